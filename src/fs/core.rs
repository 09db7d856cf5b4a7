//! The filesystem core: every FUSE operation as one method over the
//! namespace and the store, with no FUSE types, so it can be tested without
//! the kernel. The adapter in `fuse.rs` translates requests and replies.
//!
//! Locking: the namespace lock is taken first, the store's inside it; no lock
//! is held while file bytes move (fallback reads and writes work on an
//! `Arc<HostFile>` taken out of the locks).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use crate::metrics::Metrics;

mod lower;
mod remote;
pub use remote::S3Cleanup;
mod zc;
use crate::namespace::{FileState, Ino, Namespace, NodeKind, NsError, Owner, ROOT_INO, RenameMode};
use crate::store::host::{FileStat, SetTime};
use crate::store::{HostFile, HostTier, HostUsage, StoreError};

/// The hidden control directory in the root, and the status file inside it.
pub const CONTROL_DIR: &str = ".kvfs";
pub const CONTROL_DIR_INO: Ino = 2;
pub const STATUS_FILE: &str = "status";
pub const STATUS_INO: Ino = 3;
/// Prometheus text, for scrapers that read files.
pub const STATS_FILE: &str = "stats";
pub const STATS_INO: Ino = 4;
/// A symlink to the zero-copy control socket, when it is served.
pub const ZC_SOCKET_FILE: &str = "zerocopy.sock";
pub const ZC_SOCKET_INO: Ino = 5;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Namespace(#[from] NsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stale file handle {0}")]
    BadHandle(u64),
    /// The kernel named an inode whose contents the daemon dropped (an
    /// eviction): the kernel then looks the name up afresh.
    #[error("inode {0} was evicted")]
    Stale(Ino),
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("read-only: {0}")]
    ReadOnly(&'static str),
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value does not fit in {0} bytes")]
    Range(usize),
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| FsError::Io { op, source }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// The unit in which the host tier's memory is allocated.
const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// Attributes as `stat` shows them.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Changes requested by `setattr`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// An open file as the adapter needs it.
pub struct Opened {
    pub fh: u64,
    /// The backing file to pass through to; `None` for control files, which
    /// the daemon serves itself.
    pub file: Option<Arc<HostFile>>,
}

enum Handle {
    File {
        ino: Ino,
        file: Arc<HostFile>,
        writable: bool,
    },
    Status(Vec<u8>),
    Dir {
        ino: Ino,
        entries: Vec<crate::namespace::DirEntry>,
    },
}

/// How the FUSE adapter moves file bytes; reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataMode {
    Passthrough,
    Fallback,
}

/// Who is asking, for ownership of new inodes.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(serde::Serialize)]
struct Status<'a> {
    version: &'a str,
    data_path: DataMode,
    files: u64,
    host: HostUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    nvme: Option<NvmeUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s3: Option<remote::S3Usage>,
    counters: crate::metrics::CounterSnapshot,
}

#[derive(serde::Serialize)]
struct NvmeUsage {
    capacity: u64,
    used: u64,
    files: u64,
    o_direct: bool,
    /// Write-backs queued or running (0: everything sealed is on NVMe).
    pending_flushes: u64,
}

/// Told the (parent, name) of every entry the daemon removes on its own
/// (evictions), so the kernel can drop cached dentries.
pub type Invalidator = Box<dyn Fn(Ino, OsString) + Send + Sync>;

pub struct Kvfs {
    ns: Mutex<Namespace>,
    host: HostTier,
    handles: Mutex<HashMap<u64, Handle>>,
    /// File handles open for writing: while any is, a writer is busy and
    /// uploads hold back (see `remote::upload_limit`).
    writable_handles: AtomicU64,
    next_fh: AtomicU64,
    data_mode: Mutex<DataMode>,
    invalidator: OnceLock<Invalidator>,
    /// The NVMe tier, when configured.
    lower: Option<lower::Lower>,
    /// The S3 tier, when configured.
    remote: Option<remote::Remote>,
    /// One lock per file being promoted, so concurrent opens copy once.
    promoting: Mutex<HashMap<Ino, Arc<Mutex<()>>>>,
    /// Signalled whenever background work makes a file clean: writers
    /// waiting for room in the host tier wait on it.
    progress: (Mutex<()>, std::sync::Condvar),
    /// Zero-copy slots allocated and not yet committed or aborted.
    zc_slots: Mutex<std::collections::HashSet<Ino>>,
    /// Where the zero-copy socket is, once it is served.
    zc_socket: OnceLock<std::path::PathBuf>,
    /// What fsync waits for (the durability level).
    sync_waits_for_nvme: bool,
    sync_waits_for_s3: bool,
    pub metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn perm_bits(mode: u32) -> u16 {
    (mode & 0o7777) as u16
}

/// A file's owner and mode as the lower tiers keep them with its copy.
fn file_owner(node: &crate::namespace::Inode) -> crate::store::FileOwner {
    crate::store::FileOwner {
        uid: node.uid,
        gid: node.gid,
        perm: node.perm,
    }
}

/// The owner a lower tier kept, for the namespace.
fn owner_from(o: crate::store::FileOwner) -> Owner {
    Owner {
        uid: o.uid,
        gid: o.gid,
        perm: o.perm,
    }
}

impl Kvfs {
    pub fn new(host: HostTier, root: Caller) -> Kvfs {
        let now = SystemTime::now();
        let owner = Owner {
            uid: root.uid,
            gid: root.gid,
            perm: 0o755,
        };
        Kvfs {
            ns: Mutex::new(Namespace::new(owner, now)),
            host,
            handles: Mutex::new(HashMap::new()),
            writable_handles: AtomicU64::new(0),
            next_fh: AtomicU64::new(1),
            data_mode: Mutex::new(DataMode::Fallback),
            invalidator: OnceLock::new(),
            lower: None,
            remote: None,
            promoting: Mutex::new(HashMap::new()),
            zc_slots: Mutex::new(Default::default()),
            zc_socket: OnceLock::new(),
            progress: (Mutex::new(()), std::sync::Condvar::new()),
            sync_waits_for_nvme: false,
            sync_waits_for_s3: false,
            metrics: Metrics::new(),
        }
    }

