//! The `fuser::Filesystem` adapter: each FUSE op calls one method of the core
//! and replies; errors go through `reply_error`, which logs and maps them to
//! an errno in one place.
//!
//! Opens of resident files answer with passthrough to the file's backing file, so
//! the kernel moves the bytes. The kernel's rule for that: every passthrough
//! open of one inode must name the same backing id for as long as any of them
//! is open (a different id is refused with EIO), and the id must stay
//! registered until the kernel has taken its reference in the open. kvfs
//! keeps exactly one backing id per file, owned by the file's `HostFile`, so
//! it lives as long as the backing file and every open handle (which hold the
//! `HostFile`). Inode numbers are never reused, so an id can never be
//! attached to another inode's opens.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::core::{Attr, Caller, DataMode, FsError, Kind, Kvfs, SetAttr};
use super::errno::{ToErrno, is_expected};
use crate::config::DataPath;
use crate::namespace::RenameMode;
use crate::store::HostFile;
use crate::store::host::SetTime;

/// How long the kernel may cache entries and attributes. Changes made
/// through this mount update the kernel's caches directly; only the daemon's
/// own removals (evictions) need an explicit invalidation, which it sends.
const TTL: Duration = Duration::from_secs(1);
const BLKSIZE: u32 = 4096;

pub struct FuseFs {
    core: Arc<Kvfs>,
    want: DataPath,
    passthrough: AtomicBool,
    backing_failed: AtomicBool,
}

fn reply_error(op: &'static str, err: &FsError) -> Errno {
    let errno = err.to_errno();
    if is_expected(errno) {
        tracing::debug!(op, error = %err, errno = errno.code(), "request failed");
    } else {
        tracing::warn!(op, error = %err, errno = errno.code(), "request failed");
    }
    errno
}

/// Unwraps a core result or replies with the mapped errno and returns.
macro_rules! tri {
    ($self:ident, $op:literal, $reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => {
                let errno = reply_error($op, &err);
                $self.core.metrics.error($op, errno.code());
                $reply.error(errno);
                return;
            }
        }
    };
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The reply types that can answer an open with passthrough.
trait OpenReply {
    fn backing(&self, file: &HostFile) -> std::io::Result<BackingId>;
}

impl OpenReply for ReplyOpen {
    fn backing(&self, file: &HostFile) -> std::io::Result<BackingId> {
        self.open_backing(&*file.fd()?)
    }
}

impl OpenReply for ReplyCreate {
    fn backing(&self, file: &HostFile) -> std::io::Result<BackingId> {
        self.open_backing(&*file.fd()?)
    }
}

/// What every FUSE request holds while it runs: its latency timer and a
/// debug-level span naming the operation (so a debug log groups each
/// request's events).
struct Op<'a> {
    _timer: crate::metrics::OpTimer<'a>,
    _span: tracing::span::EnteredSpan,
}

impl FuseFs {
    fn op(&self, op: &'static str) -> Op<'_> {
        Op {
            _timer: self.core.metrics.time(op),
            _span: tracing::debug_span!("fuse", op).entered(),
        }
    }

    pub fn new(core: Arc<Kvfs>, want: DataPath) -> FuseFs {
        FuseFs {
            core,
            want,
            passthrough: AtomicBool::new(false),
            backing_failed: AtomicBool::new(false),
        }
    }

    /// The file's backing id, registered on its first open. `None` means the
    /// open is served by the daemon's own handlers.
    fn backing_for(&self, reply: &impl OpenReply, file: &HostFile) -> Option<Arc<BackingId>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = file.attachment.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = slot
            .as_ref()
            .and_then(|a| Arc::clone(a).downcast::<BackingId>().ok())
        {
            return Some(id);
        }
        match reply.backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                *slot = Some(Arc::clone(&id) as Arc<dyn std::any::Any + Send + Sync>);
                Some(id)
            }
            Err(e) => {
                if !self.backing_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "kernel refused a passthrough backing file; serving such files through \
                         the daemon (slower)"
                    );
                }
                None
            }
        }
    }

    fn count_open(&self, passthrough: bool) {
        let c = &self.core.metrics.counters;
        let counter = if passthrough {
            &c.passthrough_opens
        } else {
            &c.fallback_opens
        };
        counter.inc();
    }
}

