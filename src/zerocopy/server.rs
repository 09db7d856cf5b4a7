//! The daemon's end of the zero-copy protocol.
//!
//! It owns the listening socket (its permissions and the peer-credential
//! check), one thread per client connection, and the bookkeeping of which
//! slots and handles each connection holds, so that a connection that ends
//! for any reason (clean close, crash, SIGKILL, daemon shutdown) has its
//! uncommitted slots aborted and its handles closed. It reaches the
//! filesystem only through [`Backend`]: it never sees inodes or tiers.

use std::collections::{HashMap, HashSet};
use std::ffi::c_int;
use std::fs;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, error, info, warn};

use super::proto::{self, MAX_MESSAGE, Reply, Request};

/// Most client connections served at once. Clients are a few GPU worker
/// processes; the bound stops a runaway client from exhausting threads.
pub const MAX_CONNECTIONS: usize = 64;

/// A reply that cannot be delivered for this long means the client stopped
/// reading; drop it rather than pin a thread forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server needs from the filesystem. Slot and handle ids are the
/// backend's; the server only remembers which connection holds which.
pub trait Backend: Send + Sync + 'static {
    /// A new slot: a read-write shared-memory file of exactly `size` bytes.
    fn alloc(&self, size: u64) -> Result<(u64, OwnedFd), BackendError>;
    /// Publishes the slot as the sealed file at `path` (already validated:
    /// relative, no `.`/`..`/empty components, no NUL). Consumes the slot on
    /// success; on error the slot must still be allocated, since the server
    /// keeps it on the connection's books and aborts it later.
    fn commit(&self, slot: u64, path: &str) -> Result<(), BackendError>;
    /// Frees a slot that was not committed.
    fn abort(&self, slot: u64);
    /// Pins the file at `path` (validated as for `commit`) resident and returns
    /// a handle, its size and a read-only fd to its bytes.
    fn open(&self, path: &str) -> Result<(u64, u64, OwnedFd), BackendError>;
    /// Releases a handle from `open`.
    fn close(&self, handle: u64);
}

/// A backend failure, sent to the client as `{"ok":false,"errno":..,"error":..}`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message} (errno {errno})")]
pub struct BackendError {
    /// A libc errno value (ENOENT, ENOSPC, ...).
    pub errno: i32,
    pub message: String,
}

impl BackendError {
    pub fn new(errno: i32, message: impl Into<String>) -> BackendError {
        BackendError {
            errno,
            message: message.into(),
        }
    }
}

/// A running zero-copy server. Stopped by [`Server::shutdown`] or on drop.
pub struct Server {
    shared: Arc<Shared>,
    /// Wakes the accept loop's poll(2) on shutdown.
    wake: OwnedFd,
    accept: Mutex<Option<JoinHandle<()>>>,
    socket_path: PathBuf,
    /// (dev, ino) of the socket file we bound, so shutdown removes only our
    /// own socket and not one a later server bound at the same path.
    socket_id: (u64, u64),
}

