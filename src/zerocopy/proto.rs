//! Wire format of the zero-copy protocol, shared by the server and the client:
//! the request and reply messages, the path rule for names a client may use,
//! and the few `libc` calls that move one message (plus at most a handful of
//! file descriptors) over a unix `SOCK_SEQPACKET` socket.
//!
//! `SOCK_SEQPACKET` keeps message boundaries, so one `sendmsg` is one request
//! or one reply and no framing is needed; std's `UnixDatagram` cannot open
//! that socket type, hence the raw calls here.

use std::ffi::c_int;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Protocol version answered to `hello`.
pub const VERSION: u32 = 1;

/// Largest message either end accepts, in bytes. Real messages are a few
/// hundred bytes; the bound keeps a misbehaving peer from making us allocate.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most descriptors taken from one received message. Each message carries at
/// most one; room for a few more lets us receive (and close) extras a broken
/// peer sends instead of having the kernel truncate the control data.
const MAX_FDS_IN: usize = 8;

/// One request. Unknown fields are ignored so a newer client can add optional
/// fields without breaking an older daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Version check; the client sends it once after connecting.
    Hello,
    /// A new writable shared-memory slot of exactly `size` bytes (reply carries its fd).
    Alloc { size: u64 },
    /// Publish the slot's bytes as the sealed file at `path`; consumes the slot.
    Commit { slot: u64, path: String },
    /// Free the slot without publishing it.
    Abort { slot: u64 },
    /// Keep the file at `path` resident and hand out a read-only fd to its bytes.
    Open { path: String },
    /// Release a handle from `open`.
    Close { handle: u64 },
}

/// One reply. A flat object with optional fields (rather than one type per
/// request) because requests and replies alternate strictly on a connection,
/// so the client always knows which fields to expect.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// `{"ok":true}`.
    pub fn done() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn hello() -> Reply {
        Reply {
            version: Some(VERSION),
            ..Reply::done()
        }
    }

    pub fn slot(slot: u64, size: u64) -> Reply {
        Reply {
            slot: Some(slot),
            size: Some(size),
            ..Reply::done()
        }
    }

    pub fn handle(handle: u64, size: u64) -> Reply {
        Reply {
            handle: Some(handle),
            size: Some(size),
            ..Reply::done()
        }
    }

    pub fn error(errno: i32, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            errno: Some(errno),
            error: Some(message.into()),
            ..Reply::default()
        }
    }
}

/// Checks a path a client names (relative to the mount root). Returns why it
/// is refused; the server answers EINVAL. The rule is strict on purpose: the
/// backend can then join it to the root without normalising anything.
pub fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("path is empty");
    }
    if path.contains('\0') {
        return Err("path contains NUL");
    }
    if path.starts_with('/') {
        return Err("path must be relative to the mount root");
    }
    for component in path.split('/') {
        match component {
            "" => return Err("path has an empty component"),
            "." | ".." => return Err("path has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// A `sockaddr_un` for a filesystem path, with its length.
pub(crate) fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path contains NUL",
        ));
    }
    // Keep one byte for the terminating NUL that the zeroed struct provides.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A new unix `SOCK_SEQPACKET` socket (close-on-exec, so children the daemon
