//! The client end of the zero-copy protocol, used by the GPU companion: one
//! connection to the daemon's socket, one request in flight at a time.
//!
//! It owns only the socket. Slots and handles it obtains belong to this
//! connection on the daemon's side: when the `Client` is dropped (or the
//! process dies) the daemon aborts the slots not yet committed and closes the
//! handles not yet closed, so nothing leaks and no half-written file appears.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use thiserror::Error;

use super::SOCKET_REL_PATH;
use super::proto::{self, MAX_MESSAGE, Reply, Request, VERSION};

/// Errors from the zero-copy client.
#[derive(Debug, Error)]
pub enum ZcError {
    /// The socket itself failed (daemon not running, connection lost, ...).
    #[error("zero-copy socket: {0}")]
    Io(#[from] io::Error),
    /// The daemon refused the request.
    #[error("kvfs refused the request: {message} (errno {errno})")]
    Remote { errno: i32, message: String },
    /// The daemon's reply made no sense for the request.
    #[error("zero-copy protocol: {0}")]
    Protocol(String),
}

impl ZcError {
    /// An errno for callers that map errors to POSIX codes: the daemon's own
    /// for `Remote`, the OS error for `Io` (EIO if it has none), EPROTO for
    /// `Protocol`.
    pub fn errno(&self) -> i32 {
        match self {
            ZcError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            ZcError::Remote { errno, .. } => *errno,
            ZcError::Protocol(_) => libc::EPROTO,
        }
    }
}

/// A writable shared-memory slot: `mmap(MAP_SHARED)` `fd` (exactly `size`
/// bytes), fill it, then [`Client::commit`] or [`Client::abort`] it by `id`.
#[derive(Debug)]
pub struct Slot {
    pub id: u64,
    pub size: u64,
    pub fd: OwnedFd,
}

/// A resident file: a read-only `fd` to its `size` bytes, kept resident by
/// the daemon until [`Client::close`] with `handle`.
#[derive(Debug)]
pub struct Resident {
    pub handle: u64,
    pub size: u64,
    pub fd: OwnedFd,
}

/// A connection to a kvfs daemon's zero-copy socket. `Send + Sync`: the
/// socket sits behind a mutex, so requests from several threads are
/// serialised (each is one short round trip).
#[derive(Debug)]
pub struct Client {
    sock: Mutex<OwnedFd>,
}

impl Client {
    /// Connects to the daemon serving `mountpoint` (its socket is
    /// `<mountpoint>/.kvfs/zerocopy.sock`) and checks the protocol version.
    pub fn connect(mountpoint: &Path) -> Result<Client, ZcError> {
        Client::connect_socket(&mountpoint.join(SOCKET_REL_PATH))
    }

    /// Connects to a zero-copy socket at `socket` and checks the protocol version.
    pub fn connect_socket(socket: &Path) -> Result<Client, ZcError> {
        let sock = proto::connect(socket, false)?;
        let client = Client {
            sock: Mutex::new(sock),
        };
        let (reply, _) = client.request(&Request::Hello)?;
        match reply.version {
            Some(VERSION) => Ok(client),
            other => Err(ZcError::Protocol(format!(
                "daemon speaks protocol version {other:?}, this client speaks {VERSION}"
            ))),
        }
    }

    /// Allocates a writable slot of exactly `size` bytes.
    pub fn alloc(&self, size: u64) -> Result<Slot, ZcError> {
        let (reply, fd) = self.request(&Request::Alloc { size })?;
        let id = field(reply.slot, "slot")?;
        let got = field(reply.size, "size")?;
        if got != size {
            return Err(ZcError::Protocol(format!(
                "asked for a {size}-byte slot, got {got} bytes"
            )));
        }
        Ok(Slot {
            id,
            size,
            fd: fd.ok_or_else(|| ZcError::Protocol("alloc reply carried no fd".into()))?,
        })
    }

    /// Publishes the slot's bytes as the sealed file `path` (relative to the
    /// mount root). The slot is consumed on success; on error it is still
    /// allocated (retry, or abort it).
    pub fn commit(&self, slot: u64, path: &str) -> Result<(), ZcError> {
        self.request(&Request::Commit {
            slot,
            path: path.to_owned(),
        })
        .map(drop)
    }

    /// Frees a slot without publishing it.
    pub fn abort(&self, slot: u64) -> Result<(), ZcError> {
        self.request(&Request::Abort { slot }).map(drop)
    }

    /// Opens the file `path` (relative to the mount root) for direct reads;
    /// it stays resident until [`Client::close`].
    pub fn open(&self, path: &str) -> Result<Resident, ZcError> {
        let (reply, fd) = self.request(&Request::Open {
            path: path.to_owned(),
        })?;
        Ok(Resident {
            handle: field(reply.handle, "handle")?,
            size: field(reply.size, "size")?,
            fd: fd.ok_or_else(|| ZcError::Protocol("open reply carried no fd".into()))?,
        })
    }

    /// Releases a handle from [`Client::open`].
    pub fn close(&self, handle: u64) -> Result<(), ZcError> {
        self.request(&Request::Close { handle }).map(drop)
    }

    /// One round trip: send `req`, wait for its reply. Returns the reply and
    /// the first descriptor it carried (extra ones are closed).
    fn request(&self, req: &Request) -> Result<(Reply, Option<OwnedFd>), ZcError> {
        let bytes = serde_json::to_vec(req)
            .map_err(|e| ZcError::Protocol(format!("cannot encode request: {e}")))?;
        // A poisoned lock only means another thread panicked between calls;
        // the socket is still in step (one reply per request), so go on.
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![0u8; MAX_MESSAGE];
        let exchanged = proto::send_msg(sock.as_fd(), &bytes, None, 0)
            .and_then(|()| proto::recv_msg(sock.as_fd(), &mut buf, 0));
        let received = match exchanged {
            Ok(r) => r,
            Err(err) => {
                // The daemon may have refused us (access control, connection
                // limit) with an error reply and hung up. Our unread request
                // then makes the kernel report ECONNRESET (or EPIPE on send)
                // ahead of that queued reply; read it if it is there, since
                // it says why.
                match proto::recv_msg(sock.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok(r) if !r.eof && r.len > 0 => r,
                    _ => return Err(err.into()),
                }
            }
        };
        drop(sock);
        if received.eof {
            return Err(ZcError::Io(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "kvfs closed the zero-copy connection",
            )));
        }
        if received.truncated {
            return Err(ZcError::Protocol(format!(
                "reply longer than {MAX_MESSAGE} bytes"
            )));
        }
        let reply: Reply = serde_json::from_slice(&buf[..received.len])
            .map_err(|e| ZcError::Protocol(format!("unparseable reply: {e}")))?;
        if !reply.ok {
            return Err(ZcError::Remote {
                errno: reply.errno.unwrap_or(libc::EIO),
                message: reply.error.unwrap_or_default(),
            });
        }
        Ok((reply, received.fds.into_iter().next()))
    }
}

fn field<T>(value: Option<T>, name: &str) -> Result<T, ZcError> {
    value.ok_or_else(|| ZcError::Protocol(format!("reply lacks \"{name}\"")))
}
