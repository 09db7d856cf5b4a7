//! Mounting and unmounting: builds the core from a `Config`, starts the FUSE
//! session, and forwards the daemon's own namespace changes (evictions) to
//! the kernel from a thread of their own. Notifications are never sent from
//! a request handler, where the kernel may hold the directory's lock the
//! notification needs.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use fuser::{BackgroundSession, INodeNo, MountOption, Session, SessionACL};

use super::core::{Caller, DataMode, Kvfs};
use super::fuse::FuseFs;
use crate::config::{Config, DataPath, Durability, LockMemory};
use crate::store::HostTier;
use crate::store::host::BackingDir;
use crate::store::nvme::{NvmeConfig, NvmeTier};
use crate::store::s3::{S3Config, S3Tier};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel does not offer FUSE passthrough (Linux >= 6.9 and CAP_SYS_ADMIN needed); \
         use --data-path auto or fallback"
    )]
    NoPassthrough,
    #[error("cannot create the host tier's backing directory {path}")]
    BackingDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the NVMe tier in {dir}")]
    Nvme {
        dir: PathBuf,
        #[source]
        source: crate::store::nvme::NvmeError,
    },
    /// One line naming what is wrong with the S3 settings.
    #[error("S3 tier")]
    S3(#[source] crate::store::s3::S3Error),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A mounted kvfs; dropping it unmounts.
pub struct Mounted {
    pub core: Arc<Kvfs>,
    pub mountpoint: PathBuf,
    session: BackgroundSession,
    /// Stopped (and its socket removed) when the mount goes.
    _zerocopy: Option<crate::zerocopy::Server>,
}

impl Mounted {
    pub fn data_mode(&self) -> DataMode {
        self.core.data_mode()
    }

    /// Blocks until the filesystem is unmounted (by `umount`, `kvfs
    /// unmount`, or a signal handler calling [`unmount`]).
    pub fn wait(self) -> std::io::Result<()> {
        let res = self.session.join();
        drain(&self.core);
        let_go(&self.core);
        res
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(self) -> std::io::Result<()> {
        let res = self.session.umount_and_join();
        drain(&self.core);
        let_go(&self.core);
        res
    }
}

/// After the drain: stops the background threads and waits (bounded) until
/// none of them holds the core, so that dropping the mount drops the core
/// and with it the host tier's backing directory. The process exits right
/// after; a thread still holding the core then would leave the backing
/// tmpfs, and the memory of every file in it, behind (found with an S3
/// tier: an idle uploader holds the core while it waits for work). If one
/// does not let go in time (an upload still in flight), the backing files
/// are removed anyway: nothing can need them once the mount is gone.
fn let_go(core: &Arc<Kvfs>) {
    core.stop_uploader();
    core.stop_flusher();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(core) > 1 {
        if std::time::Instant::now() > deadline {
            let dir = core.host_backing_dir();
            tracing::warn!(path = %dir.display(), "background work still running at exit: removing the backing files under it");
            crate::store::host::unmount_backing(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// After the kernel let go: lets write-back finish, so that a clean
/// unmount loses nothing that a lower tier was meant to get. Files on NVMe
/// are safe there (uploaded at the next mount); files only in memory are
/// waited for longer.
fn drain(core: &Kvfs) {
    let flushes = core.drain_flushes(std::time::Duration::from_secs(120));
    let limit = if core.has_nvme() { 5 } else { 120 };
    let uploads = core.drain_uploads(std::time::Duration::from_secs(limit));
    if flushes > 0 || uploads > 0 {
        tracing::warn!(flushes, uploads, "unmounted with write-back unfinished");
    }
}

/// Raises the limits a large cache needs: a descriptor per open file (up
/// to the kernel's `fs.nr_open`, which root may reach), and page-locked
/// memory for all of them. Failures only mean lower limits.
fn raise_limits() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
    for (res, want) in [
        (libc::RLIMIT_NOFILE, nr_open),
        (libc::RLIMIT_MEMLOCK, Some(libc::RLIM_INFINITY)),
    ] {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a stack struct.
        unsafe {
            if libc::getrlimit(res, &mut lim) != 0 {
                continue;
            }
            let target = want.unwrap_or(lim.rlim_max);
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: target.max(lim.rlim_max),
            };
            if libc::setrlimit(res, &raised) != 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(res, &lim);
            }
        }
    }
}

/// Where backing files live: on /dev/shm (memory, and every Linux has it),
/// one directory per daemon, named after its pid so leftovers of a daemon
/// that died can be told apart from a live one's.
fn backing_dir_path() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_owned()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("kvfs-{}", std::process::id()))
}

/// The NVMe tier's default capacity: half of what its filesystem has free.
fn half_free_space(dir: &Path) -> u64 {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: zeroed statvfs is valid; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail * st.f_frsize / 2
}

/// Whether to page-lock, and the reason `status` shows.
fn lock_policy(mode: LockMemory) -> (bool, String) {
    match mode {
        LockMemory::On => (true, "on".into()),
        LockMemory::Off => (false, "off".into()),
        LockMemory::Auto => {
            // /proc/swaps has a header line, then one line per active swap.
            let swaps = std::fs::read_to_string("/proc/swaps")
                .map(|s| s.lines().skip(1).filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0);
            if swaps > 0 {
                (true, "auto: swap is active".into())
            } else {
                (false, "auto: no swap, nothing to lock against".into())
            }
        }
    }
}

/// Frees the memory of daemons that died without cleaning up (kill -9).
fn remove_stale_backing_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kvfs-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // Our own pid's directory is not created yet, so one there is stale.
        if comm.trim() == "kvfs" && pid != std::process::id() {
            continue;
        }
        tracing::info!(path = %entry.path().display(), "removing a dead daemon's backing files");
        crate::store::host::unmount_backing(&entry.path());
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale backing files");
        }
    }
}

