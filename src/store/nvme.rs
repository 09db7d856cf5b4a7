//! The NVMe tier's storage engine: whole block files in a directory on a
//! local disk, written and read through io_uring.
//!
//! It owns one directory (`NvmeConfig::dir`):
//!
//! ```text
//! dir/lock        flock'd while a tier is open, so two daemons never share dir
//! dir/tmp/<n>     files being written; anything found here at open is a crash leftover
//! dir/data/<key>  finished files, `key` being the file's path in the mount
//! ```
//!
//! Each file under `data/` carries its metadata as two xattrs:
//! `user.kvfs.crc32c` (crc32c of the contents, 8 hex digits) and
//! `user.kvfs.len` (the length in decimal). Recovery after a restart is a
//! scan of names, stats and xattrs only ([`NvmeTier::scan`]); contents are
//! verified lazily, on every read ([`NvmeTier::get_to_fd`]), and a copy that
//! does not match its checksum is deleted and reported as
//! [`NvmeError::Corrupt`]: this tier returns whole, correct bytes or nothing.
//!
//! Crash safety: a file is written under `tmp/`, its xattrs set, then it is
//! fsync'd, renamed to its real name and the directory fsync'd. A crash
//! therefore never leaves a torn file under a real name: at worst a leftover
//! in `tmp/` (removed at open) or, on a filesystem that reorders more than
//! ext4/xfs do, a file without valid xattrs (removed by the scan).
//!
//! I/O: the tier probes O_DIRECT at open. Where it works, data moves in
//! page-aligned buffers that bypass the page cache (a block the host tier
//! already holds in memory should not be cached a second time); the tail of
//! a file is written padded to a whole page and the file truncated back.
//! Memory filesystems (tmpfs, ramfs) and filesystems that reject O_DIRECT use
//! buffered I/O instead, with one warning at open.

use std::alloc::Layout;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::{pread_full, pwrite_all};

use io_uring::{IoUring, opcode, types};

/// Bytes per I/O request. 1 MiB keeps an NVMe device streaming while the
/// copy to or from the other fd happens between requests.
const CHUNK: usize = 1 << 20;
/// Requests in flight per transfer: enough to keep one device queue busy
/// while the CPU copies the next chunk.
const DEPTH: usize = 4;
/// Where earlier builds parked copies during a rename: no file of the mount
/// can have this name (the root's `.kvfs` is the control directory).
const PARKED: &str = ".kvfs";
/// Longest a write-back chunk waits for promotions: write-back must go on
/// under a steady read load, or the writers behind it would stall.
const MAX_YIELD: std::time::Duration = std::time::Duration::from_millis(20);
/// O_DIRECT alignment (offsets, lengths and buffer addresses).
const ALIGN: usize = 4096;
/// Idle engines kept for reuse; each holds DEPTH * CHUNK bytes of buffers.
const MAX_IDLE_ENGINES: usize = 4;

const XATTR_CRC: &CStr = c"user.kvfs.crc32c";
const XATTR_LEN: &CStr = c"user.kvfs.len";
const XATTR_OWNER: &CStr = c"user.kvfs.owner";

/// KV-cache contents reveal the prompts they were computed from.
const FILE_MODE: libc::mode_t = 0o600;
const DIR_MODE: u32 = 0o700;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

#[derive(Debug, Clone)]
pub struct NvmeConfig {
    pub dir: PathBuf,
    /// Bytes the tier may allocate on disk (`st_blocks`, not file sizes).
    pub capacity: u64,
}

/// A file found under `data/` at scan time with valid metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub key: String,
    pub len: u64,
    pub crc: u32,
    pub mtime: SystemTime,
    /// The file's owner and mode when it was written or last changed, if
    /// recorded.
    pub owner: Option<FileOwner>,
}

/// A file's owner and mode, kept beside its copy in `user.kvfs.owner` so a
/// remount gives them back; the S3 tier stores the same format.
pub use super::FileOwner;

/// What did not match when a copy was read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Checksum {
        expected: u32,
        actual: u32,
    },
    Length {
        expected: u64,
        actual: u64,
    },
    /// The xattrs are missing or unreadable.
    Metadata,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Checksum { expected, actual } => {
                write!(f, "crc32c {actual:08x}, expected {expected:08x}")
            }
            Mismatch::Length { expected, actual } => {
                write!(f, "{actual} bytes, expected {expected}")
            }
            Mismatch::Metadata => f.write_str("missing or malformed kvfs xattrs"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The copy was bad and has been deleted; treat the file as missing.
    #[error("NVMe copy of {key:?} is corrupt ({mismatch}); discarded")]
    Corrupt { key: String, mismatch: Mismatch },
    #[error("no NVMe copy of {key:?}")]
    NotFound { key: String },
    /// The tier's capacity (or the disk itself) has no room for `needed` bytes.
    #[error("NVMe tier full: {needed} bytes wanted, {used} of {capacity} used")]
    NoSpace {
        needed: u64,
        used: u64,
        capacity: u64,
    },
    #[error("bad key {0:?}: must be a relative path without empty, \".\" or \"..\" components")]
    BadKey(String),
    #[error("{} is in use by another kvfs process", dir.display())]
    Locked { dir: PathBuf },
}

impl NvmeError {
    /// The tier has no (valid) copy: the caller should look elsewhere or
    /// answer ENOENT.
    pub fn is_missing(&self) -> bool {
        matches!(self, NvmeError::Corrupt { .. } | NvmeError::NotFound { .. })
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NvmeError {
    move |source| NvmeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One tier per directory. All methods take `&self` and may run on many
/// threads at once.
///
/// io_uring: each transfer checks an engine (a ring plus its registered
/// buffers) out of a small pool and returns it afterwards, rather than
/// sharing one ring behind a mutex: a single ring would make a foreground
/// read wait behind a background flush of a whole block, and the pool costs
/// only a ring and 4 MiB of buffers per concurrent transfer.
pub struct NvmeTier {
    data: PathBuf,
    tmp: PathBuf,
    capacity: u64,
    o_direct: bool,
    used: AtomicU64,
    next_tmp: AtomicU64,
    engines: Mutex<Vec<Engine>>,
    /// Serialises changes to names under `data/`: creating parent
    /// directories vs removing empty ones, and stat-then-rename when a file
    /// replaces another (accounting). Held for metadata syscalls only, never
    /// across data I/O or fsync.
    names: Mutex<()>,
    /// Reads a caller waits for (promotions) in progress: write-backs, which
    /// nobody waits for, hold back their next chunk while there are any.
    readers: AtomicUsize,
    _lock: fs::File,
}

impl std::fmt::Debug for NvmeTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeTier")
            .field("data", &self.data)
            .field("o_direct", &self.o_direct)
            .field("used", &self.used())
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn lock_or_recover<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded value is consistent on its own; a panic elsewhere must
    // not wedge the tier.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks that `key` names a file strictly inside `data/`.
fn check_key(key: &str) -> Result<&str, NvmeError> {
    let bad = key.is_empty()
        || key.contains('\0')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(NvmeError::BadKey(key.to_owned()))
    } else {
        Ok(key)
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl NvmeTier {
    /// Opens (creating if needed) the tier in `cfg.dir`, removes crash
    /// leftovers from `tmp/`, and scans `data/` (see [`NvmeTier::scan`]).
    pub fn open(cfg: NvmeConfig) -> Result<(NvmeTier, Vec<Recovered>), NvmeError> {
        let dir = cfg.dir;
        let data = dir.join("data");
        let tmp = dir.join("tmp");
        for d in [&dir, &data, &tmp] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(d)
                .map_err(io_err("mkdir", d))?;
        }
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                NvmeError::Locked { dir }
            } else {
                NvmeError::Io {
                    op: "flock",
                    path: lock_path,
                    source: e,
                }
            });
        }

        let leftovers = clear_dir(&tmp)?;
        if leftovers > 0 {
            tracing::info!(dir = %tmp.display(), leftovers, "removed unfinished NVMe tier writes");
        }
        let o_direct = probe(&tmp)?;

        // Fails here, not on the first write, where io_uring is disabled
        // (kernel.io_uring_disabled) or memory is locked down.
        let engine = Engine::new().map_err(io_err("io_uring_setup", &dir))?;

        let tier = NvmeTier {
            data,
            tmp,
            capacity: cfg.capacity,
            o_direct,
            used: AtomicU64::new(0),
            next_tmp: AtomicU64::new(0),
            engines: Mutex::new(vec![engine]),
            names: Mutex::new(()),
            readers: AtomicUsize::new(0),
            _lock: lock,
        };
        let recovered = tier.scan()?;
        Ok((tier, recovered))
    }

