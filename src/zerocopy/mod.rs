//! The zero-copy control protocol: how a GPU client gets shared-memory backing
//! files straight from the daemon, without FUSE read/write in the data path.
//!
//! This module owns the wire protocol ([`proto`]: JSON messages over a unix
//! `SOCK_SEQPACKET` socket, file descriptors passed with `SCM_RIGHTS`), the
//! daemon's end ([`server`]: socket, access control, per-connection ownership
//! of slots and handles, cleanup when a client goes away) and the client's end
//! ([`client`]). It knows nothing about the filesystem core: the server reaches
//! it only through the [`server::Backend`] trait, which the mount implements.
//!
//! See `docs/zerocopy.md` for the protocol as a client author sees it.

pub mod client;
pub mod proto;
pub mod server;

pub use client::{Client, Resident, Slot, ZcError};
pub use server::{Backend, BackendError, Server};

/// Where the socket is found, relative to the mount root
/// (`<mountpoint>/.kvfs/zerocopy.sock`); [`Client::connect`] looks there.
pub const SOCKET_REL_PATH: &str = ".kvfs/zerocopy.sock";