struct Shared {
    backend: Arc<dyn Backend>,
    owner_uid: u32,
    stopping: AtomicBool,
    conns: Mutex<Conns>,
    /// Signalled whenever a connection thread has finished its cleanup.
    conn_gone: Condvar,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Live connections' sockets, shared with their threads so shutdown can
    /// shutdown(2) them without racing a close (and fd number reuse).
    live: HashMap<u64, Arc<OwnedFd>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        // The map stays consistent even if a holder panicked (single inserts
        // and removes), so a poisoned lock is still usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Server {
    /// Binds `socket_path` (removing a stale socket file there), chmod 0600 and
    /// chown to `owner_uid`; accepts only peers whose SO_PEERCRED uid is
    /// `owner_uid` or 0.
    pub fn start(
        socket_path: &Path,
        owner_uid: u32,
        backend: Arc<dyn Backend>,
    ) -> io::Result<Server> {
        remove_stale_socket(socket_path)?;
        let listener = proto::seqpacket_socket(true)?;
        let (addr, len) = proto::unix_addr(socket_path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe {
            libc::bind(
                listener.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Between bind and chmod the file has umask permissions; the
        // SO_PEERCRED check below still refuses anyone it should, and we do
        // not listen yet, so no one can connect in that window anyway.
        let secured = fs::set_permissions(socket_path, fs::Permissions::from_mode(0o600))
            .and_then(|()| std::os::unix::fs::chown(socket_path, Some(owner_uid), None))
            .and_then(|()| fs::symlink_metadata(socket_path));
        let meta = match secured {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(socket_path);
                return Err(e);
            }
        };
        // SAFETY: plain syscall on a socket we own.
        if unsafe { libc::listen(listener.as_raw_fd(), MAX_CONNECTIONS as c_int) } != 0 {
            let e = io::Error::last_os_error();
            let _ = fs::remove_file(socket_path);
            return Err(e);
        }
        // SAFETY: plain syscall; the result is checked before it is owned.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            let e = io::Error::last_os_error();
            let _ = fs::remove_file(socket_path);
            return Err(e);
        }
        // SAFETY: wake was just returned by eventfd(2) and nothing else owns it.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let shared = Arc::new(Shared {
            backend,
            owner_uid,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Conns::default()),
            conn_gone: Condvar::new(),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            let wake = wake.try_clone()?;
            thread::Builder::new()
                .name("kvfs-zc-accept".into())
                .spawn(move || accept_loop(&shared, &listener, &wake))
        };
        let accept = match accept {
            Ok(handle) => handle,
            Err(e) => {
                let _ = fs::remove_file(socket_path);
                return Err(e);
            }
        };
        info!(socket = %socket_path.display(), owner_uid, "zero-copy server listening");
        Ok(Server {
            shared,
            wake,
            accept: Mutex::new(Some(accept)),
            socket_path: socket_path.to_owned(),
            socket_id: (meta.dev(), meta.ino()),
        })
    }

    /// Stops accepting, closes connections (aborting their slots, closing
    /// their handles), removes the socket file; also on Drop. Idempotent.
    pub fn shutdown(&self) {
        let accept = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(accept) = accept else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        wake(self.wake.as_fd());
        if accept.join().is_err() {
            error!("zero-copy accept thread panicked");
        }
        // The accept loop is gone, so no connection can be added now: wake
        // every connection thread (its recv returns end-of-file) and wait for
        // each to clean up after itself.
        let mut conns = self.shared.conns();
        for sock in conns.live.values() {
            // SAFETY: plain syscall on a socket kept open by the Arc.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        while !conns.live.is_empty() {
            conns = self
                .shared
                .conn_gone
                .wait(conns)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(conns);
        match fs::symlink_metadata(&self.socket_path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.socket_id => {
                if let Err(e) = fs::remove_file(&self.socket_path) {
                    warn!(socket = %self.socket_path.display(), error = %e, "cannot remove zero-copy socket");
                }
            }
            _ => {}
        }
        info!(socket = %self.socket_path.display(), "zero-copy server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file left by a daemon that is gone. Refuses to touch a
/// path that is not a socket, or a socket someone still listens on (two
/// daemons must not fight over one mount's socket).
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // Non-blocking, so a live server with a full backlog answers EAGAIN
    // instead of hanging us.
    match proto::connect(path, true) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is listening on {}", path.display()),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            debug!(socket = %path.display(), "removing stale zero-copy socket");
            fs::remove_file(path)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is listening on {}", path.display()),
        )),
        Err(e) => Err(e),
    }
}

fn wake(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd. It cannot fail
    // short of the counter overflowing, which needs 2^64 shutdowns.
    unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), size_of::<u64>()) };
}

fn accept_loop(shared: &Arc<Shared>, listener: &OwnedFd, wake: &OwnedFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                error!(error = %e, "zero-copy poll failed");
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ECONNABORTED) => {}
                _ => {
                    // EMFILE and friends leave the connection pending, so
                    // poll would report it again at once: back off.
                    warn!(error = %e, "zero-copy accept failed");
                    thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        // SAFETY: fd was just returned by accept4(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        admit(shared, sock);
    }
}

