//! The block store: where the bytes of each regular file live, and how much
//! room each tier has. It knows inode numbers, never names or FUSE.
//!
//! `host`: one shmem backing file per file, bounded by a byte-weighted LRU.
//! `nvme`: the local-disk tier's storage engine (io_uring, O_DIRECT,
//! checksummed, crash-safe); not yet wired into the filesystem.

pub mod host;
pub mod nvme;

pub use host::{HostFile, HostTier, HostUsage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Open or still-written data fills the tier; nothing can be evicted.
    #[error("host tier full: {used} of {capacity} bytes used by open or unsealed files")]
    NoSpace { used: u64, capacity: u64 },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io { op, source }
    }
}
