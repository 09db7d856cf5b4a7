//! The block store: where the bytes of each regular file live, and how much
//! room each tier has. It knows inode numbers, never names or FUSE.
//!
//! `host`: one shmem backing file per file, bounded by a byte-weighted LRU.
//! `nvme`: the local-disk tier's storage engine (io_uring, O_DIRECT,
//! checksummed, crash-safe); not yet wired into the filesystem.

use std::io;
use std::os::fd::RawFd;

pub mod host;
pub mod nvme;
pub mod s3;

pub use host::{HostFile, HostTier, HostUsage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Open or still-written data fills the tier; nothing can be evicted.
    #[error("host tier full: {used} of {capacity} bytes used by open or unsealed files")]
    NoSpace { used: u64, capacity: u64 },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io { op, source }
    }
}

/// Reads until `buf` is full or the end of file (retrying short reads and
/// EINTR); returns the bytes read.
pub(crate) fn pread_upto(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is valid for rest.len() bytes.
        let n = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// Reads exactly `buf.len()` bytes at `off`; an end of file first is
/// `UnexpectedEof`.
pub(crate) fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<()> {
    if pread_upto(fd, buf, off)? < buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes all of `buf` at `off`, retrying short writes and EINTR.
pub(crate) fn pwrite_all(fd: RawFd, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: rest is valid for rest.len() bytes.
        let n = unsafe {
            libc::pwrite(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
    }
    Ok(())
}
