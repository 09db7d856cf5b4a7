//! Reference-connector engines: what vLLM's `fs` tier and the llm-d fs
//! connector do to one block file, syscall for syscall.
//!
//! This module owns the client side of the contract in `DESIGN.md`, section
//! "Semantics (what the connectors rely on)". Integration tests and
//! benchmarks drive a mount through these functions so that the filesystem
//! sees exactly the request sequence the real clients send: the same open
//! flags, one `write()`/`readv()`/`read()` per block, `rename` while the fd is
//! still open (llm-d), delete-on-short-read (vLLM), `utimensat` on a hit
//! (llm-d). It is a faithful reproduction of those syscalls, not of the
//! clients' threading, GPU staging or naming schemes; where it departs (error
//! reporting, directory names) the item's doc says so.
//!
//! Block contents come from [`fill_block`], a counter-based generator keyed
//! by (seed, index), so that [`check_block`] catches corruption, truncation
//! and two files swapped with each other.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// O_DIRECT alignment: the page size of every machine we run on, and what
/// vLLM's probe writes.
pub const PAGE: usize = 4096;

/// Model name used in both layouts.
pub const MODEL: &str = "llama3-8b";
/// Stands in for llm-d's 12-hex digest of the model/cache configuration.
pub const LLMD_CONFIG_HASH12: &str = "5f3c9a1e7b20";
/// Tensor-parallel rank in the llm-d layout.
pub const LLMD_RANK: u32 = 0;
/// KV-cache group in the llm-d layout.
pub const LLMD_GROUP: u32 = 0;

