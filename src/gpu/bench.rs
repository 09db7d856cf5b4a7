//! `kvfs gpu bench`: a synthetic paged KV cache on the GPU, stored to and
//! loaded back from kvfs through each path, every byte verified, with the
//! raw pinned copy bandwidth of the same run as the yardstick.
//!
//! Order of a run: raw D2H/H2D copies and the scatter-only pass (they
//! overwrite the cache, so they go first), fill the cache with the pattern,
//! the gather-only pass, then per path: store N blocks, zero the cache, load
//! them back, verify. The gds path loads the files the fuse path stored,
//! from the NVMe tier's directory, once the daemon has flushed them there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::config::parse_size;
use crate::zerocopy::Client;

use super::GpuError;
use super::cuda::{Buf, Context, DeviceMem, Dir, PinnedMem, Stream};
use super::layout::{CacheGeometry, CopyMode, Dma, Dtype, KvShape, plan};
use super::staging::{StagingPool, buffers_for};
use super::{fileio, gds, pattern, zc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathSel {
    Fuse,
    Zerocopy,
    Gds,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZcMode {
    Register,
    Copy,
}

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The kvfs mount point (fuse, zerocopy; gds stores through it too).
    #[arg(long)]
    pub mount: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub layers: u64,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u64,
    #[arg(long, default_value_t = 128)]
    pub head_dim: u64,
    /// bf16, fp16 or fp8.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 16)]
    pub gpu_block_tokens: u64,
    #[arg(long, default_value_t = 256)]
    pub file_block_tokens: u64,
    /// File blocks to store and load.
    #[arg(long, default_value_t = 64)]
    pub blocks: u64,
    /// I/O threads, each with its own CUDA stream.
    #[arg(long, default_value_t = 16)]
    pub threads: usize,
    /// Pinned staging memory for the fuse path (whole file blocks).
    #[arg(long, default_value = "1GiB")]
    pub staging_memory: String,
    #[arg(long, value_enum, default_value = "all")]
    pub path: PathSel,
    /// Also run the fuse-path client against this plain directory.
    #[arg(long)]
    pub baseline_dir: Option<PathBuf>,
    /// The kvfs NVMe directory (`--nvme-dir` of the mount) for the gds path.
    #[arg(long)]
    pub gds_dir: Option<PathBuf>,
    /// Path to libcufile.so.0 if the loader cannot find it.
    #[arg(long)]
    pub cufile_lib: Option<PathBuf>,
    /// How long the gds path waits for the daemon to flush files to NVMe.
    #[arg(long, default_value_t = 120)]
    pub flush_timeout_s: u64,
    /// chunk, run, 2d or 3d: how a file block is cut into DMAs.
    #[arg(long, default_value = "3d")]
    pub copy_mode: String,
    /// Scatter each file block over random GPU blocks (as a running engine's
    /// allocator does) instead of consecutive ones.
    #[arg(long)]
    pub shuffle: bool,
    /// Zero-copy slots kept allocated, mapped and registered ahead of the
    /// I/O threads; 0 does all of that on the I/O thread.
    #[arg(long, default_value_t = 32)]
    pub zc_prefetch: usize,
    /// Background threads preparing zero-copy slots. Few: registrations
    /// from many threads at once contend in the driver (H100 machine, cold
    /// slots: 2 threads 33 GB/s, 8 threads 1.2, 16 I/O threads 2.4).
    #[arg(long, default_value_t = 2)]
    pub zc_prefetch_threads: usize,
    /// register: DMA straight into the registered mapping; copy: no mapping,
    /// pwrite/pread between pinned staging and the slot's descriptor.
    #[arg(long, value_enum, default_value = "register")]
    pub zc_mode: ZcMode,
    /// Register mode: registered mappings kept for reuse, by inode (the
    /// daemon hands dropped block files out again as slots); 0 registers
    /// every slot and load anew.
    #[arg(long, default_value = "16GiB")]
    pub zc_cache: String,
    /// Zero-copy rounds on one mount: store, load, delete. Later rounds get
    /// the memory of the earlier ones back (steady state).
    #[arg(long, default_value_t = 1)]
    pub zc_rounds: u32,
    #[arg(long, default_value_t = 0)]
    pub device: i32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Leave the stored files in place.
    #[arg(long)]
    pub keep: bool,
}

/// One row of results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub path: String,
    pub op: &'static str,
    pub target: String,
    pub blocks: u64,
    pub block_bytes: u64,
    pub threads: usize,
    pub copy_mode: CopyMode,
    pub secs: f64,
    pub gbps: f64,
    /// Raw pinned cuMemcpy bandwidth in the same direction, this run.
    pub raw_gbps: f64,
    pub ratio: f64,
    /// None where the op moves no cache bytes back to check (raw, store).
    pub verified: Option<bool>,
    /// Mean per block, milliseconds, summed over threads / blocks.
    pub dma_ms: f64,
    pub io_ms: f64,
    pub prep_ms: f64,
    pub skipped: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Default, Clone, Copy)]