    /// Whether data I/O bypasses the page cache.
    pub fn o_direct(&self) -> bool {
        self.o_direct
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes allocated on disk by the tier's files, including space reserved
    /// by writes in progress. Counted from `st_blocks` when a file is
    /// written and when it is removed, so a file changed behind the tier's
    /// back skews it until the next [`NvmeTier::scan`].
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Where the copy of `key` lives (whether or not it exists), for opening
    /// it directly, e.g. as a FUSE passthrough backing file. Reads through
    /// such an fd are not checksummed.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, NvmeError> {
        Ok(self.data.join(check_key(key)?))
    }

    /// Writes `len` bytes of `src` (from offset 0; read with `pread`, so any
    /// seekable fd) as the copy of `key`, replacing any previous copy, and
    /// returns their crc32c. When this returns, the file is durable under its
    /// name; on error nothing is left behind and any previous copy is intact.
    pub fn put_from_fd(&self, key: &str, src: BorrowedFd<'_>, len: u64) -> Result<u32, NvmeError> {
        check_key(key)?;
        let staged = self.stage_from_fd(src, len)?;
        self.commit(staged, key, None)
    }

    /// The first half of [`NvmeTier::put_from_fd`]: writes `len` bytes of
    /// `src` to a temp file, durable but under no name yet. A caller whose
    /// file may be renamed meanwhile commits it under the name it has then
    /// ([`NvmeTier::commit`]), holding its own lock; dropping it unused
    /// removes it.
    pub fn stage_from_fd(&self, src: BorrowedFd<'_>, len: u64) -> Result<Staged<'_>, NvmeError> {
        let needed = round_up_u64(len);
        let reservation = self.reserve(needed)?;

        let tmp = self
            .tmp
            .join(self.next_tmp.fetch_add(1, Ordering::Relaxed).to_string());
        let mut flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        if self.o_direct {
            flags |= libc::O_DIRECT;
        }
        let fd = open_path(&tmp, flags, FILE_MODE).map_err(io_err("open", &tmp))?;
        let guard = TempFile(Some(tmp.clone()));

        if len > 0 {
            // Reserves the extent up front: a full disk fails here rather
            // than half-way through, and the file is laid out in one piece.
            // SAFETY: plain syscall on an fd we own.
            let r = unsafe {
                libc::fallocate(
                    fd.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    needed as libc::off_t,
                )
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(self.disk_err("fallocate", &tmp, needed, e));
                }
            }
        }

        let crc = {
            let mut engine = self.engine()?;
            engine
                .write_file(src.as_raw_fd(), fd.as_raw_fd(), len, self.o_direct, &|| {
                    self.yield_to_readers()
                })
                .map_err(|e| match e {
                    Xfer::Src(e) => io_err("read source", Path::new("<source fd>"))(e),
                    Xfer::Short { at } => NvmeError::Io {
                        op: "read source",
                        path: PathBuf::from("<source fd>"),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("source ends at {at} of {len} bytes"),
                        ),
                    },
                    Xfer::Dst(e) => self.disk_err("write", &tmp, needed, e),
                    Xfer::Ring(e) => io_err("io_uring_enter", &tmp)(e),
                })?
        };

