//! The core's side of the NVMe tier: writing sealed files back (one flusher
//! thread, so copies of one path never race each other), keeping NVMe keys
//! in step with renames and unlinks, promoting NVMe-only files on open,
//! demoting instead of deleting on host eviction, and recovery at mount.
//!
//! NVMe keys are the files' paths in the mount, so the disk mirrors the
//! namespace. Every NVMe rename or removal that follows a namespace change
//! is made under the namespace lock; the long copies are not.

use std::os::fd::AsFd;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;

use super::{FsError, Kvfs, Result, file_owner, io_err, lock, owner_from};
use crate::namespace::{Ino, Namespace, NodeKind, NsError, Owner};
use crate::store::HostFile;
use crate::store::host::FileStat;
use crate::store::host::Room;
use crate::store::host::SetTime;
use crate::store::nvme::{NvmeError, NvmeTier, Recovered, Staged};

/// A request to the flusher; `done` hears the outcome (fsync waits on it).
pub(super) struct FlushJob {
    ino: Ino,
    done: Option<mpsc::Sender<Result<()>>>,
}

/// The NVMe tier as the core uses it.
pub(super) struct Lower {
    pub(super) tier: NvmeTier,
    queue: Mutex<Option<mpsc::Sender<FlushJob>>>,
    /// NVMe copies, least recently used first, for the tier's capacity.
    lru: Mutex<LruCache<Ino, ()>>,
    /// Flushes queued and not finished, and a signal when one finishes:
    /// writers wait on it when the host tier is full of unflushed files.
    pending: Mutex<u64>,
    progress: Condvar,
}

/// How long a writer waits for write-back to make room before the create
/// fails with ENOSPC.
const BACKPRESSURE_LIMIT: Duration = Duration::from_secs(10);

/// How long a writer waits for a jam that write-back cannot clear (the
/// tier is pinned by open files): long enough for the kernel's asynchronous
/// RELEASE of a file just written to turn it into one write-back can free.
/// Waiting the full limit there only stalled writers that then went ahead
/// anyway (found by the model test at a 4 MiB host tier: 10 s per create).
const RELEASE_GRACE: Duration = Duration::from_millis(100);

/// How long a writer waits while write-back frees nothing: a copy that
/// keeps failing (S3 refusing one object, say) must not hold every writer
/// for the whole limit.
const STALL: Duration = Duration::from_secs(2);

/// A writer's wait for room: whether it is still worth going on.
struct Wait {
    start: Instant,
    lowered: u64,
    moved: Instant,
}

impl Wait {
    fn new(host: &crate::store::host::HostTier) -> Wait {
        let now = Instant::now();
        Wait {
            start: now,
            lowered: host.lowered(),
            moved: now,
        }
    }

    fn worth(&mut self, host: &crate::store::host::HostTier) -> bool {
        let lowered = host.lowered();
        if lowered != self.lowered {
            self.lowered = lowered;
            self.moved = Instant::now();
        }
        let waited = self.start.elapsed();
        waited < BACKPRESSURE_LIMIT
            && (waited < RELEASE_GRACE
                || (host.awaits_write_back() && self.moved.elapsed() < STALL))
    }

    fn waited(&self) -> Duration {
        self.start.elapsed()
    }
}

fn nvme_err(e: NvmeError) -> FsError {
    match e {
        NvmeError::NoSpace { used, capacity, .. } => {
            FsError::Store(crate::store::StoreError::NoSpace { used, capacity })
        }
        e if e.is_missing() => FsError::Namespace(NsError::NotFound),
        e => FsError::Io {
            op: "nvme",
            source: std::io::Error::other(e.to_string()),
        },
    }
}

/// Sets a file's times on its NVMe copy, so a demoted file keeps them.
/// One info line at most every 10 s while writers wait for write-back: the
/// host tier is too small for the write rate, or the disk too slow.
fn log_pressure(waited: Duration) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::info!(
            waited_ms = waited.as_millis() as u64,
            "host tier full of files not yet written back: writers wait (eviction pressure)"
        );
    }
}

