//! The filesystem as the kernel sees it: the core (`core`), the `fuser`
//! adapter (`fuse`), the errno mapping (`errno`) and mounting (`mount`).

pub mod core;
pub mod errno;
mod fuse;
pub mod mount;
mod zerocopy;

pub use core::{DataMode, Kvfs};
