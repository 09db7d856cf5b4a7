//! The core's side of the S3 tier: uploading sealed files (after their NVMe
//! copy, when there is an NVMe tier), applying unlinks and renames to the
//! bucket, finding names that only S3 has (lookup and readdir), fetching
//! S3-only files on open, and riding out outages.
//!
//! A few uploader threads run the bucket's jobs, in order per key and per
//! file: a job starts only when no running or earlier queued job touches
//! its keys or its file, so an unlink or rename queued after an upload of
//! the same key reaches S3 after it (or a deleted name could come back),
//! while jobs on different keys run side by side. A job that fails because
//! S3 does not answer goes back to the head of the queue and is retried
//! with exponential backoff; nothing queued is dropped, and local reads and
//! writes go on.
//!
//! Owners: an object carries its file's owner and mode. A file found by a
//! HEAD takes them from it; one found by a listing (which has no metadata)
//! is HEADed at its first lookup. A chmod or chown of a file already in S3
//! queues a job that rewrites the object's metadata, ordered with the
//! other jobs on the file.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use super::{FsError, Kvfs, Result, file_owner, io_err, lock, owner_from};
use crate::namespace::{Ino, Namespace, NodeKind, NsError, Owner, RemoteCopy};
use crate::store::host::SetTime;
use crate::store::s3::{Found, ObjectInfo, S3Error, S3Tier};

/// Work for the uploader, in order.
enum Job {
    /// Copy a sealed file's current contents to S3 (`done` hears the end,
    /// for fsync with durability `remote`). `adopt`: a file recovered from
    /// NVMe whose object may already be there.
    Upload {
        ino: Ino,
        adopt: bool,
        done: Option<mpsc::Sender<Result<()>>>,
    },
    Delete {
        key: String,
    },
    Move {
        ino: Ino,
        from: String,
        to: String,
    },
    /// Make the file's object carry the file's owner and mode as they are
    /// when the job runs (after a chmod or chown).
    SetOwner {
        ino: Ino,
    },
}

/// The S3 tier as the core uses it.
pub(super) struct Remote {
    pub(super) tier: S3Tier,
    jobs: Mutex<Queue>,
    wake: Condvar,
    stopped: std::sync::atomic::AtomicBool,
    /// Names S3 was asked about and does not have, until when to believe it.
    negative: Mutex<HashMap<(Ino, OsString), Instant>>,
    /// How long a lookup's answer from S3 is trusted.
    ttl: Duration,
    uploaded: AtomicU64,
    /// Bytes of the files waiting for upload (status: the backlog).
    backlog_bytes: AtomicU64,
    /// Tells this node's temporary keys from another node's.
    node: u64,
    /// Keys this node removed lately, and when: a lookup or listing sent
    /// before the removal can answer after it.
    removed: Mutex<HashMap<String, Instant>>,
    /// Keys an upload is writing right now (its file may be renamed or
    /// unlinked while the bytes travel).
    sending: Mutex<std::collections::HashSet<String>>,
    cleanup: S3Cleanup,
    /// Uploader threads: files uploaded at once while no writer is busy
    /// (half of them while one is; see [`WRITING_QUIET`]).
    uploads: usize,
    /// Objects the cleanup sweep queued for deletion.
    expired: AtomicU64,
}

/// Jobs waiting, and what the running ones touch.
#[derive(Default)]
struct Queue {
    /// Jobs in order, each with the times the server refused it.
    pending: VecDeque<(Job, u32)>,
    running: Vec<Claim>,
    next_claim: u64,
    /// After a job found S3 not answering, nothing starts until then (one
    /// backoff for all threads, or they would take turns hammering it).
    paused_until: Option<Instant>,
    backoff: Duration,
    /// When a writer last sealed a file (queued its upload).
    last_seal: Option<Instant>,
    /// Owner jobs queued or running, per file: while one is, the object's
    /// owner is older than the file's, and a lookup must not take it.
    owner_jobs: HashMap<Ino, u32>,
    /// Bumped whenever an owner job is queued or ends, so that a lookup
    /// can tell that none did while its HEAD travelled.
    owner_epoch: u64,
}

/// The file and keys a job touches; two jobs that share one must not run
/// at once or out of order.
#[derive(Clone)]
struct Claim {
    id: u64,
    ino: Option<Ino>,
    keys: Vec<String>,
    /// Keys whose object this running job may make appear or vanish (an
    /// upload's, a delete's, a move's source).
    in_flux: Option<String>,
    /// An owner job (counted in `Queue::owner_jobs` until it ends).
    sets_owner: bool,
    upload: bool,
}

impl Claim {
    /// Same file, same key, or one key a directory of the other: servers
    /// that keep objects as files (s3s-fs, MinIO's FS mode) cannot hold
    /// `a` and `a/b` at once, so a delete of `a` must land before an upload
    /// of `a/b` queued after it.
    fn conflicts(&self, other: &Claim) -> bool {
        let nested = |a: &str, b: &str| {
            a == b || (b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'/')
        };
        (self.ino.is_some() && self.ino == other.ino)
            || self
                .keys
                .iter()
                .any(|a| other.keys.iter().any(|b| nested(a, b) || nested(b, a)))
    }
}

/// How long a key this node removed stays hidden from lookups and
/// listings: longer than a lookup can take.
const REMOVED_MEMORY: Duration = Duration::from_secs(5);

/// A job the server refused this many times is given up on.
const MAX_REFUSALS: u32 = 4;

/// How far into the queue a free thread looks for a job it may start.
const LOOKAHEAD: usize = 64;

/// Backoff of a job S3 did not answer.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

fn s3_err(e: S3Error) -> FsError {
    match e {
        e if e.is_not_found() => FsError::Namespace(NsError::NotFound),
        e => FsError::Io {
            op: "s3",
            source: std::io::Error::other(e.to_string()),
        },
    }
}

/// For status.
#[derive(serde::Serialize)]
pub(super) struct S3Usage {
    bucket: String,
    prefix: String,
    healthy: bool,
    /// Files uploaded at once (`--s3-uploads`).
    uploads: usize,
    /// Of those, how many may run now: half while writers are sealing
    /// files (see `WRITING_QUIET`).
    uploads_allowed: usize,
    /// Uploads running now.
    uploads_running: usize,
    /// Whether uploaded bodies are hashed into the signature.
    payload_signing: bool,
    backlog_jobs: u64,
    backlog_bytes: u64,
    uploaded_files: u64,
    expired_objects: u64,
    put_bytes: u64,
    get_bytes: u64,
    requests: u64,
    errors: u64,
}