struct Times {
    dma: Duration,
    io: Duration,
    prep: Duration,
}

impl Times {
    fn add(&mut self, o: Times) {
        self.dma += o.dma;
        self.io += o.io;
        self.prep += o.prep;
    }
}

struct Bench<'a> {
    args: &'a BenchArgs,
    ctx: Arc<Context>,
    geom: CacheGeometry,
    cache: DeviceMem,
    plans: Vec<Vec<Dma>>,
    all_blocks: Vec<u64>,
    file_bytes: u64,
    mode: CopyMode,
    raw_d2h: f64,
    raw_h2d: f64,
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// GPU block ids of each file block: consecutive, or a seeded permutation.
pub fn assign_blocks(files: u64, per_file: u64, shuffle: bool, seed: u64) -> Vec<Vec<u64>> {
    let mut ids: Vec<u64> = (0..files * per_file).collect();
    if shuffle {
        fastrand::Rng::with_seed(seed).shuffle(&mut ids);
    }
    ids.chunks(per_file.max(1) as usize)
        .map(<[u64]>::to_vec)
        .collect()
}

/// Runs `f` over `0..n` items split into contiguous ranges across `threads`.
fn par_for(n: usize, threads: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (lo, hi) = (t * per, ((t + 1) * per).min(n));
            if lo < hi {
                let f = &f;
                s.spawn(move || f(lo..hi));
            }
        }
    });
}