/// Flags for opens the daemon serves itself: no page cache, so the kernel
/// never holds a second copy of host-tier data, and O_DIRECT just works.
fn daemon_open_flags() -> FopenFlags {
    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let can_passthrough = caps.contains(InitFlags::FUSE_PASSTHROUGH);
        let use_passthrough = self.want != DataPath::Fallback
            && can_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        // Lets mmap work on files the daemon serves with FOPEN_DIRECT_IO.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // Lets O_TRUNC ride on the open instead of a separate setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        self.passthrough.store(use_passthrough, Ordering::Relaxed);
        let mode = if use_passthrough {
            DataMode::Passthrough
        } else {
            DataMode::Fallback
        };
        self.core.set_data_mode(mode);
        tracing::info!(data_path = ?mode, kernel_passthrough = can_passthrough, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.op("lookup");
        let attr = tri!(self, "lookup", reply, self.core.lookup(parent.0, name));
        reply.entry(&TTL, &file_attr(&attr), Generation(0));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = tri!(self, "readlink", reply, self.core.readlink(ino.0));
        reply.data(&target);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _op = self.op("forget");
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.op("getattr");
        let attr = tri!(self, "getattr", reply, self.core.getattr(ino.0));
        reply.attr(&TTL, &file_attr(&attr));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.op("setattr");
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let attr = tri!(
            self,
            "setattr",
            reply,
            self.core.setattr(ino.0, caller(req), set)
        );
        reply.attr(&TTL, &file_attr(&attr));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.op("mknod");
        let attr = tri!(
            self,
            "mknod",
            reply,
            self.core.mknod(parent.0, name, mode, caller(req))
        );
        reply.entry(&TTL, &file_attr(&attr), Generation(0));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.op("mkdir");
        let attr = tri!(
            self,
            "mkdir",
            reply,
            self.core.mkdir(parent.0, name, mode, caller(req))
        );
        reply.entry(&TTL, &file_attr(&attr), Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.op("unlink");
        tri!(self, "unlink", reply, self.core.unlink(parent.0, name));
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.op("rmdir");
        tri!(self, "rmdir", reply, self.core.rmdir(parent.0, name));
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("rename");
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            reply.error(Errno::EINVAL);
            return;
        };
        tri!(
            self,
            "rename",
            reply,
            self.core.rename(parent.0, name, newparent.0, newname, mode)
        );
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.op("open");
        let opened = tri!(self, "open", reply, self.core.open(ino.0, flags.0));
        let backing = opened
            .file
            .as_deref()
            .and_then(|f| self.backing_for(&reply, f));
        // Control files are always served by the daemon; count data files only.
        if opened.file.is_some() {
            self.count_open(backing.is_some());
        }
        match backing {
            Some(id) => reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id),
            None => reply.opened(FileHandle(opened.fh), daemon_open_flags()),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.op("create");
        let (attr, opened) = tri!(
            self,
            "create",
            reply,
            self.core.create(parent.0, name, mode, flags, caller(req))
        );
        let backing = opened
            .file
            .as_deref()
            .and_then(|f| self.backing_for(&reply, f));
        self.count_open(backing.is_some());
        let fattr = file_attr(&attr);
        match backing {
            Some(id) => reply.created_passthrough(
                &TTL,
                &fattr,
                Generation(0),
                FileHandle(opened.fh),
                FopenFlags::empty(),
                &id,
            ),
            None => reply.created(
                &TTL,
                &fattr,
                Generation(0),
                FileHandle(opened.fh),
                daemon_open_flags(),
            ),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _op = self.op("read");
        let data = tri!(self, "read", reply, self.core.read(fh.0, offset, size));
        reply.data(&data);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = self.op("write");
        let n = tri!(self, "write", reply, self.core.write(fh.0, offset, data));
        reply.written(n);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("flush");
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("release");
        tri!(self, "release", reply, self.core.release(fh.0));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("fsync");
        // With durability `local` this returns once the file is on NVMe;
        // otherwise the bytes are already where they will stay.
        tri!(self, "fsync", reply, self.core.fsync(ino.0));
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.op("opendir");
        let fh = tri!(self, "opendir", reply, self.core.opendir(ino.0));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.op("readdir");
        let res = self.core.readdir(fh.0, offset, |ino, kind, name, next| {
            let kind = match kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
                Kind::Symlink => FileType::Symlink,
            };
            reply.add(INodeNo(ino), next, kind, name)
        });
        tri!(self, "readdir", reply, res);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("releasedir");
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("fsyncdir");
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.op("statfs");
        let (capacity, free, files) = self.core.statfs();
        let bsize = u64::from(BLKSIZE);
        // Inodes are not a limited resource here; report a large pool of
        // which `files` are used, so `df -i` adds up.
        let free_inodes = u64::from(u32::MAX);
        reply.statfs(
            capacity / bsize,
            free / bsize,
            free / bsize,
            files + free_inodes,
            free_inodes,
            BLKSIZE,
            crate::namespace::NAME_MAX as u32,
            BLKSIZE,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = self.op("setxattr");
        tri!(
            self,
            "setxattr",
            reply,
            self.core.setxattr(ino.0, name, value, flags)
        );
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.op("getxattr");
        let value = tri!(self, "getxattr", reply, self.core.getxattr(ino.0, name));
        reply_xattr(reply, &value, size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.op("listxattr");
        let names = tri!(self, "listxattr", reply, self.core.listxattr(ino.0));
        reply_xattr(reply, &names, size);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.op("removexattr");
        tri!(
            self,
            "removexattr",
            reply,
            self.core.removexattr(ino.0, name)
        );
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _op = self.op("access");
        // Permission bits are checked by the kernel (default_permissions);
        // this only confirms the inode exists.
        tri!(self, "access", reply, self.core.getattr(ino.0));
        reply.ok();
    }
}

/// Answers a size probe (size 0) or the value, as getxattr(2) expects.
fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