/// Checks a new connection's credentials and the connection bound, then
/// starts its thread. A refused peer gets an error reply (so its client can
/// say why) and is hung up on.
fn admit(shared: &Arc<Shared>, sock: OwnedFd) {
    let cred = match peer_cred(sock.as_fd()) {
        Ok(cred) => cred,
        Err(e) => {
            warn!(error = %e, "zero-copy: cannot read peer credentials; refusing");
            return;
        }
    };
    if cred.uid != shared.owner_uid && cred.uid != 0 {
        warn!(
            peer_uid = cred.uid,
            peer_pid = cred.pid,
            owner_uid = shared.owner_uid,
            "zero-copy: refusing a peer that is neither the owner nor root"
        );
        refuse(
            &sock,
            libc::EACCES,
            "permission denied: not the mount's owner",
        );
        return;
    }
    let mut conns = shared.conns();
    if conns.live.len() >= MAX_CONNECTIONS {
        drop(conns);
        warn!(
            peer_uid = cred.uid,
            peer_pid = cred.pid,
            limit = MAX_CONNECTIONS,
            "zero-copy: too many connections; refusing"
        );
        refuse(&sock, libc::EAGAIN, "too many zero-copy connections");
        return;
    }
    let id = conns.next_id;
    conns.next_id += 1;
    let sock = Arc::new(sock);
    conns.live.insert(id, Arc::clone(&sock));
    drop(conns);
    let timeout = libc::timeval {
        tv_sec: SEND_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: passes a live timeval of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    debug!(
        conn = id,
        peer_uid = cred.uid,
        peer_pid = cred.pid,
        "zero-copy connection"
    );
    let spawned = {
        let shared = Arc::clone(shared);
        thread::Builder::new()
            .name(format!("kvfs-zc-conn-{id}"))
            .spawn(move || serve(&shared, id, &sock))
    };
    if let Err(e) = spawned {
        error!(conn = id, error = %e, "zero-copy: cannot start connection thread");
        // Nothing was allocated on it yet; just deregister (dropping the
        // thread's closure dropped its copy of the socket).
        shared.conns().live.remove(&id);
        shared.conn_gone.notify_all();
    }
}

fn refuse(sock: &OwnedFd, errno: i32, message: &str) {
    if let Ok(bytes) = serde_json::to_vec(&Reply::error(errno, message)) {
        // Best effort and never blocking: the accept loop must not wait on a peer.
        let _ = proto::send_msg(sock.as_fd(), &bytes, None, libc::MSG_DONTWAIT);
    }
}

fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain old data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are live and len is cred's size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// What one connection holds. Dropping it aborts and closes everything still
/// held and deregisters the connection, so cleanup also runs if a backend
/// call panics on this thread.
struct Connection<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    slots: HashSet<u64>,
    handles: HashSet<u64>,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        for &slot in &self.slots {
            debug!(
                conn = self.id,
                slot, "zero-copy: aborting slot of ended connection"
            );
            self.shared.backend.abort(slot);
        }
        for &handle in &self.handles {
            debug!(
                conn = self.id,
                handle, "zero-copy: closing handle of ended connection"
            );
            self.shared.backend.close(handle);
        }
        debug!(
            conn = self.id,
            slots = self.slots.len(),
            handles = self.handles.len(),
            "zero-copy connection ended"
        );
        self.shared.conns().live.remove(&self.id);
        self.shared.conn_gone.notify_all();
    }
}

fn serve(shared: &Arc<Shared>, id: u64, sock: &OwnedFd) {
    let mut conn = Connection {
        shared,
        id,
        slots: HashSet::new(),
        handles: HashSet::new(),
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let received = match proto::recv_msg(sock.as_fd(), &mut buf, 0) {
            Ok(r) => r,
            Err(e) => {
                debug!(conn = id, error = %e, "zero-copy recv failed; closing");
                return;
            }
        };
        if received.eof {
            return;
        }
        if !received.fds.is_empty() {
            // Clients never send descriptors; close any we were given.
            debug!(
                conn = id,
                count = received.fds.len(),
                "zero-copy: dropping fds sent by client"
            );
        }
        let (reply, fd) = if received.truncated {
            (
                Reply::error(
                    libc::EMSGSIZE,
                    format!("message longer than {MAX_MESSAGE} bytes"),
                ),
                None,
            )
        } else {
            match serde_json::from_slice::<Request>(&buf[..received.len]) {
                Ok(req) => conn.handle(req),
                Err(e) => (
                    Reply::error(libc::EPROTO, format!("malformed request: {e}")),
                    None,
                ),
            }
        };
        let bytes = match serde_json::to_vec(&reply) {
            Ok(bytes) => bytes,
            Err(e) => {
                error!(conn = id, error = %e, "zero-copy: cannot encode reply; closing");
                return;
            }
        };
        // Anything allocated for this reply is already on the connection's
        // books, so if the send fails the Drop above still releases it.
        if let Err(e) = proto::send_msg(sock.as_fd(), &bytes, fd.as_ref().map(AsFd::as_fd), 0) {
            debug!(conn = id, error = %e, "zero-copy send failed; closing");
            return;
        }
    }
}

