//! The namespace: inodes, the directory tree, names, per-file state (being
//! written or sealed, open handles) and POSIX rules for changing the tree
//! (rename atomicity and its edge cases, unlink of open files, rmdir of
//! non-empty directories).
//!
//! It owns metadata only and does no I/O: the bytes of a regular file live in
//! the store, keyed by the same inode number. Inode numbers are never reused,
//! so a stale number from the kernel (an inode it has not forgotten yet)
//! resolves to `NotFound` instead of to another file.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

pub type Ino = u64;

/// The root directory, as FUSE numbers it.
pub const ROOT_INO: Ino = 1;
/// First inode number handed to user files; numbers below are reserved for
/// the root and the daemon's control entries.
pub const FIRST_USER_INO: Ino = 16;
/// Longest name a directory entry may have, as on ext4 and tmpfs.
pub const NAME_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
}

/// Lifecycle of a regular file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// At least one writable handle is open: contents may still change.
    Writing,
    /// No writable handle is open: contents are final until reopened for write.
    Sealed,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Writing => "writing",
            FileState::Sealed => "sealed",
        }
    }
}

#[derive(Debug)]
pub enum NodeKind {
    Dir { entries: BTreeMap<OsString, Ino> },
    File { state: FileState, writers: u32 },
}

#[derive(Debug)]
pub struct Inode {
    pub ino: Ino,
    /// Where the inode is linked; meaningless once `nlink == 0`.
    pub parent: Ino,
    pub name: OsString,
    pub kind: NodeKind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Directories: 2 + number of subdirectories. Files: 1, or 0 once unlinked.
    pub nlink: u32,
    /// Handles the kernel holds open on this inode (files and directories).
    pub open: u32,
    /// References the kernel holds (entries it was given, minus forgets).
    /// The inode must outlive them: a path walk that found it may still
    /// open it after it was unlinked or replaced.
    pub lookups: u64,
    /// Times of directories; a regular file's times live with its bytes.
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// Lower-tier state of a regular file.
    pub lower: Lower,
}

/// Where a regular file's bytes are below the host tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lower {
    /// The NVMe copy of the current contents, by its key (the path it was
    /// stored under).
    pub nvme: Option<String>,
    /// A copy to NVMe is under way.
    pub flushing: bool,
    /// Bumped by every writable open: a copy taken at another version may
    /// be stale.
    pub version: u64,
    /// The S3 object holding the current contents.
    pub s3: Option<RemoteCopy>,
    /// An upload to S3 is under way.
    pub uploading: bool,
    /// The NVMe or S3 copy was taken while the file was open (an fsync)
    /// and may predate its last writes: it must be copied again, over it
    /// (not deleted first: an fsync'd copy stays durable meanwhile).
    pub nvme_stale: bool,
    pub s3_stale: bool,
}

/// A file's object in S3, as this node last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCopy {
    /// Its key below the mount's prefix (the file's path once `settled`).
    pub key: String,
    pub size: u64,
    pub mtime: SystemTime,
    /// When S3 last confirmed it exists (lookups re-check after a TTL).
    pub checked: std::time::Instant,
    /// False while a queued rename has not reached S3 yet.
    pub settled: bool,
    /// A HEAD (or this node's upload) told the object's owner, or that it
    /// has none; false for a file only a listing found, whose owner is the
    /// mount's until its first lookup asks.
    pub headed: bool,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }

    pub fn file_state(&self) -> Option<FileState> {
        match self.kind {
            NodeKind::File { state, .. } => Some(state),
            NodeKind::Dir { .. } => None,
        }
    }

    fn entries(&self) -> Result<&BTreeMap<OsString, Ino>, NsError> {
        match &self.kind {
            NodeKind::Dir { entries } => Ok(entries),
            NodeKind::File { .. } => Err(NsError::NotDir),
        }
    }

    fn entries_mut(&mut self) -> Result<&mut BTreeMap<OsString, Ino>, NsError> {
        match &mut self.kind {
            NodeKind::Dir { entries } => Ok(entries),
            NodeKind::File { .. } => Err(NsError::NotDir),
        }
    }
}