    /// With durability `local`, fsync returns once the file is on NVMe.
    pub fn set_sync_waits_for_nvme(&mut self, wait: bool) {
        self.sync_waits_for_nvme = wait;
    }

    /// With durability `remote`, fsync returns once the file is in S3.
    pub fn set_sync_waits_for_s3(&mut self, wait: bool) {
        self.sync_waits_for_s3 = wait;
    }

    /// fsync/fdatasync of a file.
    pub fn fsync(&self, ino: Ino) -> Result<()> {
        if Self::is_control(ino) {
            return Ok(());
        }
        if self.sync_waits_for_nvme || (self.sync_waits_for_s3 && self.lower.is_some()) {
            self.sync_to_nvme(ino)?;
        }
        if self.sync_waits_for_s3 {
            self.sync_to_s3(ino)?;
        }
        Ok(())
    }

    /// Is there an NVMe tier?
    pub fn has_nvme(&self) -> bool {
        self.lower.is_some()
    }

    /// Is there any tier below the host tier?
    fn has_lower_tiers(&self) -> bool {
        self.lower.is_some() || self.remote.is_some()
    }

    /// Wakes writers waiting for room.
    fn bg_progress(&self) {
        let _g = lock(&self.progress.0);
        self.progress.1.notify_all();
    }

    /// A file was sealed (or re-pinned): copy it down a tier.
    fn after_seal(&self, ino: Ino) {
        if self.lower.is_some() {
            self.queue_flush(ino, false);
        } else {
            self.queue_upload(ino, false);
        }
    }

    pub fn set_data_mode(&self, mode: DataMode) {
        *lock(&self.data_mode) = mode;
    }

    pub fn data_mode(&self) -> DataMode {
        *lock(&self.data_mode)
    }

    /// Where the host tier's backing files are.
    pub fn host_backing_dir(&self) -> std::path::PathBuf {
        self.host.backing_dir().to_path_buf()
    }

    /// Shows `.kvfs/zerocopy.sock`, a symlink to the served socket.
    pub fn set_zc_socket(&self, path: std::path::PathBuf) {
        let _ = self.zc_socket.set(path);
    }

    /// The target of a symlink (only the control directory has one).
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match (ino, self.zc_socket.get()) {
            (ZC_SOCKET_INO, Some(p)) => {
                Ok(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec())
            }
            _ => Err(NsError::Invalid("not a symlink").into()),
        }
    }

    pub fn set_invalidator(&self, f: Invalidator) {
        // Set once at mount; a second call is a programming error we ignore.
        let _ = self.invalidator.set(f);
    }