        if self.o_direct && !len.is_multiple_of(ALIGN as u64) {
            // SAFETY: plain syscall on an fd we own.
            cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })
                .map_err(io_err("ftruncate", &tmp))?;
        }
        fsetxattr(fd.as_raw_fd(), XATTR_CRC, format!("{crc:08x}").as_bytes())
            .map_err(io_err("setxattr user.kvfs.crc32c", &tmp))?;
        fsetxattr(fd.as_raw_fd(), XATTR_LEN, len.to_string().as_bytes())
            .map_err(io_err("setxattr user.kvfs.len", &tmp))?;
        // fsync, not fdatasync: the xattrs are inode metadata that
        // fdatasync need not write, and a file must never reach its real
        // name with its data durable but not its checksum.
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::fsync(fd.as_raw_fd()) })
            .map_err(|e| self.disk_err("fsync", &tmp, needed, e))?;
        let allocated = fstat(fd.as_raw_fd())
            .map_err(io_err("fstat", &tmp))?
            .st_blocks as u64
            * 512;
        drop(fd);
        Ok(Staged {
            tmp: guard,
            reservation,
            allocated,
            crc,
        })
    }

    /// Gives a staged file its name `key` (and `owner`, if given), replacing
    /// any copy there, and makes the name durable. Returns the file's crc32c.
    pub fn commit(
        &self,
        staged: Staged<'_>,
        key: &str,
        owner: Option<FileOwner>,
    ) -> Result<u32, NvmeError> {
        let (crc, sync) = self.name(staged, key, owner)?;
        sync.run()?;
        Ok(crc)
    }

    /// [`NvmeTier::commit`] in two steps: the rename, then (by
    /// [`DirSync::run`]) the directory fsyncs that make it durable, which
    /// take milliseconds on a disk. A caller that names copies under a lock
    /// the request path needs runs the second step after letting go of it.
    pub fn name(
        &self,
        staged: Staged<'_>,
        key: &str,
        owner: Option<FileOwner>,
    ) -> Result<(u32, DirSync), NvmeError> {
        let dest = self.data.join(check_key(key)?);
        let Staged {
            mut tmp,
            reservation,
            allocated,
            crc,
        } = staged;
        let Some(tmp_path) = tmp.0.clone() else {
            return Err(NvmeError::NotFound {
                key: key.to_owned(),
            });
        };
        if let Some(owner) = owner {
            // Before the name appears, so a recovered copy has it; a lost
            // owner (a crash of the machine before the next sync) only
            // means the defaults.
            let c = cpath(&tmp_path).map_err(io_err("setxattr", &tmp_path))?;
            lsetxattr(&c, XATTR_OWNER, owner.encode().as_bytes())
                .map_err(io_err("setxattr user.kvfs.owner", &tmp_path))?;
        }
        let mut created = Vec::new();
        let parent = {
            let _names = lock_or_recover(&self.names);
            let replaced = allocated_at(&dest).map_err(io_err("stat", &dest))?;
            self.rename_creating_parents(&tmp_path, &dest, &mut created)?;
            tmp.0 = None;
            reservation.commit(allocated);
            self.sub_used(replaced);
            open_dir(parent_of(&dest)).map_err(io_err("open", parent_of(&dest)))?
        };
        Ok((
            crc,
            DirSync {
                parent,
                dest,
                created,
            },
        ))
    }

    /// Copies the contents of `key` to `dst` (written from offset 0 with
    /// `pwrite`; a regular file is truncated to the length) and returns the
    /// length. The checksum is verified on the way; on a mismatch the copy
    /// is deleted and `Corrupt` returned. On any error, what was written to
    /// `dst` is garbage: discard it.
    pub fn get_to_fd(&self, key: &str, dst: BorrowedFd<'_>) -> Result<u64, NvmeError> {
        // A caller waits for this read: write-backs step aside meanwhile.
        struct Reading<'a>(&'a AtomicUsize);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.readers.fetch_add(1, Ordering::Relaxed);
        let _reading = Reading(&self.readers);
        let len = self.read_verified(check_key(key)?, Some(dst.as_raw_fd()))?;
        let st = fstat(dst.as_raw_fd()).map_err(io_err("fstat", Path::new("<destination fd>")))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size as u64 != len {
            // SAFETY: plain syscall on an fd the caller lent us.
            cvt(unsafe { libc::ftruncate(dst.as_raw_fd(), len as libc::off_t) })
                .map_err(io_err("ftruncate", Path::new("<destination fd>")))?;
        }
        Ok(len)
    }

    /// Reads the copy of `key` and checks it against its checksum, like
    /// [`NvmeTier::get_to_fd`] without a destination. Returns the length.
    pub fn verify(&self, key: &str) -> Result<u64, NvmeError> {
        self.read_verified(check_key(key)?, None)
    }

    /// Deletes the copy of `key`, if any, and the parent directories it
    /// leaves empty. Not fsync'd: a removal lost in a crash brings back a
    /// whole, checksummed file, which is harmless for a cache.
    pub fn remove(&self, key: &str) -> Result<(), NvmeError> {
        let path = self.data.join(check_key(key)?);
        let _names = lock_or_recover(&self.names);
        let Some(st) = lstat(&path).map_err(io_err("stat", &path))? else {
            return Ok(());
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("unlink", &path)(e)),
        }
        self.sub_used(st.st_blocks as u64 * 512);
        self.remove_empty_parents(&path);
        Ok(())
    }

    /// Renames the copy of `from` to `to`, replacing any copy of `to`, and
    /// makes the rename durable.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), NvmeError> {
        let src = self.data.join(check_key(from)?);
        let dest = self.data.join(check_key(to)?);
        let mut created = Vec::new();
        let (src_parent, dest_parent) = {
            let _names = lock_or_recover(&self.names);
            if lstat(&src).map_err(io_err("stat", &src))?.is_none() {
                return Err(NvmeError::NotFound {
                    key: from.to_owned(),
                });
            }
            if src == dest {
                return Ok(());
            }
            let replaced = allocated_at(&dest).map_err(io_err("stat", &dest))?;
            self.rename_creating_parents(&src, &dest, &mut created)?;
            self.sub_used(replaced);
            let dest_parent =
                open_dir(parent_of(&dest)).map_err(io_err("open", parent_of(&dest)))?;
            let src_parent = if parent_of(&src) == parent_of(&dest) {
                None
            } else {
                let fd = open_dir(parent_of(&src)).map_err(io_err("open", parent_of(&src)))?;
                self.remove_empty_parents(&src);
                Some(fd)
            };
            (src_parent, dest_parent)
        };
        DirSync {
            parent: dest_parent,
            dest: dest.clone(),
            created,
        }
        .run()?;
        if let Some(fd) = src_parent {
            // SAFETY: plain syscall on an fd we own.
            cvt(unsafe { libc::fsync(fd.as_raw_fd()) })
                .map_err(io_err("fsync", parent_of(&src)))?;
        }
        Ok(())
    }

    /// Foreground before background: a write-back waits (bounded) before
    /// each chunk while a promotion reads, so the disk serves the read that
    /// a caller waits for first. Whatever the I/O scheduler: mq-deadline
    /// and none ignore priority levels within a class, and an idle class
    /// could starve write-back and, through backpressure, the writers.
    fn yield_to_readers(&self) {
        let start = std::time::Instant::now();
        while self.readers.load(Ordering::Relaxed) > 0 && start.elapsed() < MAX_YIELD {
            std::thread::sleep(std::time::Duration::from_micros(250));
        }
    }

    /// Records a changed owner or mode of `key`'s copy (chmod, chown).
    pub fn set_owner(&self, key: &str, owner: FileOwner) -> Result<(), NvmeError> {
        let path = self.data.join(check_key(key)?);
        let c = cpath(&path).map_err(io_err("setxattr", &path))?;
        match lsetxattr(&c, XATTR_OWNER, owner.encode().as_bytes()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(NvmeError::NotFound {
                key: key.to_owned(),
            }),
            r => r.map_err(io_err("setxattr user.kvfs.owner", &path)),
        }
    }

    /// Swaps the copies (files or whole directories) at `a` and `b` in one
    /// syscall (`renameat2(RENAME_EXCHANGE)`), so a crash leaves both names
    /// as they were or both swapped; where only one exists it is renamed to
    /// the other name.
    pub fn exchange(&self, a: &str, b: &str) -> Result<(), NvmeError> {
        let pa = self.data.join(check_key(a)?);
        let pb = self.data.join(check_key(b)?);
        let (parent_a, parent_b) = {
            let _names = lock_or_recover(&self.names);
            let has_a = lstat(&pa).map_err(io_err("stat", &pa))?.is_some();
            let has_b = lstat(&pb).map_err(io_err("stat", &pb))?.is_some();
            match (has_a, has_b) {
                (true, true) => {}
                (false, false) => return Ok(()),
                (true, false) => {
                    drop(_names);
                    return self.rename(a, b);
                }
                (false, true) => {
                    drop(_names);
                    return self.rename(b, a);
                }
            }
            let (ca, cb) = (
                cpath(&pa).map_err(io_err("rename", &pa))?,
                cpath(&pb).map_err(io_err("rename", &pb))?,
            );
            // SAFETY: two valid C strings; plain syscall.
            cvt(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    ca.as_ptr(),
                    libc::AT_FDCWD,
                    cb.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            })
            .map_err(io_err("renameat2 exchange", &pb))?;
            let fa = open_dir(parent_of(&pa)).map_err(io_err("open", parent_of(&pa)))?;
            let fb = if parent_of(&pa) == parent_of(&pb) {
                None
            } else {
                Some(open_dir(parent_of(&pb)).map_err(io_err("open", parent_of(&pb)))?)
            };
            (fa, fb)
        };
        for (fd, path) in std::iter::once((parent_a, &pa)).chain(parent_b.map(|f| (f, &pb))) {
            // SAFETY: plain syscall on an fd we own.
            cvt(unsafe { libc::fsync(fd.as_raw_fd()) })
                .map_err(io_err("fsync", parent_of(path)))?;
        }
        Ok(())
    }

    /// Lists every file under `data/` with valid metadata and recomputes
    /// [`NvmeTier::used`]. Files without valid metadata (torn by a crash on
    /// some filesystems, or put there by someone else), anything that is not
    /// a regular file or directory, names that are not UTF-8, and empty
    /// directories are removed. Reads names, stats and xattrs only, never
    /// contents. Meant for mount time: the recount races with concurrent
    /// writes.
    pub fn scan(&self) -> Result<Vec<Recovered>, NvmeError> {
        let mut found = Vec::new();
        let mut allocated = 0u64;
        let mut removed = 0u64;
        // (directory, its key prefix); directories are visited parent
        // first, so walking `dirs` backwards afterwards meets children first.
        let mut dirs: Vec<(PathBuf, String)> = vec![(self.data.clone(), String::new())];
        let mut i = 0;
        while i < dirs.len() {
            let (dir, prefix) = dirs[i].clone();
            i += 1;
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound && i > 1 => continue,
                Err(e) => return Err(io_err("readdir", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("readdir", &dir))?;
                let path = entry.path();
                let ft = entry.file_type().map_err(io_err("stat", &path))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    removed += remove_any(&path, ft.is_dir());
                    continue;
                };
                if prefix.is_empty() && name == PARKED {
                    // Copies parked half-way through a two-step move by an
                    // older kvfs that crashed: their names are unknown.
                    removed += remove_any(&path, ft.is_dir());
                    continue;
                }
                let key = if prefix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{prefix}/{name}")
                };
                if ft.is_dir() {
                    dirs.push((path, key));
                } else if ft.is_file() {
                    match recover_one(&path, key).map_err(io_err("stat", &path))? {
                        Some((r, blocks)) => {
                            allocated += blocks;
                            found.push(r);
                        }
                        None => removed += remove_any(&path, false),
                    }
                } else {
                    removed += remove_any(&path, false);
                }
            }
        }
        for (dir, _) in dirs.iter().skip(1).rev() {
            // Fails (ENOTEMPTY) for every directory still in use: one
            // syscall each, cheaper than tracking emptiness.
            let _ = fs::remove_dir(dir);
        }
        if removed > 0 {
            tracing::warn!(dir = %self.data.display(), removed, "removed NVMe tier files without valid kvfs metadata");
        }
        self.used.store(allocated, Ordering::Relaxed);
        Ok(found)
    }

    fn read_verified(&self, key: &str, dst: Option<RawFd>) -> Result<u64, NvmeError> {
        let path = self.data.join(key);
        let mut flags = libc::O_RDONLY | libc::O_CLOEXEC;
        if self.o_direct {
            flags |= libc::O_DIRECT;
        }
        let fd = match open_path(&path, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NvmeError::NotFound {
                    key: key.to_owned(),
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let st = fstat(fd.as_raw_fd()).map_err(io_err("fstat", &path))?;
        let meta = parse_meta(
            fgetxattr(fd.as_raw_fd(), XATTR_CRC).map_err(io_err("getxattr", &path))?,
            fgetxattr(fd.as_raw_fd(), XATTR_LEN).map_err(io_err("getxattr", &path))?,
        );
        let Some((expected, len)) = meta else {
            return Err(self.discard(key, &path, &st, Mismatch::Metadata));
        };
        if st.st_size as u64 != len {
            let m = Mismatch::Length {
                expected: len,
                actual: st.st_size as u64,
            };
            return Err(self.discard(key, &path, &st, m));
        }
        let result = {
            let mut engine = self.engine()?;
            engine.read_file(fd.as_raw_fd(), len, dst, self.o_direct)
        };
        match result {
            Ok(actual) if actual == expected => Ok(len),
            Ok(actual) => {
                Err(self.discard(key, &path, &st, Mismatch::Checksum { expected, actual }))
            }
            Err(Xfer::Short { at }) => {
                let m = Mismatch::Length {
                    expected: len,
                    actual: at,
                };
                Err(self.discard(key, &path, &st, m))
            }
            Err(Xfer::Src(e)) => Err(io_err("read", &path)(e)),
            Err(Xfer::Dst(e)) => Err(io_err("write", Path::new("<destination fd>"))(e)),
            Err(Xfer::Ring(e)) => Err(io_err("io_uring_enter", &path)(e)),
        }
    }

    /// Deletes a bad copy, unless a new copy has replaced it since it was
    /// opened, and returns the error to report.
    fn discard(
        &self,
        key: &str,
        path: &Path,
        opened: &libc::stat,
        mismatch: Mismatch,
    ) -> NvmeError {
        tracing::warn!(key, %mismatch, "corrupt NVMe tier copy; deleting it");
        let _names = lock_or_recover(&self.names);
        if let Ok(Some(st)) = lstat(path)
            && st.st_ino == opened.st_ino
            && st.st_dev == opened.st_dev
        {
            match fs::remove_file(path) {
                Ok(()) => {
                    self.sub_used(st.st_blocks as u64 * 512);
                    self.remove_empty_parents(path);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt NVMe tier copy")
                }
            }
        }
        NvmeError::Corrupt {
            key: key.to_owned(),
            mismatch,
        }
    }

    /// rename(2), creating `to`'s missing parent directories (recorded in
    /// `created`) when the first try says they are missing. Caller holds
    /// `names`.
    fn rename_creating_parents(
        &self,
        from: &Path,
        to: &Path,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), NvmeError> {
        match fs::rename(from, to) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("rename", to)(e)),
        }
        let parent = parent_of(to);
        let rel = parent.strip_prefix(&self.data).unwrap_or(Path::new(""));
        let mut dir = self.data.clone();
        for comp in rel.components() {
            dir.push(comp);
            match fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("mkdir", &dir)(e)),
            }
        }
        fs::rename(from, to).map_err(io_err("rename", to))
    }

    /// Removes the parents of `path` that are empty, up to `data/`.
    /// Caller holds `names`.
    fn remove_empty_parents(&self, path: &Path) {
        let mut dir = parent_of(path);
        while dir != self.data && dir.starts_with(&self.data) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
            dir = parent_of(dir);
        }
    }

    fn reserve(&self, needed: u64) -> Result<Reservation<'_>, NvmeError> {
        let r = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(needed).filter(|&n| n <= self.capacity)
            });
        match r {
            Ok(_) => Ok(Reservation {
                used: &self.used,
                bytes: needed,
            }),
            Err(used) => Err(NvmeError::NoSpace {
                needed,
                used,
                capacity: self.capacity,
            }),
        }
    }

    fn sub_used(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Maps a disk's ENOSPC to `NoSpace`, anything else to `Io`.
    fn disk_err(&self, op: &'static str, path: &Path, needed: u64, e: io::Error) -> NvmeError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            NvmeError::NoSpace {
                needed,
                used: self.used(),
                capacity: self.capacity,
            }
        } else {
            io_err(op, path)(e)
        }
    }

    fn engine(&self) -> Result<EngineGuard<'_>, NvmeError> {
        let idle = lock_or_recover(&self.engines).pop();
        let engine = match idle {
            Some(e) => e,
            None => Engine::new().map_err(io_err("io_uring_setup", &self.tmp))?,
        };
        Ok(EngineGuard {
            tier: self,
            engine: Some(engine),
        })
    }
}