/// Which reference client to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// vLLM's `fs` secondary tier (DESIGN.md Semantics, A).
    Vllm,
    /// The llm-d fs connector's C++ engine (DESIGN.md Semantics, B).
    Llmd,
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vllm" => Ok(Pattern::Vllm),
            "llmd" => Ok(Pattern::Llmd),
            other => Err(format!(
                "unknown connector pattern {other:?} (expected \"vllm\" or \"llmd\")"
            )),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Vllm => "vllm",
            Pattern::Llmd => "llmd",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("short write to {}: {got} of {expected} bytes", path.display())]
    ShortWrite {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error("short read from {}: {got} of {expected} bytes", path.display())]
    ShortRead {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    /// The file read back in full but is not the size the run wrote.
    #[error("{} is {got} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error("{} holds wrong data from byte {offset}", path.display())]
    Corrupt { path: PathBuf, offset: usize },
    /// vLLM with O_DIRECT moves a block in one syscall, so the block itself
    /// must be whole pages; we refuse before touching the filesystem rather
    /// than let the kernel answer EINVAL halfway through a store.
    #[error(
        "{}: block of {len} bytes is not a multiple of {PAGE}; vLLM's O_DIRECT \
         store and load need whole pages (use a page-multiple size or buffered I/O)",
        path.display()
    )]
    Unaligned { path: PathBuf, len: usize },
    #[error("invalid run: {0}")]
    InvalidSpec(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ConnectorError {
    move |source| ConnectorError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// The block was already there; nothing was written.
    Skipped,
}

/// Page-aligned (4096) heap buffer for O_DIRECT.
///
/// The allocation is rounded up to whole pages (and at least one) so that a
/// zero-length buffer still has a valid, aligned pointer; the visible length
/// is exactly what was asked for.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(PAGE).max(1) * PAGE;
        let layout = match std::alloc::Layout::from_size_align(cap, PAGE) {
            Ok(layout) => layout,
            Err(_) => panic!("AlignedBuf of {len} bytes exceeds the address space"),
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Thin syscall wrappers. They exist so each engine below reads as the list of
// calls the real client makes, and so no helper adds a call of its own.

fn cpath(path: &Path) -> Result<CString, ConnectorError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ConnectorError::Io {
        op: "path",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

/// `open(2)`. O_CLOEXEC is added so fds do not leak into processes a test
/// spawns (fusermount, S3 server); the kernel keeps it out of `f_flags`, so a
/// filesystem never sees it and the request is the client's.
fn sys_open(path: &CString, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated; open has no other memory arguments.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `close(2)` with its error reported: with FUSE, close is where a flush
/// failure surfaces, and the clients treat a failed close as a failed store.
fn sys_close(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: into_raw_fd gives up ownership, so the fd is closed exactly once.
    if unsafe { libc::close(fd.into_raw_fd()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sys_write(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: data is valid for data.len() bytes for the duration of the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn sys_readv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the single iovec covers exactly buf, which outlives the call.
    let n = unsafe { libc::readv(fd.as_raw_fd(), &iov, 1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn sys_read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn sys_lseek(fd: &OwnedFd, offset: libc::off_t, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain integer arguments.
    let pos = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if pos < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pos as u64)
}

/// `stat(2)` rather than std's `statx`, because that is what both clients
/// call for a lookup.
fn sys_stat(path: &CString) -> io::Result<()> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated; st is a valid out pointer.
    if unsafe { libc::stat(path.as_ptr(), &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Python retries a syscall interrupted by a signal (PEP 475), so the vLLM
/// engine does too; the C++ engine does not.
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `final` + `_<16 random hex>.tmp`, the shape both clients use, so that
/// concurrent writers of one block never share a temp file.
fn temp_path(final_path: &Path) -> PathBuf {
    let mut name = OsString::from(final_path.as_os_str());
    name.push(format!("_{:016x}.tmp", fastrand::u64(..)));
    PathBuf::from(name)
}

/// `mkdir -p`. std tries `mkdir` before looking, where Python's `makedirs`
/// and C++'s `create_directories` stat first; either way a filesystem sees
/// lookups and mkdirs of the same names, and only the order differs.
fn mkdir_parent(final_path: &Path) -> Result<(), ConnectorError> {
    match final_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            std::fs::create_dir_all(parent).map_err(io_err("mkdir", parent))
        }
        _ => Ok(()),
    }
}

/// Both clients remove their temp file on failure; a failure to remove it is
/// not reported over the error that caused it.
fn discard_temp(tmp: &Path) {
    if let Err(e) = std::fs::remove_file(tmp) {
        tracing::debug!(path = %tmp.display(), error = %e, "temp file not removed");
    }
}

// ---------------------------------------------------------------------------
// A. vLLM's `fs` tier.

/// vLLM's start-up probe: can files under `root` be opened with O_DIRECT?
///
/// The client falls back to buffered I/O for good on any failure. We do the
/// same when the failure is about O_DIRECT (open answering EINVAL, the page
/// write failing or coming back short), but report a root where no file can
/// be created at all as an error: the real client would then fail every
/// store, and a benchmark should say so rather than quietly measure nothing.
/// A probe file that cannot be removed is an error too, since it would be
/// left behind in the cache directory.
pub fn vllm_probe_o_direct(root: &Path) -> Result<bool, ConnectorError> {
    let probe = root.join(format!(".o_direct_probe_{:016x}.tmp", fastrand::u64(..)));
    let c = cpath(&probe)?;
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_DIRECT;
    let fd = match sys_open(&c, flags, 0o644) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(root = %root.display(), "O_DIRECT open refused; buffered I/O");
            return Ok(false);
        }
        Err(e) => return Err(io_err("open", &probe)(e)),
    };
    let page = AlignedBuf::zeroed(PAGE);
    let written = retry_eintr(|| sys_write(&fd, &page));
    let closed = sys_close(fd);
    std::fs::remove_file(&probe).map_err(io_err("unlink", &probe))?;
    let works = matches!(written, Ok(n) if n == PAGE) && closed.is_ok();
    if !works {
        tracing::debug!(root = %root.display(), ?written, ?closed, "O_DIRECT probe failed; buffered I/O");
    }
    Ok(works)
}

fn check_direct_len(path: &Path, len: usize, o_direct: bool) -> Result<(), ConnectorError> {
    if o_direct && !len.is_multiple_of(PAGE) {
        return Err(ConnectorError::Unaligned {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

/// vLLM store: `stat`; `mkdir -p`; `open(tmp, O_CREAT|O_EXCL|O_WRONLY|
/// O_TRUNC[|O_DIRECT], 0644)`; one `write()`; `close`; `rename(tmp, final)`.
///
/// `os.path.exists` is false on any stat error, so any error means "store".
/// The temp file is removed on every failure after it was created; a failed
/// open created nothing of ours to remove.
pub fn vllm_store(
    final_path: &Path,
    data: &AlignedBuf,
    o_direct: bool,
) -> Result<StoreOutcome, ConnectorError> {
    check_direct_len(final_path, data.len(), o_direct)?;
    let c_final = cpath(final_path)?;
    if sys_stat(&c_final).is_ok() {
        return Ok(StoreOutcome::Skipped);
    }
    mkdir_parent(final_path)?;
    let tmp = temp_path(final_path);
    let c_tmp = cpath(&tmp)?;
    let mut flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_TRUNC;
    if o_direct {
        flags |= libc::O_DIRECT;
    }
    let fd = retry_eintr(|| sys_open(&c_tmp, flags, 0o644)).map_err(io_err("open", &tmp))?;
    let result = (|| {
        let n = retry_eintr(|| sys_write(&fd, data)).map_err(io_err("write", &tmp))?;
        if n != data.len() {
            return Err(ConnectorError::ShortWrite {
                path: tmp.clone(),
                expected: data.len(),
                got: n,
            });
        }
        Ok(())
    })();
    // Closed before any removal, and on the error path too, as Python's
    // `with`/`finally` does.
    let closed = sys_close(fd).map_err(io_err("close", &tmp));
    let result = result
        .and(closed)
        .and_then(|()| std::fs::rename(&tmp, final_path).map_err(io_err("rename", &tmp)));
    if let Err(e) = result {
        discard_temp(&tmp);
        return Err(e);
    }
    Ok(StoreOutcome::Stored)
}

/// vLLM load: `open(final, O_RDONLY[|O_DIRECT])`; one `readv()` of
/// `buf.len()` bytes; `close`. A short read or any error deletes the file,
/// because the client treats such a block as bad and never offers it again.
pub fn vllm_load(
    final_path: &Path,
    buf: &mut AlignedBuf,
    o_direct: bool,
) -> Result<(), ConnectorError> {
    // A caller mistake, not a bad file: refused before the file is touched.
    check_direct_len(final_path, buf.len(), o_direct)?;
    let result = vllm_load_inner(final_path, buf, o_direct);
    if result.is_err()
        && let Err(e) = std::fs::remove_file(final_path)
    {
        tracing::debug!(path = %final_path.display(), error = %e, "bad block not removed");
    }
    result
}

fn vllm_load_inner(
    final_path: &Path,
    buf: &mut AlignedBuf,
    o_direct: bool,
) -> Result<(), ConnectorError> {
    let c = cpath(final_path)?;
    let mut flags = libc::O_RDONLY;
    if o_direct {
        flags |= libc::O_DIRECT;
    }
    let fd = retry_eintr(|| sys_open(&c, flags, 0)).map_err(io_err("open", final_path))?;
    let read = retry_eintr(|| sys_readv(&fd, buf)).map_err(io_err("readv", final_path));
    let closed = sys_close(fd).map_err(io_err("close", final_path));
    let n = read?;
    closed?;
    if n != buf.len() {
        return Err(ConnectorError::ShortRead {
            path: final_path.to_path_buf(),
            expected: buf.len(),
            got: n,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// B. llm-d fs connector engine.

/// llm-d store. Hit: `open(final, O_RDONLY)`, `utimensat(atime=now,
/// mtime=omit)`, `close`. Miss: `mkdir -p`, `open(tmp, O_WRONLY|O_CREAT|
/// O_TRUNC, 0644)`, one `write()`, `rename(tmp, final)` with the fd still
/// open, `close`; no fsync.
///
/// The real engine only logs a failed `utimensat` or `close`; we return them
/// as errors, because atime upkeep and close are part of what kvfs promises
/// and a test should see them fail.
pub fn llmd_store(final_path: &Path, data: &[u8]) -> Result<StoreOutcome, ConnectorError> {
    let c_final = cpath(final_path)?;
    if let Ok(fd) = sys_open(&c_final, libc::O_RDONLY, 0) {
        // atime is what llm-d's evictor ranks by, so a hit refreshes it while
        // leaving mtime alone.
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        // SAFETY: path is NUL-terminated and times has the two entries
        // utimensat reads.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c_final.as_ptr(), times.as_ptr(), 0) };
        let touched = if rc == -1 {
            Err(io_err("utimensat", final_path)(io::Error::last_os_error()))
        } else {
            Ok(())
        };
        let closed = sys_close(fd).map_err(io_err("close", final_path));
        touched?;
        closed?;
        return Ok(StoreOutcome::Skipped);
    }
    mkdir_parent(final_path)?;
    let tmp = temp_path(final_path);
    let c_tmp = cpath(&tmp)?;
    let fd = sys_open(
        &c_tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        0o644,
    )
    .map_err(io_err("open", &tmp))?;
    let result = (|| {
        let n = sys_write(&fd, data).map_err(io_err("write", &tmp))?;
        if n != data.len() {
            return Err(ConnectorError::ShortWrite {
                path: tmp.clone(),
                expected: data.len(),
                got: n,
            });
        }
        // Published before close: from here on other readers must see the
        // whole block although this writer has not closed yet.
        std::fs::rename(&tmp, final_path).map_err(io_err("rename", &tmp))
    })();
    let closed = sys_close(fd).map_err(io_err("close", final_path));
    if let Err(e) = result {
        discard_temp(&tmp);
        return Err(e);
    }
    // After a successful rename there is no temp file left to remove.
    closed?;
    Ok(StoreOutcome::Stored)
}

/// llm-d load: `stat`; `open(final, O_RDONLY)`; `lseek(0, SEEK_END)` for the
/// size; `lseek` to where the wanted data starts (always 0 here: we load the
/// whole file); one `read()` of the rest. Returns the file size; `buf` is
/// resized to it, which allocates only when the size changes.
pub fn llmd_load(final_path: &Path, buf: &mut Vec<u8>) -> Result<usize, ConnectorError> {
    let c = cpath(final_path)?;
    sys_stat(&c).map_err(io_err("stat", final_path))?;
    let fd = sys_open(&c, libc::O_RDONLY, 0).map_err(io_err("open", final_path))?;
    let result = (|| {
        let size = sys_lseek(&fd, 0, libc::SEEK_END).map_err(io_err("lseek", final_path))?;
        // kvfs only builds for 64-bit Linux, where a file size fits a usize.
        let size = size as usize;
        sys_lseek(&fd, 0, libc::SEEK_SET).map_err(io_err("lseek", final_path))?;
        buf.resize(size, 0);
        let n = sys_read(&fd, buf).map_err(io_err("read", final_path))?;
        if n != size {
            return Err(ConnectorError::ShortRead {
                path: final_path.to_path_buf(),
                expected: size,
                got: n,
            });
        }
        Ok(size)
    })();
    let closed = sys_close(fd).map_err(io_err("close", final_path));
    let size = result?;
    closed?;
    Ok(size)
}

// ---------------------------------------------------------------------------
// Block naming and contents.

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The 16-hex "block hash" of block `index`: scattered like a real content
/// hash, so directories fill evenly.
pub fn block_hash(index: u64) -> String {
    format!("{:016x}", splitmix(index.wrapping_add(GOLDEN)))
}

/// Path of block `index` under `root`.
///
/// - Llmd: `<root>/<model>_<hash12>_r<rank>/<hhh>/<hh>_g<group>/<hash>.bin`,
///   `hhh` the first 3 hex digits of the block hash and `hh` the next 2, as
///   the llm-d engine fans out its directories (`MODEL`,
///   `LLMD_CONFIG_HASH12`, `LLMD_RANK`, `LLMD_GROUP`). The engine's
///   `<model>_<hash12>/config.json` is not written: no data path reads it.
/// - Vllm: `<root>/<model>/<hash[0..2]>/<hash>.bin`. A stand-in: the real
///   tier names its directories differently, but what kvfs sees of it is its
///   syscalls, which do not depend on the names.
pub fn block_path(root: &Path, pattern: Pattern, index: u64) -> PathBuf {
    let hash = block_hash(index);
    match pattern {
        Pattern::Llmd => root
            .join(format!("{MODEL}_{LLMD_CONFIG_HASH12}_r{LLMD_RANK}"))
            .join(&hash[..3])
            .join(format!("{}_g{LLMD_GROUP}", &hash[3..5]))
            .join(format!("{hash}.bin")),
        Pattern::Vllm => root
            .join(MODEL)
            .join(&hash[..2])
            .join(format!("{hash}.bin")),
    }
}

/// Start of block (seed, index)'s word stream; distinct for every pair in
/// practice, so a file swapped for another differs from its first word.
fn block_key(seed: u64, index: u64) -> u64 {
    splitmix(seed ^ splitmix(index.wrapping_add(GOLDEN)))
}

/// Word `i` of a block: splitmix64 in counter form, so words are independent
/// of each other and the loop vectorises (a 32 MiB block fills in a few ms).
#[inline]
fn block_word(key: u64, i: u64) -> u64 {
    splitmix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Deterministic content of block `index` in a run seeded with `seed`.
pub fn fill_block(buf: &mut [u8], seed: u64, index: u64) {
    let key = block_key(seed, index);
    let mut chunks = buf.chunks_exact_mut(8);
    let mut i = 0u64;
    for chunk in &mut chunks {
        chunk.copy_from_slice(&block_word(key, i).to_le_bytes());
        i += 1;
    }
    let tail = chunks.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&block_word(key, i).to_le_bytes()[..n]);
}

/// First offset where `buf` differs from `fill_block(seed, index)`, or None.
pub fn check_block(buf: &[u8], seed: u64, index: u64) -> Option<usize> {
    let key = block_key(seed, index);
    let first_diff = |base: usize, got: &[u8], want: &[u8]| {
        got.iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .map(|p| base + p)
    };
    let mut chunks = buf.chunks_exact(8);
    let mut i = 0u64;
    for chunk in &mut chunks {
        let want = block_word(key, i).to_le_bytes();
        if chunk != want {
            return first_diff(i as usize * 8, chunk, &want);
        }
        i += 1;
    }
    let tail = chunks.remainder();
    first_diff(i as usize * 8, tail, &block_word(key, i).to_le_bytes())
}

// ---------------------------------------------------------------------------
// Whole runs.

/// One store or load phase over files `0..files`.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub root: PathBuf,
    pub pattern: Pattern,
    pub files: u64,
    pub file_size: usize,
    pub threads: usize,
    pub seed: u64,
}

/// Result of one phase.
///
/// `seconds` is I/O time only: each thread sums the time spent inside the
/// connector call (store or load, i.e. the syscall sequence), and `seconds`
/// is the largest such sum. Generating content before a store and checking
/// it after a load are left out, since they are the benchmark's own work,
/// not the client's. With one thread this is wall time minus that work; with
/// several it is the busiest thread's share of the I/O. `bytes` counts data
/// moved: a skipped store moves none (its lookup time still counts).
/// `gbps` is `bytes / seconds / 1e9`. `first_io_unix_s` and
/// `last_io_unix_s` are the wall-clock times (seconds since the epoch) at
/// which the first file's I/O began and the last one's ended, so that a
/// caller timing what follows the writes (an upload drain) can start its
/// clock at the first byte rather than at this process's start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub phase: String,
    pub pattern: String,
    pub files: u64,
    pub skipped: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    pub first_io_unix_s: Option<f64>,
    pub last_io_unix_s: Option<f64>,
}

#[derive(Default)]
struct Tally {
    io_time: Duration,
    skipped: u64,
    bytes: u64,
    first_io: Option<SystemTime>,
    last_io: Option<SystemTime>,
}

impl Tally {
    /// Marks the start of one file's I/O.
    fn begin(&mut self) -> Instant {
        let now = SystemTime::now();
        self.first_io = Some(self.first_io.map_or(now, |f| f.min(now)));
        Instant::now()
    }

    /// Marks the end of the I/O begun at `started`.
    fn end(&mut self, started: Instant) {
        self.io_time += started.elapsed();
        self.last_io = Some(SystemTime::now());
    }
}

fn unix_s(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// Runs `work(index, &mut tally)` for every file on `spec.threads` threads.
/// Threads pull the next index from a shared counter, as the clients' I/O
/// pools pull jobs from a queue; the first error stops the others.
fn run_phase<S, F>(
    spec: &RunSpec,
    init: impl Fn() -> S + Sync,
    work: F,
) -> Result<Tally, ConnectorError>
where
    F: Fn(&mut S, u64, &mut Tally) -> Result<(), ConnectorError> + Sync,
{
    if spec.threads == 0 {
        return Err(ConnectorError::InvalidSpec(
            "threads must be at least 1".into(),
        ));
    }
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<ConnectorError>> = Mutex::new(None);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.threads)
            .map(|_| {
                s.spawn(|| {
                    let mut state = init();
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= spec.files {
                            break;
                        }
                        if let Err(e) = work(&mut state, index, &mut tally) {
                            stop.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(e);
                            break;
                        }
                    }
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut total = Tally::default();
    for t in tallies {
        total.io_time = total.io_time.max(t.io_time);
        total.first_io = total.first_io.into_iter().chain(t.first_io).min();
        total.last_io = total.last_io.into_iter().chain(t.last_io).max();
        total.skipped += t.skipped;
        total.bytes += t.bytes;
    }
    Ok(total)
}

fn report(spec: &RunSpec, phase: &str, tally: Tally) -> RunReport {
    let seconds = tally.io_time.as_secs_f64();
    RunReport {
        phase: phase.to_string(),
        pattern: spec.pattern.to_string(),
        files: spec.files,
        skipped: tally.skipped,
        bytes: tally.bytes,
        seconds,
        gbps: if seconds > 0.0 {
            tally.bytes as f64 / seconds / 1e9
        } else {
            0.0
        },
        first_io_unix_s: unix_s(tally.first_io),
        last_io_unix_s: unix_s(tally.last_io),
    }
}

/// The vLLM client probes once at start and sticks to the answer; each run
/// stands for one client start.
fn start_client(spec: &RunSpec) -> Result<bool, ConnectorError> {
    match spec.pattern {
        Pattern::Llmd => Ok(false),
        Pattern::Vllm => {
            let o_direct = vllm_probe_o_direct(&spec.root)?;
            check_direct_len(&spec.root, spec.file_size, o_direct)?;
            Ok(o_direct)
        }
    }
}

/// Stores files `0..files` split over `threads` threads, each with its own
/// [`AlignedBuf`] filled per file by [`fill_block`]. Runs the vLLM probe
/// first for [`Pattern::Vllm`] and uses its answer.
pub fn run_store(spec: &RunSpec) -> Result<RunReport, ConnectorError> {
    let o_direct = start_client(spec)?;
    let tally = run_phase(
        spec,
        || AlignedBuf::zeroed(spec.file_size),
        |buf, index, tally| {
            fill_block(buf, spec.seed, index);
            let path = block_path(&spec.root, spec.pattern, index);
            let t0 = tally.begin();
            let outcome = match spec.pattern {
                Pattern::Vllm => vllm_store(&path, buf, o_direct),
                Pattern::Llmd => llmd_store(&path, buf),
            }?;
            tally.end(t0);
            match outcome {
                StoreOutcome::Stored => tally.bytes += spec.file_size as u64,
                StoreOutcome::Skipped => tally.skipped += 1,
            }
            Ok(())
        },
    )?;
    Ok(report(spec, "store", tally))
}

enum LoadBuf {
    Aligned(AlignedBuf),
    Plain(Vec<u8>),
}

/// Loads files `0..files` back the way the pattern's client does and checks
/// every byte with [`check_block`]; a mismatch is [`ConnectorError::Corrupt`],
/// a file of the wrong size [`ConnectorError::SizeMismatch`]. Note that a
/// failed vLLM load deletes the file, exactly as the client would.
pub fn run_load(spec: &RunSpec) -> Result<RunReport, ConnectorError> {
    let o_direct = start_client(spec)?;
    let tally = run_phase(
        spec,
        || match spec.pattern {
            Pattern::Vllm => LoadBuf::Aligned(AlignedBuf::zeroed(spec.file_size)),
            Pattern::Llmd => LoadBuf::Plain(Vec::with_capacity(spec.file_size)),
        },
        |buf, index, tally| {
            let path = block_path(&spec.root, spec.pattern, index);
            let t0 = tally.begin();
            let data: &[u8] = match buf {
                LoadBuf::Aligned(b) => {
                    vllm_load(&path, b, o_direct)?;
                    b
                }
                LoadBuf::Plain(v) => {
                    let n = llmd_load(&path, v)?;
                    if n != spec.file_size {
                        return Err(ConnectorError::SizeMismatch {
                            path,
                            expected: spec.file_size,
                            got: n,
                        });
                    }
                    v
                }
            };
            tally.end(t0);
            if let Some(offset) = check_block(data, spec.seed, index) {
                return Err(ConnectorError::Corrupt { path, offset });
            }
            tally.bytes += spec.file_size as u64;
            Ok(())
        },
    )?;
    Ok(report(spec, "load", tally))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: usize = 1 << 20;

    fn filled(len: usize, seed: u64, index: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        fill_block(&mut buf, seed, index);
        buf
    }

    /// Every file under `dir` whose name ends in `.tmp`.
    fn leftovers(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.to_string_lossy().ends_with(".tmp") {
                    found.push(path);
                }
            }
        }
        found
    }

    fn set_times(path: &Path, atime: libc::timespec, mtime: libc::timespec) {
        let c = cpath(path).expect("path");
        let times = [atime, mtime];
        // SAFETY: valid path and two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(rc, 0, "utimensat: {}", io::Error::last_os_error());
    }

    #[test]
    fn aligned_buf_is_page_aligned_and_zeroed() {
        for len in [0, 1, PAGE - 1, PAGE, 3 * PAGE + 5] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % PAGE, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn pattern_parses_and_prints() {
        for p in [Pattern::Vllm, Pattern::Llmd] {
            assert_eq!(p.to_string().parse::<Pattern>(), Ok(p));
        }
        assert!("lmcache".parse::<Pattern>().is_err());
    }

    #[test]
    fn layouts_match_the_clients() {
        let root = Path::new("/kv");
        let hash = block_hash(7);
        assert_eq!(hash.len(), 16);
        assert_eq!(
            block_path(root, Pattern::Llmd, 7),
            PathBuf::from(format!(
                "/kv/llama3-8b_{LLMD_CONFIG_HASH12}_r0/{}/{}_g0/{hash}.bin",
                &hash[..3],
                &hash[3..5]
            ))
        );
        assert_eq!(
            block_path(root, Pattern::Vllm, 7),
            PathBuf::from(format!("/kv/llama3-8b/{}/{hash}.bin", &hash[..2]))
        );
        assert_ne!(block_hash(7), block_hash(8));
    }

    #[test]
    fn fill_check_detect_flip_truncation_and_swap() {
        let len = MIB + 123;
        let mut a = filled(len, 42, 1);
        let b = filled(len, 42, 2);
        assert_eq!(check_block(&a, 42, 1), None);
        assert_eq!(check_block(&b, 42, 2), None);
        // Swapped files: each fails against the other's index, at once.
        assert_eq!(check_block(&a, 42, 2), Some(0));
        assert_eq!(check_block(&b, 42, 1), Some(0));
        // Another run's seed is another content.
        assert!(check_block(&a, 43, 1).is_some());
        for offset in [0, 4097, len - 1] {
            a[offset] ^= 0x10;
            assert_eq!(check_block(&a, 42, 1), Some(offset));
            a[offset] ^= 0x10;
        }
        // A truncated copy still matches its prefix; the caller checks the
        // length, which the loaders do.
        assert_eq!(check_block(&a[..len - 7], 42, 1), None);
    }

    #[test]
    fn llmd_roundtrip_odd_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = MIB + 123;
        let data = filled(len, 9, 3);
        let path = block_path(dir.path(), Pattern::Llmd, 3);
        assert_eq!(
            llmd_store(&path, &data).expect("store"),
            StoreOutcome::Stored
        );
        let mut buf = Vec::new();
        assert_eq!(llmd_load(&path, &mut buf).expect("load"), len);
        assert_eq!(buf.len(), len);
        assert_eq!(check_block(&buf, 9, 3), None);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o644 & !current_umask()
        );
        assert!(leftovers(dir.path()).is_empty());
    }

    /// Read from /proc rather than with umask(2), which would briefly change
    /// it for the tests running beside this one.
    fn current_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .expect("Umask line");
        u32::from_str_radix(line.trim(), 8).expect("octal umask")
    }

    #[test]
    fn vllm_roundtrip_with_probe_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o_direct = vllm_probe_o_direct(dir.path()).expect("probe");
        // The probe leaves nothing behind, whatever it found.
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0);
        let len = MIB + 5 * PAGE;
        let data = filled(len, 1, 11);
        let path = block_path(dir.path(), Pattern::Vllm, 11);
        assert_eq!(
            vllm_store(&path, &data, o_direct).expect("store"),
            StoreOutcome::Stored
        );
        let mut buf = AlignedBuf::zeroed(len);
        vllm_load(&path, &mut buf, o_direct).expect("load");
        assert_eq!(check_block(&buf, 1, 11), None);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn vllm_buffered_takes_odd_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = MIB + 123;
        let data = filled(len, 2, 5);
        let path = block_path(dir.path(), Pattern::Vllm, 5);
        assert_eq!(
            vllm_store(&path, &data, false).expect("store"),
            StoreOutcome::Stored
        );
        let mut buf = AlignedBuf::zeroed(len);
        vllm_load(&path, &mut buf, false).expect("load");
        assert_eq!(check_block(&buf, 2, 5), None);
    }

    #[test]
    fn vllm_o_direct_refuses_unaligned_block_before_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = filled(MIB + 123, 2, 5);
        let path = block_path(dir.path(), Pattern::Vllm, 5);
        let err = vllm_store(&path, &data, true).expect_err("unaligned store");
        assert!(matches!(err, ConnectorError::Unaligned { len, .. } if len == MIB + 123));
        assert!(err.to_string().contains("multiple of 4096"));
        // Nothing was created, not even the directory.
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0);
        let mut buf = AlignedBuf::zeroed(MIB + 123);
        assert!(matches!(
            vllm_load(&path, &mut buf, true),
            Err(ConnectorError::Unaligned { .. })
        ));
    }

    #[test]
    fn vllm_second_store_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o_direct = vllm_probe_o_direct(dir.path()).expect("probe");
        let path = block_path(dir.path(), Pattern::Vllm, 1);
        let data = filled(64 * 1024, 3, 1);
        assert_eq!(
            vllm_store(&path, &data, o_direct).expect("store"),
            StoreOutcome::Stored
        );
        let other = filled(64 * 1024, 3, 2);
        assert_eq!(
            vllm_store(&path, &other, o_direct).expect("store"),
            StoreOutcome::Skipped
        );
        let mut buf = AlignedBuf::zeroed(64 * 1024);
        vllm_load(&path, &mut buf, o_direct).expect("load");
        assert_eq!(check_block(&buf, 3, 1), None, "skip must not overwrite");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn llmd_hit_refreshes_atime_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = block_path(dir.path(), Pattern::Llmd, 4);
        let data = filled(MIB + 123, 4, 4);
        assert_eq!(
            llmd_store(&path, &data).expect("store"),
            StoreOutcome::Stored
        );
        let old = libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        };
        let mtime = libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 123,
        };
        set_times(&path, old, mtime);
        let before = std::fs::metadata(&path).expect("stat");
        assert_eq!(before.atime(), 1_000_000);

        assert_eq!(
            llmd_store(&path, &data).expect("store"),
            StoreOutcome::Skipped
        );
        let after = std::fs::metadata(&path).expect("stat");
        assert!(after.atime() > 1_000_000, "atime not refreshed");
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec()),
            "mtime must be left alone"
        );
        assert_eq!(after.len(), data.len() as u64);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn vllm_short_read_deletes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o_direct = vllm_probe_o_direct(dir.path()).expect("probe");
        let len = MIB;
        let path = block_path(dir.path(), Pattern::Vllm, 6);
        vllm_store(&path, &filled(len, 6, 6), o_direct).expect("store");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len((len / 2) as u64))
            .expect("truncate");
        let mut buf = AlignedBuf::zeroed(len);
        match vllm_load(&path, &mut buf, o_direct) {
            Err(ConnectorError::ShortRead { expected, got, .. }) => {
                assert_eq!((expected, got), (len, len / 2));
            }
            other => panic!("expected ShortRead, got {other:?}"),
        }
        assert!(!path.exists(), "bad block must be deleted");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn llmd_short_file_is_reported_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = block_path(dir.path(), Pattern::Llmd, 8);
        llmd_store(&path, &filled(MIB + 123, 8, 8)).expect("store");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(1000))
            .expect("truncate");
        let mut buf = Vec::new();
        assert_eq!(llmd_load(&path, &mut buf).expect("load"), 1000);
        assert_eq!(buf.len(), 1000);
    }

    #[test]
    fn store_into_a_file_as_parent_fails_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("llama3-8b");
        std::fs::write(&blocker, b"not a directory").expect("write");
        let path = block_path(dir.path(), Pattern::Vllm, 1);
        let err = vllm_store(&path, &filled(PAGE, 0, 1), false).expect_err("store");
        assert!(
            matches!(err, ConnectorError::Io { op: "mkdir", .. }),
            "{err}"
        );
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn runs_roundtrip_skip_and_catch_corruption() {
        for pattern in [Pattern::Vllm, Pattern::Llmd] {
            let dir = tempfile::tempdir().expect("tempdir");
            let spec = RunSpec {
                root: dir.path().to_path_buf(),
                pattern,
                files: 24,
                file_size: 16 * PAGE,
                threads: 4,
                seed: 77,
            };
            let before = unix_s(Some(SystemTime::now())).expect("clock");
            let stored = run_store(&spec).expect("run_store");
            let after = unix_s(Some(SystemTime::now())).expect("clock");
            assert_eq!((stored.files, stored.skipped), (24, 0));
            // The I/O span lies within the call and holds the I/O time.
            let (first, last) = (
                stored.first_io_unix_s.expect("first I/O"),
                stored.last_io_unix_s.expect("last I/O"),
            );
            assert!(before <= first && first <= last && last <= after);
            assert!(last - first >= stored.seconds - 1e-3, "{stored:?}");
            assert_eq!(stored.bytes, 24 * 16 * PAGE as u64);
            assert_eq!(stored.pattern, pattern.to_string());
            let again = run_store(&spec).expect("run_store again");
            assert_eq!((again.skipped, again.bytes), (24, 0));
            let loaded = run_load(&spec).expect("run_load");
            assert_eq!(loaded.phase, "load");
            assert_eq!(loaded.bytes, stored.bytes);
            assert!(leftovers(dir.path()).is_empty());

            // Swap two files: the run must notice.
            let (p3, p9) = (
                block_path(dir.path(), pattern, 3),
                block_path(dir.path(), pattern, 9),
            );
            let tmp = dir.path().join("swap");
            std::fs::rename(&p3, &tmp).expect("rename");
            std::fs::rename(&p9, &p3).expect("rename");
            std::fs::rename(&tmp, &p9).expect("rename");
            match run_load(&spec) {
                Err(ConnectorError::Corrupt { offset: 0, .. }) => {}
                other => panic!("expected Corrupt at 0, got {other:?}"),
            }
        }
    }

    #[test]
    fn run_rejects_zero_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = RunSpec {
            root: dir.path().to_path_buf(),
            pattern: Pattern::Llmd,
            files: 1,
            file_size: PAGE,
            threads: 0,
            seed: 0,
        };
        assert!(matches!(
            run_store(&spec),
            Err(ConnectorError::InvalidSpec(_))
        ));
    }
}
