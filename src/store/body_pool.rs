//! Reusable memory for upload bodies: the S3 tier reads each body from its
//! local file into one of these buffers and hands it to the HTTP client,
//! which gives it back when the request is done with it.
//!
//! Why not a fresh `Vec` per upload: a body of tens of MiB is a fresh
//! anonymous mapping, so reading into it page-faults and zeroes every page,
//! and freeing it unmaps it again, which shoots down TLB entries on every
//! core the process runs on; at several GB/s of uploads that was a tenth of
//! the daemon's CPU spent on memory it had a moment before.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Buffers kept for reuse, at most `keep` of them.
#[derive(Debug)]
pub struct BodyPool {
    free: Mutex<Free>,
    keep: usize,
}

#[derive(Debug)]
struct Free {
    buffers: Vec<Vec<u8>>,
    /// When a body was last made.
    used: Instant,
}

impl BodyPool {
    pub fn new(keep: usize) -> Arc<BodyPool> {
        Arc::new(BodyPool {
            free: Mutex::new(Free {
                buffers: Vec::new(),
                used: Instant::now(),
            }),
            keep,
        })
    }

    /// A buffer of exactly `len` bytes, filled by `fill`, then frozen into a
    /// body; its memory comes back to the pool when the last clone of the
    /// body (the client keeps one for a retry) is dropped.
    pub fn body<E>(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        let mut buf = self.take(len);
        if let Err(e) = fill(&mut buf[..len]) {
            self.give_back(buf);
            return Err(e);
        }
        Ok(Bytes::from_owner(Pooled {
            buf,
            len,
            pool: Arc::clone(self),
        }))
    }

    /// Lets go of every buffer not in use if no body was made for `quiet`,
    /// so that a mount gone quiet does not hold the memory of its busiest
    /// moment, while one that uploads now and then keeps reusing it.
    pub fn trim_if_quiet(&self, quiet: Duration) {
        let mut free = self.lock();
        if free.used.elapsed() >= quiet {
            free.buffers.clear();
        }
    }

    /// Buffers waiting for reuse.
    pub fn idle(&self) -> usize {
        self.lock().buffers.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // A panic while holding this lock leaves only a list of buffers.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The smallest free buffer that holds `len`, grown if none does. The
    /// part beyond what `fill` writes is never read: a buffer keeps its
    /// length, so a reused one is not zeroed again.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut guard = self.lock();
        guard.used = Instant::now();
        let free = &mut guard.buffers;
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let mut buf = match fit {
            Some(i) => free.swap_remove(i),
            // Grow the largest: it is the likeliest to be near `len`.
            None => {
                let largest = free
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                largest.map(|i| free.swap_remove(i)).unwrap_or_default()
            }
        };
        drop(guard);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.lock();
        if free.buffers.len() < self.keep {
            free.buffers.push(buf);
        }
    }
}

/// A body's memory on loan from a pool.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BodyPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_holds_what_was_filled_and_its_memory_is_reused() {
        let pool = BodyPool::new(2);
        let body = pool
            .body::<()>(5, |b| {
                b.copy_from_slice(b"hello");
                Ok(())
            })
            .unwrap();
        assert_eq!(&body[..], b"hello");
        let ptr = body.as_ptr();
        let clone = body.clone();
        drop(body);
        assert_eq!(pool.idle(), 0, "a clone still uses it");
        drop(clone);
        assert_eq!(pool.idle(), 1);
        // A smaller body reuses the same memory, and sees only its bytes.
        let again = pool
            .body::<()>(3, |b| {
                b.copy_from_slice(b"abc");
                Ok(())
            })
            .unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(&again[..], b"abc");
        drop(again);
        pool.trim_if_quiet(Duration::from_secs(3600));
        assert_eq!(pool.idle(), 1, "used a moment ago: kept");
        std::thread::sleep(Duration::from_millis(20));
        pool.trim_if_quiet(Duration::from_millis(10));
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_failed_fill_returns_the_buffer_and_the_pool_keeps_at_most_keep() {
        let pool = BodyPool::new(1);
        let err = pool.body(4, |_| Err("read failed"));
        assert_eq!(err.unwrap_err(), "read failed");
        assert_eq!(pool.idle(), 1);
        let a = pool.body::<()>(4, |_| Ok(())).unwrap();
        let b = pool.body::<()>(4, |_| Ok(())).unwrap();
        drop((a, b));
        assert_eq!(pool.idle(), 1);
    }
}