fn round_up_u64(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// Space held by `used` for a write in progress; given back on drop unless
/// the write commits.
struct Reservation<'a> {
    used: &'a AtomicU64,
    bytes: u64,
}

impl Reservation<'_> {
    /// Replaces the estimate by what the file really allocated.
    fn commit(mut self, allocated: u64) {
        let bytes = std::mem::replace(&mut self.bytes, 0);
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes).saturating_add(allocated))
            });
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let bytes = self.bytes;
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }
}

/// What makes a new name durable: fsyncs of the directory that holds it
/// and of every directory created for it. Dropped unrun, the name is there
/// but a power loss may take it (a kill -9 cannot).
#[must_use = "the name is not durable until run"]
pub struct DirSync {
    parent: OwnedFd,
    dest: PathBuf,
    created: Vec<PathBuf>,
}

impl DirSync {
    pub fn run(self) -> Result<(), NvmeError> {
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::fsync(self.parent.as_raw_fd()) })
            .map_err(io_err("fsync", parent_of(&self.dest)))?;
        for dir in &self.created {
            let p = parent_of(dir);
            let fd = open_dir(p).map_err(io_err("open", p))?;
            // SAFETY: plain syscall on an fd we own.
            cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map_err(io_err("fsync", p))?;
        }
        Ok(())
    }
}

/// A file written under `tmp/`, waiting for its name
/// ([`NvmeTier::commit`]); removed, with its space, if dropped.
pub struct Staged<'a> {
    tmp: TempFile,
    reservation: Reservation<'a>,
    allocated: u64,
    crc: u32,
}

/// Unlinks a temp file on early return.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Removes everything in `dir`, returning how many entries there were.
fn clear_dir(dir: &Path) -> Result<u64, NvmeError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(io_err("readdir", dir))? {
        let entry = entry.map_err(io_err("readdir", dir))?;
        let path = entry.path();
        let is_dir = entry.file_type().map_err(io_err("stat", &path))?.is_dir();
        let r = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        r.map_err(io_err("remove", &path))?;
        n += 1;
    }
    Ok(n)
}

/// Best-effort removal during the scan; returns 1 if something went.
fn remove_any(path: &Path, is_dir: bool) -> u64 {
    let r = if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Ok(()) => 1,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove foreign file from the NVMe tier");
            0
        }
    }
}

/// Reads one file's metadata for the scan: `None` if it is not a valid copy.
/// Also returns the bytes it allocates.
fn recover_one(path: &Path, key: String) -> io::Result<Option<(Recovered, u64)>> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let c = cpath(path)?;
    let Some((crc, len)) = parse_meta(lgetxattr(&c, XATTR_CRC)?, lgetxattr(&c, XATTR_LEN)?) else {
        return Ok(None);
    };
    if md.len() != len {
        return Ok(None);
    }
    let mtime = md.modified()?;
    let owner = lgetxattr(&c, XATTR_OWNER)?.and_then(|x| FileOwner::decode(x.as_bytes()));
    Ok(Some((
        Recovered {
            key,
            len,
            crc,
            mtime,
            owner,
        },
        md.blocks() * 512,
    )))
}

/// Parses the two xattr values; `None` unless both are well-formed.
fn parse_meta(crc: Option<Xattr>, len: Option<Xattr>) -> Option<(u32, u64)> {
    let crc = crc?;
    let len = len?;
    let crc = crc.as_bytes();
    let len = len.as_bytes();
    if crc.len() != 8 || !crc.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    if len.is_empty() || !len.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    let len = std::str::from_utf8(len).ok()?.parse().ok()?;
    Some((crc, len))
}

/// Whether `dir`'s filesystem does O_DIRECT for real. Also checks that it
/// takes user xattrs, without which no file could be recovered.
fn probe(dir: &Path) -> Result<bool, NvmeError> {
    let c = cpath(dir).map_err(io_err("statfs", dir))?;
    // SAFETY: statfs writes only into the zeroed struct we pass.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and sfs is a valid out-pointer.
    cvt(unsafe { libc::statfs(c.as_ptr(), &mut sfs) }).map_err(io_err("statfs", dir))?;
    let magic = sfs.f_type as i64;

    let path = dir.join("probe");
    let _cleanup = TempFile(Some(path.clone()));
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
    let fd = open_path(&path, flags, FILE_MODE).map_err(io_err("open", &path))?;
    fsetxattr(fd.as_raw_fd(), XATTR_LEN, b"0").map_err(|e| NvmeError::Io {
        op: "setxattr (the NVMe tier needs a filesystem with user xattrs)",
        path: path.clone(),
        source: e,
    })?;
    drop(fd);

    // Linux >= 6.6 accepts O_DIRECT on tmpfs but still goes through the page
    // cache: there is nothing to bypass, and no alignment rule applies, so
    // buffered I/O is the honest description of what happens.
    let reason = if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        Some("a memory filesystem".to_owned())
    } else {
        match probe_direct_write(&path) {
            Ok(()) => None,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Some(format!("O_DIRECT rejected: {e}"))
            }
            Err(e) => return Err(io_err("O_DIRECT probe", &path)(e)),
        }
    };
    match reason {
        None => Ok(true),
        Some(reason) => {
            tracing::warn!(dir = %dir.display(), %reason, "NVMe tier: no O_DIRECT, using buffered I/O");
            Ok(false)
        }
    }
}