impl Remote {
    /// Uploads that may run now (see [`WRITING_QUIET`]).
    fn upload_limit(&self, core: &Kvfs, q: &Queue) -> usize {
        let busy = writers_busy(core.writable_handles(), q.last_seal, Instant::now());
        upload_limit(self.uploads, busy)
    }
}

impl Kvfs {
    /// Adds the S3 tier; `ttl` bounds how long a lookup's answer is reused,
    /// `uploads` how many files are uploaded at once.
    pub fn attach_s3(&mut self, tier: S3Tier, ttl: Duration, cleanup: S3Cleanup, uploads: usize) {
        self.remote = Some(Remote {
            tier,
            jobs: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stopped: false.into(),
            negative: Mutex::new(HashMap::new()),
            ttl,
            uploaded: AtomicU64::new(0),
            backlog_bytes: AtomicU64::new(0),
            node: fastrand::u64(..),
            removed: Mutex::new(HashMap::new()),
            sending: Mutex::new(Default::default()),
            cleanup,
            uploads: uploads.max(1),
            expired: AtomicU64::new(0),
        });
        // Files recovered from NVMe may or may not be in S3 already.
        let files: Vec<Ino> = {
            let ns = self.ns.get_mut().unwrap_or_else(|p| p.into_inner());
            ns.files_under(crate::namespace::ROOT_INO)
        };
        for ino in files {
            self.push_job(Job::Upload {
                ino,
                adopt: true,
                done: None,
            });
        }
    }

    /// Starts the uploader thread; it holds the core weakly.
    pub fn start_uploader(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(uploads) = self.remote.as_ref().map(|r| r.uploads) else {
            return Ok(());
        };
        for _ in 0..uploads {
            let core: Weak<Kvfs> = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("kvfs-upload".into())
                .spawn(move || upload_loop(core))?;
        }
        if let Some(cleanup) = self.remote.as_ref().map(|r| r.cleanup)
            && (cleanup.expire_after.is_some() || cleanup.capacity.is_some())
        {
            let core: Weak<Kvfs> = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("kvfs-s3-cleanup".into())
                .spawn(move || cleanup_loop(core, cleanup))?;
        }
        Ok(())
    }

