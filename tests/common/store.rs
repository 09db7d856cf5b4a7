//! The two reference connectors' store sequences, syscall for syscall as
//! DESIGN.md lists them, returning the first error instead of panicking (a
//! crash test keeps storing until the daemon is gone).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvfs::bench::connector::AlignedBuf;

/// `final` + `_<random>.tmp`, as both connectors name their temp files.
pub fn tmp_name(final_path: &Path) -> PathBuf {
    final_path.with_file_name(format!(
        "{}_{:08x}.tmp",
        final_path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        fastrand::u32(..)
    ))
}

fn whole(written: usize, want: usize) -> io::Result<()> {
    if written == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "short write: {written} of {want}"
        )))
    }
}

/// llm-d's fs connector: a temp name, one write, (optionally fsync), rename
/// while the fd is still open, then close.
pub fn llmd(final_path: &Path, data: &[u8], fsync: bool) -> io::Result<()> {
    let tmp = tmp_name(final_path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    whole(f.write(data)?, data.len())?;
    if fsync {
        f.sync_all()?;
    }
    fs::rename(&tmp, final_path)?;
    drop(f);
    Ok(())
}

/// vLLM's file tier: O_DIRECT exclusive create of a temp name, one write of
/// the whole block (a multiple of 4 KiB), close, rename.
pub fn vllm(final_path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = tmp_name(final_path);
    // Page-aligned, for O_DIRECT.
    let mut buf = AlignedBuf::zeroed(data.len());
    buf.copy_from_slice(data);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&tmp)?;
    whole(f.write(&buf)?, data.len())?;
    drop(f);
    fs::rename(&tmp, final_path)
}