fn copy_times(to: &std::path::Path, atime: SystemTime, mtime: SystemTime) {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(to.as_os_str()));
    let Ok(c) = c else { return };
    let times = [SetTime::At(atime).timespec(), SetTime::At(mtime).timespec()];
    // SAFETY: valid C string and two timespecs.
    unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
}

impl Kvfs {
    /// Adds the NVMe tier and puts back the files it holds.
    pub fn attach_nvme(&mut self, tier: NvmeTier, recovered: Vec<Recovered>) {
        let mut lru = LruCache::unbounded();
        {
            let ns = self.ns.get_mut().unwrap_or_else(|p| p.into_inner());
            let owner = Owner {
                uid: 0,
                gid: 0,
                perm: 0o644,
            };
            // Oldest first, so the LRU starts in the order files were stored.
            let mut recovered = recovered;
            recovered.sort_by_key(|r| r.mtime);
            for r in recovered {
                let owner = r.owner.map_or(owner, owner_from);
                match ns.insert_sealed(&r.key, owner, r.mtime) {
                    Ok(ino) => {
                        lru.put(ino, ());
                    }
                    Err(e) => {
                        tracing::warn!(key = %r.key, error = %e, "cannot restore a file from NVMe");
                    }
                }
            }
        }
        self.lower = Some(Lower {
            tier,
            queue: Mutex::new(None),
            lru: Mutex::new(lru),
            pending: Mutex::new(0),
            progress: Condvar::new(),
        });
    }

    /// Starts the flusher thread. It holds the core weakly, so it ends with
    /// the mount.
    pub fn start_flusher(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(lower) = &self.lower else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel::<FlushJob>();
        *lock(&lower.queue) = Some(tx);
        let core: Weak<Kvfs> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("kvfs-flush".into())
            .spawn(move || {
                for job in rx {
                    let Some(core) = core.upgrade() else { break };
                    let res = core.flush_now(job.ino, job.done.is_some());
                    if let Err(e) = &res {
                        tracing::warn!(ino = job.ino, error = %e, "write-back to NVMe failed");
                        if core.remote.is_some()
                            && matches!(e, FsError::Store(crate::store::StoreError::NoSpace { .. }))
                        {
                            // NVMe is full of files not yet in S3 (an
                            // outage): keep it pinned and try again once
                            // uploads make room; writers meanwhile wait.
                            std::thread::sleep(Duration::from_millis(200));
                            core.queue_flush(job.ino, false);
                        } else {
                            // The host must be free to drop it, or writers
                            // waiting for room would wait for nothing.
                            core.release_to_host_lru(job.ino);
                        }
                    }
                    if let Some(lower) = &core.lower {
                        let mut pending = lock(&lower.pending);
                        *pending = pending.saturating_sub(1);
                        lower.progress.notify_all();
                    }
                    core.bg_progress();
                    if let Some(done) = job.done {
                        let _ = done.send(res);
                    }
                }
            })?;
        Ok(())
    }