    /// One cleanup sweep: queues the delete of every object uploaded more
    /// than `expire_after` ago, then of the oldest others while the prefix
    /// holds more than `capacity` bytes. Objects of files this node holds
    /// on a local tier or has open are spared (in use here; the delete
    /// job's own check keeps them too); a file this node knew only from S3
    /// is forgotten with its object. Returns how many deletes it queued.
    fn cleanup_sweep(&self, cleanup: S3Cleanup) -> u64 {
        let Some(remote) = &self.remote else { return 0 };
        let mut objects = match remote.tier.list_all() {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "S3 cleanup: listing failed; next time");
                return 0;
            }
        };
        objects.sort_by_key(|o| o.2);
        let cutoff = cleanup
            .expire_after
            .and_then(|age| SystemTime::now().checked_sub(age));
        let mut total: u64 = objects.iter().map(|o| o.1).sum();
        let (mut expired, mut evicted) = (0u64, 0u64);
        for (key, size, modified) in objects {
            let old = cutoff.is_some_and(|c| modified < c);
            let over = cleanup.capacity.is_some_and(|cap| total > cap);
            if !old && !over {
                continue;
            }
            if !self.drop_unless_local(&key) {
                continue;
            }
            tracing::debug!(key = %key, old, over, "S3 cleanup");
            self.push_job(Job::Delete { key });
            total = total.saturating_sub(size);
            if old {
                expired += 1;
            } else {
                evicted += 1;
            }
        }
        remote
            .expired
            .fetch_add(expired + evicted, Ordering::Relaxed);
        if expired + evicted > 0 {
            tracing::info!(
                expired,
                over_capacity = evicted,
                bytes_left = total,
                "S3 cleanup: deleting objects"
            );
        }
        expired + evicted
    }

    /// Whether `key`'s object may go: false if its file is held here on a
    /// local tier or open; a file known only from S3 is forgotten first.
    fn drop_unless_local(&self, key: &str) -> bool {
        let mut ns = self.ns();
        let ino = match ns.resolve(key) {
            Some(ino) if ino != crate::namespace::ROOT_INO => ino,
            _ => return true,
        };
        let local = self.host.get(ino).is_some()
            || ns
                .get(ino)
                .is_ok_and(|n| n.lower.nvme.is_some() || n.open > 0);
        if local {
            return false;
        }
        if ns
            .get(ino)
            .is_ok_and(|n| n.lower.s3.as_ref().is_some_and(|c| c.key == key))
        {
            if let Ok(node) = ns.get_mut(ino) {
                node.lower.s3 = None;
            }
            self.forget_file(&mut ns, ino);
        }
        true
    }

    pub fn stop_uploader(&self) {
        if let Some(remote) = &self.remote {
            remote.stopped.store(true, Ordering::Relaxed);
            remote.wake.notify_all();
        }
    }

    fn push_job(&self, job: Job) {
        let Some(remote) = &self.remote else { return };
        let mut q = lock(&remote.jobs);
        if let Job::SetOwner { ino } = job {
            *q.owner_jobs.entry(ino).or_default() += 1;
            q.owner_epoch += 1;
        }
        if let Job::Upload { adopt: false, .. } = job {
            q.last_seal = Some(Instant::now());
        }
        q.pending.push_back((job, 0));
        drop(q);
        remote.wake.notify_all();
    }

    /// After a chmod or chown: the file's object must follow. A file not in
    /// S3 yet needs nothing (its upload sends the owner it has then), but
    /// one being sent right now may have read the old owner: the job,
    /// queued behind that upload, looks. One queued job is enough, as it
    /// reads the owner when it runs.
    pub(super) fn record_s3_owner(&self, ns: &Namespace, ino: Ino) {
        let Some(remote) = &self.remote else { return };
        let Ok(node) = ns.get(ino) else { return };
        if node.lower.s3.is_none() && !node.lower.uploading {
            return;
        }
        let queued = lock(&remote.jobs)
            .pending
            .iter()
            .any(|(job, _)| matches!(job, Job::SetOwner { ino: i } if *i == ino));
        if !queued {
            self.push_job(Job::SetOwner { ino });
        }
    }

    /// Queues the upload of a sealed file; with `wait`, returns a receiver
    /// for its outcome.
    pub(super) fn queue_upload(&self, ino: Ino, wait: bool) -> Option<mpsc::Receiver<Result<()>>> {
        self.remote.as_ref()?;
        let (done, rx) = if wait {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.push_job(Job::Upload {
            ino,
            adopt: false,
            done,
        });
        rx
    }

    /// fsync with durability `remote`: returns once the file is in S3.
    pub(super) fn sync_to_s3(&self, ino: Ino) -> Result<()> {
        match self.queue_upload(ino, true) {
            Some(rx) => rx.recv().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// The S3 copy of `ino` no longer matches it (unlinked, or about to
    /// change): delete the object, after anything queued before.
    pub(super) fn drop_s3_copy(&self, ns: &mut Namespace, ino: Ino) {
        let Some(remote) = &self.remote else { return };
        let Ok(node) = ns.get_mut(ino) else { return };
        let Some(copy) = node.lower.s3.take() else {
            return;
        };
        let _ = remote;
        self.push_job(Job::Delete { key: copy.key });
    }

    /// After a rename touching `roots` (and the namespace already changed):
    /// queue the moves of their objects. An exchange goes through
    /// temporary keys, so the two names never overwrite each other.
    pub(super) fn reconcile_s3_keys(&self, ns: &mut Namespace, roots: &[Ino]) {
        let Some(remote) = &self.remote else { return };
        let mut moves = Vec::new();
        let mut uploads = Vec::new();
        for &root in roots {
            for ino in ns.files_under(root) {
                let Some(path) = ns.path_of(ino).map(|p| p.to_string_lossy().into_owned()) else {
                    continue;
                };
                let on_nvme = ns.get(ino).is_ok_and(|n| n.lower.nvme.is_some());
                let local = on_nvme || self.host.get(ino).is_some();
                let Ok(node) = ns.get_mut(ino) else { continue };
                let Some(copy) = node.lower.s3.as_mut() else {
                    continue;
                };
                if copy.key == path {
                    continue;
                }
                if local {
                    // Sent again under the new name (deletes first, so an
                    // exchange never overwrites what it is about to send):
                    // simpler than a copy, and never leaves the object
                    // behind its file.
                    let closed = node.open == 0;
                    self.drop_s3_copy(ns, ino);
                    if closed && self.host.get(ino).is_some() {
                        // Only the host copy holds it now: not evictable.
                        let evicted = self.host.settle(ino, on_nvme);
                        self.drop_evicted(ns, &evicted);
                    }
                    if closed {
                        uploads.push(ino);
                    }
                    continue;
                }
                let from = std::mem::replace(&mut copy.key, path.clone());
                copy.settled = false;
                moves.push((ino, from, path));
            }
        }
        for ino in uploads {
            self.queue_upload(ino, false);
        }
        if roots.len() > 1 {
            for (ino, from, _) in &mut moves {
                let tmp = format!(".kvfs/moving/{:016x}-{ino}", remote.node);
                self.push_job(Job::Move {
                    ino: *ino,
                    from: std::mem::replace(from, tmp.clone()),
                    to: tmp,
                });
            }
        }
        for (ino, from, to) in moves {
            self.push_job(Job::Move { ino, from, to });
        }
    }

    /// Is `ino`'s current content in S3?
    pub(super) fn in_s3(ns: &Namespace, ino: Ino) -> bool {
        ns.get(ino).is_ok_and(|n| n.lower.s3.is_some())
    }

    /// A name the namespace does not have: ask S3 (unless it said no
    /// within the TTL). Called without the namespace lock.
    pub(super) fn find_in_s3(&self, parent: Ino, name: &OsStr) -> Result<Option<Ino>> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let cache_key = (parent, name.to_owned());
        if let Some(until) = lock(&remote.negative).get(&cache_key)
            && Instant::now() < *until
        {
            return Ok(None);
        }
        let Some(dir) = self.ns().path_of(parent) else {
            return Ok(None);
        };
        let key = dir.join(name).to_string_lossy().into_owned();
        if key.starts_with(".kvfs") || Self::leaving_keys(remote).contains(&key) {
            return Ok(None);
        }
        // An outage is a miss: the connector recomputes; nothing is lost.
        let started = Instant::now();
        let answer = remote.tier.lookup(&key);
        self.metrics
            .tier_io("s3", "lookup", started, answer.as_ref().ok().map(|_| 0));
        let found = match answer {
            Ok(Some(Found::File(info))) => Some(Ok(info)),
            Ok(Some(Found::Dir)) => Some(Err(())),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "s3 lookup failed");
                None
            }
        };
        let mut ns = self.ns();
        if let Ok(ino) = ns.lookup(parent, name) {
            return Ok(Some(ino)); // created here meanwhile
        }
        // Removed by this node while the answer travelled: not back. Under
        // the namespace lock, which every removal holds while it queues. A
        // directory may be in S3 only for the objects this node is removing
        // below it (as in readdir).
        if found.is_some() {
            let leaving = Self::leaving_keys(remote);
            let below = format!("{key}/");
            let gone = match found {
                Some(Ok(_)) => leaving.contains(&key),
                _ => leaving.iter().any(|k| k.starts_with(&below)),
            };
            if gone {
                return Ok(None);
            }
        }
        let owner = self.found_owner(&ns);
        match found {
            None => {
                let mut neg = lock(&remote.negative);
                if neg.len() > 100_000 {
                    let now = Instant::now();
                    neg.retain(|_, until| *until > now);
                }
                neg.insert(cache_key, Instant::now() + remote.ttl);
                Ok(None)
            }
            Some(Err(())) => {
                let dir_owner = Owner {
                    perm: 0o755,
                    ..owner
                };
                Ok(Some(ns.mkdir(
                    parent,
                    name,
                    dir_owner,
                    SystemTime::now(),
                )?))
            }
            Some(Ok(info)) => Ok(Some(
                self.insert_remote(&mut ns, parent, name, &key, info, true)?,
            )),
        }
    }

    /// Owner and mode of a file S3 has without saying whose it is: the
    /// mount's owner, 0644.
    pub(super) fn found_owner(&self, ns: &Namespace) -> Owner {
        let root = ns.get(crate::namespace::ROOT_INO);
        Owner {
            uid: root.map(|r| r.uid).unwrap_or(0),
            gid: root.map(|r| r.gid).unwrap_or(0),
            perm: 0o644,
        }
    }

    /// Adds a file S3 has; `headed`: `info` comes from a HEAD, so its owner
    /// (or the lack of one) is the object's, not a listing's blank.
    fn insert_remote(
        &self,
        ns: &mut Namespace,
        parent: Ino,
        name: &OsStr,
        key: &str,
        info: ObjectInfo,
        headed: bool,
    ) -> Result<Ino> {
        tracing::debug!(key, "found in s3");
        // No owner in the metadata (another tool's object, or a malformed
        // value): the mount's default, never a failed lookup.
        let owner = info
            .owner
            .map(owner_from)
            .unwrap_or_else(|| self.found_owner(ns));
        let ino = ns.insert_found(parent, name, owner, info.mtime)?;
        ns.get_mut(ino)?.lower.s3 = Some(RemoteCopy {
            key: key.to_string(),
            size: info.size,
            mtime: info.mtime,
            checked: Instant::now(),
            settled: true,
            headed,
        });
        Ok(ino)
    }

    /// A file whose object S3 confirmed more than a TTL ago, or that a
    /// listing found (which brings no owner): ask again (HEAD), so an
    /// unlink on another node shows here, and the object's owner and mode
    /// (set at upload, changed by a chmod anywhere) show on the file. Only
    /// a clear "no such object" drops it; an outage keeps it (and the owner
    /// it has: the next HEAD, after the TTL, brings the object's). Called
    /// without the namespace lock.
    pub(super) fn revalidate(&self, ino: Ino) {
        let Some(remote) = &self.remote else { return };
        let key = {
            let ns = self.ns();
            let Ok(node) = ns.get(ino) else { return };
            match (&node.lower.s3, &node.kind) {
                (Some(c), NodeKind::File { writers: 0, .. })
                    if c.settled
                        && (c.checked.elapsed() >= remote.ttl || !c.headed)
                        && !node.lower.uploading =>
                {
                    c.key.clone()
                }
                _ => return,
            }
        };
        let epoch = lock(&remote.jobs).owner_epoch;
        let answer = remote.tier.head(&key);
        let gone = matches!(answer, Ok(None));
        let owner = answer.ok().flatten().and_then(|info| info.owner);
        let mut ns = self.ns();
        let Ok(node) = ns.get_mut(ino) else { return };
        let Some(copy) = node.lower.s3.as_mut() else {
            return;
        };
        if copy.key != key || !copy.settled {
            return; // renamed meanwhile
        }
        if !gone {
            copy.checked = Instant::now();
            copy.headed = true;
            // Not while this node's own chmod is on its way to the object
            // (or was queued or landed while the HEAD travelled): the HEAD
            // may show the owner from before it.
            let mine_pending = {
                let q = lock(&remote.jobs);
                q.owner_epoch != epoch || q.owner_jobs.contains_key(&ino)
            };
            if let Some(o) = owner
                && !mine_pending
                && file_owner(node) != o
            {
                tracing::debug!(ino, key = %key, owner = %o.encode(), "owner from the object");
                node.uid = o.uid;
                node.gid = o.gid;
                node.perm = o.perm;
                node.ctime = SystemTime::now();
                self.record_owner(&ns, ino);
            }
            return;
        }
        tracing::debug!(ino, key = %key, "object deleted elsewhere; dropping the file");
        node.lower.s3 = None;
        if node.open == 0 {
            self.drop_nvme_copy(&mut ns, ino);
            self.host.remove(ino);
            self.forget_file(&mut ns, ino);
        }
    }

    /// readdir: adds what S3 has below directory `dir` and the namespace
    /// does not. An outage lists the local entries only.
    pub(super) fn merge_s3_listing(&self, dir: Ino) {
        let Some(remote) = &self.remote else { return };
        let Some(path) = self.ns().path_of(dir) else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        let listing = match remote.tier.list(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(dir = %path, error = %e, "s3 listing failed; local entries only");
                return;
            }
        };
        let mut ns = self.ns();
        // Under the namespace lock, which every removal holds while it
        // queues its job.
        let leaving = Self::leaving_keys(remote);
        let owner = self.found_owner(&ns);
        let is_root = dir == crate::namespace::ROOT_INO;
        for name in listing.dirs {
            if is_root && name == super::CONTROL_DIR {
                continue;
            }
            let below = if path.is_empty() {
                format!("{name}/")
            } else {
                format!("{path}/{name}/")
            };
            if leaving.iter().any(|k| k.starts_with(&below)) {
                // Perhaps only what this node removed keeps it in S3.
                continue;
            }
            if ns.lookup(dir, name.as_ref()).is_err() {
                let dir_owner = Owner {
                    perm: 0o755,
                    ..owner
                };
                let _ = ns.mkdir(dir, name.as_ref(), dir_owner, SystemTime::now());
            }
        }
        for (name, info) in listing.files {
            if ns.lookup(dir, name.as_ref()).is_err() {
                let key = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                if leaving.contains(&key) {
                    continue;
                }
                // Its owner comes with the HEAD of its first lookup.
                let _ = self.insert_remote(&mut ns, dir, name.as_ref(), &key, info, false);
            }
        }
    }

    /// Attributes of a file that is only in S3: (size, mtime).
    pub(super) fn s3_attr(ns: &Namespace, ino: Ino) -> Option<(u64, SystemTime)> {
        let copy = ns.get(ino).ok()?.lower.s3.as_ref()?;
        Some((copy.size, copy.mtime))
    }

    /// Fetches an S3-only file into the host tier (called under the
    /// file's promotion gate). A missing or damaged object is a cache miss.
    pub(super) fn promote_from_s3(&self, ino: Ino) -> Result<Arc<crate::store::HostFile>> {
        let remote = self.remote.as_ref().ok_or(FsError::Stale(ino))?;
        // A queued rename must reach S3 before the object is at its key.
        let deadline = Instant::now() + Duration::from_secs(30);
        let copy = loop {
            let ns = self.ns_with_room_to_read()?;
            let copy = ns.get(ino)?.lower.s3.clone().ok_or(FsError::Stale(ino))?;
            if copy.settled || Instant::now() > deadline {
                break copy;
            }
            drop(ns);
            std::thread::sleep(Duration::from_millis(10));
        };
        let file = self.host.create(ino)?;
        let fd = file.fd().map_err(io_err("open backing file"))?;
        let started = Instant::now();
        let got = remote
            .tier
            .get_to_fd(&copy.key, fd.as_fd(), Some(copy.size));
        self.metrics
            .tier_io("s3", "get", started, got.as_ref().ok().copied());
        match got {
            Ok(_) => {
                let _ = file.set_times(SetTime::Omit, SetTime::At(copy.mtime));
                self.host.remeasure(ino);
                self.metrics.counters.promotions.inc();
                // Keep a local copy too, by policy.
                self.queue_flush(ino, false);
                Ok(file)
            }
            Err(e) => {
                self.host.remove(ino);
                if e.is_missing() {
                    tracing::warn!(key = %copy.key, error = %e, "S3 copy unusable, file dropped");
                    let mut ns = self.ns();
                    if let Ok(node) = ns.get_mut(ino) {
                        node.lower.s3 = None;
                    }
                    self.forget_file(&mut ns, ino);
                }
                Err(s3_err(e))
            }
        }
    }

    /// S3 jobs queued or running.
    pub(super) fn s3_queue_depth(&self) -> Option<u64> {
        let remote = self.remote.as_ref()?;
        let q = lock(&remote.jobs);
        Some((q.pending.len() + q.running.len()) as u64)
    }

    pub(super) fn s3_healthy(&self) -> Option<bool> {
        Some(self.remote.as_ref()?.tier.healthy())
    }

    pub(super) fn s3_usage(&self) -> Option<S3Usage> {
        let remote = self.remote.as_ref()?;
        let c = &remote.tier.counters;
        let q = lock(&remote.jobs);
        let backlog_jobs = (q.pending.len() + q.running.len()) as u64;
        let uploads_allowed = remote.upload_limit(self, &q);
        let uploads_running = q.running.iter().filter(|c| c.upload).count();
        drop(q);
        Some(S3Usage {
            bucket: remote.tier.bucket().to_string(),
            prefix: remote.tier.prefix().to_string(),
            healthy: remote.tier.healthy(),
            uploads: remote.uploads,
            uploads_allowed,
            uploads_running,
            payload_signing: remote.tier.signs_payload(),
            backlog_jobs,
            backlog_bytes: remote.backlog_bytes.load(Ordering::Relaxed),
            uploaded_files: remote.uploaded.load(Ordering::Relaxed),
            expired_objects: remote.expired.load(Ordering::Relaxed),
            put_bytes: c.put_bytes.load(Ordering::Relaxed),
            get_bytes: c.get_bytes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        })
    }

    /// At unmount: waits (bounded) until every queued S3 job is done, so
    /// that files held only in memory reach S3. With an NVMe tier, files
    /// already there are uploaded at the next mount instead. Returns the
    /// jobs left undone.
    pub fn drain_uploads(&self, limit: Duration) -> usize {
        let Some(remote) = &self.remote else { return 0 };
        let deadline = Instant::now() + limit;
        loop {
            let left = {
                let q = lock(&remote.jobs);
                q.pending.len() + q.running.len()
            };
            if left == 0 || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one job; `Err` with a transient error means "try again later".
    fn run_job(&self, job: &mut Job, claim: &Claim) -> std::result::Result<(), S3Error> {
        match job {
            Job::Upload { ino, .. } => tracing::debug!(ino, "s3 job: upload"),
            Job::Delete { key } => tracing::debug!(key, "s3 job: delete"),
            Job::Move { ino, from, to } => tracing::debug!(ino, from, to, "s3 job: move"),
            Job::SetOwner { ino } => tracing::debug!(ino, "s3 job: set owner"),
        }
        match job {
            Job::Delete { key } => {
                if self.holds_s3_key(key) {
                    // An upload queued before this delete already put the
                    // new file's object there: deleting it would lose it.
                    tracing::debug!(key, "delete skipped: a file holds the key");
                    return Ok(());
                }
                let res = self.remote_tier()?.delete(key);
                self.removed_key_done(key);
                res
            }
            Job::Move { ino, from, to } => {
                let res = self.remote_tier()?.rename(from, to);
                self.removed_key_done(from);
                if let Err(e) = &res
                    && !e.is_missing()
                {
                    return res;
                }
                let mut ns = self.ns();
                if let Ok(node) = ns.get_mut(*ino)
                    && let Some(copy) = node.lower.s3.as_mut()
                    && copy.key == *to
                {
                    if res.is_ok() {
                        copy.settled = true;
                        copy.checked = Instant::now();
                    } else {
                        // The source vanished (deleted elsewhere).
                        node.lower.s3 = None;
                        self.repin_after_remote_loss(&mut ns, *ino);
                    }
                }
                Ok(())
            }
            Job::Upload { ino, adopt, done } => {
                self.upload(*ino, *adopt, done.is_some(), claim.keys.first())
            }
            Job::SetOwner { ino } => self.set_s3_owner(*ino),
        }
    }

    /// Rewrites the owner in a file's object to the file's owner now.
    fn set_s3_owner(&self, ino: Ino) -> std::result::Result<(), S3Error> {
        let (key, owner) = {
            let ns = self.ns();
            let Ok(node) = ns.get(ino) else {
                return Ok(()); // forgotten
            };
            // Not in S3 (an upload failed, or it was dropped): the next
            // upload sends the owner.
            let Some(copy) = &node.lower.s3 else {
                return Ok(());
            };
            if !copy.settled {
                // A rename queued after this job has not reached S3: the
                // object is still at the old key, which the move copies
                // with its metadata as it is. Once more, behind the move.
                drop(ns);
                self.push_job(Job::SetOwner { ino });
                return Ok(());
            }
            (copy.key.clone(), file_owner(node))
        };
        match self.remote_tier()?.set_owner(&key, owner) {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(
                    key,
                    "object too large to copy: its owner in S3 stays as uploaded"
                );
                Ok(())
            }
            // Deleted elsewhere: a lookup finds that out; nothing to set.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A move that cannot be done: the file's object is not where the
    /// namespace says. Sent again if a local tier has it; else it is gone.
    fn abandon_move(&self, ino: Ino, to: &str) {
        let mut ns = self.ns();
        let Ok(node) = ns.get_mut(ino) else { return };
        if node.lower.s3.as_ref().is_none_or(|c| c.key != to) {
            return;
        }
        node.lower.s3 = None;
        let on_nvme = node.lower.nvme.is_some();
        let closed = node.open == 0;
        let in_host = self.host.get(ino).is_some();
        if in_host && closed {
            // Its only copy below is gone: not evictable until sent again.
            let evicted = self.host.settle(ino, on_nvme);
            self.drop_evicted(&mut ns, &evicted);
        }
        if on_nvme || in_host {
            drop(ns);
            self.queue_upload(ino, false);
        } else {
            self.forget_file(&mut ns, ino);
        }
    }

    /// Whether the file now at path `key` has its current contents in S3
    /// under `key`.
    fn holds_s3_key(&self, key: &str) -> bool {
        let ns = self.ns();
        let Some(ino) = ns.resolve(key) else {
            return false;
        };
        ns.get(ino).is_ok_and(|n| {
            n.lower
                .s3
                .as_ref()
                .is_some_and(|c| c.key == key && c.settled)
                && !n.lower.s3_stale
        })
    }

    fn remote_tier(&self) -> std::result::Result<&S3Tier, S3Error> {
        self.remote
            .as_ref()
            .map(|r| &r.tier)
            .ok_or_else(|| S3Error::Settings("no s3 tier".into()))
    }

    /// A file lost its S3 copy (not by this node's doing): if no local tier
    /// has it, it is gone.
    fn repin_after_remote_loss(&self, ns: &mut Namespace, ino: Ino) {
        let local =
            self.host.get(ino).is_some() || ns.get(ino).is_ok_and(|n| n.lower.nvme.is_some());
        if !local {
            self.forget_file(ns, ino);
        }
    }

    /// Uploads a file's current contents, from the host copy if there is
    /// one, else from NVMe.
    /// A file still open for writing is sent only for an fsync (`sync`):
    /// its seal queues it again.
    fn upload(
        &self,
        ino: Ino,
        adopt: bool,
        sync: bool,
        claimed: Option<&String>,
    ) -> std::result::Result<(), S3Error> {
        let tier = self.remote_tier()?;
        // Under the lock: what to send, and mark it in flight.
        enum Source {
            Host(Arc<crate::store::HostFile>),
            Nvme(std::path::PathBuf),
        }
        let (key, version, source, owner) = {
            let mut ns = self.ns();
            if ns.path_of(ino).is_none() {
                return Ok(()); // unlinked meanwhile
            }
            // Renamed since the job was picked: the queue let other jobs run
            // on the new name beside this one (a delete of the object the
            // rename replaced), so it writes the name it claimed, and the
            // move after the upload sends it to the new one.
            let key = match claimed {
                Some(k) => k.clone(),
                None => return Ok(()),
            };
            let nvme_path = ns
                .get(ino)
                .ok()
                .and_then(|n| n.lower.nvme.clone())
                .and_then(|k| self.nvme_path(&k));
            let Ok(node) = ns.get_mut(ino) else {
                return Ok(());
            };
            match node.kind {
                NodeKind::File { writers, .. }
                    if !node.lower.uploading && (writers == 0 || sync) => {}
                _ => {
                    tracing::debug!(ino, key, "upload skipped: open for writing or sending");
                    return Ok(()); // a writer's seal queues it again
                }
            }
            if node.lower.s3.as_ref().is_some_and(|c| c.key == key)
                && !node.lower.s3_stale
                && node.open == 0
            {
                tracing::debug!(ino, key, "upload skipped: already there");
                return Ok(()); // already there
            }
            let source = match (self.host.get(ino), nvme_path) {
                (Some(f), _) => Source::Host(f),
                (None, Some(p)) => Source::Nvme(p),
                (None, None) => return Ok(()), // gone
            };
            node.lower.uploading = true;
            if let Some(remote) = &self.remote {
                lock(&remote.sending).insert(key.clone());
            }
            // Read with `uploading` set, under the same lock: a chmod from
            // now on queues an owner job behind this upload.
            (key, node.lower.version, source, file_owner(node))
        };
        // Until this returns (after any delete of the key is queued).
        struct Sending<'a>(&'a Remote, String);
        impl Drop for Sending<'_> {
            fn drop(&mut self) {
                lock(&self.0.sending).remove(&self.1);
            }
        }
        let _sending = self.remote.as_ref().map(|r| Sending(r, key.clone()));
        let sent = (|| {
            let (file, _host);
            let (fd, len, mtime) = match &source {
                Source::Host(f) => {
                    let st = f.stat().map_err(|source| S3Error::Io {
                        op: "fstat",
                        source,
                    })?;
                    _host = f.fd().map_err(|source| S3Error::Io {
                        op: "open backing file",
                        source,
                    })?;
                    (_host.as_fd(), st.size, st.mtime)
                }
                Source::Nvme(p) => {
                    file = std::fs::File::open(p).map_err(|source| S3Error::Io {
                        op: "open nvme copy",
                        source,
                    })?;
                    let md = file.metadata().map_err(|source| S3Error::Io {
                        op: "stat nvme copy",
                        source,
                    })?;
                    (
                        file.as_fd(),
                        md.len(),
                        md.modified().unwrap_or(SystemTime::now()),
                    )
                }
            };
            if adopt
                && let Ok(Some(info)) = tier.head(&key)
                && info.size == len
                && info.mtime == mtime
            {
                // Already there; an owner changed since (a chmod whose job
                // the last unmount left undone) is rewritten, not re-sent.
                return Ok((len, mtime, info.owner == Some(owner)));
            }
            if let Some(remote) = &self.remote {
                remote.backlog_bytes.fetch_add(len, Ordering::Relaxed);
            }
            let started = Instant::now();
            let res = tier.put_from_fd(&key, fd, len, mtime, owner);
            self.metrics
                .tier_io("s3", "put", started, res.as_ref().ok().map(|_| len));
            if let Some(remote) = &self.remote {
                remote.backlog_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            res.map(|_| (len, mtime, true))
        })();
        let mut ns = self.ns();
        let Ok(node) = ns.get_mut(ino) else {
            if sent.is_ok() {
                self.push_job(Job::Delete { key });
            }
            return Ok(());
        };
        node.lower.uploading = false;
        let (len, mtime, owner_sent) = match sent {
            Ok(v) => v,
            Err(e @ S3Error::Io { .. }) => {
                // The local source vanished (evicted meanwhile): nothing to send.
                tracing::debug!(ino, error = %e, "upload source gone");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let current = ns.path_of(ino).map(|p| p.to_string_lossy().into_owned());
        let node = ns
            .get_mut(ino)
            .map_err(|e| S3Error::Settings(e.to_string()))?;
        if node.nlink == 0 || node.lower.version != version {
            tracing::debug!(ino, key, "uploaded an old version or an unlinked file");
            self.push_job(Job::Delete { key });
            return Ok(());
        }
        tracing::debug!(ino, key, current = ?current, "uploaded");
        node.lower.s3 = Some(RemoteCopy {
            key: key.clone(),
            size: len,
            mtime,
            checked: Instant::now(),
            settled: true,
            headed: true,
        });
        node.lower.s3_stale = false;
        if let Some(remote) = &self.remote {
            remote.uploaded.fetch_add(1, Ordering::Relaxed);
        }
        if !owner_sent {
            self.push_job(Job::SetOwner { ino });
        }
        // Renamed while sending: move the object after it.
        if let Some(now) = current
            && now != key
        {
            self.reconcile_s3_keys(&mut ns, &[ino]);
        }
        // Now clean for the tier above.
        if self.lower.is_none() && ns.get(ino).is_ok_and(|n| n.open == 0) {
            let evicted = self.host.make_evictable(ino);
            self.drop_evicted(&mut ns, &evicted);
        }
        self.bg_progress();
        Ok(())
    }
}

impl Kvfs {
    /// What `job` touches; an upload's key is its file's path now.
    fn claim_of(ns: &Namespace, job: &Job) -> Claim {
        let (ino, keys) = match job {
            Job::Upload { ino, .. } => (
                Some(*ino),
                ns.path_of(*ino)
                    .map(|p| vec![p.to_string_lossy().into_owned()])
                    .unwrap_or_default(),
            ),
            Job::Delete { key } => (None, vec![key.clone()]),
            Job::Move { ino, from, to } => (Some(*ino), vec![from.clone(), to.clone()]),
            // The key its object has now (a delete of it waits).
            Job::SetOwner { ino } => (
                Some(*ino),
                ns.get(*ino)
                    .ok()
                    .and_then(|n| n.lower.s3.as_ref())
                    .map(|c| vec![c.key.clone()])
                    .unwrap_or_default(),
            ),
        };
        Claim {
            id: 0,
            ino,
            in_flux: match job {
                Job::Upload { .. } => keys.first().cloned(),
                _ => Self::removed_key(job).map(str::to_string),
            },
            keys,
            sets_owner: matches!(job, Job::SetOwner { .. }),
            upload: matches!(job, Job::Upload { .. }),
        }
    }

    fn removed_key(job: &Job) -> Option<&str> {
        match job {
            Job::Delete { key } => Some(key),
            Job::Move { from, .. } => Some(from),
            Job::Upload { .. } | Job::SetOwner { .. } => None,
        }
    }

    /// Keys this node has removed (unlink, rename) that S3 may still show
    /// until the queued job reaches it, and keys a running upload may be
    /// writing for a file unlinked meanwhile: a lookup or listing must not
    /// bring them back.
    fn leaving_keys(remote: &Remote) -> std::collections::HashSet<String> {
        let mut keys: std::collections::HashSet<String> = {
            let q = lock(&remote.jobs);
            q.pending
                .iter()
                .filter_map(|(job, _)| Self::removed_key(job))
                .map(str::to_string)
                .chain(q.running.iter().filter_map(|c| c.in_flux.clone()))
                .collect()
        };
        let mut removed = lock(&remote.removed);
        let now = Instant::now();
        removed.retain(|_, at| now.duration_since(*at) < REMOVED_MEMORY);
        keys.extend(removed.keys().cloned());
        drop(removed);
        keys.extend(lock(&remote.sending).iter().cloned());
        keys
    }

    /// Remembers that this node removed `key` from the bucket.
    fn removed_key_done(&self, key: &str) {
        if let Some(remote) = &self.remote {
            lock(&remote.removed).insert(key.to_string(), Instant::now());
        }
    }

    /// Takes the first queued job that touches nothing a running or an
    /// earlier queued job touches. The namespace lock is taken first, as
    /// everywhere (jobs are queued under it).
    fn next_job(&self, remote: &Remote) -> Option<(Job, u32, Claim)> {
        let ns = self.ns();
        let mut q = lock(&remote.jobs);
        if q.paused_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let mut ahead: Vec<Claim> = q.running.clone();
        let mut pick = None;
        let uploads_held =
            q.running.iter().filter(|c| c.upload).count() >= remote.upload_limit(self, &q);
        for (i, (job, _)) in q.pending.iter().enumerate().take(LOOKAHEAD) {
            let claim = Self::claim_of(&ns, job);
            // A held upload still goes into `ahead`: jobs behind it that
            // touch its file or key wait for it.
            let held = claim.upload && uploads_held;
            if !held && !ahead.iter().any(|c| c.conflicts(&claim)) {
                pick = Some((i, claim));
                break;
            }
            ahead.push(claim);
        }
        let (i, mut claim) = pick?;
        let (job, refusals) = q.pending.remove(i)?;
        q.next_claim += 1;
        claim.id = q.next_claim;
        q.running.push(claim.clone());
        Some((job, refusals, claim))
    }

    /// Ends a job; `retry` puts it back at the head and pauses the queue
    /// for the next backoff step.
    fn finish_job(&self, remote: &Remote, id: u64, retry: Option<(Job, u32)>) {
        let mut q = lock(&remote.jobs);
        let owner_of = q
            .running
            .iter()
            .find(|c| c.id == id && c.sets_owner)
            .and_then(|c| c.ino);
        q.running.retain(|c| c.id != id);
        if let Some(ino) = owner_of
            && retry.is_none()
        {
            q.owner_epoch += 1;
            if let Some(n) = q.owner_jobs.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    q.owner_jobs.remove(&ino);
                }
            }
        }
        match retry {
            Some(job) => {
                q.pending.push_front(job);
                q.backoff = (q.backoff * 2).clamp(RETRY_FIRST, RETRY_MAX);
                let wait = q.backoff;
                q.paused_until = Some(Instant::now() + wait);
                tracing::warn!(
                    retry_in_ms = wait.as_millis() as u64,
                    "s3 unavailable; will retry"
                );
            }
            None => {
                q.backoff = Duration::ZERO;
                q.paused_until = None;
            }
        }
        drop(q);
        remote.wake.notify_all();
    }
}

/// What the cleanup sweep deletes from the bucket (the connectors never
/// clean up): objects older than `expire_after`, and the oldest beyond
/// `capacity` bytes under the prefix.
#[derive(Debug, Clone, Copy, Default)]
pub struct S3Cleanup {
    pub expire_after: Option<Duration>,
    pub capacity: Option<u64>,
}

/// Sweeps a few seconds after the mount, then every quarter of the expiry
/// age and every minute with a capacity (at most every 10 minutes, at least
/// every second).
fn cleanup_loop(core: Weak<Kvfs>, cleanup: S3Cleanup) {
    let by_age = cleanup.expire_after.map(|a| a / 4);
    let by_size = cleanup.capacity.map(|_| Duration::from_secs(60));
    let every = [by_age, by_size]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(600))
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut next = Instant::now() + Duration::from_secs(2).min(every);
    loop {
        // Short naps, so the thread notices the unmount.
        std::thread::sleep(Duration::from_millis(200));
        let Some(k) = core.upgrade() else { return };
        let Some(remote) = &k.remote else { return };
        if remote.stopped.load(Ordering::Relaxed) {
            return;
        }
        if Instant::now() >= next {
            k.cleanup_sweep(cleanup);
            next = Instant::now() + every;
        }
    }
}

