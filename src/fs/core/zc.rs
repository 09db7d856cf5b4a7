//! The core's side of the zero-copy path: a client gets a host-tier
//! backing file before it has a name (a slot), fills it through its own
//! mapping (DMA from the GPU), and commits it under a path, after which it
//! is a sealed file like any written through FUSE (tiering, `ls`, `stat`,
//! reads all agree). Loads hand out a read-only descriptor of a resident
//! file, pinned until closed.

use std::os::fd::OwnedFd;
use std::time::SystemTime;

use super::{CONTROL_DIR, FsError, Kvfs, Result, io_err, lock};
use crate::namespace::{Ino, NsError, Owner, ROOT_INO};

impl Kvfs {
    /// A new slot of `size` bytes (memory allocated now, within the host
    /// tier's capacity): its number and a read-write descriptor.
    pub fn zc_alloc(&self, size: u64) -> Result<(u64, OwnedFd)> {
        let capacity = self.host.capacity();
        if size > capacity {
            // Would not fit even in an empty tier: evicting would only lose
            // what is stored.
            return Err(crate::store::StoreError::NoSpace {
                used: self.host.usage().used,
                capacity,
            }
            .into());
        }
        // Taken before making room, which would drop it first.
        let spare = self.host.take_spare(size);
        let ino = {
            let mut ns = self.ns_with_room()?;
            let evicted = self.host.reserve(size)?;
            self.drop_evicted(&mut ns, &evicted);
            ns.reserve_ino()
        };
        let file = self.host.create_slot(ino, size, spare)?;
        match file.reopen(true).map_err(io_err("open slot")) {
            Ok(fd) => {
                self.host.remeasure(ino);
                lock(&self.zc_slots).insert(ino);
                Ok((ino, fd))
            }
            Err(e) => {
                self.host.remove(ino);
                Err(e)
            }
        }
    }

    /// Publishes a slot as the sealed file at `path` (relative, already
    /// checked for `.`/`..`/empty parts), replacing a file of that name as
    /// rename(2) would. On error the slot stays allocated.
    pub fn zc_commit(&self, slot: u64, path: &str) -> Result<()> {
        if !lock(&self.zc_slots).contains(&slot) {
            return Err(FsError::BadHandle(slot));
        }
        if path.split('/').next() == Some(CONTROL_DIR) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        let (dir_path, name) = path.rsplit_once('/').unwrap_or(("", path));
        let now = SystemTime::now();
        let mut ns = self.ns();
        let owner = self.found_owner(&ns);
        let dir_owner = Owner {
            perm: 0o755,
            ..owner
        };
        let dir = ns.mkdir_p(dir_path, dir_owner, now)?;
        if let Ok(old) = ns.lookup(dir, name.as_ref()) {
            if ns.get(old)?.is_dir() {
                return Err(NsError::IsDir.into());
            }
            ns.unlink(dir, name.as_ref(), now)?;
            self.drop_lower_copies(&mut ns, old);
            self.unlinked(&mut ns, old);
            if let Some(inval) = self.invalidator.get() {
                inval(dir, name.into());
            }
        }
        ns.link_reserved(dir, name.as_ref(), slot, owner, now)?;
        lock(&self.zc_slots).remove(&slot);
        self.host.remeasure(slot);
        let evictable = self.is_clean(&ns, slot);
        let evicted = self.host.settle(slot, evictable);
        self.drop_evicted(&mut ns, &evicted);
        drop(ns);
        if let Some(file) = self.host.get(slot) {
            let bytes = file.stat().map(|s| s.size).unwrap_or(0);
            self.metrics.counters.sealed_files.inc();
            self.metrics.counters.sealed_bytes.inc_by(bytes);
            self.metrics.counters.creates.inc();
            self.host.park(&file);
            self.after_seal(slot);
        }
        Ok(())
    }

    /// Frees a slot that was not committed (unknown numbers are ignored).
    pub fn zc_abort(&self, slot: u64) {
        if lock(&self.zc_slots).remove(&slot) {
            self.host.remove(slot);
        }
    }

    /// Makes the file at `path` resident (promoting it from NVMe or S3) and
    /// pins it: (handle, size, read-only descriptor).
    pub fn zc_open(&self, path: &str) -> Result<(u64, u64, OwnedFd)> {
        if path.split('/').next() == Some(CONTROL_DIR) {
            return Err(FsError::ReadOnly("the control directory"));
        }
        let ino = self.resolve(path)?;
        let opened = self.open(ino, libc::O_RDONLY)?;
        let described = opened
            .file
            .as_ref()
            .ok_or(FsError::Stale(ino))
            .and_then(|f| {
                let size = f.stat().map_err(io_err("fstat"))?.size;
                let fd = f.reopen(false).map_err(io_err("open backing file"))?;
                Ok((size, fd))
            });
        match described {
            Ok((size, fd)) => Ok((opened.fh, size, fd)),
            Err(e) => {
                let _ = self.release(opened.fh);
                Err(e)
            }
        }
    }

    /// Releases a handle from [`Kvfs::zc_open`].
    pub fn zc_close(&self, handle: u64) {
        if let Err(e) = self.release(handle) {
            tracing::debug!(handle, error = %e, "zero-copy close");
        }
    }

    /// The inode at `path`, asking S3 for names the namespace lacks.
    fn resolve(&self, path: &str) -> Result<Ino> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let local = self.ns().lookup(ino, part.as_ref());
            ino = match local {
                Ok(i) => i,
                Err(NsError::NotFound) => self
                    .find_in_s3(ino, part.as_ref())?
                    .ok_or(NsError::NotFound)?,
                Err(e) => return Err(e.into()),
            };
        }
        Ok(ino)
    }
}