    fn ns(&self) -> MutexGuard<'_, Namespace> {
        lock(&self.ns)
    }

    /// File handles open for writing now.
    pub(super) fn writable_handles(&self) -> u64 {
        self.writable_handles.load(Ordering::Relaxed)
    }

    fn new_fh(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Handle::File { writable: true, .. } = handle {
            self.writable_handles.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.handles).insert(fh, handle);
        fh
    }

    /// Attributes of the control entries; the status file's size is that of
    /// the document an open would serve now.
    fn control_attr(&self, ns: &Namespace, ino: Ino) -> Attr {
        let (kind, perm, nlink, size) = match ino {
            CONTROL_DIR_INO => (Kind::Dir, 0o555, 2, 0),
            ZC_SOCKET_INO => (
                Kind::Symlink,
                0o777,
                1,
                self.zc_socket
                    .get()
                    .map_or(0, |p| p.as_os_str().len() as u64),
            ),
            STATS_INO => (Kind::File, 0o444, 1, self.prometheus_text().len() as u64),
            _ => (Kind::File, 0o444, 1, self.status_doc(ns).len() as u64),
        };
        let now = SystemTime::now();
        Attr {
            ino,
            kind,
            size,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            perm,
            nlink,
            uid: 0,
            gid: 0,
        }
    }

    fn is_control(ino: Ino) -> bool {
        matches!(
            ino,
            CONTROL_DIR_INO | STATUS_INO | STATS_INO | ZC_SOCKET_INO
        )
    }

    /// Builds attributes from the namespace and, for files, the backing file.
    fn attr_of(&self, ns: &Namespace, ino: Ino) -> Result<Attr> {
        if Self::is_control(ino) {
            return Ok(self.control_attr(ns, ino));
        }
        let node = ns.get(ino)?;
        let mut attr = Attr {
            ino,
            kind: if node.is_dir() { Kind::Dir } else { Kind::File },
            size: 0,
            blocks: 0,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
        };
        if node.is_dir() {
            attr.size = 4096;
            attr.blocks = 8;
        } else if let Some(file) = self.host.get(ino) {
            let st: FileStat = file.stat().map_err(io_err("fstat"))?;
            attr.size = st.size;
            attr.blocks = st.allocated / 512;
            attr.atime = st.atime;
            attr.mtime = st.mtime;
            // The namespace changes ctime too (chmod, rename): show the later.
            attr.ctime = st.ctime.max(node.ctime);
        } else if node.lower.nvme.is_none()
            && let Some((size, mtime)) = Self::s3_attr(ns, ino)
        {
            // Only in S3.
            attr.size = size;
            attr.blocks = size.div_ceil(512);
            attr.mtime = mtime;
            attr.atime = node.atime.max(mtime);
        } else {
            // Only on NVMe (demoted), or gone (evicted: the kernel retries).
            let key = node.lower.nvme.as_deref().ok_or(FsError::Stale(ino))?;
            let md = self.nvme_stat(key).ok_or(FsError::Stale(ino))?;
            use std::os::unix::fs::MetadataExt;
            attr.size = md.len();
            attr.blocks = md.blocks();
            attr.atime = md.accessed().unwrap_or(node.atime);
            attr.mtime = md.modified().unwrap_or(node.mtime);
            attr.ctime = node.ctime;
        }
        Ok(attr)
    }

    /// Resolves a name. Every entry handed to the kernel is a reference it
    /// will `forget` later; the inode lives at least until then.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let mut ns = self.ns();
        if parent == ROOT_INO && name == CONTROL_DIR {
            return Ok(self.control_attr(&ns, CONTROL_DIR_INO));
        }
        if parent == CONTROL_DIR_INO {
            return match name.to_str() {
                Some(STATUS_FILE) => Ok(self.control_attr(&ns, STATUS_INO)),
                Some(STATS_FILE) => Ok(self.control_attr(&ns, STATS_INO)),
                Some(ZC_SOCKET_FILE) if self.zc_socket.get().is_some() => {
                    Ok(self.control_attr(&ns, ZC_SOCKET_INO))
                }
                _ => Err(NsError::NotFound.into()),
            };
        }
        if self.remote.is_some() {
            // Asking S3 is slow: not under the namespace lock.
            let local = ns.lookup(parent, name).ok();
            drop(ns);
            match local {
                Some(ino) => self.revalidate(ino),
                None => {
                    self.find_in_s3(parent, name)?;
                }
            }
            ns = self.ns();
        }
        match ns.lookup(parent, name) {
            Ok(ino) => {
                let attr = self.attr_of(&ns, ino)?;
                ns.remember(ino);
                if attr.kind == Kind::File {
                    self.metrics.counters.hits.inc();
                }
                Ok(attr)
            }
            Err(NsError::NotFound) => {
                self.metrics.counters.misses.inc();
                Err(NsError::NotFound.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let ns = self.ns();
        self.attr_of(&ns, ino)
    }

    pub fn setattr(&self, ino: Ino, caller: Caller, set: SetAttr) -> Result<Attr> {
        if Self::is_control(ino) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        if self.has_lower_tiers()
            && (set.size.is_some() || set.atime.is_some() || set.mtime.is_some())
            && !self.ns().get(ino)?.is_dir()
        {
            self.host_copy(ino)?;
        }
        let mut ns = self.ns();
        let now = SystemTime::now();
        let is_dir = ns.get(ino)?.is_dir();
        if let Some(size) = set.size {
            if is_dir {
                return Err(NsError::IsDir.into());
            }
            let file = self.host.get(ino).ok_or(FsError::Stale(ino))?;
            // Growing makes a hole, which allocates nothing: no room needed.
            file.set_len(size).map_err(io_err("ftruncate"))?;
            self.host.remeasure(ino);
            // The lower copy no longer matches; a closed file is copied again.
            self.drop_lower_copies(&mut ns, ino);
        }
        let node = ns.get_mut(ino)?;
        if let Some(mode) = set.mode {
            node.perm = perm_bits(mode);
            node.ctime = now;
        }
        if set.uid.is_some() || set.gid.is_some() {
            // The kernel checks permissions (default_permissions); only root
            // may give files away, which it already enforced.
            let _ = caller;
            if let Some(uid) = set.uid {
                node.uid = uid;
            }
            if let Some(gid) = set.gid {
                node.gid = gid;
            }
            node.ctime = now;
        }
        let owner_changed = set.mode.is_some() || set.uid.is_some() || set.gid.is_some();
        if owner_changed && !is_dir {
            self.record_owner(&ns, ino);
            self.record_s3_owner(&ns, ino);
        }
        let node = ns.get_mut(ino)?;
        if set.atime.is_some() || set.mtime.is_some() {
            let atime = set.atime.unwrap_or(SetTime::Omit);
            let mtime = set.mtime.unwrap_or(SetTime::Omit);
            if is_dir {
                let resolve = |t: SetTime, old: SystemTime| match t {
                    SetTime::Omit => old,
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
                node.atime = resolve(atime, node.atime);
                node.mtime = resolve(mtime, node.mtime);
                node.ctime = now;
            } else if let Some(file) = self.host.get(ino) {
                file.set_times(atime, mtime).map_err(io_err("futimens"))?;
                self.host.touch(ino);
            }
        }
        if self.has_lower_tiers() && !is_dir && ns.get(ino)?.open == 0 {
            // A promotion for this setattr left the file pinned; settle it.
            let evictable = self.is_clean(&ns, ino);
            let evicted = self.host.settle(ino, evictable);
            self.drop_evicted(&mut ns, &evicted);
        }
        self.attr_of(&ns, ino)
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        self.check_writable_parent(parent, name)?;
        let mut ns = self.ns();
        let owner = Owner {
            uid: caller.uid,
            gid: caller.gid,
            perm: perm_bits(mode),
        };
        let ino = ns.mkdir(parent, name, owner, SystemTime::now())?;
        ns.remember(ino);
        self.attr_of(&ns, ino)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        if Self::is_control(ino) {
            return;
        }
        let mut ns = self.ns();
        if ns.forget(ino, n) {
            self.host.remove(ino);
        }
    }

    fn check_writable_parent(&self, parent: Ino, name: &OsStr) -> Result<()> {
        if Self::is_control(parent) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        if parent == ROOT_INO && name == CONTROL_DIR {
            return Err(NsError::Exists.into());
        }
        Ok(())
    }

    /// Creates and opens a regular file. Without `O_EXCL` an existing file
    /// of that name is opened instead (another process won the race to
    /// create it between the kernel's lookup and this call).
    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, Opened)> {
        self.check_writable_parent(parent, name)?;
        let mut ns = self.ns_with_room()?;
        match ns.lookup(parent, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => return Err(NsError::Exists.into()),
            Ok(ino) => {
                drop(ns);
                let opened = self.open(ino, flags)?;
                let mut ns = self.ns();
                ns.remember(ino);
                return Ok((self.attr_of(&ns, ino)?, opened));
            }
            Err(NsError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let owner = Owner {
            uid: caller.uid,
            gid: caller.gid,
            perm: perm_bits(mode),
        };
        let ino = ns.create_file(parent, name, owner, SystemTime::now())?;
        let file = match self.host.create(ino) {
            Ok(f) => f,
            Err(e) => {
                // Undo the name so a failed create leaves nothing behind.
                let _ = ns.unlink(parent, name, SystemTime::now());
                ns.reap(ino);
                return Err(e.into());
            }
        };
        ns.open(ino, true)?;
        ns.remember(ino);
        let attr = self.attr_of(&ns, ino)?;
        drop(ns);
        let fh = self.new_fh(Handle::File {
            ino,
            file: Arc::clone(&file),
            writable: true,
        });
        self.metrics.counters.creates.inc();
        self.metrics.counters.opens.inc();
        Ok((
            attr,
            Opened {
                fh,
                file: Some(file),
            },
        ))
    }

    /// Creates a regular file without opening it (mknod).
    pub fn mknod(&self, parent: Ino, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FsError::NotPermitted(
                "only regular files and directories can be created",
            ));
        }
        let (attr, opened) = self.create(parent, name, mode, libc::O_EXCL, caller)?;
        self.release(opened.fh)?;
        Ok(attr)
    }

    pub fn open(&self, ino: Ino, flags: i32) -> Result<Opened> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if ino == STATUS_INO || ino == STATS_INO {
            if writable {
                return Err(FsError::ReadOnly("the control directory"));
            }
            let doc = if ino == STATUS_INO {
                self.status_json()
            } else {
                self.prometheus_text().into_bytes()
            };
            let fh = self.new_fh(Handle::Status(doc));
            return Ok(Opened { fh, file: None });
        }
        if ino == CONTROL_DIR_INO {
            return Err(NsError::IsDir.into());
        }
        if self.has_lower_tiers() && !self.ns().get(ino)?.is_dir() {
            // Only on NVMe or in S3: copy it back (verified) before opening it.
            self.host_copy(ino)?;
        }
        let mut ns = self.ns();
        let node = ns.get(ino)?;
        if node.is_dir() {
            return Err(NsError::IsDir.into());
        }
        let file = self.host.get(ino).ok_or(FsError::Stale(ino))?;
        // Pin first: making room must never evict the file being opened.
        self.host.acquire(ino);
        let room = if writable {
            let (guard, room) = self.room_to_write(ns);
            ns = guard;
            room
        } else {
            Ok(())
        };
        if let Err(e) = room {
            if ns.get(ino)?.open == 0 {
                // Nobody else holds it: back in the LRU.
                let evictable = self.is_clean(&ns, ino);
                let evicted = self.host.settle(ino, evictable);
                self.drop_evicted(&mut ns, &evicted);
            }
            return Err(e);
        }
        if flags & libc::O_TRUNC != 0 && writable {
            file.set_len(0).map_err(io_err("ftruncate"))?;
            self.host.remeasure(ino);
        }
        ns.open(ino, writable)?;
        if writable {
            // The contents may change: the lower copy is no longer the file.
            self.drop_lower_copies(&mut ns, ino);
        }
        drop(ns);
        self.metrics.counters.opens.inc();
        let fh = self.new_fh(Handle::File {
            ino,
            file: Arc::clone(&file),
            writable,
        });
        Ok(Opened {
            fh,
            file: Some(file),
        })
    }

    /// Fallback data path: read through the daemon.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file = {
            let handles = lock(&self.handles);
            match handles.get(&fh) {
                Some(Handle::File { file, .. }) => Arc::clone(file),
                Some(Handle::Status(data)) => {
                    let start = (offset as usize).min(data.len());
                    let end = (start + size as usize).min(data.len());
                    return Ok(data[start..end].to_vec());
                }
                Some(Handle::Dir { .. }) => return Err(NsError::IsDir.into()),
                None => return Err(FsError::BadHandle(fh)),
            }
        };
        let mut buf = vec![0u8; size as usize];
        let n = file.read_at(&mut buf, offset).map_err(io_err("pread"))?;
        buf.truncate(n);
        self.metrics.counters.daemon_read_bytes.inc_by(n as u64);
        Ok(buf)
    }

    /// Fallback data path: write through the daemon, within capacity.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let (ino, file) = {
            let handles = lock(&self.handles);
            match handles.get(&fh) {
                Some(Handle::File {
                    ino,
                    file,
                    writable: true,
                }) => (*ino, Arc::clone(file)),
                Some(Handle::File { .. }) => {
                    return Err(FsError::NotPermitted("file not open for writing"));
                }
                Some(_) => return Err(FsError::ReadOnly("the control directory")),
                None => return Err(FsError::BadHandle(fh)),
            }
        };
        // Memory is allocated in pages: only pages past the current end cost
        // more (holes below it are rare for block files and not counted).
        // With huge pages the tier allocates 2 MiB ahead of the size: what
        // is allocated already costs nothing more.
        let page_end = |n: u64| n.div_ceil(PAGE) * PAGE;
        let st = file.stat().map_err(io_err("fstat"))?;
        let have = page_end(st.size).max(st.allocated);
        let need = page_end(offset + data.len() as u64).saturating_sub(have);
        if need > 0 {
            let mut ns = self.ns();
            let evicted = self.host.reserve(need)?;
            self.drop_evicted(&mut ns, &evicted);
        }
        file.write_at(data, offset).map_err(io_err("pwrite"))?;
        self.metrics
            .counters
            .daemon_write_bytes
            .inc_by(data.len() as u64);
        let _ = ino;
        Ok(data.len() as u32)
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let handle = lock(&self.handles).remove(&fh);
        let Some(Handle::File {
            ino,
            file,
            writable,
        }) = handle
        else {
            return Ok(());
        };
        if writable {
            self.writable_handles.fetch_sub(1, Ordering::Relaxed);
        }
        let mut ns = self.ns();
        let sealed = ns.release(ino, writable)?;
        if sealed && let Ok(node) = ns.get_mut(ino) {
            // Before anything asks whether the file is clean: a copy taken
            // by an fsync while it was open may be older than what the
            // writer wrote after it (found as a flaky "older bytes" test:
            // the host evicted a file whose only lower copy was stale).
            node.lower.nvme_stale = node.lower.nvme.is_some();
            node.lower.s3_stale = node.lower.s3.is_some();
        }
        let node = ns.get(ino)?;
        let closed = node.open == 0;
        let linked = node.nlink > 0;
        let mut settled = false;
        if !linked && closed {
            self.unlinked(&mut ns, ino);
        } else if closed && node.file_state() == Some(FileState::Sealed) {
            let evictable = self.is_clean(&ns, ino);
            let evicted = self.host.settle(ino, evictable);
            self.drop_evicted(&mut ns, &evicted);
            // A file too large for the tier is among the evicted.
            settled = !evicted.contains(&ino);
        }
        if sealed {
            let bytes = file.stat().map(|s| s.size).unwrap_or(0);
            self.metrics.counters.sealed_files.inc();
            self.metrics.counters.sealed_bytes.inc_by(bytes);
        }
        drop(ns);
        if settled {
            self.host.park(&file);
            self.after_seal(ino);
        }
        Ok(())
    }

    /// May the host tier drop this file's bytes? Without a lower tier,
    /// always (an eviction is a cache miss); with one, once they are there.
    fn is_clean(&self, ns: &Namespace, ino: Ino) -> bool {
        !self.has_lower_tiers()
            || ns.get(ino).is_ok_and(|n| {
                // `flushing` with a fresh copy: named, not yet durable.
                (n.lower.nvme.is_some() && !n.lower.nvme_stale && !n.lower.flushing)
                    || (n.lower.s3.is_some() && !n.lower.s3_stale)
            })
    }

    /// The lower copies of `ino` no longer match it (unlinked, or about to
    /// change): drop them. A closed file that still has its name stays
    /// pinned in the host tier and is copied down again.
    fn drop_lower_copies(&self, ns: &mut Namespace, ino: Ino) {
        let had_s3 = Self::in_s3(ns, ino);
        self.drop_s3_copy(ns, ino);
        if ns.get(ino).is_ok_and(|n| n.lower.nvme.is_some()) {
            self.drop_nvme_copy(ns, ino);
        } else if had_s3 && let Ok(node) = ns.get(ino) {
            let requeue = node.nlink > 0 && node.open == 0;
            self.repin(ns, ino, requeue);
        }
    }

    /// Room for one more written file, evicting as needed.
    fn make_room(&self, ns: &mut Namespace) -> Result<()> {
        let evicted = self.host.make_room_for_new_file()?;
        self.drop_evicted(ns, &evicted);
        Ok(())
    }

    /// Removes evicted files from the namespace and tells the kernel.
    fn drop_evicted(&self, ns: &mut Namespace, evicted: &[Ino]) {
        self.metrics.counters.evictions.inc_by(evicted.len() as u64);
        for &ino in evicted {
            let Ok(node) = ns.get(ino) else { continue };
            if node.lower.nvme.is_some() || node.lower.flushing || node.lower.s3.is_some() {
                // Demoted: the bytes stay below (or are on their way).
                continue;
            }
            let (parent, name) = (node.parent, node.name.clone());
            tracing::debug!(ino, path = ?ns.path_of(ino), "evicted from host tier");
            if ns.unlink(parent, &name, SystemTime::now()).is_ok() {
                ns.reap(ino);
                if let Some(inval) = self.invalidator.get() {
                    inval(parent, name);
                }
            }
        }
    }

    fn unlinked(&self, ns: &mut Namespace, ino: Ino) {
        if ns.reap(ino) {
            self.host.remove(ino);
        }
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.check_writable_parent(parent, name)?;
        let mut ns = self.ns();
        let ino = ns.unlink(parent, name, SystemTime::now())?;
        tracing::debug!(parent, name = ?name, ino, "unlink");
        self.drop_lower_copies(&mut ns, ino);
        self.unlinked(&mut ns, ino);
        Ok(())
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.check_writable_parent(parent, name)?;
        let mut ns = self.ns();
        let ino = ns.rmdir(parent, name, SystemTime::now())?;
        ns.reap(ino);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        self.check_writable_parent(parent, name)?;
        self.check_writable_parent(newparent, newname)?;
        let mut ns = self.ns();
        let src = ns.lookup(parent, name)?;
        let dst = ns.lookup(newparent, newname).ok();
        let out = ns.rename(parent, name, newparent, newname, mode, SystemTime::now())?;
        tracing::debug!(src, from = ?name, to = ?newname, newparent, replaced = ?out.replaced, "rename");
        if self.has_lower_tiers() {
            if let Some(old) = out.replaced {
                self.drop_lower_copies(&mut ns, old);
            }
            let mut moved = vec![src];
            if mode == RenameMode::Exchange {
                moved.extend(dst);
            }
            self.reconcile_keys(&mut ns, &moved);
            self.reconcile_s3_keys(&mut ns, &moved);
        }
        if let Some(old) = out.replaced {
            self.unlinked(&mut ns, old);
        }
        Ok(())
    }

    fn list_dir(&self, ino: Ino) -> Result<Vec<crate::namespace::DirEntry>> {
        if ino != CONTROL_DIR_INO {
            return Ok(self.ns().list(ino)?);
        }
        let entry = |ino, is_dir, name: &str| crate::namespace::DirEntry {
            ino,
            is_dir,
            name: name.into(),
        };
        let mut entries = vec![
            entry(ino, true, "."),
            entry(ROOT_INO, true, ".."),
            entry(STATUS_INO, false, STATUS_FILE),
            entry(STATS_INO, false, STATS_FILE),
        ];
        if self.zc_socket.get().is_some() {
            entries.push(entry(ZC_SOCKET_INO, false, ZC_SOCKET_FILE));
        }
        Ok(entries)
    }

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        if ino != CONTROL_DIR_INO {
            self.merge_s3_listing(ino);
        }
        // A snapshot per handle keeps offsets stable while the directory
        // changes under a long listing.
        let entries = self.list_dir(ino)?;
        Ok(self.new_fh(Handle::Dir { ino, entries }))
    }

    /// Entries of an open directory from `offset` on, with the offset of the
    /// entry after each. Offset 0 (a new listing, or `rewinddir`) takes a
    /// fresh snapshot.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(Ino, Kind, &OsStr, u64) -> bool,
    ) -> Result<()> {
        if offset == 0 {
            let ino = match lock(&self.handles).get(&fh) {
                Some(Handle::Dir { ino, .. }) => *ino,
                _ => return Err(FsError::BadHandle(fh)),
            };
            // Listed without the handle table locked: the namespace lock
            // is never taken inside it.
            let fresh = self.list_dir(ino)?;
            if let Some(Handle::Dir { entries, .. }) = lock(&self.handles).get_mut(&fh) {
                *entries = fresh;
            }
        }
        let handles = lock(&self.handles);
        let Some(Handle::Dir { entries, .. }) = handles.get(&fh) else {
            return Err(FsError::BadHandle(fh));
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match (e.is_dir, e.ino) {
                (true, _) => Kind::Dir,
                (false, ZC_SOCKET_INO) => Kind::Symlink,
                _ => Kind::File,
            };
            if emit(e.ino, kind, &e.name, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// (capacity, free, files) for statfs.
    /// (capacity, free, files) for statfs: every tier together.
    pub fn statfs(&self) -> (u64, u64, u64) {
        let usage = self.host.usage();
        let files = self.ns().file_count();
        let (mut capacity, mut free) = (usage.capacity, usage.capacity.saturating_sub(usage.used));
        if let Some((cap, used, _, _)) = self.nvme_usage() {
            capacity += cap;
            free += cap.saturating_sub(used);
        }
        (capacity, free, files)
    }

    fn builtin_xattr(&self, ns: &Namespace, ino: Ino, name: &OsStr) -> Result<Option<Vec<u8>>> {
        let node = ns.get(ino)?;
        Ok(match name.to_str() {
            Some("user.kvfs.tier") if !node.is_dir() => {
                let tiers: Vec<&str> = [
                    self.host.get(ino).is_some().then_some("host"),
                    node.lower.nvme.is_some().then_some("nvme"),
                    node.lower.s3.is_some().then_some("s3"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Some(tiers.join(",").into())
            }
            Some("user.kvfs.state") => node.file_state().map(|s| s.as_str().into()),
            _ => None,
        })
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        if Self::is_control(ino) {
            return Err(FsError::NoAttr);
        }
        let ns = self.ns();
        if let Some(v) = self.builtin_xattr(&ns, ino, name)? {
            return Ok(v);
        }
        ns.get(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NoAttr)
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        if Self::is_control(ino) {
            return Ok(Vec::new());
        }
        let ns = self.ns();
        let node = ns.get(ino)?;
        let mut out = Vec::new();
        let builtin: &[&str] = if node.is_dir() {
            &[]
        } else {
            &["user.kvfs.tier", "user.kvfs.state"]
        };
        for name in builtin {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        for name in node.xattrs.keys() {
            out.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()));
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if Self::is_control(ino) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        let s = name.to_str().unwrap_or("");
        if s.starts_with("user.kvfs.") {
            return Err(FsError::NotPermitted(
                "user.kvfs.* attributes are read-only",
            ));
        }
        if !s.starts_with("user.") {
            return Err(FsError::Unsupported("only user.* extended attributes"));
        }
        let mut ns = self.ns();
        let node = ns.get_mut(ino)?;
        let exists = node.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(NsError::Exists.into());
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttr);
        }
        node.xattrs.insert(name.to_owned(), value.to_vec());
        node.ctime = SystemTime::now();
        Ok(())
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        if Self::is_control(ino) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        if name.to_str().is_some_and(|s| s.starts_with("user.kvfs.")) {
            return Err(FsError::NotPermitted(
                "user.kvfs.* attributes are read-only",
            ));
        }
        let mut ns = self.ns();
        let node = ns.get_mut(ino)?;
        node.xattrs.remove(name).map(|_| ()).ok_or(FsError::NoAttr)
    }

    /// Prometheus text, served at `.kvfs/stats` and by `--metrics-addr`.
    pub fn prometheus_text(&self) -> String {
        let lower = crate::metrics::LowerUsage {
            nvme: self.nvme_usage().map(|(c, u, f, _)| (c, u, f)),
            flush_queue: self.has_nvme().then(|| self.pending_flushes()),
            upload_queue: self.s3_queue_depth(),
            s3_up: self.s3_healthy(),
        };
        self.metrics.render(&self.host.usage(), &lower)
    }

    /// The daemon's state as JSON, served at `.kvfs/status`.
    pub fn status_json(&self) -> Vec<u8> {
        self.status_doc(&self.ns())
    }

    /// The status document, for callers that already hold the namespace.
    fn status_doc(&self, ns: &Namespace) -> Vec<u8> {
        let status = Status {
            version: env!("CARGO_PKG_VERSION"),
            data_path: self.data_mode(),
            files: ns.file_count(),
            host: self.host.usage(),
            nvme: self
                .nvme_usage()
                .map(|(capacity, used, files, o_direct)| NvmeUsage {
                    capacity,
                    used,
                    files,
                    o_direct,
                    pending_flushes: self.pending_flushes(),
                }),
            s3: self.s3_usage(),
            counters: self.metrics.counters.snapshot(),
        };
        let mut out = serde_json::to_vec_pretty(&status).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// True if the inode is a regular file in the `Writing` state (for tests).
    pub fn is_writing(&self, ino: Ino) -> bool {
        let ns = self.ns();
        matches!(
            ns.get(ino).map(|n| &n.kind),
            Ok(NodeKind::File {
                state: FileState::Writing,
                ..
            })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Caller = Caller { uid: 0, gid: 0 };

    fn fs(capacity: u64) -> Kvfs {
        Kvfs::new(HostTier::scratch(capacity, false), ME)
    }

    fn put(fs: &Kvfs, name: &str, len: usize) -> Ino {
        let (attr, o) = fs
            .create(ROOT_INO, name.as_ref(), 0o644, libc::O_EXCL, ME)
            .unwrap();
        fs.write(o.fh, 0, &vec![1u8; len]).unwrap();
        fs.release(o.fh).unwrap();
        attr.ino
    }

    #[test]
    fn write_read_through_daemon() {
        let fs = fs(1 << 30);
        let (attr, o) = fs
            .create(ROOT_INO, "f".as_ref(), 0o644, libc::O_EXCL, ME)
            .unwrap();
        assert!(fs.is_writing(attr.ino));
        fs.write(o.fh, 3, b"abc").unwrap();
        assert_eq!(fs.read(o.fh, 0, 10).unwrap(), b"\0\0\0abc");
        fs.release(o.fh).unwrap();
        assert!(!fs.is_writing(attr.ino));
        assert_eq!(fs.getattr(attr.ino).unwrap().size, 6);
        let o = fs.open(attr.ino, libc::O_RDONLY).unwrap();
        assert!(fs.write(o.fh, 0, b"x").is_err());
        fs.release(o.fh).unwrap();
    }

    #[test]
    fn eviction_drops_least_recent_and_calls_invalidator() {
        let page = 4096;
        let fs = fs(4 * page as u64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        fs.set_invalidator(Box::new(move |_, name| lock(&s).push(name)));
        for i in 0..6 {
            put(&fs, &format!("f{i}"), page);
        }
        assert!(fs.lookup(ROOT_INO, "f0".as_ref()).is_err());
        assert!(fs.lookup(ROOT_INO, "f5".as_ref()).is_ok());
        assert!(!lock(&seen).is_empty());
        assert!(fs.host.usage().used <= 4 * page as u64);
    }

    #[test]
    fn full_of_open_files_is_enospc() {
        let page = 4096;
        let fs = fs(2 * page as u64);
        let (_, a) = fs
            .create(ROOT_INO, "a".as_ref(), 0o644, libc::O_EXCL, ME)
            .unwrap();
        fs.write(a.fh, 0, &vec![0u8; 2 * page]).unwrap();
        let err = fs
            .create(ROOT_INO, "b".as_ref(), 0o644, libc::O_EXCL, ME)
            .err();
        assert!(matches!(
            err,
            Some(FsError::Store(StoreError::NoSpace { .. }))
        ));
        // The failed create left no name behind, and "a" is intact.
        assert!(fs.lookup(ROOT_INO, "b".as_ref()).is_err());
        assert_eq!(fs.read(a.fh, 0, 10).unwrap().len(), 10);
    }

    #[test]
    fn opening_for_write_never_evicts_the_file_itself() {
        // Files of the tier's minimum reserve, so that only the open evicts.
        let page = 1 << 20;
        let fs = fs(2 * page as u64);
        let a = put(&fs, "a", page);
        put(&fs, "b", page);
        // "a" is the least recent; making room for a writer of "a" must
        // evict "b" instead.
        let o = fs.open(a, libc::O_WRONLY).unwrap();
        assert_eq!(fs.read(o.fh, 0, 10).unwrap().len(), 10);
        fs.release(o.fh).unwrap();
        assert!(fs.lookup(ROOT_INO, "a".as_ref()).is_ok());
        assert!(fs.lookup(ROOT_INO, "b".as_ref()).is_err());
    }

    #[test]
    fn rewinddir_sees_new_entries() {
        let fs = fs(1 << 20);
        let names = |fs: &Kvfs, fh| {
            let mut v = Vec::new();
            fs.readdir(fh, 0, |_, _, n, _| {
                v.push(n.to_owned());
                false
            })
            .unwrap();
            v
        };
        let fh = fs.opendir(ROOT_INO).unwrap();
        assert_eq!(names(&fs, fh).len(), 2);
        put(&fs, "new", 1);
        assert_eq!(names(&fs, fh).len(), 3);
        fs.releasedir(fh);
    }

    #[test]
    fn unlinked_open_file_stays_readable() {
        let fs = fs(1 << 20);
        let ino = put(&fs, "f", 100);
        let o = fs.open(ino, libc::O_RDONLY).unwrap();
        fs.unlink(ROOT_INO, "f".as_ref()).unwrap();
        assert_eq!(fs.read(o.fh, 0, 1000).unwrap().len(), 100);
        fs.release(o.fh).unwrap();
        // The kernel's reference from the create keeps it until forgotten.
        assert!(fs.getattr(ino).is_ok());
        fs.forget(ino, 1);
        assert!(fs.getattr(ino).is_err());
        assert_eq!(fs.host.usage().files, 0);
    }

    #[test]
    fn control_entries() {
        let fs = fs(1 << 20);
        assert_eq!(
            fs.lookup(ROOT_INO, CONTROL_DIR.as_ref()).unwrap().kind,
            Kind::Dir
        );
        assert!(matches!(
            fs.create(ROOT_INO, CONTROL_DIR.as_ref(), 0o644, 0, ME),
            Err(FsError::Namespace(NsError::Exists))
        ));
        // Its size is computed under the namespace lock: must not deadlock.
        let size = fs.getattr(STATUS_INO).unwrap().size;
        assert_eq!(
            fs.lookup(CONTROL_DIR_INO, STATUS_FILE.as_ref())
                .unwrap()
                .size,
            size
        );
        let o = fs.open(STATUS_INO, libc::O_RDONLY).unwrap();
        let data = fs.read(o.fh, 0, 1 << 20).unwrap();
        assert_eq!(data.len() as u64, size);
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(v["host"]["capacity"], 1 << 20);
    }

    #[test]
    fn builtin_xattrs() {
        let fs = fs(1 << 20);
        let ino = put(&fs, "f", 10);
        assert_eq!(
            fs.getxattr(ino, "user.kvfs.tier".as_ref()).unwrap(),
            b"host"
        );
        assert_eq!(
            fs.getxattr(ino, "user.kvfs.state".as_ref()).unwrap(),
            b"sealed"
        );
        assert!(
            fs.setxattr(ino, "user.kvfs.tier".as_ref(), b"x", 0)
                .is_err()
        );
        fs.setxattr(ino, "user.note".as_ref(), b"hi", 0).unwrap();
        assert_eq!(fs.getxattr(ino, "user.note".as_ref()).unwrap(), b"hi");
        let list = fs.listxattr(ino).unwrap();
        assert_eq!(list, b"user.kvfs.tier\0user.kvfs.state\0user.note\0");
    }
}