/// Writers count as busy while a file is open for writing and until this
/// long after their last seal (the connector spends the time between two
/// stores filling its next block). While they are, only half of the
/// uploads run: each upload takes CPU and memory
/// bandwidth from them (on the GPU machine, 16 writers stored at 4.7-4.9
/// GB/s beside 8 uploads and 2.9-3.1 beside 16), and once they stop, the
/// rest drain the backlog at the server's pace (16 requests in flight get
/// 2.2-2.4 GB/s from the local server, 8 get 1.6-1.8). Short, because it
/// delays the full drain after a burst; a writer storing 16 MiB blocks
/// seals one every few milliseconds.
const WRITING_QUIET: Duration = Duration::from_millis(30);

/// Whether writers are busy at `now`: a file open for writing, or a seal
/// less than [`WRITING_QUIET`] ago.
fn writers_busy(open_for_writing: u64, last_seal: Option<Instant>, now: Instant) -> bool {
    open_for_writing > 0
        || last_seal.is_some_and(|t| now.saturating_duration_since(t) < WRITING_QUIET)
}

/// Uploads that may run out of `uploads`.
fn upload_limit(uploads: usize, writers_busy: bool) -> usize {
    if writers_busy {
        uploads.div_ceil(2)
    } else {
        uploads
    }
}

