//! Counters of what the daemon did, shared by the filesystem core and
//! reported by `status` (and later by a Prometheus endpoint).

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic event counters. Reads and writes that pass through to a
/// backing file never reach the daemon, so byte counters cover only what the
/// daemon itself moved; `sealed_bytes` counts what writers stored.
#[derive(Debug, Default)]
pub struct Counters {
    /// Lookups that found a regular file.
    pub hits: AtomicU64,
    /// Lookups of names that do not exist.
    pub misses: AtomicU64,
    pub creates: AtomicU64,
    pub opens: AtomicU64,
    /// Files whose last writer closed, and their sizes then.
    pub sealed_files: AtomicU64,
    pub sealed_bytes: AtomicU64,
    /// Bytes moved by the daemon's own read/write handlers (fallback path).
    pub daemon_read_bytes: AtomicU64,
    pub daemon_write_bytes: AtomicU64,
    /// Opens answered with passthrough, and those that fell back.
    pub passthrough_opens: AtomicU64,
    pub fallback_opens: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CounterSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub creates: u64,
    pub opens: u64,
    pub sealed_files: u64,
    pub sealed_bytes: u64,
    pub daemon_read_bytes: u64,
    pub daemon_write_bytes: u64,
    pub passthrough_opens: u64,
    pub fallback_opens: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            hits: g(&self.hits),
            misses: g(&self.misses),
            creates: g(&self.creates),
            opens: g(&self.opens),
            sealed_files: g(&self.sealed_files),
            sealed_bytes: g(&self.sealed_bytes),
            daemon_read_bytes: g(&self.daemon_read_bytes),
            daemon_write_bytes: g(&self.daemon_write_bytes),
            passthrough_opens: g(&self.passthrough_opens),
            fallback_opens: g(&self.fallback_opens),
        }
    }
}
