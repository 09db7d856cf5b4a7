//! The zero-copy path's client side: shared-memory mappings of the daemon's
//! backing files, registered with the CUDA driver so the copy engine DMAs
//! straight between GPU memory and the file's bytes.
//!
//! A [`Client`] serialises its requests on one connection, which the daemon
//! serves on one thread, so each I/O thread should hold its own (the bench
//! does: one shared connection held 16 threads to one alloc or commit at a
//! time). A slot belongs to the connection that allocated it, and a
//! [`ReadySlot`] carries that connection for its commit.
//!
//! Stores may take slots from [`SlotPrefetcher`], which allocates, maps
//! (MAP_POPULATE) and registers slots on background threads so that page
//! faults, zeroing and pinning stay off the I/O threads; retired slots are
//! unregistered and unmapped on a reaper thread for the same reason. With a
//! depth of 0 all of that happens on the I/O thread instead, which is how the
//! bench measures what the pool is worth.
//!
//! Registration is not free: the driver pins every page, and on the H100
//! machine it ran at roughly 10-20 GB/s for the whole process, below the
//! copy engine's 55 GB/s. So a second mode maps nothing: the I/O thread
//! moves the bytes between a pinned staging buffer and the slot's
//! descriptor with pwrite/pread. That is one memory copy, done by the kernel
//! into pages it allocates without zeroing them first (a fresh mapping is
//! faulted in and zeroed before it is written), and no FUSE and no pinning
//! (docs/gpu.md has the figures of both).

use std::ffi::c_void;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::zerocopy::{Client, Resident, Slot};

use super::GpuError;
use super::cuda::{Context, Registered};

fn zc_err(what: &str) -> impl FnOnce(crate::zerocopy::ZcError) -> GpuError + '_ {
    move |e| GpuError::Zerocopy(format!("{what}: {e}"))
}