/// What vLLM's probe does: open with O_DIRECT and write one aligned page.
fn probe_direct_write(path: &Path) -> io::Result<()> {
    let flags = libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_DIRECT;
    let fd = open_path(path, flags, FILE_MODE)?;
    let buf = Arena::new(ALIGN);
    // SAFETY: buf is valid for ALIGN bytes and outlives the call.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.ptr.as_ptr().cast(), ALIGN, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != ALIGN {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short O_DIRECT write",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// io_uring engine

/// Page-aligned, zeroed memory for DMA from and to the device.
struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: Arena uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for Arena {}

impl Arena {
    fn new(len: usize) -> Arena {
        let layout = match Layout::from_size_align(len.max(ALIGN), ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("buffer of {len} bytes exceeds the address space"),
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Arena { ptr, layout }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A ring and the DEPTH chunk buffers its requests use. Only ever
/// returned to the pool, or dropped, with nothing in flight.
struct Engine {
    // Declared before `arena` so it is dropped first: the kernel lets go of
    // the registered buffers before their memory is freed.
    ring: IoUring,
    /// The buffers are registered with the ring (no page pinning per
    /// request). Registration counts against RLIMIT_MEMLOCK, so it may fail
    /// for an unprivileged daemon; plain requests work the same, slower.
    fixed: bool,
    /// The kernel's view of in-flight requests is unknown (io_uring_enter
    /// failed): the engine must never be reused nor its buffers freed.
    poisoned: bool,
    cqes: Vec<(usize, i32)>,
    arena: Arena,
}

#[derive(Debug)]
enum Xfer {
    /// Reading the source failed.
    Src(io::Error),
    /// Writing the destination failed.
    Dst(io::Error),
    /// The source ended at `at`, before the requested length.
    Short {
        at: u64,
    },
    Ring(io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
    /// Read complete, waiting for the chunks before it (reads are consumed
    /// in order: the checksum is sequential).
    Ready,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: SlotState,
    off: u64,
    /// Bytes that count: the data in the chunk.
    valid: u32,
    /// Bytes asked of the kernel (page-padded under O_DIRECT).
    io_len: u32,
    /// Bytes that must complete: io_len for writes, valid for reads.
    want: u32,
    done: u32,
}

const FREE: Slot = Slot {
    state: SlotState::Free,
    off: 0,
    valid: 0,
    io_len: 0,
    want: 0,
    done: 0,
};

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

impl Engine {
    fn new() -> io::Result<Engine> {
        let ring = IoUring::new(2 * DEPTH as u32)?;
        let arena = Arena::new(DEPTH * CHUNK);
        let iovecs: Vec<libc::iovec> = (0..DEPTH)
            .map(|i| libc::iovec {
                // SAFETY: in bounds of the arena.
                iov_base: unsafe { arena.ptr.as_ptr().add(i * CHUNK) }.cast(),
                iov_len: CHUNK,
            })
            .collect();
        // SAFETY: the arena outlives the registration: it is dropped after
        // the ring (field order), and never moves (heap allocation).
        let fixed = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "io_uring buffer registration failed; using plain requests");
                false
            }
        };
        Ok(Engine {
            ring,
            fixed,
            poisoned: false,
            cqes: Vec::with_capacity(DEPTH),
            arena,
        })
    }

    fn buf(&self, slot: usize) -> *mut u8 {
        // SAFETY: slot < DEPTH, so in bounds of the arena.
        unsafe { self.arena.ptr.as_ptr().add(slot * CHUNK) }
    }

    /// Queues the rest of `slot`'s request (from `done` on).
    fn push(&mut self, slot: usize, s: &Slot, op: Op, fd: RawFd) -> io::Result<()> {
        let done = s.done as usize;
        // SAFETY: done < io_len <= CHUNK, in bounds of the slot's buffer.
        let ptr = unsafe { self.buf(slot).add(done) };
        let len = s.io_len - s.done;
        let off = s.off + done as u64;
        let fd = types::Fd(fd);
        let idx = slot as u16;
        let entry = match (op, self.fixed) {
            (Op::Read, true) => opcode::ReadFixed::new(fd, ptr, len, idx)
                .offset(off)
                .build(),
            (Op::Read, false) => opcode::Read::new(fd, ptr, len).offset(off).build(),
            (Op::Write, true) => opcode::WriteFixed::new(fd, ptr, len, idx)
                .offset(off)
                .build(),
            (Op::Write, false) => opcode::Write::new(fd, ptr, len).offset(off).build(),
        };
        // SAFETY: the buffer stays valid and untouched by us until the
        // completion is reaped (the slot is InFlight until then).
        unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Submits what is queued and waits for at least one completion,
    /// leaving the completions in `self.cqes`.
    fn reap(&mut self) -> Result<(), Xfer> {
        self.cqes.clear();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    self.poisoned = true;
                    return Err(Xfer::Ring(e));
                }
            }
            // submit_and_wait may return after submitting without having
            // waited (a signal arrived): loop until something completed.
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result())),
            );
            if !self.cqes.is_empty() {
                return Ok(());
            }
        }
    }

    /// Applies one completion to its slot. Returns the error it carries, if
    /// any; `Ok(true)` when the slot's request is complete.
    fn complete(
        &mut self,
        slot: usize,
        s: &mut Slot,
        res: i32,
        op: Op,
        fd: RawFd,
    ) -> Result<bool, io::Error> {
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push(slot, s, op, fd)?;
            return Ok(false);
        }
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        s.done += res as u32;
        if s.done >= s.want {
            return Ok(true);
        }
        if res == 0 {
            // End of file for a read; a write that makes no progress.
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no progress"));
        }
        self.push(slot, s, op, fd)?;
        Ok(false)
    }

    /// Copies `len` bytes of `src` (pread) to `dst` (ring writes) and
    /// returns their crc32c.
    /// `before_chunk` runs before each chunk is sent (the tier's priority
    /// for foreground reads).
    fn write_file(
        &mut self,
        src: RawFd,
        dst: RawFd,
        len: u64,
        direct: bool,
        before_chunk: &dyn Fn(),
    ) -> Result<u32, Xfer> {
        let chunks = len.div_ceil(CHUNK as u64);
        let mut slots = [FREE; DEPTH];
        let mut next = 0u64;
        let mut in_flight = 0usize;
        let mut crc = 0u32;
        let mut err: Option<Xfer> = None;
        loop {
            while err.is_none() && next < chunks && in_flight < DEPTH {
                let Some(i) = slots.iter().position(|s| s.state == SlotState::Free) else {
                    break;
                };
                before_chunk();
                let off = next * CHUNK as u64;
                let valid = (len - off).min(CHUNK as u64) as usize;
                let io_len = if direct {
                    round_up(valid, ALIGN)
                } else {
                    valid
                };
                // SAFETY: the slot is free, so the kernel does not touch its
                // buffer, and it is CHUNK bytes long.
                let buf = unsafe { std::slice::from_raw_parts_mut(self.buf(i), CHUNK) };
                if let Err(e) = pread_full(src, &mut buf[..valid], off) {
                    err = Some(if e.kind() == io::ErrorKind::UnexpectedEof {
                        Xfer::Short { at: off }
                    } else {
                        Xfer::Src(e)
                    });
                    break;
                }
                crc = crc32c::crc32c_append(crc, &buf[..valid]);
                buf[valid..io_len].fill(0);
                slots[i] = Slot {
                    state: SlotState::InFlight,
                    off,
                    valid: valid as u32,
                    io_len: io_len as u32,
                    want: io_len as u32,
                    done: 0,
                };
                let s = slots[i];
                if let Err(e) = self.push(i, &s, Op::Write, dst) {
                    slots[i].state = SlotState::Free;
                    err = Some(Xfer::Ring(e));
                    break;
                }
                in_flight += 1;
                next += 1;
            }
            if in_flight == 0 {
                break;
            }
            self.reap()?;
            let cqes = std::mem::take(&mut self.cqes);
            for &(i, res) in &cqes {
                let mut s = slots[i];
                match self.complete(i, &mut s, res, Op::Write, dst) {
                    Ok(false) => {}
                    Ok(true) => {
                        s.state = SlotState::Free;
                        in_flight -= 1;
                    }
                    Err(e) => {
                        s.state = SlotState::Free;
                        in_flight -= 1;
                        err.get_or_insert(Xfer::Dst(e));
                    }
                }
                slots[i] = s;
            }
            self.cqes = cqes;
        }
        match err {
            Some(e) => Err(e),
            None => Ok(crc),
        }
    }

    /// Reads `len` bytes of `src` (ring reads), in order appends them to
    /// `dst` (pwrite) if given, and returns their crc32c.
    fn read_file(
        &mut self,
        src: RawFd,
        len: u64,
        dst: Option<RawFd>,
        direct: bool,
    ) -> Result<u32, Xfer> {
        let chunks = len.div_ceil(CHUNK as u64);
        let mut slots = [FREE; DEPTH];
        let mut next_submit = 0u64;
        let mut next_use = 0u64;
        let mut crc = 0u32;
        let mut err: Option<Xfer> = None;
        loop {
            while err.is_none() && next_submit < chunks {
                let Some(i) = slots.iter().position(|s| s.state == SlotState::Free) else {
                    break;
                };
                let off = next_submit * CHUNK as u64;
                let valid = (len - off).min(CHUNK as u64) as usize;
                let io_len = if direct {
                    round_up(valid, ALIGN)
                } else {
                    valid
                };
                slots[i] = Slot {
                    state: SlotState::InFlight,
                    off,
                    valid: valid as u32,
                    io_len: io_len as u32,
                    want: valid as u32,
                    done: 0,
                };
                let s = slots[i];
                if let Err(e) = self.push(i, &s, Op::Read, src) {
                    slots[i].state = SlotState::Free;
                    err = Some(Xfer::Ring(e));
                    break;
                }
                next_submit += 1;
            }

            // Consume finished chunks in file order.
            while let Some(i) = slots.iter().position(|s| {
                s.state == SlotState::Ready && (err.is_some() || s.off == next_use * CHUNK as u64)
            }) {
                let s = slots[i];
                slots[i].state = SlotState::Free;
                if err.is_some() {
                    continue;
                }
                // SAFETY: the read into this slot has completed, so the
                // kernel no longer touches its buffer.
                let data = unsafe { std::slice::from_raw_parts(self.buf(i), s.valid as usize) };
                crc = crc32c::crc32c_append(crc, data);
                if let Some(dst) = dst
                    && let Err(e) = pwrite_all(dst, data, s.off)
                {
                    err = Some(Xfer::Dst(e));
                }
                next_use += 1;
            }

            let in_flight = slots
                .iter()
                .filter(|s| s.state == SlotState::InFlight)
                .count();
            if in_flight == 0 {
                if err.is_some() || next_submit == chunks {
                    break;
                }
                continue;
            }
            self.reap()?;
            let cqes = std::mem::take(&mut self.cqes);
            for &(i, res) in &cqes {
                let mut s = slots[i];
                match self.complete(i, &mut s, res, Op::Read, src) {
                    Ok(false) => {}
                    Ok(true) => s.state = SlotState::Ready,
                    Err(e) => {
                        s.state = SlotState::Free;
                        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                            Xfer::Short {
                                at: s.off + s.done as u64,
                            }
                        } else {
                            Xfer::Src(e)
                        };
                        err.get_or_insert(e);
                    }
                }
                slots[i] = s;
            }
            self.cqes = cqes;
        }
        match err {
            Some(e) => Err(e),
            None => Ok(crc),
        }
    }
}

