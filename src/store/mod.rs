//! The block store: where the bytes of each regular file live, and how much
//! room each tier has. It knows inode numbers, never names or FUSE.
//!
//! `host`: one shmem backing file per file, bounded by a byte-weighted LRU.
//! `nvme`: the local-disk tier's storage engine (io_uring, O_DIRECT,
//! checksummed, crash-safe); not yet wired into the filesystem.

use std::io;
use std::os::fd::RawFd;

pub mod body_pool;
pub mod host;
pub mod nvme;
pub mod s3;

pub use host::{HostFile, HostTier, HostUsage};

/// Nice value of the threads that move data to a lower tier in the
/// background (the uploaders and the threads that send their bodies).
/// The engine's writers storing blocks come first. On the GPU machine
/// (server and clients on separate cores, 16 writer threads) the connector
/// stored 9-24% faster in four A/B pairs with the uploaders at 10, and the
/// drain moved by -4% to +5%.
pub const BACKGROUND_NICE: libc::c_int = 10;

/// Lowers the calling thread's CPU priority (Linux nice values are per
/// thread). Failure only costs the writers some CPU: logged, not fatal.
pub fn lower_this_threads_priority(nice: libc::c_int) {
    // SAFETY: plain syscalls about the calling thread; no memory is shared.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), nice, "could not lower the thread's priority");
    }
}

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

/// A file's owner and permission bits, kept with its copy in a lower tier
/// so that another mount gives them back: `uid:gid:mode`, mode in octal.
/// The NVMe tier keeps it in the `user.kvfs.owner` xattr, the S3 tier in
/// the object's `kvfs-owner` metadata; one format, parsed in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOwner {
    pub uid: u32,
    pub gid: u32,
    pub perm: u16,
}

impl FileOwner {
    pub(crate) fn encode(&self) -> String {
        format!("{}:{}:{:o}", self.uid, self.gid, self.perm & 0o7777)
    }

    /// `None` for anything but exactly `uid:gid:mode`: a value written by
    /// another tool or damaged is ignored, never trusted in part.
    pub(crate) fn decode(x: &[u8]) -> Option<FileOwner> {
        let s = std::str::from_utf8(x).ok()?;
        let mut it = s.split(':');
        let owner = FileOwner {
            uid: it.next()?.parse().ok()?,
            gid: it.next()?.parse().ok()?,
            perm: u16::from_str_radix(it.next()?, 8).ok()? & 0o7777,
        };
        it.next().is_none().then_some(owner)
    }
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

#[cfg(test)]
mod tests {
    use super::FileOwner;

    #[test]
    fn owners_round_trip_and_malformed_ones_are_none() {
        let o = FileOwner {
            uid: u32::MAX,
            gid: 7,
            perm: 0o4755,
        };
        assert_eq!(o.encode(), "4294967295:7:4755");
        assert_eq!(FileOwner::decode(o.encode().as_bytes()), Some(o));
        let bad: [&[u8]; 11] = [
            b"",
            b"1:2",
            b"1:2:9",
            b"a:2:644",
            b"1:2:644:5",
            b"1:2:-1",
            b"-1:2:644",
            b"4294967296:0:644",
            b"1:2:",
            b" 1:2:644",
            b"1:2:\xff",
        ];
        for bad in bad {
            assert_eq!(
                FileOwner::decode(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Bits above the mode are masked, as chmod would.
        assert_eq!(
            FileOwner::decode(b"0:0:177777").map(|o| o.perm),
            Some(0o7777)
        );
    }
}