/// A `mmap` of a shared-memory fd, unmapped on drop.
pub struct Mapping {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: a mapping is plain memory owned by this value.
unsafe impl Send for Mapping {}
// SAFETY: the value is never mutated after creation; what is written
// through the pointer is the users' business, as with any shared memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(fd: &impl AsRawFd, len: usize, writable: bool) -> Result<Mapping, GpuError> {
        if len == 0 {
            return Err(GpuError::Zerocopy("cannot map an empty file".into()));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // Populate so the page faults happen here, once, and not inside the
        // driver's pinning.
        let flags = libc::MAP_SHARED | libc::MAP_POPULATE;
        // SAFETY: a fresh mapping of a valid fd; the result is checked.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(GpuError::Zerocopy(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Mapping { ptr, len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in new(), unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A mapping registered for DMA. Field order is drop order: the
/// registration goes before the mapping it covers, and the descriptor
/// (which keeps the inode, so its number, from being reused) goes last.
struct Dma {
    _reg: Registered,
    map: Mapping,
    _fd: OwnedFd,
    writable: bool,
}

impl Dma {
    /// Maps `len` bytes of `fd` and registers them (read-only for loads).
    fn new(ctx: &Arc<Context>, fd: OwnedFd, len: usize, writable: bool) -> Result<Dma, GpuError> {
        let map = Mapping::new(&fd, len, writable)?;
        // SAFETY: the mapping lives in the same Dma and is dropped after.
        let reg = unsafe { Registered::new(ctx, map.ptr().cast(), map.len(), !writable)? };
        Ok(Dma {
            _reg: reg,
            map,
            _fd: fd,
            writable,
        })
    }
}

/// Registered mappings kept after their slot or load is done, keyed by the
/// backing file's inode, up to `limit` bytes (least recently used go
/// first). The daemon hands a dropped block file's memory out again as the
/// next slot (its spares), and a file stored here is often loaded here
/// too: either way the inode comes back, and the DMA needs no new
/// `cuMemHostRegister`, which costs more than the copy itself (70-90 ms
/// for 32 MiB on the H100 machine, against under 1 ms of DMA).
///
/// The cost: the cached pages stay pinned while cached, including those of
/// files the daemon has deleted meanwhile, so at most `limit` bytes beyond
/// the host tier.
pub struct RegCache {
    limit: u64,
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    lru: lru::LruCache<(u64, u64), Arc<Dma>>,
    bytes: u64,
}

impl RegCache {
    pub fn new(limit: u64) -> RegCache {
        RegCache {
            limit,
            inner: Mutex::new(CacheInner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// The registered mapping of `fd`'s file: the cached one if this inode
    /// is cached with the same length (and writable, if asked), else a new
    /// one (on a descriptor of its own), cached.
    fn get(
        &self,
        ctx: &Arc<Context>,
        fd: &OwnedFd,
        len: usize,
        writable: bool,
    ) -> Result<Arc<Dma>, GpuError> {
        let key = inode_of(fd)?;
        if self.limit > 0 {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(d) = inner.lru.get(&key)
                && d.map.len() == len
                && (d.writable || !writable)
            {
                return Ok(Arc::clone(d));
            }
        }
        let own = fd
            .try_clone()
            .map_err(|e| GpuError::Zerocopy(format!("dup: {e}")))?;
        let dma = Arc::new(Dma::new(ctx, own, len, writable)?);
        if self.limit >= len as u64 {
            let mut evicted = Vec::new();
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = inner.lru.put(key, Arc::clone(&dma)) {
                inner.bytes -= old.map.len() as u64;
                evicted.push(old);
            }
            inner.bytes += len as u64;
            while inner.bytes > self.limit {
                let Some((_, old)) = inner.lru.pop_lru() else {
                    break;
                };
                inner.bytes -= old.map.len() as u64;
                evicted.push(old);
            }
            // Unregistered outside the lock.
            drop(inner);
            drop(evicted);
        }
        Ok(dma)
    }

    /// Registered bytes held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

fn inode_of(fd: &OwnedFd) -> Result<(u64, u64), GpuError> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(GpuError::Zerocopy(format!(
            "fstat: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok((st.st_dev, st.st_ino))
}

/// A slot ready to be filled: registered for DMA in register mode, or only
/// its descriptor in copy mode.
pub struct ReadySlot {
    dma: Option<Arc<Dma>>,
    fd: OwnedFd,
    /// The connection that allocated it: the only one that may commit it.
    client: Arc<Client>,
    len: usize,
    pub id: u64,
    /// Time spent allocating, mapping and registering it.
    pub prepare: Duration,
}

impl ReadySlot {
    /// The registered mapping, in register mode.
    pub fn dma_ptr(&self) -> Option<*mut u8> {
        self.dma.as_ref().map(|d| d.map.ptr())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `bytes` to the start of the slot (copy mode).
    pub fn write(&self, bytes: &[u8]) -> Result<(), GpuError> {
        crate::store::pwrite_all(self.fd.as_raw_fd(), bytes, 0)
            .map_err(|e| GpuError::Zerocopy(format!("write to slot {}: {e}", self.id)))
    }

    /// Publishes the slot's bytes as the file `path`; on error the slot is
    /// aborted.
    pub fn commit(&self, path: &str) -> Result<(), GpuError> {
        let done = self
            .client
            .commit(self.id, path)
            .map_err(|e| GpuError::Zerocopy(format!("commit {path}: {e}")));
        if done.is_err() {
            self.abort();
        }
        done
    }

    /// Frees the slot unpublished (best effort: the daemon also frees it
    /// when the connection ends).
    pub fn abort(&self) {
        let _ = self.client.abort(self.id);
    }

    /// Drops registration and mapping (what the reaper does).
    pub fn retire(self) {
        drop(self.dma);
    }
}

/// Allocates a slot of `size` bytes and, with a registration cache (register
/// mode), maps it read-write and registers it for DMA.
pub fn prepare_slot(
    client: &Arc<Client>,
    ctx: &Arc<Context>,
    size: u64,
    cache: Option<&RegCache>,
) -> Result<ReadySlot, GpuError> {
    let t = Instant::now();
    let Slot { id, size: got, fd } = client.alloc(size).map_err(zc_err("alloc"))?;
    let result = (|| {
        let dma = match cache {
            Some(c) => Some(c.get(ctx, &fd, got as usize, true)?),
            None => None,
        };
        Ok(ReadySlot {
            dma,
            fd,
            client: Arc::clone(client),
            len: got as usize,
            id,
            prepare: t.elapsed(),
        })
    })();
    if result.is_err() {
        let _ = client.abort(id);
    }
    result
}

/// Keeps up to `depth` prepared slots ready, filled by `threads` background
/// threads (each with its own connection), and retires used slots on a
/// reaper thread.
pub struct SlotPrefetcher {
    ready: Mutex<Receiver<Result<ReadySlot, GpuError>>>,
    retired: Mutex<Option<SyncSender<ReadySlot>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl SlotPrefetcher {
    /// Starts filling at once; `total` caps how many slots are prepared in
    /// all (the number of blocks to store), so none is left over to abort.
    pub fn start(
        mount: PathBuf,
        ctx: Arc<Context>,
        size: u64,
        depth: usize,
        threads: usize,
        total: u64,
        cache: Option<Arc<RegCache>>,
    ) -> SlotPrefetcher {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let (tx, rx) = sync_channel(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let (tx, mount, ctx, stop, issued, cache) = (
                tx.clone(),
                mount.clone(),
                ctx.clone(),
                stop.clone(),
                issued.clone(),
                cache.clone(),
            );
            handles.push(std::thread::spawn(move || {
                if let Err(e) = ctx.bind() {
                    let _ = tx.send(Err(e));
                    return;
                }
                let client = match Client::connect(&mount) {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        let _ = tx.send(Err(zc_err("connect")(e)));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed)
                    && issued.fetch_add(1, Ordering::Relaxed) < total
                {
                    let slot = prepare_slot(&client, &ctx, size, cache.as_deref());
                    if let Err(std::sync::mpsc::SendError(Ok(unused))) = tx.send(slot) {
                        unused.abort();
                        unused.retire();
                        return;
                    }
                }
            }));
        }
        let (rtx, rrx) = sync_channel::<ReadySlot>(depth.max(1) * 2);
        let reaper_ctx = ctx.clone();
        handles.push(std::thread::spawn(move || {
            let _ = reaper_ctx.bind();
            for slot in rrx {
                slot.retire();
            }
        }));
        SlotPrefetcher {
            ready: Mutex::new(rx),
            retired: Mutex::new(Some(rtx)),
            threads: handles,
            stop,
        }
    }

    /// The next ready slot (waits for one).
    pub fn take(&self) -> Result<ReadySlot, GpuError> {
        let rx = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        rx.recv()
            .map_err(|_| GpuError::Zerocopy("slot prefetch threads stopped".into()))?
    }

    /// Hands a committed (or aborted) slot to the reaper.
    pub fn retire(&self, slot: ReadySlot) {
        let tx = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(slot)) = tx.send(slot) {
                    slot.retire();
                }
            }
            None => slot.retire(),
        }
    }

    /// Stops the fillers, aborts what they prepared but nobody took, and
    /// waits for every thread.
    pub fn finish(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        {
            let rx = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            // Drain so blocked fillers wake up; their last slot arrives here too.
            while let Ok(r) = rx.recv_timeout(Duration::from_millis(50)) {
                if let Ok(slot) = r {
                    slot.abort();
                    slot.retire();
                }
            }
        }
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// A resident file, pinned by the daemon until [`OpenFile::close`]:
/// mapped read-only and registered for host-to-device DMA in register
/// mode, or only its descriptor in copy mode.
pub struct OpenFile {
    dma: Option<Arc<Dma>>,
    fd: OwnedFd,
    pub handle: u64,
    pub size: u64,
    /// Time spent in mmap plus registration.
    pub prepare: Duration,
}

impl OpenFile {
    /// Opens `path`; with a registration cache (register mode), maps it and
    /// registers the mapping for DMA, else the caller reads it into its own
    /// pinned buffer.
    pub fn open(
        client: &Client,
        ctx: &Arc<Context>,
        path: &str,
        cache: Option<&RegCache>,
    ) -> Result<OpenFile, GpuError> {
        let Resident { handle, size, fd } = client.open(path).map_err(zc_err("open"))?;
        let t = Instant::now();
        let dma = match cache {
            Some(c) => c.get(ctx, &fd, size as usize, false).map(Some),
            None => Ok(None),
        };
        match dma {
            Ok(dma) => Ok(OpenFile {
                dma,
                fd,
                handle,
                size,
                prepare: t.elapsed(),
            }),
            Err(e) => {
                let _ = client.close(handle);
                Err(e)
            }
        }
    }

    /// The registered mapping, in register mode.
    pub fn dma_ptr(&self) -> Option<*const u8> {
        self.dma.as_ref().map(|d| d.map.ptr().cast_const())
    }

    /// Reads the whole file into the start of `buf` (copy mode).
    pub fn read_into(&self, buf: &mut [u8]) -> Result<(), GpuError> {
        let n = self.size as usize;
        let have = buf.len();
        let dst = buf.get_mut(..n).ok_or_else(|| {
            GpuError::Zerocopy(format!("{n}-byte file does not fit a {have}-byte buffer"))
        })?;
        crate::store::pread_full(self.fd.as_raw_fd(), dst, 0)
            .map_err(|e| GpuError::Zerocopy(format!("read of handle {}: {e}", self.handle)))
    }

    /// Unregisters, unmaps, then releases the daemon's handle.
    pub fn close(mut self, client: &Client) -> Result<(), GpuError> {
        drop(self.dma.take());
        let handle = self.handle;
        drop(self);
        client.close(handle).map_err(zc_err("close"))
    }
}