impl Connection<'_> {
    fn handle(&mut self, req: Request) -> (Reply, Option<OwnedFd>) {
        let backend = &self.shared.backend;
        match req {
            Request::Hello => (Reply::hello(), None),
            Request::Alloc { size } => match backend.alloc(size) {
                Ok((slot, fd)) => {
                    self.slots.insert(slot);
                    debug!(conn = self.id, slot, size, "zero-copy alloc");
                    (Reply::slot(slot, size), Some(fd))
                }
                Err(e) => (self.failed("alloc", e), None),
            },
            Request::Commit { slot, path } => {
                if !self.slots.contains(&slot) {
                    return (unknown("slot", slot), None);
                }
                if let Err(why) = proto::validate_path(&path) {
                    return (Reply::error(libc::EINVAL, why), None);
                }
                match backend.commit(slot, &path) {
                    Ok(()) => {
                        self.slots.remove(&slot);
                        debug!(conn = self.id, slot, path, "zero-copy commit");
                        (Reply::done(), None)
                    }
                    Err(e) => (self.failed("commit", e), None),
                }
            }
            Request::Abort { slot } => {
                if !self.slots.remove(&slot) {
                    return (unknown("slot", slot), None);
                }
                backend.abort(slot);
                debug!(conn = self.id, slot, "zero-copy abort");
                (Reply::done(), None)
            }
            Request::Open { path } => {
                if let Err(why) = proto::validate_path(&path) {
                    return (Reply::error(libc::EINVAL, why), None);
                }
                match backend.open(&path) {
                    Ok((handle, size, fd)) => {
                        self.handles.insert(handle);
                        debug!(conn = self.id, handle, size, path, "zero-copy open");
                        (Reply::handle(handle, size), Some(fd))
                    }
                    Err(e) => (self.failed("open", e), None),
                }
            }
            Request::Close { handle } => {
                if !self.handles.remove(&handle) {
                    return (unknown("handle", handle), None);
                }
                backend.close(handle);
                debug!(conn = self.id, handle, "zero-copy close");
                (Reply::done(), None)
            }
        }
    }

    fn failed(&self, op: &str, e: BackendError) -> Reply {
        debug!(conn = self.id, op, errno = e.errno, error = %e.message, "zero-copy request failed");
        Reply::error(e.errno, e.message)
    }
}

