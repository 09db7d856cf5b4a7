//! Whole-block file I/O the way vLLM's file tier does it: a store writes
//! `<final>_<rand>.tmp` (O_CREAT|O_EXCL|O_WRONLY|O_DIRECT) with one `write`,
//! closes and renames it over the final name; a load opens O_DIRECT and
//! reads the block with one `read`. A short write or read is an error, as it
//! is for the connector, because a block is only ever whole or absent.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::GpuError;

/// O_DIRECT alignment for buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

fn cpath(p: &Path) -> Result<CString, GpuError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| GpuError::Io {
        op: "path",
        path: p.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> GpuError + 'a {
    move |source| GpuError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn open(path: &CString, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated; the fd is owned from here on.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Closes `fd` and reports the error `close` returns (a dropped OwnedFd
/// would swallow it, and a failed close can mean lost data).
fn close(fd: OwnedFd) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: we own fd and close it exactly once.
    if unsafe { libc::close(fd.into_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The temp name a store writes before its rename.
pub fn temp_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_os_string();
    s.push(format!("_{:016x}.tmp", fastrand::u64(..)));
    PathBuf::from(s)
}

/// Whether O_DIRECT can be used for `len`-byte blocks at `data` in `dir`:
/// aligned sizes and a filesystem that accepts the flag, probed the way
/// vLLM does (create a file with O_DIRECT, remove it).
pub fn direct_ok(dir: &Path, data_align_ok: bool, len: u64) -> bool {
    if !data_align_ok || !len.is_multiple_of(DIRECT_ALIGN as u64) {
        return false;
    }
    let probe = dir.join(format!(".o_direct_probe_{:016x}.tmp", fastrand::u64(..)));
    let Ok(c) = cpath(&probe) else { return false };
    let ok = open(
        &c,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_DIRECT,
    )
    .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Stores one block: temp file, one write, close, rename. The temp file is
/// removed on any failure.
///
/// # Safety
/// `data .. data + len` must be readable for the duration of the call.
pub unsafe fn store(
    final_path: &Path,
    data: *const u8,
    len: usize,
    direct: bool,
) -> Result<(), GpuError> {
    let tmp = temp_path(final_path);
    let c = cpath(&tmp)?;
    let mut flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let fd = retry(|| open(&c, flags)).map_err(io_err("open", &tmp))?;
    let written = retry(|| {
        // SAFETY: as the caller promised.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.cast(), len) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    });
    let result = match written {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(GpuError::Short {
            op: "write",
            path: tmp.clone(),
            expected: len as u64,
            got: n as u64,
        }),
        Err(e) => Err(io_err("write", &tmp)(e)),
    };
    let closed = close(fd).map_err(io_err("close", &tmp));
    let result = result
        .and(closed)
        .and_then(|()| std::fs::rename(&tmp, final_path).map_err(io_err("rename", &tmp)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Loads one whole block into `buf .. buf + len` with one read.
///
/// # Safety
/// `buf .. buf + len` must be writable for the duration of the call.
pub unsafe fn load(path: &Path, buf: *mut u8, len: usize, direct: bool) -> Result<(), GpuError> {
    let c = cpath(path)?;
    let mut flags = libc::O_RDONLY;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let fd = retry(|| open(&c, flags)).map_err(io_err("open", path))?;
    let got = retry(|| {
        // SAFETY: as the caller promised.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.cast(), len) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
    .map_err(io_err("read", path))?;
    close(fd).map_err(io_err("close", path))?;
    if got != len {
        return Err(GpuError::Short {
            op: "read",
            path: path.to_path_buf(),
            expected: len as u64,
            got: got as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_load_round_trips_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.bin");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        // SAFETY: data lives across the call.
        unsafe { store(&path, data.as_ptr(), data.len(), false) }.expect("store");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
        let mut back = vec![0u8; data.len()];
        // SAFETY: back lives across the call.
        unsafe { load(&path, back.as_mut_ptr(), back.len(), false) }.expect("load");
        assert_eq!(back, data);
    }

    #[test]
    fn short_read_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("short.bin");
        std::fs::write(&path, [1u8; 100]).expect("write");
        let mut buf = vec![0u8; 200];
        // SAFETY: buf lives across the call.
        let err = unsafe { load(&path, buf.as_mut_ptr(), buf.len(), false) };
        assert!(
            matches!(
                err,
                Err(GpuError::Short {
                    op: "read",
                    expected: 200,
                    got: 100,
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn failed_store_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The parent does not exist: the open fails, nothing is created.
        let path = dir.path().join("missing/a.bin");
        let data = [0u8; 16];
        // SAFETY: data lives across the call.
        assert!(unsafe { store(&path, data.as_ptr(), data.len(), false) }.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("readdir").count(), 0);
    }

    #[test]
    fn direct_needs_aligned_lengths() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!direct_ok(dir.path(), true, 4097));
        assert!(!direct_ok(dir.path(), false, 4096));
        // Whatever the filesystem says, the probe leaves nothing behind.
        let _ = direct_ok(dir.path(), true, 4096);
        assert_eq!(std::fs::read_dir(dir.path()).expect("readdir").count(), 0);
    }
}
