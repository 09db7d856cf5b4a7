//! The zero-copy server's view of the filesystem: the [`Backend`] the
//! protocol server calls, over the core. Errors become errno values here,
//! through the same mapping as FUSE replies.

use std::os::fd::OwnedFd;
use std::sync::Weak;

use super::core::{FsError, Kvfs};
use super::errno::ToErrno;
use crate::zerocopy::{Backend, BackendError};

/// Holds the core weakly: the server must not keep the mount's tiers alive
/// past the unmount.
pub struct CoreBackend {
    core: Weak<Kvfs>,
}

impl CoreBackend {
    pub fn new(core: Weak<Kvfs>) -> CoreBackend {
        CoreBackend { core }
    }

    fn with<T>(&self, f: impl FnOnce(&Kvfs) -> Result<T, FsError>) -> Result<T, BackendError> {
        let core = self
            .core
            .upgrade()
            .ok_or_else(|| BackendError::new(libc::ESHUTDOWN, "the filesystem is unmounted"))?;
        f(&core).map_err(|e| BackendError::new(e.to_errno().code(), e.to_string()))
    }
}

impl Backend for CoreBackend {
    fn alloc(&self, size: u64) -> Result<(u64, OwnedFd), BackendError> {
        self.with(|c| c.zc_alloc(size))
    }

    fn commit(&self, slot: u64, path: &str) -> Result<(), BackendError> {
        self.with(|c| c.zc_commit(slot, path))
    }

    fn abort(&self, slot: u64) {
        let _ = self.with(|c| {
            c.zc_abort(slot);
            Ok(())
        });
    }

    fn open(&self, path: &str) -> Result<(u64, u64, OwnedFd), BackendError> {
        self.with(|c| c.zc_open(path))
    }

    fn close(&self, handle: u64) {
        let _ = self.with(|c| {
            c.zc_close(handle);
            Ok(())
        });
    }
}