/// An engine checked out of the pool.
struct EngineGuard<'a> {
    tier: &'a NvmeTier,
    engine: Option<Engine>,
}

impl std::ops::Deref for EngineGuard<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        // Some until drop.
        self.engine.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        self.engine.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        if engine.poisoned {
            // Requests may still be running against its buffers: leaking
            // 4 MiB is the only safe choice.
            tracing::error!("io_uring failed with requests in flight; leaking its buffers");
            std::mem::forget(engine);
            return;
        }
        let mut idle = lock_or_recover(&self.tier.engines);
        if idle.len() < MAX_IDLE_ENGINES {
            idle.push(engine);
        }
    }
}

// ---------------------------------------------------------------------------
// Thin syscall wrappers

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn open_path(path: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: c is NUL-terminated; open has no other memory arguments.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    open_path(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: fstat writes only into the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// lstat(2); `None` if nothing is there.
fn lstat(path: &Path) -> io::Result<Option<libc::stat>> {
    let c = cpath(path)?;
    // SAFETY: lstat writes only into the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st a valid out-pointer.
    match cvt(unsafe { libc::lstat(c.as_ptr(), &mut st) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Bytes allocated by the regular file at `path`; 0 if there is none.
fn allocated_at(path: &Path) -> io::Result<u64> {
    Ok(match lstat(path)? {
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st.st_blocks as u64 * 512,
        _ => 0,
    })
}

fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: name is NUL-terminated, value valid for its length.
    cvt(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })?;
    Ok(())
}

/// A short xattr value; ours are at most 20 bytes.
struct Xattr {
    buf: [u8; 32],
    len: usize,
}

impl Xattr {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Maps getxattr's result: missing (ENODATA) and oversized (ERANGE) values
/// are both "no valid value".
fn xattr_result(n: isize, buf: [u8; 32]) -> io::Result<Option<Xattr>> {
    if n >= 0 {
        return Ok(Some(Xattr {
            buf,
            len: n as usize,
        }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ERANGE) => Ok(None),
        _ => Err(e),
    }
}

fn fgetxattr(fd: RawFd, name: &CStr) -> io::Result<Option<Xattr>> {
    let mut buf = [0u8; 32];
    // SAFETY: name is NUL-terminated, buf valid for its length.
    let n = unsafe { libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    xattr_result(n, buf)
}

fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: path and name are NUL-terminated, value valid for its length.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

fn lgetxattr(path: &CStr, name: &CStr) -> io::Result<Option<Xattr>> {
    let mut buf = [0u8; 32];
    // SAFETY: path and name are NUL-terminated, buf valid for its length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    xattr_result(n, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const SIZES: [usize; 8] = [
        0,
        1,
        4095,
        4096,
        4097,
        3 * CHUNK + 5,
        // More chunks than DEPTH: slots are reused.
        9 * CHUNK + 7,
        2 * CHUNK,
    ];

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn memfd(bytes: &[u8]) -> OwnedFd {
        // SAFETY: the name is NUL-terminated.
        let fd = unsafe { libc::memfd_create(c"kvfs-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        pwrite_all(fd.as_raw_fd(), bytes, 0).expect("fill memfd");
        fd
    }

    fn contents(fd: &OwnedFd) -> Vec<u8> {
        let len = fstat(fd.as_raw_fd()).expect("fstat").st_size as usize;
        let mut buf = vec![0; len];
        pread_full(fd.as_raw_fd(), &mut buf, 0).expect("read back");
        buf
    }

    /// A disk directory (ext4 here: O_DIRECT) and a tmpfs one (buffered).
    fn dirs() -> Vec<(tempfile::TempDir, bool)> {
        vec![
            (tempfile::tempdir_in("/var/tmp").expect("tempdir"), true),
            (tempfile::tempdir_in("/dev/shm").expect("tempdir"), false),
        ]
    }

    fn open(dir: &Path, capacity: u64) -> (NvmeTier, Vec<Recovered>) {
        NvmeTier::open(NvmeConfig {
            dir: dir.to_path_buf(),
            capacity,
        })
        .expect("open tier")
    }

    /// What `used` should be: st_blocks of everything under data/.
    fn allocated(dir: &Path) -> u64 {
        let mut total = 0;
        let mut stack = vec![dir.join("data")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("readdir") {
                let e = e.expect("entry");
                let md = e.metadata().expect("stat");
                if md.is_dir() {
                    stack.push(e.path());
                } else {
                    total += md.blocks() * 512;
                }
            }
        }
        total
    }

    fn put(tier: &NvmeTier, key: &str, bytes: &[u8]) -> u32 {
        let src = memfd(bytes);
        tier.put_from_fd(key, src.as_fd(), bytes.len() as u64)
            .expect("put")
    }

    fn get(tier: &NvmeTier, key: &str) -> Result<Vec<u8>, NvmeError> {
        let dst = memfd(&[]);
        let n = tier.get_to_fd(key, dst.as_fd())?;
        let got = contents(&dst);
        assert_eq!(got.len() as u64, n);
        Ok(got)
    }

    #[test]
    fn tier_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NvmeTier>();
    }

    #[test]
    fn unregistered_buffers_work_too() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let mut engine = Engine::new().expect("engine");
            // What happens where RLIMIT_MEMLOCK refuses the registration.
            engine.fixed = false;
            *lock_or_recover(&tier.engines) = vec![engine];
            for (i, len) in [4097, 5 * CHUNK + 1].into_iter().enumerate() {
                let bytes = pattern(len, 40 + i as u64);
                let key = format!("u/{i}");
                put(&tier, &key, &bytes);
                assert_eq!(get(&tier, &key).expect("get"), bytes);
            }
            let idle = lock_or_recover(&tier.engines);
            assert_eq!(idle.len(), 1);
            assert!(!idle[0].fixed);
        }
    }

    /// Write-back asks to yield before every chunk; the yield lasts while
    /// a promotion reads, and never longer than MAX_YIELD.
    #[test]
    fn write_back_yields_to_readers_chunk_by_chunk() {
        for (dir, direct) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let len = 5 * CHUNK + 1;
            let bytes = pattern(len, 9);
            let src = dir.path().join("src");
            fs::write(&src, &bytes).expect("write source");
            let src = fs::File::open(&src).expect("open source");
            let dst = dir.path().join("dst");
            let mut flags = libc::O_WRONLY | libc::O_CREAT;
            if direct {
                flags |= libc::O_DIRECT;
            }
            let dst = open_path(&dst, flags, FILE_MODE).expect("open dst");
            let calls = std::cell::Cell::new(0);
            let mut engine = Engine::new().expect("engine");
            engine
                .write_file(
                    src.as_raw_fd(),
                    dst.as_raw_fd(),
                    len as u64,
                    direct,
                    &|| calls.set(calls.get() + 1),
                )
                .map_err(|_| "write")
                .expect("write_file");
            assert_eq!(calls.get(), 6);

            tier.readers.store(1, Ordering::Relaxed);
            let t = std::time::Instant::now();
            tier.yield_to_readers();
            assert!(t.elapsed() >= MAX_YIELD, "did not wait for the reader");
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    tier.readers.store(0, Ordering::Relaxed);
                });
                tier.yield_to_readers();
            });
            assert_eq!(tier.readers.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn o_direct_on_disk_buffered_on_tmpfs() {
        for (dir, direct) in dirs() {
            let (tier, recovered) = open(dir.path(), 1 << 30);
            assert_eq!(tier.o_direct(), direct, "{}", dir.path().display());
            assert!(recovered.is_empty());
            assert_eq!(tier.used(), 0);
        }
    }

    #[test]
    fn roundtrip_sizes() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            for (i, &len) in SIZES.iter().enumerate() {
                let key = format!("model_x/abc/{i}.bin");
                let bytes = pattern(len, i as u64);
                let crc = put(&tier, &key, &bytes);
                assert_eq!(crc, crc32c::crc32c(&bytes), "len {len}");
                let path = tier.path_of(&key).expect("path");
                assert_eq!(fs::metadata(&path).expect("stat").len(), len as u64);
                assert_eq!(get(&tier, &key).expect("get"), bytes, "len {len}");
                assert_eq!(tier.verify(&key).expect("verify"), len as u64);

                // A longer destination is cut to the file's length.
                let dst = memfd(&pattern(len + 5000, 99));
                tier.get_to_fd(&key, dst.as_fd()).expect("get");
                assert_eq!(contents(&dst), bytes);
            }
            assert!(
                fs::read_dir(dir.path().join("tmp"))
                    .expect("tmp")
                    .next()
                    .is_none()
            );
            assert_eq!(tier.used(), allocated(dir.path()));
        }
    }

    #[test]
    fn put_replaces_and_accounts() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            put(&tier, "a/b.bin", &pattern(3 * CHUNK, 1));
            let before = tier.used();
            assert_eq!(before, allocated(dir.path()));
            let small = pattern(10, 2);
            put(&tier, "a/b.bin", &small);
            assert_eq!(get(&tier, "a/b.bin").expect("get"), small);
            assert!(tier.used() < before);
            assert_eq!(tier.used(), allocated(dir.path()));
        }
    }

    #[test]
    fn corrupt_copy_is_deleted() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let bytes = pattern(CHUNK + 4097, 3);
            put(&tier, "m/x/1.bin", &bytes);
            put(&tier, "m/y/2.bin", &bytes);
            put(&tier, "m/z/3.bin", &bytes);

            // A flipped byte.
            let path = tier.path_of("m/x/1.bin").expect("path");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open");
            pwrite_all(
                f.as_raw_fd(),
                &[bytes[CHUNK + 4096] ^ 1],
                (CHUNK + 4096) as u64,
            )
            .expect("flip");
            drop(f);
            match get(&tier, "m/x/1.bin") {
                Err(
                    e @ NvmeError::Corrupt {
                        mismatch: Mismatch::Checksum { .. },
                        ..
                    },
                ) => {
                    assert!(e.is_missing())
                }
                other => panic!("expected a checksum mismatch, got {other:?}"),
            }
            assert!(!path.exists());
            assert!(!dir.path().join("data/m/x").exists(), "empty parent left");
            assert!(matches!(
                get(&tier, "m/x/1.bin"),
                Err(NvmeError::NotFound { .. })
            ));

            // A size that disagrees with the metadata. (Grown, not cut: a
            // cut frees blocks behind the tier's back and skews used().)
            let path = tier.path_of("m/y/2.bin").expect("path");
            let grown = bytes.len() as u64 + 100;
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open")
                .set_len(grown)
                .expect("extend");
            assert!(matches!(
                tier.verify("m/y/2.bin"),
                Err(NvmeError::Corrupt { mismatch: Mismatch::Length { expected, actual }, .. })
                    if expected == bytes.len() as u64 && actual == grown
            ));
            assert!(!path.exists());

            // Lost xattrs.
            let path = tier.path_of("m/z/3.bin").expect("path");
            let c = cpath(&path).expect("cpath");
            // SAFETY: both strings are NUL-terminated.
            let r = unsafe { libc::removexattr(c.as_ptr(), XATTR_CRC.as_ptr()) };
            assert_eq!(r, 0);
            assert!(matches!(
                get(&tier, "m/z/3.bin"),
                Err(NvmeError::Corrupt {
                    mismatch: Mismatch::Metadata,
                    ..
                })
            ));
            assert!(!dir.path().join("data/m").exists());
            assert_eq!(tier.used(), 0);
        }
    }

    #[test]
    fn reopen_recovers_every_file() {
        for (dir, _) in dirs() {
            let mut want = Vec::new();
            let used = {
                let (tier, _) = open(dir.path(), 1 << 30);
                for (i, &len) in SIZES.iter().enumerate() {
                    let key = format!("model_{}/h{i:02}/{i}.bin", i % 2);
                    let bytes = pattern(len, 10 + i as u64);
                    let crc = put(&tier, &key, &bytes);
                    want.push((key, len as u64, crc, bytes));
                }
                tier.used()
            };
            let (tier, mut recovered) = open(dir.path(), 1 << 30);
            recovered.sort_by(|a, b| a.key.cmp(&b.key));
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(recovered.len(), want.len());
            for (r, (key, len, crc, bytes)) in recovered.iter().zip(&want) {
                assert_eq!((&r.key, r.len, r.crc), (key, *len, *crc));
                let age = SystemTime::now()
                    .duration_since(r.mtime)
                    .expect("mtime in the past");
                assert!(age.as_secs() < 600);
                assert_eq!(&get(&tier, key).expect("get"), bytes);
            }
            assert_eq!(tier.used(), used);
        }
    }

    #[test]
    fn second_open_of_a_dir_is_refused() {
        for (dir, _) in dirs() {
            let (_tier, _) = open(dir.path(), 1 << 30);
            let again = NvmeTier::open(NvmeConfig {
                dir: dir.path().to_path_buf(),
                capacity: 1 << 30,
            });
            assert!(matches!(again, Err(NvmeError::Locked { .. })));
        }
    }

    #[test]
    fn tmp_leftovers_are_removed_at_open() {
        for (dir, _) in dirs() {
            drop(open(dir.path(), 1 << 30));
            let tmp = dir.path().join("tmp");
            fs::write(tmp.join("17"), b"torn").expect("leftover");
            fs::create_dir(tmp.join("sub")).expect("mkdir");
            fs::write(tmp.join("sub/x"), b"torn").expect("leftover");
            let (_tier, recovered) = open(dir.path(), 1 << 30);
            assert!(recovered.is_empty());
            assert!(fs::read_dir(&tmp).expect("tmp").next().is_none());
        }
    }

    #[test]
    fn scan_removes_files_without_valid_metadata() {
        for (dir, _) in dirs() {
            {
                let (tier, _) = open(dir.path(), 1 << 30);
                put(&tier, "keep/a.bin", &pattern(5000, 4));
                put(&tier, "bad/len.bin", &pattern(5000, 5));
            }
            let data = dir.path().join("data");
            fs::create_dir_all(data.join("foreign/deep")).expect("mkdir");
            fs::write(data.join("foreign/deep/x.bin"), b"no xattrs").expect("write");
            fs::write(data.join("keep/torn.bin"), b"no xattrs").expect("write");
            fs::create_dir_all(data.join("empty/dir")).expect("mkdir");
            std::os::unix::fs::symlink("/etc/passwd", data.join("link")).expect("symlink");
            // Length xattr disagrees with the size.
            let c = cpath(&data.join("bad/len.bin")).expect("cpath");
            // SAFETY: strings are NUL-terminated, the value valid for its length.
            let r = unsafe {
                libc::setxattr(
                    c.as_ptr(),
                    XATTR_LEN.as_ptr(),
                    b"4999".as_ptr().cast(),
                    4,
                    0,
                )
            };
            assert_eq!(r, 0);

            let (tier, recovered) = open(dir.path(), 1 << 30);
            let keys: Vec<_> = recovered.iter().map(|r| r.key.as_str()).collect();
            assert_eq!(keys, ["keep/a.bin"]);
            let mut left: Vec<_> = fs::read_dir(&data)
                .expect("data")
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect();
            left.sort();
            assert_eq!(left, ["keep"]);
            assert!(!data.join("keep/torn.bin").exists());
            assert_eq!(tier.used(), allocated(dir.path()));
        }
    }

    #[test]
    fn owners_round_trip_and_bad_ones_are_ignored() {
        let o = FileOwner {
            uid: u32::MAX,
            gid: 7,
            perm: 0o4755,
        };
        assert_eq!(FileOwner::decode(o.encode().as_bytes()), Some(o));
        for bad in ["", "1:2", "1:2:9", "a:2:644", "1:2:644:5", "1:2:-1"] {
            assert_eq!(FileOwner::decode(bad.as_bytes()), None, "{bad}");
        }
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            put(&tier, "f", &pattern(4096, 1));
            tier.set_owner("f", o).expect("set owner");
            assert!(matches!(
                tier.set_owner("nope", o),
                Err(NvmeError::NotFound { .. })
            ));
            let r = tier.scan().expect("scan");
            assert_eq!(r[0].owner, Some(o));
        }
    }

    #[test]
    fn exchange_swaps_files_and_directories_in_one_step() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let (a, b, c) = (pattern(5000, 1), pattern(9000, 2), pattern(3000, 3));
            put(&tier, "x/f", &a);
            put(&tier, "y", &b);
            put(&tier, "z/deep/g", &c);
            // File and directory trade places.
            tier.exchange("x", "y").expect("exchange");
            assert_eq!(get(&tier, "y/f").expect("get"), a);
            assert_eq!(get(&tier, "x").expect("get"), b);
            // Only one side exists: a rename.
            tier.exchange("nothing/here", "z")
                .expect("exchange with a missing side");
            assert_eq!(get(&tier, "nothing/here/deep/g").expect("get"), c);
            assert!(!dir.path().join("data/z").exists());
            tier.exchange("n1", "n2").expect("neither exists");
            assert_eq!(tier.used(), allocated(dir.path()));
            // A scan after the swaps finds every copy under its new name.
            let mut keys: Vec<String> = tier
                .scan()
                .expect("scan")
                .into_iter()
                .map(|r| r.key)
                .collect();
            keys.sort();
            assert_eq!(keys, ["nothing/here/deep/g", "x", "y/f"]);
        }
    }

    #[test]
    fn scan_drops_copies_parked_by_an_interrupted_move() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            put(&tier, "kept", &pattern(4096, 1));
            put(&tier, ".kvfs/moving/17", &pattern(4096, 2));
            let keys: Vec<String> = tier
                .scan()
                .expect("scan")
                .into_iter()
                .map(|r| r.key)
                .collect();
            assert_eq!(keys, ["kept"]);
            assert!(!dir.path().join("data/.kvfs").exists());
        }
    }

    #[test]
    fn rename_and_remove_clean_up_parents() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let data = dir.path().join("data");
            let a = pattern(7000, 6);
            let b = pattern(2 * CHUNK, 7);
            put(&tier, "m/a/1.bin", &a);
            put(&tier, "keep/other.bin", &b);

            tier.rename("m/a/1.bin", "n/b/c/2.bin").expect("rename");
            assert!(!data.join("m").exists());
            assert!(matches!(
                get(&tier, "m/a/1.bin"),
                Err(NvmeError::NotFound { .. })
            ));
            assert_eq!(get(&tier, "n/b/c/2.bin").expect("get"), a);
            assert_eq!(tier.used(), allocated(dir.path()));

            // Over an existing file: the replaced copy leaves the accounting.
            tier.rename("keep/other.bin", "n/b/c/2.bin")
                .expect("rename over");
            assert_eq!(get(&tier, "n/b/c/2.bin").expect("get"), b);
            assert!(!data.join("keep").exists());
            assert_eq!(tier.used(), allocated(dir.path()));

            tier.rename("n/b/c/2.bin", "n/b/c/2.bin")
                .expect("rename to itself");
            assert!(matches!(
                tier.rename("nope", "x"),
                Err(NvmeError::NotFound { .. })
            ));

            tier.remove("n/b/c/2.bin").expect("remove");
            tier.remove("n/b/c/2.bin").expect("remove again");
            tier.remove("never/was").expect("remove missing");
            assert!(fs::read_dir(&data).expect("data").next().is_none());
            assert_eq!(tier.used(), 0);
        }
    }

    #[test]
    fn bad_keys() {
        let (dir, _) = dirs().remove(0);
        let (tier, _) = open(dir.path(), 1 << 30);
        let src = memfd(b"x");
        for key in [
            "", "/abs", "a/../b", "..", ".", "a//b", "a/", "./a", "a/.", "a\0b",
        ] {
            let bad = |r: Result<(), NvmeError>| matches!(r, Err(NvmeError::BadKey(_)));
            assert!(
                bad(tier.put_from_fd(key, src.as_fd(), 1).map(drop)),
                "{key:?}"
            );
            assert!(bad(tier.get_to_fd(key, src.as_fd()).map(drop)), "{key:?}");
            assert!(bad(tier.verify(key).map(drop)), "{key:?}");
            assert!(bad(tier.remove(key)), "{key:?}");
            assert!(bad(tier.rename(key, "ok")), "{key:?}");
            assert!(bad(tier.rename("ok", key)), "{key:?}");
            assert!(bad(tier.path_of(key).map(drop)), "{key:?}");
        }
        assert!(
            fs::read_dir(dir.path().join("data"))
                .expect("data")
                .next()
                .is_none()
        );
        assert_eq!(
            tier.path_of("a/b c/.x..").expect("ok"),
            dir.path().join("data/a/b c/.x..")
        );
    }

    #[test]
    fn capacity_is_enforced() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 3 * 4096);
            let src = memfd(&pattern(3 * 4096, 8));
            tier.put_from_fd("a", src.as_fd(), 4096).expect("fits");
            let used = tier.used();
            assert_eq!(used, allocated(dir.path()));
            let err = tier
                .put_from_fd("b", src.as_fd(), 3 * 4096)
                .expect_err("too big");
            assert!(
                matches!(err, NvmeError::NoSpace { needed: 12288, .. }),
                "{err:?}"
            );
            assert_eq!(tier.used(), used);
            assert!(!dir.path().join("data/b").exists());
            tier.remove("a").expect("remove");
            tier.put_from_fd("b", src.as_fd(), 3 * 4096)
                .expect("fits now");
        }
    }

    #[test]
    fn short_source_leaves_nothing() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 30);
            let src = memfd(&pattern(5000, 9));
            let err = tier
                .put_from_fd("s/x", src.as_fd(), 2 * CHUNK as u64)
                .expect_err("short");
            assert!(
                matches!(&err, NvmeError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
                "{err:?}"
            );
            assert!(!dir.path().join("data/s").exists());
            assert!(
                fs::read_dir(dir.path().join("tmp"))
                    .expect("tmp")
                    .next()
                    .is_none()
            );
            assert_eq!(tier.used(), 0);
        }
    }

    #[test]
    fn concurrent_puts_and_gets() {
        for (dir, _) in dirs() {
            let (tier, _) = open(dir.path(), 1 << 32);
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let tier = &tier;
                    s.spawn(move || {
                        for i in 0..6u64 {
                            let key = format!("t{t}/{i}.bin");
                            let bytes =
                                pattern(CHUNK * (i as usize % 3) + 123 * i as usize, t * 100 + i);
                            put(tier, &key, &bytes);
                            assert_eq!(get(tier, &key).expect("get"), bytes);
                        }
                    });
                }
            });
            assert_eq!(tier.used(), allocated(dir.path()));
            assert!(lock_or_recover(&tier.engines).len() <= MAX_IDLE_ENGINES);
        }
    }

    /// Times the recovery scan over 100k small files:
    /// `cargo test --release --lib store::nvme -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn scan_100k_files_timing() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let n = 100_000;
        {
            let (tier, _) = open(dir.path(), 1 << 40);
            let src = memfd(&pattern(4096, 1));
            let t = std::time::Instant::now();
            for i in 0..n {
                let key = format!(
                    "model_x_0123456789ab_r0/{:03x}/{:02x}_g0/{i:016x}.bin",
                    i % 4096,
                    i % 256
                );
                tier.put_from_fd(&key, src.as_fd(), 4096).expect("put");
            }
            eprintln!("put {n} x 4 KiB: {:?}", t.elapsed());
        }
        let t = std::time::Instant::now();
        let (tier, recovered) = open(dir.path(), 1 << 40);
        eprintln!("open + scan of {n} files, warm cache: {:?}", t.elapsed());
        assert_eq!(recovered.len(), n);
        drop(tier);
        // SAFETY: plain syscall.
        unsafe { libc::sync() };
        let dropped = fs::write("/proc/sys/vm/drop_caches", b"3").is_ok();
        let t = std::time::Instant::now();
        let (_tier, recovered) = open(dir.path(), 1 << 40);
        eprintln!(
            "open + scan of {n} files, {}: {:?}",
            if dropped {
                "cold cache"
            } else {
                "warm cache (could not drop caches)"
            },
            t.elapsed()
        );
        assert_eq!(recovered.len(), n);
    }

    /// Sequential throughput of 16 MiB blocks, memfd to disk and back:
    /// `cargo test --release --lib store::nvme -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput_16mib_blocks() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let (tier, _) = open(dir.path(), 1 << 40);
        let block = 16 << 20;
        let n = 128;
        let src = memfd(&pattern(block, 1));
        let t = std::time::Instant::now();
        for i in 0..n {
            tier.put_from_fd(&format!("b/{i}.bin"), src.as_fd(), block as u64)
                .expect("put");
        }
        let w = t.elapsed();
        let dst = memfd(&[]);
        let t = std::time::Instant::now();
        for i in 0..n {
            tier.get_to_fd(&format!("b/{i}.bin"), dst.as_fd())
                .expect("get");
        }
        let r = t.elapsed();
        let gb = (n * block) as f64 / 1e9;
        eprintln!(
            "o_direct={} put {:.2} GB/s, get {:.2} GB/s ({n} x 16 MiB)",
            tier.o_direct(),
            gb / w.as_secs_f64(),
            gb / r.as_secs_f64()
        );
    }
}