impl Bench<'_> {
    fn result(
        &self,
        path: &str,
        op: &'static str,
        target: &str,
        d: Duration,
        t: Times,
    ) -> BenchResult {
        let bytes = self.args.blocks * self.file_bytes;
        let g = gbps(bytes, d);
        let raw = if op == "store" {
            self.raw_d2h
        } else {
            self.raw_h2d
        };
        let per = |x: Duration| x.as_secs_f64() * 1e3 / self.args.blocks.max(1) as f64;
        BenchResult {
            path: path.into(),
            op,
            target: target.into(),
            blocks: self.args.blocks,
            block_bytes: self.file_bytes,
            threads: self.args.threads,
            copy_mode: self.mode,
            secs: d.as_secs_f64(),
            gbps: g,
            raw_gbps: raw,
            ratio: if raw > 0.0 { g / raw } else { 0.0 },
            verified: None,
            dma_ms: per(t.dma),
            io_ms: per(t.io),
            prep_ms: per(t.prep),
            skipped: None,
            detail: serde_json::Value::Null,
        }
    }

    /// Runs `work` for every file block on `threads` threads, each with its
    /// own stream and per-thread state from `init`; the clock starts once
    /// every thread is ready.
    fn run_blocks<S>(
        &self,
        init: impl Fn() -> Result<S, GpuError> + Sync,
        work: impl Fn(&mut S, &Stream, u64, &mut Times) -> Result<(), GpuError> + Sync,
    ) -> Result<(Duration, Times), GpuError> {
        let threads = self.args.threads.max(1);
        let next = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let ready = Barrier::new(threads + 1);
        let mut start = Instant::now();
        let outcomes: Vec<Result<Times, GpuError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let setup = self
                            .ctx
                            .bind()
                            .and_then(|()| Stream::new(&self.ctx))
                            .and_then(|st| init().map(|state| (st, state)));
                        ready.wait();
                        let (stream, mut state) =
                            setup.inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                        let mut times = Times::default();
                        while !failed.load(Ordering::Relaxed) {
                            let f = next.fetch_add(1, Ordering::Relaxed);
                            if f >= self.args.blocks {
                                break;
                            }
                            if let Err(e) = work(&mut state, &stream, f, &mut times) {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                        Ok(times)
                    })
                })
                .collect();
            ready.wait();
            start = Instant::now();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(GpuError::Usage("an I/O thread panicked".into())))
                })
                .collect()
        });
        let elapsed = start.elapsed();
        let mut total = Times::default();
        for o in outcomes {
            total.add(o?);
        }
        Ok((elapsed, total))
    }

    fn zero_cache(&self) -> Result<(), GpuError> {
        let s = Stream::new(&self.ctx)?;
        s.memset(self.cache.ptr(), 0, self.cache.len())?;
        s.sync()
    }

    fn layer_base(&self, l: u64) -> u64 {
        self.cache.ptr() + l * self.geom.layer_bytes()
    }

    fn fill(&self, host: &mut PinnedMem) -> Result<(), GpuError> {
        let s = Stream::new(&self.ctx)?;
        let chunk = self.geom.shape.chunk_bytes() as usize;
        let per_layer = self.geom.layer_bytes() as usize;
        for l in 0..self.geom.shape.layers {
            let buf = &mut host.as_mut_slice()[..per_layer];
            let base = buf.as_mut_ptr() as usize;
            let n = per_layer / chunk;
            let geom = self.geom;
            let seed = self.args.seed;
            par_for(n, 16, |r| {
                for i in r {
                    // SAFETY: each index owns a disjoint chunk of buf, which
                    // outlives the scoped threads.
                    let c = unsafe {
                        std::slice::from_raw_parts_mut((base + i * chunk) as *mut u8, chunk)
                    };
                    let i = i as u64;
                    pattern::fill_chunk(
                        &geom,
                        seed,
                        l,
                        i / geom.num_gpu_blocks,
                        i % geom.num_gpu_blocks,
                        c,
                    );
                }
            });
            // SAFETY: host holds per_layer bytes; the layer is in the cache.
            unsafe { s.htod(self.layer_base(l), host.as_ptr(), per_layer as u64)? };
            s.sync()?;
        }
        Ok(())
    }

    fn verify(&self, host: &mut PinnedMem, path: &str) -> Result<(), GpuError> {
        let s = Stream::new(&self.ctx)?;
        let per_layer = self.geom.layer_bytes() as usize;
        for l in 0..self.geom.shape.layers {
            // SAFETY: host holds per_layer bytes.
            unsafe { s.dtoh(host.as_ptr(), self.layer_base(l), per_layer as u64)? };
            s.sync()?;
            let image = &host.as_slice()[..per_layer];
            let bad = std::sync::Mutex::new(None);
            par_for(self.all_blocks.len(), 16, |r| {
                let blocks = &self.all_blocks[r];
                if let Some(b) = pattern::check_layer(&self.geom, self.args.seed, l, image, blocks)
                {
                    *bad.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
                }
            });
            if let Some((kv, gpu_block, offset)) =
                bad.into_inner().unwrap_or_else(|e| e.into_inner())
            {
                return Err(GpuError::Verify {
                    path: path.into(),
                    layer: l,
                    kv: if kv == 0 { "K" } else { "V" },
                    gpu_block,
                    offset,
                });
            }
        }
        Ok(())
    }

    /// Pinned cuMemcpy of the same number of bytes, one stream, large copies.
    fn raw(&self, host: &PinnedMem) -> Result<(f64, f64), GpuError> {
        let s = Stream::new(&self.ctx)?;
        let total = self.args.blocks * self.file_bytes;
        let step = host.len() as u64;
        let run = |dir: Dir| -> Result<f64, GpuError> {
            let t = Instant::now();
            let mut off = 0;
            while off < total {
                let n = step.min(total - off);
                // SAFETY: n <= host.len(); off + n <= the cache's size.
                unsafe {
                    match dir {
                        Dir::ToBuf => s.dtoh(host.as_ptr(), self.cache.ptr() + off, n)?,
                        Dir::ToDevice => s.htod(self.cache.ptr() + off, host.as_ptr(), n)?,
                    }
                }
                off += n;
            }
            s.sync()?;
            Ok(gbps(total, t.elapsed()))
        };
        // A warm-up pass of each, so first-touch costs do not count.
        run(Dir::ToBuf)?;
        run(Dir::ToDevice)?;
        Ok((run(Dir::ToBuf)?, run(Dir::ToDevice)?))
    }

    fn dma_all(&self, s: &Stream, f: u64, buf: Buf, dir: Dir) -> Result<(), GpuError> {
        for d in &self.plans[f as usize] {
            // SAFETY: the plan is within the cache; buf holds a whole file block.
            unsafe { s.dma(d, buf, dir)? };
        }
        s.sync()
    }

    fn gather_only(&self, pool: &StagingPool, dir: Dir) -> Result<(Duration, Times), GpuError> {
        self.run_blocks(
            || Ok(()),
            |_, s, f, t| {
                let buf = pool.acquire();
                let t0 = Instant::now();
                self.dma_all(s, f, Buf::Host(buf.as_ptr()), dir)?;
                t.dma += t0.elapsed();
                Ok(())
            },
        )
    }

    fn fuse_store(
        &self,
        pool: &StagingPool,
        root: &Path,
        direct: bool,
    ) -> Result<(Duration, Times), GpuError> {
        self.run_blocks(
            || Ok(()),
            |_, s, f, t| {
                let buf = pool.acquire();
                let t0 = Instant::now();
                self.dma_all(s, f, Buf::Host(buf.as_ptr()), Dir::ToBuf)?;
                let t1 = Instant::now();
                // SAFETY: buf holds file_bytes bytes for the call.
                unsafe {
                    fileio::store(
                        &block_path(root, f),
                        buf.as_ptr(),
                        self.file_bytes as usize,
                        direct,
                    )?
                };
                t.dma += t1 - t0;
                t.io += t1.elapsed();
                Ok(())
            },
        )
    }

    fn fuse_load(
        &self,
        pool: &StagingPool,
        root: &Path,
        direct: bool,
    ) -> Result<(Duration, Times), GpuError> {
        self.run_blocks(
            || Ok(()),
            |_, s, f, t| {
                let buf = pool.acquire();
                let t0 = Instant::now();
                // SAFETY: buf holds file_bytes bytes for the call.
                unsafe {
                    fileio::load(
                        &block_path(root, f),
                        buf.as_ptr(),
                        self.file_bytes as usize,
                        direct,
                    )?
                };
                let t1 = Instant::now();
                self.dma_all(s, f, Buf::Host(buf.as_ptr()), Dir::ToDevice)?;
                t.io += t1 - t0;
                t.dma += t1.elapsed();
                Ok(())
            },
        )
    }

    fn zc_store(
        &self,
        mount: &Path,
        rel: &str,
        pool: &StagingPool,
        cache: Option<&Arc<zc::RegCache>>,
    ) -> Result<(Duration, Times), GpuError> {
        let pre = (self.args.zc_prefetch > 0).then(|| {
            zc::SlotPrefetcher::start(
                mount.to_path_buf(),
                self.ctx.clone(),
                self.file_bytes,
                self.args.zc_prefetch,
                self.args.zc_prefetch_threads,
                self.args.blocks,
                cache.cloned(),
            )
        });
        let r = self.run_blocks(
            // A connection per I/O thread: one is served one request at a time.
            || zc_connect(mount).map(Arc::new),
            |client, s, f, t| {
                let mut copied = Duration::ZERO;
                let t0 = Instant::now();
                let slot = match &pre {
                    Some(p) => p.take()?,
                    None => {
                        zc::prepare_slot(client, &self.ctx, self.file_bytes, cache.map(|c| &**c))?
                    }
                };
                let t1 = Instant::now();
                let name = format!("{rel}/{}", block_name(f));
                // dma: GPU to host memory; io: the CPU copy of copy mode;
                // prep: slot, commit and retirement.
                let moved = match slot.dma_ptr() {
                    Some(ptr) => self.dma_all(s, f, Buf::Host(ptr), Dir::ToBuf),
                    None => {
                        let buf = pool.acquire();
                        let dma = self.dma_all(s, f, Buf::Host(buf.as_ptr()), Dir::ToBuf);
                        let t = Instant::now();
                        let written = dma.and_then(|()| slot.write(&buf.as_slice()[..slot.len()]));
                        copied += t.elapsed();
                        written
                    }
                };
                let t2 = Instant::now();
                let done = match moved {
                    Ok(()) => slot.commit(&name),
                    Err(e) => {
                        slot.abort();
                        Err(e)
                    }
                };
                match &pre {
                    Some(p) => p.retire(slot),
                    None => slot.retire(),
                }
                t.prep += (t1 - t0) + t2.elapsed();
                t.dma += t2 - t1 - copied;
                t.io += copied;
                done
            },
        );
        if let Some(p) = pre {
            p.finish();
        }
        r
    }

    fn zc_load(
        &self,
        mount: &Path,
        rel: &str,
        pool: &StagingPool,
        cache: Option<&Arc<zc::RegCache>>,
    ) -> Result<(Duration, Times), GpuError> {
        self.run_blocks(
            || zc_connect(mount),
            |client, s, f, t| {
                let t0 = Instant::now();
                let name = format!("{rel}/{}", block_name(f));
                let mut copied = Duration::ZERO;
                let file = zc::OpenFile::open(client, &self.ctx, &name, cache.map(|c| &**c))?;
                let t1 = Instant::now();
                let r = if file.size != self.file_bytes {
                    Err(GpuError::Short {
                        op: "zero-copy open",
                        path: PathBuf::from(&name),
                        expected: self.file_bytes,
                        got: file.size,
                    })
                } else if let Some(ptr) = file.dma_ptr() {
                    self.dma_all(s, f, Buf::Host(ptr.cast_mut()), Dir::ToDevice)
                } else {
                    let mut buf = pool.acquire();
                    let t = Instant::now();
                    let read = file.read_into(buf.as_mut_slice());
                    copied = t.elapsed();
                    read.and_then(|()| self.dma_all(s, f, Buf::Host(buf.as_ptr()), Dir::ToDevice))
                };
                let t2 = Instant::now();
                let closed = file.close(client);
                t.prep += (t1 - t0) + t2.elapsed();
                t.dma += t2 - t1 - copied;
                t.io += copied;
                r.and(closed)
            },
        )
    }

    fn gds_load(&self, cufile: &gds::CuFile, root: &Path) -> Result<(Duration, Times), GpuError> {
        self.run_blocks(
            || {
                let staging = DeviceMem::new(&self.ctx, self.file_bytes)?;
                // Unregistered buffers work too, through cuFile's own bounce
                // buffers; registration is an optimisation, so a failure only warns.
                if let Err(e) = cufile.register_buffer(staging.ptr(), self.file_bytes as usize) {
                    tracing::warn!(error = %e, "cuFileBufRegister failed");
                }
                Ok(staging)
            },
            |staging, s, f, t| {
                let t0 = Instant::now();
                cufile.read_file(
                    &block_path(root, f),
                    staging.ptr(),
                    self.file_bytes as usize,
                )?;
                let t1 = Instant::now();
                self.dma_all(s, f, Buf::Device(staging.ptr()), Dir::ToDevice)?;
                t.io += t1 - t0;
                t.dma += t1.elapsed();
                Ok(())
            },
        )
    }
}