pub fn mount(config: &Config) -> Result<Mounted, MountError> {
    raise_limits();
    // SAFETY: getuid/getgid cannot fail.
    let me = unsafe {
        Caller {
            uid: libc::getuid(),
            gid: libc::getgid(),
        }
    };
    let dir = backing_dir_path();
    remove_stale_backing_dirs(dir.parent().unwrap_or(Path::new("/")));
    let backing =
        BackingDir::create(&dir, config.huge_pages).map_err(|source| MountError::BackingDir {
            path: dir.clone(),
            source,
        })?;
    let (lock, policy) = lock_policy(config.lock_memory);
    let host = HostTier::new(backing, config.host_capacity, lock, policy);
    let mut core = Kvfs::new(host, me);
    if let Some(dir) = &config.nvme_dir {
        // The embedded default directory may not exist yet.
        std::fs::create_dir_all(dir).map_err(|source| MountError::Nvme {
            dir: dir.clone(),
            source: crate::store::nvme::NvmeError::Io {
                op: "create directory",
                path: dir.clone(),
                source,
            },
        })?;
        let capacity = config.nvme_capacity.unwrap_or_else(|| half_free_space(dir));
        let started = std::time::Instant::now();
        let (tier, recovered) = NvmeTier::open(NvmeConfig {
            dir: dir.clone(),
            capacity,
        })
        .map_err(|source| MountError::Nvme {
            dir: dir.clone(),
            source,
        })?;
        tracing::info!(
            dir = %dir.display(),
            capacity,
            o_direct = tier.o_direct(),
            recovered = recovered.len(),
            seconds = started.elapsed().as_secs_f64(),
            "NVMe tier opened"
        );
        core.attach_nvme(tier, recovered);
        core.set_sync_waits_for_nvme(config.durability == Durability::Local);
    }
    if let Some(s3) = &config.s3 {
        let tier = open_s3(s3)?;
        let cleanup = crate::fs::core::S3Cleanup {
            expire_after: s3.expire_after,
            capacity: s3.capacity,
        };
        core.attach_s3(tier, s3.cache_ttl, cleanup, s3.uploads);
        core.set_sync_waits_for_s3(config.durability == Durability::Remote);
    }
    let core = Arc::new(core);
    core.start_flusher().map_err(|source| MountError::Mount {
        path: config.mountpoint.clone(),
        source,
    })?;
    core.start_uploader().map_err(|source| MountError::Mount {
        path: config.mountpoint.clone(),
        source,
    })?;
    // Bound before mounting, so a taken port fails the mount cleanly.
    if let Some(addr) = config.metrics_addr {
        // Weak: the server thread must not keep the tier (and its backing
        // directory) alive past the unmount.
        let c = Arc::downgrade(&core);
        let render = move || c.upgrade().map(|c| c.prometheus_text()).unwrap_or_default();
        let bound = crate::metrics::serve(addr, Arc::new(render))
            .map_err(|source| MountError::Metrics { addr, source })?;
        tracing::info!(addr = %bound, "serving Prometheus metrics");
    }
    // The zero-copy socket lives beside the backing files (a FUSE
    // directory cannot hold a listening socket); `.kvfs/zerocopy.sock`
    // links to it. Without it the mount still works: FUSE is the fallback.
    let socket = core.host_backing_dir().join("zerocopy.sock");
    let backend = Arc::new(super::zerocopy::CoreBackend::new(Arc::downgrade(&core)));
    let zerocopy = match crate::zerocopy::Server::start(&socket, me.uid, backend) {
        Ok(server) => {
            core.set_zc_socket(socket);
            Some(server)
        }
        Err(e) => {
            tracing::warn!(path = %socket.display(), error = %e, "zero-copy socket not served");
            None
        }
    };
    let fs = FuseFs::new(Arc::clone(&core), config.data_path);

    let options = vec![
        MountOption::FSName("kvfs".into()),
        // fuser passes no subtype to the mount syscall itself; as a data
        // option the kernel shows the type as fuse.kvfs (findmnt -t fuse.kvfs).
        MountOption::CUSTOM("subtype=kvfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // The ACL also sets the kernel's allow_other option.
    let acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = acl;
    fuse_config.n_threads = Some(config.threads);
    fuse_config.clone_fd = true;

    let session =
        Session::new(fs, &config.mountpoint, &fuse_config).map_err(|source| MountError::Mount {
            path: config.mountpoint.clone(),
            source,
        })?;
    let notifier = session.notifier();
    let (tx, rx) = mpsc::channel::<(u64, OsString)>();
    core.set_invalidator(Box::new(move |parent, name| {
        let _ = tx.send((parent, name));
    }));
    std::thread::Builder::new()
        .name("kvfs-inval".into())
        .spawn(move || {
            for (parent, name) in rx {
                // ENOENT just means the kernel had nothing cached.
                if let Err(e) = notifier.inval_entry(INodeNo(parent), &name) {
                    tracing::trace!(parent, ?name, error = %e, "dentry invalidation");
                }
            }
        })
        .map_err(|source| MountError::Mount {
            path: config.mountpoint.clone(),
            source,
        })?;
    let session = session.spawn().map_err(|source| MountError::Mount {
        path: config.mountpoint.clone(),
        source,
    })?;
    let mounted = Mounted {
        core,
        mountpoint: config.mountpoint.clone(),
        session,
        _zerocopy: zerocopy,
    };
    if config.data_path == DataPath::Passthrough && mounted.data_mode() != DataMode::Passthrough {
        let _ = mounted.unmount();
        return Err(MountError::NoPassthrough);
    }
    tracing::info!(
        mountpoint = %config.mountpoint.display(),
        host_capacity = config.host_capacity,
        threads = config.threads,
        data_path = ?mounted.data_mode(),
        "mounted"
    );
    Ok(mounted)
}

/// Builds the S3 client and checks the bucket; with `lazy`, an S3 that
/// cannot be reached is reported and the mount goes on.
fn open_s3(s3: &crate::config::S3Settings) -> Result<S3Tier, MountError> {
    let mut cfg = S3Config::new(&s3.bucket);
    cfg.prefix = s3.prefix.clone();
    cfg.endpoint = s3.endpoint.clone();
    cfg.region = s3.region.clone();
    cfg.path_style = s3.path_style;
    cfg.sign_payload = s3.sign_payload;
    let tier = S3Tier::connect(&cfg).map_err(MountError::S3)?;
    match tier.check() {
        Ok(()) => {
            tracing::info!(
                bucket = %s3.bucket,
                prefix = %tier.prefix(),
                sign_payload = s3.sign_payload,
                "S3 tier reachable"
            );
        }
        Err(e) if s3.lazy => {
            tracing::warn!(error = %e, "S3 tier down at mount (--s3-lazy): mounting without it for now");
        }
        Err(e) => return Err(MountError::S3(e)),
    }
    Ok(tier)
}

/// Unmounts a kvfs mount point (any FUSE mount, in fact). With `lazy`, a
/// busy mount is detached now and goes away when its last user closes.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), MountError> {
    let err = |source| MountError::Unmount {
        path: path.to_owned(),
        source,
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper unmounts what this user mounted.
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .args(lazy.then_some("-z"))
            .arg(path)
            .status()
            .map_err(err)?;
        if status.success() {
            return Ok(());
        }
    }
    Err(err(e))
}