fn upload_loop(core: Weak<Kvfs>) {
    crate::store::lower_this_threads_priority(crate::store::BACKGROUND_NICE);
    loop {
        let Some(k) = core.upgrade() else { return };
        let Some(remote) = &k.remote else { return };
        if remote.stopped.load(Ordering::Relaxed) {
            return;
        }
        let Some((mut job, refusals, claim)) = k.next_job(remote) else {
            // Bounded, so that the strong reference is let go of now and
            // then and the core can end with the mount.
            let q = lock(&remote.jobs);
            // Held back by busy writers: look again soon, as they may stop
            // without a wake (a seal wakes, but not an unlink of an open
            // file).
            let wait = if writers_busy(k.writable_handles(), q.last_seal, Instant::now()) {
                WRITING_QUIET / 3
            } else {
                Duration::from_millis(200)
            };
            let _ = remote.wake.wait_timeout(q, wait);
            remote.tier.trim_bodies();
            continue;
        };
        let id = claim.id;
        match k.run_job(&mut job, &claim) {
            Ok(()) => {
                k.finish_job(remote, id, None);
                if let Job::Upload {
                    done: Some(done), ..
                } = job
                {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) if e.is_missing() => {
                tracing::warn!(error = %e, "s3 job dropped");
                k.finish_job(remote, id, None);
                if let Job::Upload {
                    done: Some(done), ..
                } = job
                {
                    let _ = done.send(Err(s3_err(e)));
                }
            }
            Err(e) if e.is_refusal() && refusals + 1 >= MAX_REFUSALS => {
                // The server keeps answering no: stop holding up the keys
                // behind it. A file whose move failed is sent again.
                tracing::warn!(error = %e, refusals = refusals + 1, "s3 refused a job; giving up on it");
                k.finish_job(remote, id, None);
                match job {
                    Job::Move { ino, to, .. } => k.abandon_move(ino, &to),
                    Job::Upload { ino, done, .. } => {
                        if let Some(done) = done {
                            let _ = done.send(Err(s3_err(e)));
                        } else {
                            // Once more at the back, behind other work.
                            k.push_job(Job::Upload {
                                ino,
                                adopt: false,
                                done: None,
                            });
                        }
                    }
                    Job::Delete { .. } | Job::SetOwner { .. } => {}
                }
            }
            Err(e) => {
                // Back to the head, so that its order is kept.
                tracing::debug!(error = %e, "s3 job failed");
                let refusals = refusals + u32::from(e.is_refusal());
                k.finish_job(remote, id, Some((job, refusals)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_uploads_run_while_writers_seal_files() {
        let t0 = Instant::now();
        let after = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!writers_busy(0, None, t0), "nothing written yet");
        assert!(writers_busy(1, None, t0), "a file open for writing");
        assert!(writers_busy(0, Some(t0), after(29)));
        assert!(!writers_busy(0, Some(t0), after(30)), "quiet again");
        assert!(writers_busy(2, Some(t0), after(500)), "still open");
        // A seal stamped after `now` (a racing thread) counts as writing.
        assert!(writers_busy(0, Some(after(5)), t0));
        assert_eq!(upload_limit(16, false), 16);
        assert_eq!(upload_limit(16, true), 8);
        // Odd counts round up, and one upload is never held back to none.
        assert_eq!(upload_limit(5, true), 3);
        assert_eq!(upload_limit(1, true), 1);
    }
}