fn zc_connect(mount: &Path) -> Result<Client, GpuError> {
    Client::connect(mount).map_err(|e| GpuError::Zerocopy(format!("connect: {e}")))
}

pub fn block_name(f: u64) -> String {
    format!("blk{f:06}.bin")
}

fn block_path(root: &Path, f: u64) -> PathBuf {
    root.join(block_name(f))
}

fn mkdir(p: &Path) -> Result<(), GpuError> {
    std::fs::create_dir_all(p).map_err(|source| GpuError::Io {
        op: "mkdir",
        path: p.to_path_buf(),
        source,
    })
}

/// Waits until the NVMe tier holds a whole copy of every block.
fn wait_flushed(
    root: &Path,
    blocks: u64,
    len: u64,
    timeout: Duration,
) -> Result<Duration, GpuError> {
    let t = Instant::now();
    for f in 0..blocks {
        let p = block_path(root, f);
        loop {
            if std::fs::metadata(&p)
                .map(|m| m.len() == len)
                .unwrap_or(false)
            {
                break;
            }
            if t.elapsed() > timeout {
                return Err(GpuError::Gds(format!(
                    "{} did not reach the NVMe tier within {}s",
                    p.display(),
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(t.elapsed())
}

fn skipped(path: &str, op: &'static str, reason: String) -> BenchResult {
    BenchResult {
        path: path.into(),
        op,
        target: String::new(),
        blocks: 0,
        block_bytes: 0,
        threads: 0,
        copy_mode: CopyMode::Run,
        secs: 0.0,
        gbps: 0.0,
        raw_gbps: 0.0,
        ratio: 0.0,
        verified: None,
        dma_ms: 0.0,
        io_ms: 0.0,
        prep_ms: 0.0,
        skipped: Some(reason),
        detail: serde_json::Value::Null,
    }
}

/// Runs the benchmark, writing one JSON line per result to `out` as it
/// comes, then a table. Returns the results.
pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<Vec<BenchResult>, GpuError> {
    let dtype: Dtype = args.dtype.parse()?;
    let mode: CopyMode = args.copy_mode.parse().map_err(GpuError::Usage)?;
    let shape = KvShape::new(
        args.layers,
        args.kv_heads,
        args.head_dim,
        dtype,
        args.gpu_block_tokens,
        args.file_block_tokens,
    )?;
    if args.blocks == 0 || args.threads == 0 {
        return Err(GpuError::Usage(
            "--blocks and --threads must be at least 1".into(),
        ));
    }
    let staging = parse_size(&args.staging_memory).map_err(|e| GpuError::Usage(e.to_string()))?;
    let file_bytes = shape.file_bytes();
    let n_staging = buffers_for(staging, file_bytes)?;
    let want = |p: PathSel| args.path == p || args.path == PathSel::All;
    let mount = args.mount.as_deref();
    if mount.is_none() && (want(PathSel::Fuse) || want(PathSel::Zerocopy) || want(PathSel::Gds)) {
        return Err(GpuError::Usage(
            "--mount is required for the fuse, zerocopy and gds paths".into(),
        ));
    }
    if want(PathSel::Gds) && args.path == PathSel::Gds && args.gds_dir.is_none() {
        return Err(GpuError::Usage(
            "--gds-dir (the mount's NVMe directory) is required for --path gds".into(),
        ));
    }

    let ctx = Context::new(args.device)?;
    let bpf = shape.gpu_blocks_per_file();
    let geom = CacheGeometry::new(shape, args.blocks * bpf)?;
    let cache_bytes = geom.layer_bytes() * shape.layers;
    let (free, _) = ctx.mem_info()?;
    let gds_extra = if want(PathSel::Gds) {
        args.threads as u64 * file_bytes
    } else {
        0
    };
    if cache_bytes + gds_extra + (256 << 20) > free {
        return Err(GpuError::Usage(format!(
            "the cache ({cache_bytes} bytes) does not fit in the GPU's {free} free bytes: use fewer --blocks"
        )));
    }
    let cache = DeviceMem::new(&ctx, cache_bytes)?;
    let bases: Vec<u64> = (0..shape.layers)
        .map(|l| cache.ptr() + l * geom.layer_bytes())
        .collect();
    let ids = assign_blocks(args.blocks, bpf, args.shuffle, args.seed);
    let plans = ids
        .iter()
        .map(|ids| plan(&geom, &bases, ids, mode))
        .collect::<Result<Vec<_>, _>>()?;
    let mut all_blocks: Vec<u64> = ids.concat();
    all_blocks.sort_unstable();
    let mut bench = Bench {
        args,
        ctx: ctx.clone(),
        geom,
        cache,
        plans,
        all_blocks,
        file_bytes,
        mode,
        raw_d2h: 0.0,
        raw_h2d: 0.0,
    };
    let mut results = Vec::new();
    let emit = |r: BenchResult, out: &mut dyn Write, results: &mut Vec<BenchResult>| {
        if let Ok(line) = serde_json::to_string(&r) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        results.push(r);
    };

    // The host image used for fill, verify and the raw copies: one layer,
    // at least 256 MiB so the raw copies are large.
    let mut host = PinnedMem::new(&ctx, (geom.layer_bytes() as usize).max(256 << 20))?;
    let (d2h, h2d) = bench.raw(&host)?;
    bench.raw_d2h = d2h;
    bench.raw_h2d = h2d;
    let pool = StagingPool::new(&ctx, n_staging, file_bytes as usize)?;
    let raw_row = |op: &'static str, g: f64| {
        let mut r = bench.result(
            "raw-pinned",
            op,
            "cuMemcpy",
            Duration::from_secs_f64(0.0),
            Times::default(),
        );
        r.gbps = g;
        r.ratio = 1.0;
        r.secs = (args.blocks * file_bytes) as f64 / (g * 1e9);
        r
    };
    emit(raw_row("store", d2h), out, &mut results);
    emit(raw_row("load", h2d), out, &mut results);
    let (d, t) = bench.gather_only(&pool, Dir::ToDevice)?;
    let mut r = bench.result("gpu-only", "load", "pinned staging, no I/O", d, t);
    r.detail = serde_json::json!({"staging_buffers": pool.count()});
    emit(r, out, &mut results);

    bench.fill(&mut host)?;
    let (d, t) = bench.gather_only(&pool, Dir::ToBuf)?;
    let mut r = bench.result("gpu-only", "store", "pinned staging, no I/O", d, t);
    r.detail = serde_json::json!({"staging_buffers": pool.count()});
    emit(r, out, &mut results);

    let run_id = format!("kvfs-gpu-bench-{:08x}", fastrand::u32(..));
    // Set when a failed load left the cache half overwritten.
    let mut cache_dirty = false;
    let mut cleanup: Vec<PathBuf> = Vec::new();

    // The fuse-path client against a plain directory and against the mount.
    let mut targets: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(b) = &args.baseline_dir {
        targets.push(("baseline", b.clone()));
    }
    if let Some(m) = mount
        && (want(PathSel::Fuse) || want(PathSel::Gds))
    {
        targets.push(("fuse", m.to_path_buf()));
    }
    for (label, dir) in targets {
        let root = dir.join(&run_id).join("fuse");
        mkdir(&root)?;
        cleanup.push(dir.join(&run_id));
        let direct = fileio::direct_ok(&root, true, file_bytes);
        let (d, t) = bench.fuse_store(&pool, &root, direct)?;
        let mut r = bench.result(label, "store", &dir.display().to_string(), d, t);
        r.detail = serde_json::json!({"o_direct": direct, "staging_buffers": pool.count()});
        emit(r, out, &mut results);
        bench.zero_cache()?;
        let (d, t) = bench.fuse_load(&pool, &root, direct)?;
        bench.verify(&mut host, label)?;
        let mut r = bench.result(label, "load", &dir.display().to_string(), d, t);
        r.verified = Some(true);
        r.detail = serde_json::json!({"o_direct": direct, "staging_buffers": pool.count()});
        emit(r, out, &mut results);

        if label == "fuse" && want(PathSel::Gds) {
            match &args.gds_dir {
                None => emit(
                    skipped("gds", "load", "no --gds-dir given".into()),
                    out,
                    &mut results,
                ),
                Some(g) => match gds::CuFile::load(args.cufile_lib.as_deref()) {
                    Err(e) => emit(skipped("gds", "load", e.to_string()), out, &mut results),
                    Ok(cufile) => {
                        let mode = cufile.mode();
                        let groot = gds::data_root(g).join(&run_id).join("fuse");
                        let attempt = (|| {
                            let waited = wait_flushed(
                                &groot,
                                args.blocks,
                                file_bytes,
                                Duration::from_secs(args.flush_timeout_s),
                            )?;
                            bench.zero_cache()?;
                            let (d, t) = bench.gds_load(&cufile, &groot)?;
                            bench.verify(&mut host, "gds")?;
                            Ok::<_, GpuError>((waited, d, t))
                        })();
                        let r = match attempt {
                            Ok((waited, d, t)) => {
                                let mut r =
                                    bench.result("gds", "load", &groot.display().to_string(), d, t);
                                r.verified = Some(true);
                                r.detail = serde_json::json!({
                                    "cufile": mode,
                                    "library": cufile.loaded_from,
                                    "flush_wait_s": waited.as_secs_f64(),
                                });
                                r
                            }
                            // With every path asked for, one that cannot run
                            // here is reported and the others still run.
                            Err(e) if args.path == PathSel::All => {
                                cache_dirty = true;
                                let mut r = skipped("gds", "load", format!("failed: {e}"));
                                r.detail = serde_json::json!({ "cufile": mode });
                                r
                            }
                            Err(e) => return Err(e),
                        };
                        emit(r, out, &mut results);
                    }
                },
            }
        }
    }

    if let Some(m) = mount
        && want(PathSel::Zerocopy)
    {
        match Client::connect(m) {
            Err(e) => emit(
                skipped(
                    "zerocopy",
                    "store",
                    format!("cannot connect to the daemon: {e}"),
                ),
                out,
                &mut results,
            ),
            Ok(_) => {
                let rel = format!("{run_id}/zerocopy");
                cleanup.push(m.join(&run_id));
                let cache = match args.zc_mode {
                    ZcMode::Copy => None,
                    ZcMode::Register => Some(Arc::new(zc::RegCache::new(
                        parse_size(&args.zc_cache).map_err(|e| GpuError::Usage(e.to_string()))?,
                    ))),
                };
                for round in 1..=args.zc_rounds.max(1) {
                    if round > 1 {
                        // Deleted through the mount, as an engine drops blocks.
                        std::fs::remove_dir_all(m.join(&rel)).map_err(|source| GpuError::Io {
                            op: "remove",
                            path: m.join(&rel),
                            source,
                        })?;
                    }
                    mkdir(&m.join(&rel))?;
                    let target = match args.zc_rounds {
                        0 | 1 => m.display().to_string(),
                        _ => format!("{} (round {round})", m.display()),
                    };
                    let detail = |cache: Option<&Arc<zc::RegCache>>| {
                        serde_json::json!({
                            "mode": args.zc_mode,
                            "prefetch": args.zc_prefetch,
                            "prefetch_threads": args.zc_prefetch_threads,
                            "round": round,
                            "registered_bytes": cache.map(|c| c.bytes()),
                        })
                    };
                    // Every earlier load that succeeded ended verified, so the
                    // cache holds the pattern unless one failed midway.
                    if cache_dirty {
                        bench.fill(&mut host)?;
                    }
                    let (d, t) = bench.zc_store(m, &rel, &pool, cache.as_ref())?;
                    let mut r = bench.result("zerocopy", "store", &target, d, t);
                    r.detail = detail(cache.as_ref());
                    emit(r, out, &mut results);
                    bench.zero_cache()?;
                    let (d, t) = bench.zc_load(m, &rel, &pool, cache.as_ref())?;
                    bench.verify(&mut host, "zerocopy")?;
                    let mut r = bench.result("zerocopy", "load", &target, d, t);
                    r.verified = Some(true);
                    r.detail = detail(cache.as_ref());
                    emit(r, out, &mut results);
                }
            }
        }
    }

    if !args.keep {
        cleanup.sort();
        cleanup.dedup();
        for p in cleanup {
            if let Err(e) = std::fs::remove_dir_all(&p) {
                tracing::warn!(path = %p.display(), error = %e, "cleanup failed");
            }
        }
    }
    let _ = write_table(out, &results);
    Ok(results)
}

fn write_table(out: &mut dyn Write, rows: &[BenchResult]) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:<11} {:<6} {:>9} {:>9} {:>6} {:>8} {:>8} {:>8}  target",
        "path", "op", "GB/s", "raw GB/s", "ratio", "dma ms", "io ms", "prep ms"
    )?;
    for r in rows {
        if let Some(why) = &r.skipped {
            writeln!(out, "{:<11} {:<6} skipped: {why}", r.path, r.op)?;
            continue;
        }
        writeln!(
            out,
            "{:<11} {:<6} {:>9.2} {:>9.2} {:>6.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            r.path, r.op, r.gbps, r.raw_gbps, r.ratio, r.dma_ms, r.io_ms, r.prep_ms, r.target
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_a_permutation() {
        let plain = assign_blocks(4, 3, false, 1);
        assert_eq!(
            plain,
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9, 10, 11]]
        );
        let shuffled = assign_blocks(4, 3, true, 1);
        assert_ne!(shuffled, plain);
        let mut all = shuffled.concat();
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        assert_eq!(shuffled, assign_blocks(4, 3, true, 1), "seeded");
    }

    #[test]
    fn par_for_covers_every_index_once() {
        let hits: Vec<AtomicU64> = (0..103).map(|_| AtomicU64::new(0)).collect();
        par_for(103, 7, |r| {
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