    /// At unmount: waits (bounded) for queued flushes to NVMe. Returns the
    /// number left.
    pub fn drain_flushes(&self, limit: Duration) -> u64 {
        let Some(lower) = &self.lower else { return 0 };
        let deadline = Instant::now() + limit;
        loop {
            let left = *lock(&lower.pending);
            if left == 0 || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops accepting flushes (at unmount), letting the thread end.
    pub fn stop_flusher(&self) {
        if let Some(lower) = &self.lower {
            lock(&lower.queue).take();
        }
    }

    /// Queues a write-back; returns a receiver for its outcome if `wait`.
    pub(super) fn queue_flush(&self, ino: Ino, wait: bool) -> Option<mpsc::Receiver<Result<()>>> {
        let lower = self.lower.as_ref()?;
        let (done, rx) = if wait {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let queue = lock(&lower.queue);
        // Counted before it is sent: the flusher may finish it (and count
        // it off) before this thread runs again.
        *lock(&lower.pending) += 1;
        let sent = queue
            .as_ref()
            .is_some_and(|q| q.send(FlushJob { ino, done }).is_ok());
        if !sent {
            let mut pending = lock(&lower.pending);
            *pending = pending.saturating_sub(1);
            return None;
        }
        rx
    }

    /// fsync: returns once the file's current contents are on NVMe.
    pub fn sync_to_nvme(&self, ino: Ino) -> Result<()> {
        match self.queue_flush(ino, true) {
            Some(rx) => rx.recv().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Copies a file's current contents to NVMe (on the flusher thread).
    /// A file still open for writing is copied only for an fsync (`sync`):
    /// its seal queues it again.
    fn flush_now(&self, ino: Ino, sync: bool) -> Result<()> {
        let Some(lower) = &self.lower else {
            return Ok(());
        };
        // Under the lock: what to copy, and mark it in flight.
        let (key, version, file): (String, u64, Arc<HostFile>) = {
            let mut ns = self.ns();
            let Some(key) = ns.path_of(ino).map(|p| p.to_string_lossy().into_owned()) else {
                return Ok(()); // unlinked meanwhile
            };
            let Some(file) = self.host.get(ino) else {
                return Ok(()); // only on NVMe already, or evicted
            };
            let node = ns.get_mut(ino)?;
            match node.kind {
                NodeKind::File { writers, .. } if !node.lower.flushing => {
                    if writers > 0 && !sync {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
            if node.lower.nvme.as_deref() == Some(key.as_str())
                && node.open == 0
                && !node.lower.nvme_stale
            {
                return Ok(()); // already there
            }
            node.lower.flushing = true;
            (key, node.lower.version, file)
        };
        // Written under no name yet: the name is given below, under the
        // namespace lock, as the file is called then. Named at the start,
        // a copy could land on a name the file was renamed away from and
        // another file took meanwhile, replacing that file's copy.
        let started = Instant::now();
        let staged = self.copy_out(lower, &file);
        let bytes = staged.as_ref().ok().map(|(_, st)| st.size);
        self.metrics.tier_io("nvme", "write", started, bytes);
        let mut ns = self.ns();
        let Ok(node) = ns.get_mut(ino) else {
            return staged.map(drop);
        };
        node.lower.flushing = false;
        let (staged, st) = match staged {
            Ok(s) => s,
            Err(e) => {
                if self.host.get(ino).is_none() && node.lower.nvme.is_none() {
                    // Evicted from the host while being copied: nothing holds
                    // the bytes any more.
                    self.forget_file(&mut ns, ino);
                }
                return Err(e);
            }
        };
        let stale = node.nlink == 0 || node.lower.version != version;
        if stale {
            if node.nlink > 0 && self.host.get(ino).is_none() {
                self.forget_file(&mut ns, ino);
            }
            return Ok(());
        }
        let now = ns.path_of(ino).map(|p| p.to_string_lossy().into_owned());
        let Some(now) = now else { return Ok(()) };
        if now != key {
            tracing::debug!(ino, from = %key, to = %now, "renamed while copied to NVMe");
        }
        let owner = ns.get(ino).ok().map(file_owner);
        let (_, durable) = lower.tier.name(staged, &now, owner).map_err(nvme_err)?;
        if let Ok(path) = lower.tier.path_of(&now) {
            copy_times(&path, st.atime, st.mtime);
        }
        let node = ns.get_mut(ino)?;
        node.lower.nvme = Some(now);
        node.lower.nvme_stale = false;
        // The directory fsyncs take milliseconds on a disk: not under the
        // lock every request takes (they stalled foreground reads during
        // write-back bursts). Still `flushing` meanwhile, so the host copy
        // is not evicted (is_clean) before the copy's name is durable.
        node.lower.flushing = true;
        lock(&lower.lru).put(ino, ());
        drop(ns);
        let synced = durable.run().map_err(nvme_err);
        let mut ns = self.ns();
        if let Ok(node) = ns.get_mut(ino) {
            node.lower.flushing = false;
        }
        synced?;
        let clean = ns.get(ino).is_ok_and(|n| n.open == 0) && self.is_clean(&ns, ino);
        if clean {
            let evicted = self.host.make_evictable(ino);
            self.drop_evicted(&mut ns, &evicted);
        }
        drop(ns);
        self.queue_upload(ino, false);
        Ok(())
    }

    /// After a failed write-back: let the host tier evict the file after all.
    fn release_to_host_lru(&self, ino: Ino) {
        let mut ns = self.ns();
        if ns.get(ino).is_ok_and(|n| n.open == 0) {
            let evicted = self.host.make_evictable(ino);
            self.drop_evicted(&mut ns, &evicted);
        }
    }

    /// The namespace lock, with room made for one more file in the host
    /// tier. With a lower tier, a full tier is waited on (bounded): open
    /// writers keep growing their files, so a check before taking the lock
    /// can pass and the room still be gone by the time it is made.
    pub(super) fn ns_with_room(&self) -> Result<std::sync::MutexGuard<'_, Namespace>> {
        self.ns_with(Room::Write)
    }

    /// The same for a file copied up for a reader, which may use the room
    /// writers leave free ([`HostTier::is_jammed`]).
    pub(super) fn ns_with_room_to_read(&self) -> Result<std::sync::MutexGuard<'_, Namespace>> {
        self.ns_with(Room::Read)
    }

    fn ns_with(&self, who: Room) -> Result<std::sync::MutexGuard<'_, Namespace>> {
        self.wait_for_flushes(who);
        let (ns, room) = self.room_for(self.ns(), who);
        room.map(|()| ns)
    }

    /// Room for a writer of an existing file (already pinned, so making
    /// room cannot evict it): like a create, it waits (bounded) for
    /// write-back to free the tier rather than failing at once. Found by
    /// the model soak: a truncate got ENOSPC while files written a moment
    /// before were still being copied to NVMe.
    pub(super) fn room_to_write<'a>(
        &'a self,
        ns: std::sync::MutexGuard<'a, Namespace>,
    ) -> (std::sync::MutexGuard<'a, Namespace>, Result<()>) {
        self.room_for(ns, Room::Write)
    }

    fn room_for<'a>(
        &'a self,
        mut ns: std::sync::MutexGuard<'a, Namespace>,
        who: Room,
    ) -> (std::sync::MutexGuard<'a, Namespace>, Result<()>) {
        let mut wait = Wait::new(&self.host);
        loop {
            match self.make_room(&mut ns) {
                Err(FsError::Store(crate::store::StoreError::NoSpace { .. }))
                    if self.has_lower_tiers() && wait.worth(&self.host) =>
                {
                    // Not under the namespace lock: the flusher needs it.
                    drop(ns);
                    self.wait_for_flushes(who);
                    std::thread::sleep(Duration::from_millis(10));
                    ns = self.ns();
                }
                other => return (ns, other),
            }
        }
    }

    /// Backpressure: while the host tier is full of files that cannot be
    /// evicted yet (unflushed, or still open), a new file waits for the
    /// flusher, bounded, instead of failing or forcing out unflushed data.
    /// It cannot wait only on queued flushes: the kernel sends RELEASE
    /// asynchronously, so the previous file of the same writer may not even
    /// be queued yet when its next create arrives.
    fn wait_for_flushes(&self, who: Room) {
        if !self.has_lower_tiers() {
            return;
        }
        let mut wait = Wait::new(&self.host);
        while self.host.is_jammed(who) && wait.worth(&self.host) {
            let g = lock(&self.progress.0);
            let _ = self.progress.1.wait_timeout(g, Duration::from_millis(20));
        }
        if wait.waited() >= Duration::from_millis(20) {
            log_pressure(wait.waited());
        }
    }

    /// The long copy, outside the namespace lock: a file's bytes to an NVMe
    /// temp file, making room by dropping least recently used copies when
    /// the tier is full. Also returns the file's stat as copied (size,
    /// times).
    fn copy_out<'t>(&self, lower: &'t Lower, file: &HostFile) -> Result<(Staged<'t>, FileStat)> {
        let st = file.stat().map_err(io_err("fstat"))?;
        let fd = file.fd().map_err(io_err("open backing file"))?;
        loop {
            match lower.tier.stage_from_fd(fd.as_fd(), st.size) {
                Ok(staged) => return Ok((staged, st)),
                // Full: drop the least recently used copy and try again.
                Err(e @ NvmeError::NoSpace { .. }) => {
                    if !self.drop_nvme_lru(file.ino()) {
                        return Err(nvme_err(e));
                    }
                }
                Err(e) => return Err(nvme_err(e)),
            }
        }
    }

    /// Drops the least recently used NVMe copy (not of `keep`). A file that
    /// is only on NVMe goes away: a cache miss. Returns false if none is left.
    fn drop_nvme_lru(&self, keep: Ino) -> bool {
        let Some(lower) = &self.lower else {
            return false;
        };
        let mut ns = self.ns();
        // Each copy is looked at once at most; skipped ones go to the back.
        let mut tries = lock(&lower.lru).len();
        while tries > 0 {
            tries -= 1;
            let victim = {
                let mut lru = lock(&lower.lru);
                match lru.pop_lru() {
                    Some((ino, ())) => ino,
                    None => return false,
                }
            };
            let Ok(node) = ns.get_mut(victim) else {
                continue;
            };
            // With an S3 tier, a copy leaves NVMe only once it is in S3:
            // the file then stays, S3-only. Without one it is a cache miss.
            let waiting_for_s3 =
                self.remote.is_some() && (node.lower.s3.is_none() || node.lower.s3_stale);
            if victim == keep || waiting_for_s3 || node.lower.uploading {
                if node.lower.nvme.is_some() {
                    lock(&lower.lru).put(victim, ());
                }
                continue;
            }
            let Some(key) = node.lower.nvme.take() else {
                continue;
            };
            let _ = lower.tier.remove(&key);
            self.metrics.counters.evictions.inc();
            if self.host.get(victim).is_none() && node.lower.s3.is_none() {
                self.forget_file(&mut ns, victim);
            }
            return true;
        }
        false
    }

    /// Removes a file whose bytes are gone from every tier from the
    /// namespace, and tells the kernel.
    pub(super) fn forget_file(&self, ns: &mut Namespace, ino: Ino) {
        let Ok(node) = ns.get(ino) else { return };
        if node.nlink == 0 {
            return;
        }
        let (parent, name) = (node.parent, node.name.clone());
        if ns.unlink(parent, &name, SystemTime::now()).is_ok() {
            ns.reap(ino);
            if let Some(inval) = self.invalidator.get() {
                inval(parent, name);
            }
        }
    }

    /// The NVMe copy of `ino` no longer matches it (the file is unlinked,
    /// or its contents are about to change): remove it. A closed file that
    /// still has its name is pinned in the host tier and copied again.
    pub(super) fn drop_nvme_copy(&self, ns: &mut Namespace, ino: Ino) {
        let Some(lower) = &self.lower else { return };
        let Ok(node) = ns.get_mut(ino) else { return };
        let Some(key) = node.lower.nvme.take() else {
            return;
        };
        let (linked, closed) = (node.nlink > 0, node.open == 0);
        let _ = lower.tier.remove(&key);
        lock(&lower.lru).pop(&ino);
        self.repin(ns, ino, linked && closed);
    }

    /// A file lost its NVMe copy: if the host still has it, keep it there
    /// until it is copied again; if not, its bytes are gone (a cache miss).
    pub(super) fn repin(&self, ns: &mut Namespace, ino: Ino, requeue: bool) {
        let in_s3 = ns.get(ino).is_ok_and(|n| n.lower.s3.is_some());
        let on_nvme = ns.get(ino).is_ok_and(|n| n.lower.nvme.is_some());
        if self.host.get(ino).is_none() {
            if !in_s3 && !on_nvme {
                self.forget_file(ns, ino);
            }
        } else if requeue {
            let evicted = self.host.settle(ino, in_s3);
            self.drop_evicted(ns, &evicted);
            self.after_seal(ino);
        }
    }

    /// After a namespace rename (one root) or exchange (two roots): moves
    /// every NVMe copy below them to its file's new path. Each move is one
    /// rename on disk (an exchange one `RENAME_EXCHANGE`), so a crash never
    /// leaves a copy under a name that is neither its old nor its new one.
    pub(super) fn reconcile_keys(&self, ns: &mut Namespace, roots: &[Ino]) {
        let Some(lower) = &self.lower else { return };
        let path = |ns: &Namespace, ino| ns.path_of(ino).map(|p| p.to_string_lossy().into_owned());
        // (file, where its copy is, where it belongs now)
        let mut moved = Vec::new();
        for &root in roots {
            for ino in ns.files_under(root) {
                let Some(key) = ns.get(ino).ok().and_then(|n| n.lower.nvme.clone()) else {
                    continue;
                };
                match path(ns, ino) {
                    Some(now) if now != key => moved.push((ino, key, now)),
                    _ => {}
                }
            }
        }
        if let [a, b] = *roots {
            let (Some(pa), Some(pb)) = (path(ns, a), path(ns, b)) else {
                return;
            };
            // Every copy below the two names was at the other name's path.
            let swapped = lower.tier.exchange(&pa, &pb);
            if let Err(e) = &swapped {
                tracing::warn!(a = %pa, b = %pb, error = %e, "cannot exchange NVMe copies");
            }
            for (ino, key, now) in moved {
                let followed = swap_prefix(&key, &pa, &pb).is_some_and(|k| k == now);
                match ns.get_mut(ino) {
                    Ok(node) if followed && swapped.is_ok() => node.lower.nvme = Some(now),
                    _ => self.lose_copy(ns, ino),
                }
            }
            return;
        }
        for (ino, key, now) in moved {
            match lower.tier.rename(&key, &now) {
                Ok(()) => {
                    if let Ok(node) = ns.get_mut(ino) {
                        node.lower.nvme = Some(now);
                    }
                }
                Err(e) => {
                    tracing::warn!(from = %key, to = %now, error = %e, "cannot move an NVMe copy");
                    self.lose_copy(ns, ino);
                }
            }
        }
    }

    /// After a chmod or chown: the NVMe copy keeps the new owner and mode
    /// for the next mount. Best effort: the copy's bytes are unaffected.
    pub(super) fn record_owner(&self, ns: &Namespace, ino: Ino) {
        let Some(lower) = &self.lower else { return };
        let Ok(node) = ns.get(ino) else { return };
        let Some(key) = &node.lower.nvme else { return };
        if let Err(e) = lower.tier.set_owner(key, file_owner(node)) {
            tracing::debug!(key = %key, error = %e, "owner not recorded on the NVMe copy");
        }
    }

    fn lose_copy(&self, ns: &mut Namespace, ino: Ino) {
        let Some(lower) = &self.lower else { return };
        let Ok(node) = ns.get_mut(ino) else { return };
        node.lower.nvme = None;
        let closed = node.open == 0;
        lock(&lower.lru).pop(&ino);
        self.repin(ns, ino, closed);
    }

    /// The host copy of a file, promoted from NVMe if it is only there.
    pub(super) fn host_copy(&self, ino: Ino) -> Result<Arc<HostFile>> {
        if let Some(f) = self.host.get(ino) {
            return Ok(f);
        }
        let gate = Arc::clone(lock(&self.promoting).entry(ino).or_default());
        let _one = lock(&gate);
        let on_nvme = self.ns().get(ino)?.lower.nvme.is_some();
        let res = match &self.lower {
            _ if self.host.get(ino).is_some() => self.host.get(ino).ok_or(FsError::Stale(ino)),
            Some(lower) if on_nvme => self.promote(lower, ino),
            _ => self.promote_from_s3(ino),
        };
        lock(&self.promoting).remove(&ino);
        res
    }

    fn promote(&self, lower: &Lower, ino: Ino) -> Result<Arc<HostFile>> {
        if let Some(f) = self.host.get(ino) {
            return Ok(f); // another open promoted it
        }
        let key = {
            let ns = self.ns_with_room_to_read()?;
            ns.get(ino)?.lower.nvme.clone().ok_or(FsError::Stale(ino))?
        };
        let file = self.host.create(ino)?;
        let fd = file.fd().map_err(io_err("open backing file"))?;
        let started = Instant::now();
        let got = lower.tier.get_to_fd(&key, fd.as_fd());
        self.metrics
            .tier_io("nvme", "read", started, got.as_ref().ok().copied());
        match got {
            Ok(_) => {
                if let Ok(path) = lower.tier.path_of(&key)
                    && let Ok(md) = std::fs::metadata(path)
                {
                    let at = |t: std::io::Result<SystemTime>| t.map_or(SetTime::Omit, SetTime::At);
                    let _ = file.set_times(at(md.accessed()), at(md.modified()));
                }
                self.host.remeasure(ino);
                lock(&lower.lru).promote(&ino);
                self.metrics.counters.promotions.inc();
                Ok(file)
            }
            Err(e) => {
                self.host.remove(ino);
                let mut ns = self.ns();
                if e.is_missing() {
                    // A damaged or vanished copy is discarded: a cache miss.
                    tracing::warn!(key = %key, error = %e, "NVMe copy unusable, file dropped");
                    let mut in_s3 = false;
                    if let Ok(node) = ns.get_mut(ino) {
                        node.lower.nvme = None;
                        in_s3 = node.lower.s3.is_some();
                    }
                    lock(&lower.lru).pop(&ino);
                    if in_s3 {
                        drop(ns);
                        return self.promote_from_s3(ino);
                    }
                    self.forget_file(&mut ns, ino);
                }
                Err(nvme_err(e))
            }
        }
    }

    /// Where the NVMe copy under `key` is on disk.
    pub(super) fn nvme_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.lower.as_ref()?.tier.path_of(key).ok()
    }

    /// Attributes of a file that is only on NVMe.
    pub(super) fn nvme_stat(&self, key: &str) -> Option<std::fs::Metadata> {
        let lower = self.lower.as_ref()?;
        std::fs::metadata(lower.tier.path_of(key).ok()?).ok()
    }

    /// For status: NVMe capacity, used bytes, files held.
    pub(super) fn pending_flushes(&self) -> u64 {
        self.lower.as_ref().map_or(0, |l| *lock(&l.pending))
    }

    pub(super) fn nvme_usage(&self) -> Option<(u64, u64, u64, bool)> {
        let lower = self.lower.as_ref()?;
        let files = lock(&lower.lru).len() as u64;
        Some((
            lower.tier.capacity(),
            lower.tier.used(),
            files,
            lower.tier.o_direct(),
        ))
    }
}

/// `key` with its prefix `a` replaced by `b` or `b` by `a` (whole path
/// components only); `None` if it is below neither.
fn swap_prefix(key: &str, a: &str, b: &str) -> Option<String> {
    let below = |p: &str| {
        key.strip_prefix(p)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    below(a)
        .map(|rest| format!("{b}{rest}"))
        .or_else(|| below(b).map(|rest| format!("{a}{rest}")))
}

#[cfg(test)]
mod tests {
    use super::swap_prefix;

    #[test]
    fn swap_prefix_takes_whole_components() {
        assert_eq!(swap_prefix("a/x", "a", "b").as_deref(), Some("b/x"));
        assert_eq!(swap_prefix("b", "a", "b").as_deref(), Some("a"));
        assert_eq!(swap_prefix("ab/x", "a", "b"), None);
        assert_eq!(swap_prefix("c/a", "a", "b"), None);
    }
}
