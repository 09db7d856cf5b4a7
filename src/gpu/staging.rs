//! The bounded pool of pinned staging buffers the fuse path stages file
//! blocks through: `--staging-memory` divided into whole file blocks,
//! allocated and page-locked once, handed to I/O threads one at a time.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex};

use super::GpuError;
use super::cuda::{Context, PinnedMem};

pub struct StagingPool {
    free: Mutex<Vec<PinnedMem>>,
    returned: Condvar,
    count: usize,
}

/// How many buffers of `buf_len` bytes fit in `budget` bytes.
pub fn buffers_for(budget: u64, buf_len: u64) -> Result<usize, GpuError> {
    let n = budget / buf_len.max(1);
    if n == 0 {
        return Err(GpuError::Usage(format!(
            "--staging-memory ({budget} bytes) is smaller than one file block ({buf_len} bytes)"
        )));
    }
    Ok(n as usize)
}

impl StagingPool {
    pub fn new(ctx: &Arc<Context>, count: usize, buf_len: usize) -> Result<StagingPool, GpuError> {
        let free = (0..count)
            .map(|_| PinnedMem::new(ctx, buf_len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StagingPool {
            free: Mutex::new(free),
            returned: Condvar::new(),
            count,
        })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Waits for a free buffer: the pool, not the thread count, bounds pinned
    /// memory.
    pub fn acquire(&self) -> Staged<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(buf) = free.pop() {
                return Staged {
                    pool: self,
                    buf: Some(buf),
                };
            }
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A buffer on loan from a [`StagingPool`]; goes back on drop.
pub struct Staged<'a> {
    pool: &'a StagingPool,
    buf: Option<PinnedMem>,
}

impl Deref for Staged<'_> {
    type Target = PinnedMem;

    fn deref(&self) -> &PinnedMem {
        self.buf
            .as_ref()
            .expect("a loaned buffer is present until drop")
    }
}

impl DerefMut for Staged<'_> {
    fn deref_mut(&mut self) -> &mut PinnedMem {
        self.buf
            .as_mut()
            .expect("a loaned buffer is present until drop")
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
            free.push(buf);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_whole_blocks() {
        assert_eq!(buffers_for(1 << 30, 32 << 20).expect("fits"), 32);
        assert_eq!(buffers_for((32 << 20) * 3 - 1, 32 << 20).expect("fits"), 2);
        assert!(matches!(
            buffers_for((32 << 20) - 1, 32 << 20),
            Err(GpuError::Usage(_))
        ));
    }
}
