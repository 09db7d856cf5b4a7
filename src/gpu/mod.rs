//! The GPU companion client: moves KV-cache blocks between a paged GPU KV
//! cache and kvfs the way an inference engine's offloading connector does.
//!
//! This module owns everything on the GPU side of kvfs: the file-block byte
//! layout ([`layout`], documented for other tools in `docs/kv-layout.md`),
//! the CUDA driver layer ([`cuda`], loaded at run time through cudarc, so the
//! binary runs without CUDA and says so), the pinned staging pool
//! ([`staging`]), the three transfer paths (`fuse`: pinned staging plus
//! connector-style O_DIRECT file I/O through the mount, [`fileio`];
//! `zerocopy`: DMA straight into the daemon's shared backing memory,
//! [`zc`]; `gds`: cuFile reads from the NVMe tier, [`gds`]), and the
//! `kvfs gpu check | bench` commands ([`command`], [`bench`]).
//! It does not own the daemon's end of the zero-copy protocol
//! (`crate::zerocopy`).

pub mod bench;
pub mod command;
pub mod cuda;
pub mod fileio;
pub mod gds;
pub mod layout;
pub mod pattern;
pub mod staging;
pub mod zc;

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    /// No usable GPU or driver: the one error a machine without CUDA gives.
    #[error("no GPU available: {0}")]
    NoGpu(String),
    #[error("{call} failed: {code}")]
    Cuda { call: &'static str, code: String },
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("short {op} on {path}: {got} of {expected} bytes")]
    Short {
        op: &'static str,
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error(
        "verification failed after {path} load: layer {layer} {kv} GPU block {gpu_block}, byte {offset} of the chunk differs"
    )]
    Verify {
        path: String,
        layer: u64,
        kv: &'static str,
        gpu_block: u64,
        offset: usize,
    },
    #[error("{0}")]
    Usage(String),
    #[error("zero-copy: {0}")]
    Zerocopy(String),
    #[error("cuFile: {0}")]
    Gds(String),
}

impl GpuError {
    /// True for errors that mean "nothing to run on" rather than a failure.
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, GpuError::NoGpu(_))
    }
}