/// or client spawns do not inherit it).
pub(crate) fn seqpacket_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects a new socket to `path`.
pub(crate) fn connect(path: &Path, nonblocking: bool) -> io::Result<OwnedFd> {
    let sock = seqpacket_socket(nonblocking)?;
    let (addr, len) = unix_addr(path)?;
    loop {
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            return Ok(sock);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Sends one message, with `pass` attached via `SCM_RIGHTS` if given.
/// `MSG_NOSIGNAL`: a vanished peer must give EPIPE, not kill the process.
pub(crate) fn send_msg(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    pass: Option<BorrowedFd<'_>>,
    extra_flags: c_int,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // u64 array: control data must be aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = pass {
        // SAFETY: CMSG_* only compute sizes and pointers inside `control`,
        // which is large enough (CMSG_SPACE(4) is 24 bytes on 64-bit Linux).
        unsafe {
            let space = libc::CMSG_SPACE(size_of::<c_int>() as u32) as usize;
            debug_assert!(space <= size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points at iov/control, which outlive the call.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &raw const msg,
                libc::MSG_NOSIGNAL | extra_flags,
            )
        };
        if n >= 0 {
            // SEQPACKET sends the whole record or fails; a short count would
            // mean the peer sees a broken message, so call it an error.
            if n as usize != bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short send on a SOCK_SEQPACKET socket",
                ));
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// One received message.
pub(crate) struct Received {
    /// Bytes stored in the buffer (at most its length).
    pub len: usize,
    /// The message was longer than the buffer; the rest was discarded.
    pub truncated: bool,
    /// The peer closed the connection (no message).
    pub eof: bool,
    /// Descriptors that came with the message, already close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Receives one message into `buf`. A zero-length read is end of connection:
/// on SEQPACKET it cannot be told apart from an empty record, and no valid
/// message is empty.
pub(crate) fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8], flags: c_int) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let control_len =
        unsafe { libc::CMSG_SPACE((MAX_FDS_IN * size_of::<c_int>()) as u32) } as usize;
    debug_assert!(control_len <= size_of_val(&control));
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len as _;
    let n = loop {
        // SAFETY: msg points at buf/control, which outlive the call.
        // MSG_CMSG_CLOEXEC: received fds must not leak into spawned children.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &raw mut msg,
                libc::MSG_CMSG_CLOEXEC | flags,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay within it, and every SCM_RIGHTS entry is a new fd that
    // this process now owns (we take each exactly once).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<c_int>();
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / size_of::<c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(Received {
        len: n.min(buf.len()),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        eof: n == 0 && msg.msg_flags & libc::MSG_TRUNC == 0,
        fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_documented_json() {
        let cases = [
            (Request::Hello, r#"{"op":"hello"}"#),
            (
                Request::Alloc { size: 4096 },
                r#"{"op":"alloc","size":4096}"#,
            ),
            (
                Request::Commit {
                    slot: 3,
                    path: "a/b.bin".into(),
                },
                r#"{"op":"commit","slot":3,"path":"a/b.bin"}"#,
            ),
            (Request::Abort { slot: 3 }, r#"{"op":"abort","slot":3}"#),
            (
                Request::Open {
                    path: "a/b.bin".into(),
                },
                r#"{"op":"open","path":"a/b.bin"}"#,
            ),
            (Request::Close { handle: 9 }, r#"{"op":"close","handle":9}"#),
        ];
        for (req, json) in cases {
            assert_eq!(serde_json::to_string(&req).expect("serialize"), json);
            assert_eq!(serde_json::from_str::<Request>(json).expect("parse"), req);
        }
    }

    #[test]
    fn replies_use_the_documented_json() {
        let cases = [
            (Reply::hello(), r#"{"ok":true,"version":1}"#),
            (Reply::slot(2, 10), r#"{"ok":true,"slot":2,"size":10}"#),
            (Reply::handle(5, 10), r#"{"ok":true,"handle":5,"size":10}"#),
            (Reply::done(), r#"{"ok":true}"#),
            (
                Reply::error(libc::ENOENT, "no such file"),
                r#"{"ok":false,"errno":2,"error":"no such file"}"#,
            ),
        ];
        for (reply, json) in cases {
            assert_eq!(serde_json::to_string(&reply).expect("serialize"), json);
            assert_eq!(serde_json::from_str::<Reply>(json).expect("parse"), reply);
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_ops_rejected() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"alloc","size":1,"hint":"x"}"#).ok(),
            Some(Request::Alloc { size: 1 })
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"alloc","size":-1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"size":1}"#).is_err());
    }

    #[test]
    fn path_rule() {
        for good in ["a.bin", "a/b/c.bin", "x..y", ".hidden", "a/...", "é/ü.bin"] {
            assert_eq!(validate_path(good), Ok(()), "{good:?}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", "a/..", "./a", "a/./b", ".", "..", "a\0b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn too_long_socket_path_is_enametoolong() {
        let long = "x".repeat(200);
        let err = unix_addr(Path::new(&long)).err().map(|e| e.raw_os_error());
        assert_eq!(err, Some(Some(libc::ENAMETOOLONG)));
    }
}