/// How `rename` treats an existing target (renameat2 flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// What a rename did, so the caller can release what it unlinked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RenameOutcome {
    /// The inode that the rename replaced (now `nlink == 0`).
    pub replaced: Option<Ino>,
}

/// One directory entry of a listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub is_dir: bool,
    pub name: OsString,
}

pub struct Namespace {
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    files: u64,
}

/// Who creates an inode and with which permission bits.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub perm: u16,
}

fn check_name(name: &OsStr) -> Result<(), NsError> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(NsError::NameTooLong);
    }
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(NsError::Invalid("not a valid file name"));
    }
    Ok(())
}

impl Namespace {
    pub fn new(root: Owner, now: SystemTime) -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT_INO,
            Inode {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: OsString::new(),
                kind: NodeKind::Dir {
                    entries: BTreeMap::new(),
                },
                perm: root.perm,
                uid: root.uid,
                gid: root.gid,
                nlink: 2,
                open: 0,
                lookups: 0,
                atime: now,
                mtime: now,
                ctime: now,
                xattrs: BTreeMap::new(),
                lower: Lower::default(),
            },
        );
        Namespace {
            inodes,
            next_ino: FIRST_USER_INO,
            files: 0,
        }
    }

    pub fn get(&self, ino: Ino) -> Result<&Inode, NsError> {
        self.inodes.get(&ino).ok_or(NsError::NotFound)
    }

    pub fn get_mut(&mut self, ino: Ino) -> Result<&mut Inode, NsError> {
        self.inodes.get_mut(&ino).ok_or(NsError::NotFound)
    }

    /// Regular files that are still linked.
    pub fn file_count(&self) -> u64 {
        self.files
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, NsError> {
        if name.len() > NAME_MAX {
            return Err(NsError::NameTooLong);
        }
        let dir = self.get(parent)?;
        dir.entries()?.get(name).copied().ok_or(NsError::NotFound)
    }

    pub fn mkdir(
        &mut self,
        parent: Ino,
        name: &OsStr,
        owner: Owner,
        now: SystemTime,
    ) -> Result<Ino, NsError> {
        let ino = self.link_new(parent, name, owner, now, true)?;
        let dir = self.get_mut(parent)?;
        dir.nlink += 1;
        Ok(ino)
    }

    pub fn create_file(
        &mut self,
        parent: Ino,
        name: &OsStr,
        owner: Owner,
        now: SystemTime,
    ) -> Result<Ino, NsError> {
        let ino = self.link_new(parent, name, owner, now, false)?;
        self.files += 1;
        Ok(ino)
    }

    fn link_new(
        &mut self,
        parent: Ino,
        name: &OsStr,
        owner: Owner,
        now: SystemTime,
        dir: bool,
    ) -> Result<Ino, NsError> {
        let ino = self.next_ino;
        self.link_at(parent, name, owner, now, dir, ino)?;
        self.next_ino += 1;
        Ok(ino)
    }

    /// An inode number for a file that will be linked later
    /// ([`Namespace::link_reserved`]); numbers are never reused.
    pub fn reserve_ino(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Links a sealed file under a number from [`Namespace::reserve_ino`]
    /// (its bytes were written before it had a name).
    pub fn link_reserved(
        &mut self,
        parent: Ino,
        name: &OsStr,
        ino: Ino,
        owner: Owner,
        now: SystemTime,
    ) -> Result<(), NsError> {
        if ino >= self.next_ino || self.inodes.contains_key(&ino) {
            return Err(NsError::Invalid("inode number not reserved"));
        }
        self.link_at(parent, name, owner, now, false, ino)?;
        self.files += 1;
        self.get_mut(ino)?.kind = NodeKind::File {
            state: FileState::Sealed,
            writers: 0,
        };
        Ok(())
    }

    fn link_at(
        &mut self,
        parent: Ino,
        name: &OsStr,
        owner: Owner,
        now: SystemTime,
        dir: bool,
        ino: Ino,
    ) -> Result<(), NsError> {
        check_name(name)?;
        let pdir = self.get_mut(parent)?;
        let entries = pdir.entries_mut()?;
        if entries.contains_key(name) {
            return Err(NsError::Exists);
        }
        entries.insert(name.to_owned(), ino);
        pdir.mtime = now;
        pdir.ctime = now;
        let kind = if dir {
            NodeKind::Dir {
                entries: BTreeMap::new(),
            }
        } else {
            NodeKind::File {
                state: FileState::Writing,
                writers: 0,
            }
        };
        self.inodes.insert(
            ino,
            Inode {
                ino,
                parent,
                name: name.to_owned(),
                kind,
                perm: owner.perm,
                uid: owner.uid,
                gid: owner.gid,
                nlink: if dir { 2 } else { 1 },
                open: 0,
                lookups: 0,
                atime: now,
                mtime: now,
                ctime: now,
                xattrs: BTreeMap::new(),
                lower: Lower::default(),
            },
        );
        Ok(())
    }

    /// Removes the name of a regular file. The inode stays while handles are
    /// open (the caller drops it through [`Namespace::reap`]).
    pub fn unlink(&mut self, parent: Ino, name: &OsStr, now: SystemTime) -> Result<Ino, NsError> {
        let ino = self.lookup(parent, name)?;
        if self.get(ino)?.is_dir() {
            return Err(NsError::IsDir);
        }
        self.detach(parent, name, ino, now)?;
        Ok(ino)
    }

    pub fn rmdir(&mut self, parent: Ino, name: &OsStr, now: SystemTime) -> Result<Ino, NsError> {
        let ino = self.lookup(parent, name)?;
        let node = self.get(ino)?;
        if !node.entries()?.is_empty() {
            return Err(NsError::NotEmpty);
        }
        self.detach(parent, name, ino, now)?;
        Ok(ino)
    }

    /// Unhooks `name` (which resolves to `ino`) from `parent` and drops the
    /// inode's link count to zero.
    fn detach(
        &mut self,
        parent: Ino,
        name: &OsStr,
        ino: Ino,
        now: SystemTime,
    ) -> Result<(), NsError> {
        let is_dir = self.get(ino)?.is_dir();
        let pdir = self.get_mut(parent)?;
        pdir.entries_mut()?.remove(name);
        pdir.mtime = now;
        pdir.ctime = now;
        if is_dir {
            pdir.nlink -= 1;
        }
        let node = self.get_mut(ino)?;
        node.nlink = 0;
        node.ctime = now;
        if !is_dir {
            self.files -= 1;
        }
        Ok(())
    }

    /// The kernel was handed an entry for `ino`.
    pub fn remember(&mut self, ino: Ino) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// The kernel dropped `n` references; returns whether the inode is gone.
    pub fn forget(&mut self, ino: Ino, n: u64) -> bool {
        match self.inodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                self.reap(ino)
            }
            None => false,
        }
    }

    /// Drops an inode that has no name, no open handle and no kernel
    /// reference left. Returns whether it was dropped.
    pub fn reap(&mut self, ino: Ino) -> bool {
        match self.inodes.get(&ino) {
            Some(node)
                if node.nlink == 0 && node.open == 0 && node.lookups == 0 && ino != ROOT_INO =>
            {
                self.inodes.remove(&ino);
                true
            }
            _ => false,
        }
    }

    /// Is `ancestor` on the path from `ino` up to the root?
    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            match self.inodes.get(&ino) {
                Some(node) => ino = node.parent,
                None => return false,
            }
        }
    }

    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
        now: SystemTime,
    ) -> Result<RenameOutcome, NsError> {
        check_name(newname)?;
        let src = self.lookup(parent, name)?;
        self.get(newparent)?.entries()?;
        let dst = match self.lookup(newparent, newname) {
            Ok(ino) => Some(ino),
            Err(NsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        let src_dir = self.get(src)?.is_dir();
        // A directory must not move below itself: the tree would detach.
        if src_dir && self.is_ancestor(src, newparent) {
            return Err(NsError::Invalid("cannot move a directory into itself"));
        }
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => return Err(NsError::Exists),
            (RenameMode::Exchange, None) => return Err(NsError::NotFound),
            (RenameMode::Exchange, Some(dst)) => {
                if self.get(dst)?.is_dir() && self.is_ancestor(dst, parent) {
                    return Err(NsError::Invalid("cannot move a directory into itself"));
                }
                self.exchange(parent, name, src, newparent, newname, dst, now)?;
                return Ok(RenameOutcome::default());
            }
            _ => {}
        }
        if dst == Some(src) {
            // POSIX: renaming a file onto itself (or a hard link of itself) does nothing.
            return Ok(RenameOutcome::default());
        }
        let mut outcome = RenameOutcome::default();
        if let Some(dst) = dst {
            let dnode = self.get(dst)?;
            match (src_dir, dnode.is_dir()) {
                (true, false) => return Err(NsError::NotDir),
                (false, true) => return Err(NsError::IsDir),
                (true, true) if !dnode.entries()?.is_empty() => return Err(NsError::NotEmpty),
                _ => {}
            }
            self.detach(newparent, newname, dst, now)?;
            outcome.replaced = Some(dst);
        }
        let pdir = self.get_mut(parent)?;
        pdir.entries_mut()?.remove(name);
        pdir.mtime = now;
        pdir.ctime = now;
        if src_dir {
            pdir.nlink -= 1;
        }
        let ndir = self.get_mut(newparent)?;
        ndir.entries_mut()?.insert(newname.to_owned(), src);
        ndir.mtime = now;
        ndir.ctime = now;
        if src_dir {
            ndir.nlink += 1;
        }
        let node = self.get_mut(src)?;
        node.parent = newparent;
        node.name = newname.to_owned();
        node.ctime = now;
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &mut self,
        parent: Ino,
        name: &OsStr,
        src: Ino,
        newparent: Ino,
        newname: &OsStr,
        dst: Ino,
        now: SystemTime,
    ) -> Result<(), NsError> {
        let src_dir = self.get(src)?.is_dir();
        let dst_dir = self.get(dst)?.is_dir();
        self.get_mut(parent)?
            .entries_mut()?
            .insert(name.to_owned(), dst);
        self.get_mut(newparent)?
            .entries_mut()?
            .insert(newname.to_owned(), src);
        if parent != newparent && src_dir != dst_dir {
            // A directory changed parents: move one ".." link with it.
            let (gain, lose) = if src_dir {
                (newparent, parent)
            } else {
                (parent, newparent)
            };
            self.get_mut(gain)?.nlink += 1;
            self.get_mut(lose)?.nlink -= 1;
        }
        for (ino, p, n) in [(src, newparent, newname), (dst, parent, name)] {
            let node = self.get_mut(ino)?;
            node.parent = p;
            node.name = n.to_owned();
            node.ctime = now;
        }
        for dir in [parent, newparent] {
            let d = self.get_mut(dir)?;
            d.mtime = now;
            d.ctime = now;
        }
        Ok(())
    }

    /// A consistent listing of one directory, `.` and `..` first.
    pub fn list(&self, ino: Ino) -> Result<Vec<DirEntry>, NsError> {
        let dir = self.get(ino)?;
        let entries = dir.entries()?;
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push(DirEntry {
            ino,
            is_dir: true,
            name: ".".into(),
        });
        out.push(DirEntry {
            ino: dir.parent,
            is_dir: true,
            name: "..".into(),
        });
        for (name, &child) in entries {
            let is_dir = self.inodes.get(&child).is_some_and(Inode::is_dir);
            out.push(DirEntry {
                ino: child,
                is_dir,
                name: name.clone(),
            });
        }
        Ok(out)
    }

    /// Records an open handle; a writable one moves the file to `Writing`.
    pub fn open(&mut self, ino: Ino, writable: bool) -> Result<(), NsError> {
        let node = self.get_mut(ino)?;
        node.open += 1;
        if writable {
            node.lower.version += 1;
        }
        if let NodeKind::File { state, writers } = &mut node.kind
            && writable
        {
            *writers += 1;
            *state = FileState::Writing;
        }
        Ok(())
    }

    /// Records a closed handle. Returns true when this sealed the file
    /// (its last writable handle closed).
    pub fn release(&mut self, ino: Ino, writable: bool) -> Result<bool, NsError> {
        let node = self.get_mut(ino)?;
        node.open = node.open.saturating_sub(1);
        if let NodeKind::File { state, writers } = &mut node.kind {
            if writable {
                *writers = writers.saturating_sub(1);
            }
            if *writers == 0 && *state == FileState::Writing {
                *state = FileState::Sealed;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Creates the directories of `path` (relative, `/`-separated) that do
    /// not exist yet and returns the last one.
    pub fn mkdir_p(&mut self, path: &str, owner: Owner, now: SystemTime) -> Result<Ino, NsError> {
        let mut dir = ROOT_INO;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            dir = match self.lookup(dir, comp.as_ref()) {
                Ok(ino) if self.get(ino)?.is_dir() => ino,
                Ok(_) => return Err(NsError::NotDir),
                Err(NsError::NotFound) => self.mkdir(dir, comp.as_ref(), owner, now)?,
                Err(e) => return Err(e),
            };
        }
        Ok(dir)
    }

    /// Adds a sealed file named `name` in `parent` that exists only in a
    /// lower tier (found there by a lookup or a listing).
    pub fn insert_found(
        &mut self,
        parent: Ino,
        name: &OsStr,
        owner: Owner,
        mtime: SystemTime,
    ) -> Result<Ino, NsError> {
        let ino = self.create_file(parent, name, owner, mtime)?;
        let node = self.get_mut(ino)?;
        node.kind = NodeKind::File {
            state: FileState::Sealed,
            writers: 0,
        };
        Ok(ino)
    }

    /// Puts back a sealed file found in a lower tier at mount time.
    pub fn insert_sealed(
        &mut self,
        path: &str,
        owner: Owner,
        mtime: SystemTime,
    ) -> Result<Ino, NsError> {
        // Directories need their search bit, whatever the files' mode.
        let dir_owner = Owner {
            perm: 0o755,
            ..owner
        };
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (self.mkdir_p(d, dir_owner, mtime)?, n),
            None => (ROOT_INO, path),
        };
        let ino = self.create_file(dir, name.as_ref(), owner, mtime)?;
        let node = self.get_mut(ino)?;
        node.kind = NodeKind::File {
            state: FileState::Sealed,
            writers: 0,
        };
        node.lower.nvme = Some(path.to_owned());
        Ok(ino)
    }

    /// `ino` if it is a file, else every file below the directory `ino`.
    pub fn files_under(&self, ino: Ino) -> Vec<Ino> {
        let mut out = Vec::new();
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            match self.inodes.get(&i).map(|n| &n.kind) {
                Some(NodeKind::Dir { entries }) => stack.extend(entries.values().copied()),
                Some(NodeKind::File { .. }) => out.push(i),
                None => {}
            }
        }
        out
    }

    /// Path of an inode relative to the root, for logs and status.
    /// The inode at `path` (relative to the root, `/`-separated), the
    /// inverse of [`Namespace::path_of`].
    pub fn resolve(&self, path: &str) -> Option<Ino> {
        path.split('/')
            .filter(|p| !p.is_empty())
            .try_fold(ROOT_INO, |ino, part| self.lookup(ino, part.as_ref()).ok())
    }

    pub fn path_of(&self, mut ino: Ino) -> Option<std::path::PathBuf> {
        let mut parts = Vec::new();
        while ino != ROOT_INO {
            let node = self.inodes.get(&ino)?;
            if node.nlink == 0 {
                return None;
            }
            parts.push(node.name.clone());
            ino = node.parent;
        }
        Some(parts.iter().rev().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner = Owner {
        uid: 0,
        gid: 0,
        perm: 0o755,
    };

    fn ns() -> Namespace {
        Namespace::new(OWNER, SystemTime::UNIX_EPOCH)
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    #[test]
    fn create_lookup_unlink() {
        let mut ns = ns();
        let f = ns
            .create_file(ROOT_INO, "a".as_ref(), OWNER, now())
            .unwrap();
        assert_eq!(ns.lookup(ROOT_INO, "a".as_ref()), Ok(f));
        assert_eq!(
            ns.create_file(ROOT_INO, "a".as_ref(), OWNER, now()),
            Err(NsError::Exists)
        );
        assert_eq!(ns.file_count(), 1);
        ns.open(f, false).unwrap();
        ns.remember(f);
        assert_eq!(ns.unlink(ROOT_INO, "a".as_ref(), now()), Ok(f));
        assert_eq!(ns.file_count(), 0);
        assert_eq!(ns.lookup(ROOT_INO, "a".as_ref()), Err(NsError::NotFound));
        // Still open: the inode survives its name.
        assert!(!ns.reap(f));
        assert!(ns.get(f).is_ok());
        ns.release(f, false).unwrap();
        // The kernel still holds a reference from its lookup.
        assert!(!ns.reap(f));
        assert!(ns.forget(f, 1));
        assert_eq!(ns.get(f).err(), Some(NsError::NotFound));
    }

    #[test]
    fn names_are_checked() {
        let mut ns = ns();
        let long = "x".repeat(256);
        assert_eq!(
            ns.create_file(ROOT_INO, long.as_ref(), OWNER, now()),
            Err(NsError::NameTooLong)
        );
        assert_eq!(
            ns.lookup(ROOT_INO, long.as_ref()),
            Err(NsError::NameTooLong)
        );
        let ok = "x".repeat(255);
        assert!(ns.create_file(ROOT_INO, ok.as_ref(), OWNER, now()).is_ok());
    }

    #[test]
    fn dirs_and_errnos() {
        let mut ns = ns();
        let d = ns.mkdir(ROOT_INO, "d".as_ref(), OWNER, now()).unwrap();
        assert_eq!(ns.get(ROOT_INO).unwrap().nlink, 3);
        let f = ns.create_file(d, "f".as_ref(), OWNER, now()).unwrap();
        assert_eq!(
            ns.rmdir(ROOT_INO, "d".as_ref(), now()),
            Err(NsError::NotEmpty)
        );
        assert_eq!(
            ns.unlink(ROOT_INO, "d".as_ref(), now()),
            Err(NsError::IsDir)
        );
        assert_eq!(ns.lookup(f, "x".as_ref()), Err(NsError::NotDir));
        assert_eq!(
            ns.create_file(f, "x".as_ref(), OWNER, now()),
            Err(NsError::NotDir)
        );
        ns.unlink(d, "f".as_ref(), now()).unwrap();
        assert_eq!(ns.rmdir(ROOT_INO, "d".as_ref(), now()), Ok(d));
        assert_eq!(ns.get(ROOT_INO).unwrap().nlink, 2);
    }

    #[test]
    fn rename_replaces_and_reports() {
        let mut ns = ns();
        let a = ns
            .create_file(ROOT_INO, "a".as_ref(), OWNER, now())
            .unwrap();
        let b = ns
            .create_file(ROOT_INO, "b".as_ref(), OWNER, now())
            .unwrap();
        let out = ns
            .rename(
                ROOT_INO,
                "a".as_ref(),
                ROOT_INO,
                "b".as_ref(),
                RenameMode::Replace,
                now(),
            )
            .unwrap();
        assert_eq!(out.replaced, Some(b));
        assert_eq!(ns.lookup(ROOT_INO, "b".as_ref()), Ok(a));
        assert_eq!(ns.lookup(ROOT_INO, "a".as_ref()), Err(NsError::NotFound));
        assert_eq!(ns.file_count(), 1);
        assert!(ns.reap(b));
        assert_eq!(ns.path_of(a), Some("b".into()));
    }

    #[test]
    fn rename_flags_and_type_rules() {
        let mut ns = ns();
        let a = ns
            .create_file(ROOT_INO, "a".as_ref(), OWNER, now())
            .unwrap();
        let d = ns.mkdir(ROOT_INO, "d".as_ref(), OWNER, now()).unwrap();
        let e = ns.mkdir(d, "e".as_ref(), OWNER, now()).unwrap();
        let r = |ns: &mut Namespace, p, n: &str, np, nn: &str, m| {
            ns.rename(p, n.as_ref(), np, nn.as_ref(), m, now())
        };
        assert_eq!(
            r(&mut ns, ROOT_INO, "a", ROOT_INO, "d", RenameMode::Replace),
            Err(NsError::IsDir)
        );
        assert_eq!(
            r(&mut ns, d, "e", ROOT_INO, "a", RenameMode::Replace),
            Err(NsError::NotDir)
        );
        assert_eq!(
            r(&mut ns, ROOT_INO, "d", e, "x", RenameMode::Replace),
            Err(NsError::Invalid("cannot move a directory into itself"))
        );
        assert_eq!(
            r(&mut ns, ROOT_INO, "a", ROOT_INO, "d", RenameMode::NoReplace),
            Err(NsError::Exists)
        );
        assert_eq!(
            r(&mut ns, ROOT_INO, "a", ROOT_INO, "zz", RenameMode::Exchange),
            Err(NsError::NotFound)
        );
        // Directory over a non-empty directory.
        let f = ns.mkdir(ROOT_INO, "f".as_ref(), OWNER, now()).unwrap();
        assert_eq!(
            r(&mut ns, ROOT_INO, "f", ROOT_INO, "d", RenameMode::Replace),
            Err(NsError::NotEmpty)
        );
        // Exchange a file and a directory across parents keeps link counts right.
        r(&mut ns, ROOT_INO, "a", d, "e", RenameMode::Exchange).unwrap();
        assert_eq!(ns.lookup(d, "e".as_ref()), Ok(a));
        assert_eq!(ns.lookup(ROOT_INO, "a".as_ref()), Ok(e));
        assert_eq!(ns.get(d).unwrap().nlink, 2);
        assert_eq!(ns.get(ROOT_INO).unwrap().nlink, 5);
        assert_eq!(ns.get(e).unwrap().parent, ROOT_INO);
        // Directory move updates parents' link counts.
        r(&mut ns, ROOT_INO, "f", d, "f2", RenameMode::Replace).unwrap();
        assert_eq!(ns.get(d).unwrap().nlink, 3);
        assert_eq!(ns.get(ROOT_INO).unwrap().nlink, 4);
        assert_eq!(ns.path_of(f), Some("d/f2".into()));
    }

    #[test]
    fn state_follows_writers() {
        let mut ns = ns();
        let f = ns
            .create_file(ROOT_INO, "f".as_ref(), OWNER, now())
            .unwrap();
        ns.open(f, true).unwrap();
        ns.open(f, false).unwrap();
        assert_eq!(ns.get(f).unwrap().file_state(), Some(FileState::Writing));
        assert_eq!(ns.release(f, false), Ok(false));
        assert_eq!(ns.release(f, true), Ok(true));
        assert_eq!(ns.get(f).unwrap().file_state(), Some(FileState::Sealed));
        ns.open(f, true).unwrap();
        assert_eq!(ns.get(f).unwrap().file_state(), Some(FileState::Writing));
    }

    #[test]
    fn recovered_files_come_back_sealed_under_their_paths() {
        let mut ns = ns();
        let a = ns.insert_sealed("m/x/a.bin", OWNER, now()).unwrap();
        let b = ns.insert_sealed("m/x/b.bin", OWNER, now()).unwrap();
        ns.insert_sealed("top", OWNER, now()).unwrap();
        assert_eq!(ns.path_of(a), Some("m/x/a.bin".into()));
        let m = ns.lookup(ROOT_INO, "m".as_ref()).unwrap();
        assert_eq!(ns.get(m).unwrap().perm, 0o755);
        assert_eq!(ns.get(b).unwrap().file_state(), Some(FileState::Sealed));
        assert_eq!(ns.get(b).unwrap().lower.nvme.as_deref(), Some("m/x/b.bin"));
        assert_eq!(ns.file_count(), 3);
        assert_eq!(
            ns.insert_sealed("top/z", OWNER, now()),
            Err(NsError::NotDir)
        );
        // A writable open makes any lower copy possibly stale.
        let v = ns.get(a).unwrap().lower.version;
        ns.open(a, true).unwrap();
        assert_eq!(ns.get(a).unwrap().lower.version, v + 1);
    }

    #[test]
    fn listing_is_sorted_with_dots() {
        let mut ns = ns();
        for n in ["b", "a", "c"] {
            ns.create_file(ROOT_INO, n.as_ref(), OWNER, now()).unwrap();
        }
        let names: Vec<_> = ns
            .list(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|e| e.name.into_string().unwrap())
            .collect();
        assert_eq!(names, [".", "..", "a", "b", "c"]);
    }
}