/// EBADF for an id this connection does not hold, whether it never existed
/// or belongs to another connection: connections must not touch each
/// other's slots, and telling the two apart would leak which ids exist.
fn unknown(kind: &str, id: u64) -> Reply {
    Reply::error(libc::EBADF, format!("no {kind} {id} on this connection"))
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;
    use crate::zerocopy::client::{Client, ZcError};

    /// Stand-in backend: one memfd per slot, committed files as byte vectors,
    /// and a record of what was aborted and closed.
    #[derive(Default)]
    struct MemBackend {
        state: Mutex<MemState>,
    }

    #[derive(Default)]
    struct MemState {
        next: u64,
        slots: HashMap<u64, OwnedFd>,
        handles: HashMap<u64, String>,
        files: HashMap<String, Vec<u8>>,
        aborted: Vec<u64>,
        closed: Vec<u64>,
    }

    const TOO_BIG: u64 = 1 << 40;

    impl MemBackend {
        fn state(&self) -> MutexGuard<'_, MemState> {
            self.state.lock().expect("backend lock")
        }
    }

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::memfd_create(c"kvfs-zc-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().expect("dup"))
            .set_len(size)
            .expect("ftruncate");
        fd
    }

    impl Backend for MemBackend {
        fn alloc(&self, size: u64) -> Result<(u64, OwnedFd), BackendError> {
            if size >= TOO_BIG {
                return Err(BackendError::new(libc::ENOSPC, "no room"));
            }
            let fd = memfd(size);
            let mut st = self.state();
            st.next += 1;
            let slot = st.next;
            st.slots.insert(slot, fd.try_clone().expect("dup"));
            Ok((slot, fd))
        }

        fn commit(&self, slot: u64, path: &str) -> Result<(), BackendError> {
            let mut st = self.state();
            if st.files.contains_key(path) {
                return Err(BackendError::new(libc::EEXIST, "exists"));
            }
            let fd = st
                .slots
                .remove(&slot)
                .ok_or_else(|| BackendError::new(libc::EBADF, "no slot"))?;
            let file = File::from(fd);
            let len = file.metadata().expect("fstat").len() as usize;
            let mut bytes = vec![0u8; len];
            file.read_exact_at(&mut bytes, 0).expect("pread");
            st.files.insert(path.to_owned(), bytes);
            Ok(())
        }

        fn abort(&self, slot: u64) {
            let mut st = self.state();
            st.slots.remove(&slot);
            st.aborted.push(slot);
        }

        fn open(&self, path: &str) -> Result<(u64, u64, OwnedFd), BackendError> {
            let mut st = self.state();
            let bytes = st
                .files
                .get(path)
                .cloned()
                .ok_or_else(|| BackendError::new(libc::ENOENT, "no such file"))?;
            let fd = memfd(bytes.len() as u64);
            File::from(fd.try_clone().expect("dup"))
                .write_all_at(&bytes, 0)
                .expect("pwrite");
            // Hand out a read-only descriptor to the same memory, as the real
            // store does.
            let ro = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("reopen");
            st.next += 1;
            let handle = st.next;
            st.handles.insert(handle, path.to_owned());
            Ok((handle, bytes.len() as u64, ro.into()))
        }

        fn close(&self, handle: u64) {
            let mut st = self.state();
            st.handles.remove(&handle);
            st.closed.push(handle);
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        backend: Arc<MemBackend>,
        server: Server,
    }

    fn start_as(owner_uid: u32) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        // Other uids must reach the socket itself, so that the socket's own
        // mode (not the directory's) is what the access tests exercise.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = dir.path().join("zc.sock");
        let backend = Arc::new(MemBackend::default());
        let server = Server::start(&socket, owner_uid, backend.clone()).expect("start");
        Fixture {
            _dir: dir,
            socket,
            backend,
            server,
        }
    }

    fn start() -> Fixture {
        // SAFETY: getuid cannot fail.
        start_as(unsafe { libc::getuid() })
    }

    impl Fixture {
        fn client(&self) -> Client {
            Client::connect_socket(&self.socket).expect("connect")
        }
    }

    /// A shared mapping of a whole descriptor.
    struct Map {
        ptr: *mut u8,
        len: usize,
    }

    impl Map {
        fn new(fd: BorrowedFd<'_>, len: u64, writable: bool) -> Map {
            let len = len as usize;
            let prot = if writable {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: maps len bytes of fd; checked for MAP_FAILED.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            Map {
                ptr: ptr.cast(),
                len,
            }
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: ptr maps len readable bytes until Drop.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }

        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: ptr maps len writable bytes until Drop (writable maps only).
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly what new() mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Polls `cond` until it holds, failing the test after 3 s.
    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn remote_errno<T: std::fmt::Debug>(r: Result<T, ZcError>) -> i32 {
        match r {
            Err(e @ ZcError::Remote { .. }) => e.errno(),
            other => panic!("expected a remote error, got {other:?}"),
        }
    }

    /// A raw connection, for messages the client would never send.
    fn raw(fx: &Fixture) -> OwnedFd {
        proto::connect(&fx.socket, false).expect("connect")
    }

    fn raw_call(sock: &OwnedFd, bytes: &[u8], pass: Option<BorrowedFd<'_>>) -> Reply {
        proto::send_msg(sock.as_fd(), bytes, pass, 0).expect("send");
        let mut buf = vec![0u8; MAX_MESSAGE];
        let rx = proto::recv_msg(sock.as_fd(), &mut buf, 0).expect("recv");
        assert!(!rx.eof, "server hung up");
        serde_json::from_slice(&buf[..rx.len]).expect("reply is JSON")
    }

    #[test]
    fn hello_reports_version() {
        let fx = start();
        let sock = raw(&fx);
        assert_eq!(raw_call(&sock, br#"{"op":"hello"}"#, None), Reply::hello());
        fx.client();
    }

    #[test]
    fn round_trip_alloc_mmap_commit_open_read() {
        let fx = start();
        let client = fx.client();
        let size = 1 << 20;
        let slot = client.alloc(size).expect("alloc");
        assert_eq!(slot.size, size);
        let pattern: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        {
            let mut map = Map::new(slot.fd.as_fd(), size, true);
            map.bytes_mut().copy_from_slice(&pattern);
        }
        client.commit(slot.id, "dir/block-0.bin").expect("commit");
        assert!(fx.backend.state().slots.is_empty(), "slot consumed");
        // Committed slots are no longer the connection's.
        assert_eq!(remote_errno(client.abort(slot.id)), libc::EBADF);

        let res = client.open("dir/block-0.bin").expect("open");
        assert_eq!(res.size, size);
        let map = Map::new(res.fd.as_fd(), res.size, false);
        assert!(map.bytes() == pattern.as_slice(), "bytes differ");
        // The descriptor is read-only: a writable mapping must be refused.
        // SAFETY: an mmap call whose failure is the expected outcome.
        let rw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                res.fd.as_raw_fd(),
                0,
            )
        };
        assert_eq!(rw, libc::MAP_FAILED);
        assert_eq!(fx.backend.state().handles.len(), 1);
        client.close(res.handle).expect("close");
        assert!(fx.backend.state().handles.is_empty());
        assert_eq!(remote_errno(client.close(res.handle)), libc::EBADF);
    }

    #[test]
    fn abort_frees_slot() {
        let fx = start();
        let client = fx.client();
        let slot = client.alloc(4096).expect("alloc");
        assert_eq!(fx.backend.state().slots.len(), 1);
        client.abort(slot.id).expect("abort");
        let st = fx.backend.state();
        assert!(st.slots.is_empty());
        assert_eq!(st.aborted, vec![slot.id]);
        drop(st);
        // An aborted slot is gone: neither commit nor abort finds it.
        assert_eq!(remote_errno(client.commit(slot.id, "a.bin")), libc::EBADF);
        assert_eq!(remote_errno(client.abort(slot.id)), libc::EBADF);
        assert!(fx.backend.state().files.is_empty());
    }

    #[test]
    fn unknown_slot_and_handle_are_ebadf() {
        let fx = start();
        let client = fx.client();
        assert_eq!(remote_errno(client.commit(77, "a.bin")), libc::EBADF);
        assert_eq!(remote_errno(client.abort(77)), libc::EBADF);
        assert_eq!(remote_errno(client.close(77)), libc::EBADF);
        // The backend never saw them.
        let st = fx.backend.state();
        assert!(st.aborted.is_empty() && st.closed.is_empty());
    }

    #[test]
    fn backend_errors_reach_the_client() {
        let fx = start();
        let client = fx.client();
        assert_eq!(remote_errno(client.alloc(TOO_BIG)), libc::ENOSPC);
        assert_eq!(remote_errno(client.open("missing.bin")), libc::ENOENT);
        // A failed commit leaves the slot allocated and usable.
        let a = client.alloc(8).expect("alloc");
        client.commit(a.id, "x.bin").expect("commit");
        let b = client.alloc(8).expect("alloc");
        assert_eq!(remote_errno(client.commit(b.id, "x.bin")), libc::EEXIST);
        client.commit(b.id, "y.bin").expect("commit after failure");
    }

    #[test]
    fn bad_paths_are_einval() {
        let fx = start();
        let client = fx.client();
        let slot = client.alloc(16).expect("alloc");
        for bad in [
            "",
            "/abs.bin",
            "../up.bin",
            "a/../b.bin",
            "a//b.bin",
            "a/",
            "./a",
            "a\0b",
        ] {
            assert_eq!(
                remote_errno(client.commit(slot.id, bad)),
                libc::EINVAL,
                "commit {bad:?}"
            );
            assert_eq!(remote_errno(client.open(bad)), libc::EINVAL, "open {bad:?}");
        }
        // The refused commits did not consume the slot.
        client.commit(slot.id, "good/name.bin").expect("commit");
        assert_eq!(
            fx.backend.state().files.keys().collect::<Vec<_>>(),
            vec!["good/name.bin"]
        );
    }

    #[test]
    fn malformed_messages_get_eproto_and_connection_survives() {
        let fx = start();
        let sock = raw(&fx);
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[1,2]",
            br#"{"op":"alloc"}"#,
            br#"{"op":"alloc","size":"big"}"#,
            br#"{"op":"alloc","size":-4}"#,
            br#"{"op":"format","disk":"all"}"#,
            b"\xff\xfe",
        ] {
            let reply = raw_call(&sock, bad, None);
            assert!(!reply.ok);
            assert_eq!(
                reply.errno,
                Some(libc::EPROTO),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(raw_call(&sock, br#"{"op":"hello"}"#, None), Reply::hello());
    }

    #[test]
    fn oversize_message_gets_error_and_connection_survives() {
        let fx = start();
        let sock = raw(&fx);
        let mut big = br#"{"op":"open","path":""#.to_vec();
        big.resize(MAX_MESSAGE + 4096, b'a');
        big.extend_from_slice(br#""}"#);
        let reply = raw_call(&sock, &big, None);
        assert_eq!(reply.errno, Some(libc::EMSGSIZE));
        assert_eq!(raw_call(&sock, br#"{"op":"hello"}"#, None), Reply::hello());
    }

    #[test]
    fn descriptors_sent_by_a_client_are_ignored() {
        let fx = start();
        let sock = raw(&fx);
        let stray = memfd(1);
        let reply = raw_call(&sock, br#"{"op":"hello"}"#, Some(stray.as_fd()));
        assert_eq!(reply, Reply::hello());
    }

    #[test]
    fn slot_or_handle_from_another_connection_is_ebadf() {
        let fx = start();
        fx.backend
            .state()
            .files
            .insert("shared.bin".into(), vec![7; 64]);
        let a = fx.client();
        let b = fx.client();
        let slot = a.alloc(64).expect("alloc");
        let res = a.open("shared.bin").expect("open");
        assert_eq!(remote_errno(b.commit(slot.id, "stolen.bin")), libc::EBADF);
        assert_eq!(remote_errno(b.abort(slot.id)), libc::EBADF);
        assert_eq!(remote_errno(b.close(res.handle)), libc::EBADF);
        // Still the owner's to use.
        a.commit(slot.id, "mine.bin").expect("commit");
        a.close(res.handle).expect("close");
        let st = fx.backend.state();
        assert!(st.files.contains_key("mine.bin") && !st.files.contains_key("stolen.bin"));
    }

    #[test]
    fn closing_a_connection_aborts_slots_and_closes_handles() {
        let fx = start();
        fx.backend.state().files.insert("f.bin".into(), vec![1; 8]);
        let client = fx.client();
        let slot = client.alloc(8).expect("alloc");
        let res = client.open("f.bin").expect("open");
        drop(client);
        wait_until("cleanup after close", || {
            let st = fx.backend.state();
            st.aborted == [slot.id] && st.closed == [res.handle]
        });
        assert!(fx.backend.state().slots.is_empty());
    }

    #[test]
    fn socket_is_0600_and_owned_by_owner() {
        let fx = start_as(4242);
        let meta = fs::symlink_metadata(&fx.socket).expect("stat");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), 4242);
        // Root may always connect.
        fx.client();
    }

    #[test]
    fn shutdown_aborts_closes_and_removes_socket() {
        let fx = start();
        fx.backend.state().files.insert("f.bin".into(), vec![1; 8]);
        let client = fx.client();
        let slot = client.alloc(8).expect("alloc");
        let res = client.open("f.bin").expect("open");
        fx.server.shutdown();
        // shutdown waits for the connections' cleanup: no polling needed.
        {
            let st = fx.backend.state();
            assert_eq!(st.aborted, vec![slot.id]);
            assert_eq!(st.closed, vec![res.handle]);
        }
        assert!(!fx.socket.exists(), "socket file removed");
        assert!(matches!(client.abort(slot.id), Err(ZcError::Io(_))));
        assert!(Client::connect_socket(&fx.socket).is_err());
        fx.server.shutdown(); // idempotent
    }

    #[test]
    fn stale_socket_is_replaced_but_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("zc.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
        assert!(socket.exists(), "stale socket file left behind");
        let backend: Arc<dyn Backend> = Arc::new(MemBackend::default());
        let server = Server::start(&socket, 0, backend.clone()).expect("start over stale");
        Client::connect_socket(&socket).expect("connect");

        let err = Server::start(&socket, 0, backend.clone())
            .err()
            .map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::AddrInUse));
        Client::connect_socket(&socket).expect("first server still serves");
        drop(server);
        assert!(!socket.exists());

        let plain = dir.path().join("plain");
        fs::write(&plain, b"keep me").expect("write");
        let err = Server::start(&plain, 0, backend).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::AlreadyExists));
        assert_eq!(fs::read(&plain).expect("read"), b"keep me");
    }

    #[test]
    fn connections_beyond_the_limit_are_refused() {
        let fx = start();
        let clients: Vec<Client> = (0..MAX_CONNECTIONS).map(|_| fx.client()).collect();
        let refused = Client::connect_socket(&fx.socket).err().map(|e| e.errno());
        assert_eq!(refused, Some(libc::EAGAIN));
        drop(clients);
        wait_until("room for a new connection", || {
            fx.server.shared.conns().live.is_empty()
        });
        fx.client();
    }

    // ---- tests with a second process -------------------------------------

    const CHILD_MODE: &str = "KVFS_ZC_TEST_CHILD";
    const CHILD_SOCKET: &str = "KVFS_ZC_TEST_SOCKET";

    /// Not a test on its own: the body of the child processes below, which
    /// run this test binary filtered to this test. Without the marker
    /// variable it does nothing.
    #[test]
    fn child_process_entry() {
        let Ok(mode) = std::env::var(CHILD_MODE) else {
            return;
        };
        let socket = PathBuf::from(std::env::var_os(CHILD_SOCKET).expect("socket env"));
        let say = |line: String| {
            let mut out = io::stdout().lock();
            out.write_all(format!("{line}\n").as_bytes())
                .expect("stdout");
            out.flush().expect("stdout");
        };
        let client = match Client::connect_socket(&socket) {
            Ok(client) => client,
            Err(e) => {
                say(format!("ZC_RESULT errno={} {e}", e.errno()));
                return;
            }
        };
        match mode.as_str() {
            "connect" => say("ZC_RESULT ok".into()),
            "alloc" => {
                let slot = client.alloc(4096).expect("alloc");
                let mut map = Map::new(slot.fd.as_fd(), slot.size, true);
                map.bytes_mut().fill(0xab);
                say(format!("ZC_READY {}", slot.id));
                // Wait to be killed; exit eventually if the parent never does.
                thread::sleep(Duration::from_secs(60));
            }
            "open" => {
                let res = client.open("held.bin").expect("open");
                say(format!("ZC_READY {}", res.handle));
                thread::sleep(Duration::from_secs(60));
            }
            other => panic!("unknown child mode {other}"),
        }
    }

    /// Runs `child_process_entry` in a new process as `uid` (None: ours).
    fn spawn_child(mode: &str, socket: &Path, uid: Option<u32>) -> (Child, mpsc::Receiver<String>) {
        let mut exe = std::env::current_exe().expect("current_exe");
        // Another user may not reach the test binary where it was built (a
        // checkout under a 0700 directory): run a copy from a directory
        // anyone can enter, removed once the child runs (spawn returns
        // after exec).
        let mut copy_dir = None;
        if uid.is_some() {
            use std::os::unix::fs::PermissionsExt;
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("kvfs-zc-child-{}-{n}", std::process::id()));
            std::fs::create_dir(&dir).expect("child dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .expect("chmod child dir");
            let copy = dir.join("child");
            std::fs::copy(&exe, &copy).expect("copy test binary");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .expect("chmod test binary");
            exe = copy;
            copy_dir = Some(dir);
        }
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "zerocopy::server::tests::child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .env(CHILD_SOCKET, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        // A copy just written can be "busy" for a moment: another test
        // thread's fork may still hold its write descriptor until exec.
        let mut spawned = cmd.spawn();
        for _ in 0..50 {
            match &spawned {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    thread::sleep(Duration::from_millis(20));
                    spawned = cmd.spawn();
                }
                _ => break,
            }
        }
        if let Some(dir) = copy_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut child = spawned.expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness prints "test ... " before the child's own
                // output on the same line, so look for the marker anywhere.
                if let Some(at) = line.find("ZC_")
                    && tx.send(line[at..].to_owned()).is_err()
                {
                    return;
                }
            }
        });
        (child, rx)
    }

    fn child_line(rx: &mpsc::Receiver<String>) -> String {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("child reported nothing")
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            warn!("not root: skipping a test that needs to switch uid");
        }
        root
    }

    #[test]
    fn other_uid_cannot_connect_through_0600_socket() {
        if !is_root() {
            return;
        }
        let fx = start_as(4242);
        let (mut child, rx) = spawn_child("connect", &fx.socket, Some(65534));
        let line = child_line(&rx);
        assert!(
            line.starts_with(&format!("ZC_RESULT errno={} ", libc::EACCES)),
            "{line}"
        );
        child.wait().expect("wait");
        // Refused by the file mode, before the server saw anything.
        assert_eq!(fx.server.shared.conns().next_id, 0);
    }

    #[test]
    fn peercred_refuses_other_uid_even_when_socket_is_open() {
        if !is_root() {
            return;
        }
        let fx = start_as(4242);
        fs::set_permissions(&fx.socket, fs::Permissions::from_mode(0o666)).expect("chmod");
        let (mut child, rx) = spawn_child("connect", &fx.socket, Some(65534));
        let line = child_line(&rx);
        assert!(
            line.starts_with(&format!("ZC_RESULT errno={} ", libc::EACCES)),
            "{line}"
        );
        child.wait().expect("wait");
        assert_eq!(
            fx.server.shared.conns().next_id,
            0,
            "no connection admitted"
        );

        // The owner's uid is let in.
        let (mut child, rx) = spawn_child("connect", &fx.socket, Some(4242));
        assert_eq!(child_line(&rx), "ZC_RESULT ok");
        child.wait().expect("wait");
    }

    #[test]
    fn killed_client_after_alloc_leaves_slot_aborted() {
        let fx = start();
        let (mut child, rx) = spawn_child("alloc", &fx.socket, None);
        let line = child_line(&rx);
        let slot: u64 = line
            .strip_prefix("ZC_READY ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad child line {line}"));
        assert!(fx.backend.state().slots.contains_key(&slot));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        wait_until("the dead client's slot to be aborted", || {
            let st = fx.backend.state();
            st.aborted == [slot] && st.slots.is_empty()
        });
        assert!(fx.backend.state().files.is_empty(), "no file appeared");
    }

    #[test]
    fn killed_client_after_open_leaves_handle_closed() {
        let fx = start();
        fx.backend
            .state()
            .files
            .insert("held.bin".into(), vec![3; 4096]);
        let (mut child, rx) = spawn_child("open", &fx.socket, None);
        let line = child_line(&rx);
        let handle: u64 = line
            .strip_prefix("ZC_READY ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad child line {line}"));
        assert!(fx.backend.state().handles.contains_key(&handle));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        wait_until("the dead client's handle to be closed", || {
            let st = fx.backend.state();
            st.closed == [handle] && st.handles.is_empty()
        });
    }
}
