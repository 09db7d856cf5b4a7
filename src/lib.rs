//! kvfs: a FUSE filesystem for LLM KV-cache block files, tiered behind the mount.
//!
//! Data flows one way: `fs` (the FUSE adapter and the filesystem core) calls
//! `namespace` (names, inodes, file states) and `store` (where the bytes live).

pub mod bench;
pub mod config;
pub mod fs;
pub mod gpu;
pub mod metrics;
pub mod namespace;
pub mod ops;
pub mod store;
pub mod zerocopy;
