//! What the daemon counts and how it is exported: counters shared by the
//! filesystem core and the FUSE adapter, latency histograms per FUSE
//! operation, errors by errno, and tier gauges; rendered as Prometheus text
//! at `<mount>/.kvfs/stats` and, with `--metrics-addr`, over HTTP.
//!
//! Reads and writes that pass through to a backing file never reach the
//! daemon, so byte counters cover only what the daemon itself moved;
//! `sealed_bytes` counts what writers stored.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::HostUsage;

/// Monotonic event counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Lookups that found a regular file.
    pub hits: Counter,
    /// Lookups of names that do not exist.
    pub misses: Counter,
    pub creates: Counter,
    /// Opens of regular files, creates included.
    pub opens: Counter,
    /// Files whose last writer closed, and their sizes then.
    pub sealed_files: Counter,
    pub sealed_bytes: Counter,
    /// Bytes moved by the daemon's own read/write handlers (fallback path).
    pub daemon_read_bytes: Counter,
    pub daemon_write_bytes: Counter,
    /// Opens answered with passthrough, and those the daemon serves.
    pub passthrough_opens: Counter,
    pub fallback_opens: Counter,
    /// Files (or lower-tier copies) dropped to make room.
    pub evictions: Counter,
    /// Files copied back into the host tier (from NVMe or S3) on open.
    pub promotions: Counter,
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
    pub promotions: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            hits: self.hits.get(),
            misses: self.misses.get(),
            creates: self.creates.get(),
            opens: self.opens.get(),
            sealed_files: self.sealed_files.get(),
            sealed_bytes: self.sealed_bytes.get(),
            daemon_read_bytes: self.daemon_read_bytes.get(),
            daemon_write_bytes: self.daemon_write_bytes.get(),
            passthrough_opens: self.passthrough_opens.get(),
            fallback_opens: self.fallback_opens.get(),
            promotions: self.promotions.get(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub op: &'static str,
    pub errno: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// One kind of I/O of a tier below the host tier: `nvme` `write` (a
/// write-back) or `read` (a promotion); `s3` `put` (an upload), `get` (a
/// fetch) or `lookup` (HEAD and LIST of a name no local tier has).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierOpLabel {
    pub tier: &'static str,
    pub op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 us to ~10 s: metadata ops take microseconds, a fallback read of a
    // whole block tens of milliseconds.
    Histogram::new(exponential_buckets(10e-6, 4.0, 11))
}

type Gauges = Family<TierLabel, Gauge<i64, std::sync::atomic::AtomicI64>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: &'static str,
}

type QueueGauges = Family<QueueLabel, Gauge<i64, std::sync::atomic::AtomicI64>>;

/// The tiers below the host tier, as of now (absent tiers are `None`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LowerUsage {
    /// NVMe (capacity, used, files).
    pub nvme: Option<(u64, u64, u64)>,
    /// Write-backs to NVMe queued or running.
    pub flush_queue: Option<u64>,
    /// S3 jobs queued or running.
    pub upload_queue: Option<u64>,
    /// Whether S3 answered its last request.
    pub s3_up: Option<bool>,
}

/// Everything the daemon exports.
pub struct Metrics {
    pub counters: Counters,
    pub op_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub errors: Family<ErrorLabel, Counter>,
    tier_seconds: Family<TierOpLabel, Histogram, fn() -> Histogram>,
    tier_bytes: Family<TierOpLabel, Counter>,
    tier_errors: Family<TierOpLabel, Counter>,
    capacity: Gauges,
    used: Gauges,
    files: Gauges,
    locked: Gauges,
    queues: QueueGauges,
    up: Gauges,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kvfs");
        let counters = Counters::default();
        let c = &counters;
        for (name, help, counter) in [
            ("lookup_hits", "Lookups that found a regular file", &c.hits),
            (
                "lookup_misses",
                "Lookups of names that do not exist",
                &c.misses,
            ),
            ("creates", "Files created", &c.creates),
            (
                "opens",
                "Opens of regular files, creates included",
                &c.opens,
            ),
            (
                "passthrough_opens",
                "Opens answered with FUSE passthrough",
                &c.passthrough_opens,
            ),
            (
                "fallback_opens",
                "Opens served by the daemon's own handlers",
                &c.fallback_opens,
            ),
            (
                "sealed_files",
                "Files whose last writer closed",
                &c.sealed_files,
            ),
            (
                "sealed_bytes",
                "Bytes of files when their last writer closed",
                &c.sealed_bytes,
            ),
            (
                "daemon_read_bytes",
                "Bytes read through the daemon (fallback path)",
                &c.daemon_read_bytes,
            ),
            (
                "daemon_write_bytes",
                "Bytes written through the daemon (fallback path)",
                &c.daemon_write_bytes,
            ),
            (
                "evictions",
                "Files dropped from a tier to make room",
                &c.evictions,
            ),
            (
                "promotions",
                "Files copied back into the host tier from NVMe or S3",
                &c.promotions,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        let op_seconds: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "fuse_op_seconds",
            "Time the daemon spent on each FUSE request, by operation",
            op_seconds.clone(),
        );
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "fuse_errors",
            "FUSE requests answered with an error, by operation and errno",
            errors.clone(),
        );
        let tier_seconds: Family<TierOpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "tier_io_seconds",
            "Time of each I/O of the NVMe and S3 tiers, by tier and operation \
             (nvme write/read, s3 put/get/lookup)",
            tier_seconds.clone(),
        );
        let tier_bytes = Family::<TierOpLabel, Counter>::default();
        registry.register(
            "tier_io_bytes",
            "Bytes moved by the NVMe and S3 tiers, by tier and operation",
            tier_bytes.clone(),
        );
        let tier_errors = Family::<TierOpLabel, Counter>::default();
        registry.register(
            "tier_io_errors",
            "Failed I/O of the NVMe and S3 tiers, by tier and operation",
            tier_errors.clone(),
        );
        let gauges = |registry: &mut Registry, name, help| {
            let g = Gauges::default();
            registry.register(name, help, g.clone());
            g
        };
        let capacity = gauges(
            &mut registry,
            "tier_capacity_bytes",
            "Capacity of each tier",
        );
        let used = gauges(
            &mut registry,
            "tier_used_bytes",
            "Bytes allocated in each tier",
        );
        let files = gauges(&mut registry, "tier_files", "Files held by each tier");
        let locked = gauges(
            &mut registry,
            "tier_locked_bytes",
            "Page-locked bytes of each tier",
        );
        let queues = QueueGauges::default();
        registry.register(
            "queue_jobs",
            "Background jobs queued or running: flush (to NVMe), upload (S3 jobs)",
            queues.clone(),
        );
        let up = gauges(
            &mut registry,
            "tier_up",
            "1 if the tier answered its last request (S3), else 0",
        );
        Metrics {
            counters,
            op_seconds,
            errors,
            tier_seconds,
            tier_bytes,
            tier_errors,
            capacity,
            used,
            files,
            locked,
            queues,
            up,
            registry,
        }
    }

    /// Times one FUSE request until the returned guard drops.
    pub fn time(&self, op: &'static str) -> OpTimer<'_> {
        OpTimer {
            metrics: self,
            op,
            start: Instant::now(),
        }
    }

    /// Records one I/O of a lower tier that began at `start`: its time, and
    /// its bytes if it succeeded (`Some`), else an error.
    pub fn tier_io(
        &self,
        tier: &'static str,
        op: &'static str,
        start: Instant,
        bytes: Option<u64>,
    ) {
        let label = TierOpLabel { tier, op };
        self.tier_seconds
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
        match bytes {
            Some(n) => self.tier_bytes.get_or_create(&label).inc_by(n),
            None => self.tier_errors.get_or_create(&label).inc(),
        };
    }

    pub fn error(&self, op: &'static str, errno: i32) {
        self.errors.get_or_create(&ErrorLabel { op, errno }).inc();
    }

    /// Prometheus text exposition, with the tier gauges as of now.
    pub fn render(&self, host: &HostUsage, lower: &LowerUsage) -> String {
        let set = |g: &Gauges, tier: &'static str, v: u64| {
            g.get_or_create(&TierLabel { tier })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.capacity, "host", host.capacity);
        set(&self.used, "host", host.used);
        set(&self.files, "host", host.files);
        set(&self.locked, "host", host.locked_bytes);
        if let Some((capacity, used, files)) = lower.nvme {
            set(&self.capacity, "nvme", capacity);
            set(&self.used, "nvme", used);
            set(&self.files, "nvme", files);
        }
        let queue = |queue: &'static str, v: u64| {
            self.queues
                .get_or_create(&QueueLabel { queue })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        if let Some(n) = lower.flush_queue {
            queue("flush", n);
        }
        if let Some(n) = lower.upload_queue {
            queue("upload", n);
        }
        if let Some(up) = lower.s3_up {
            set(&self.up, "s3", u64::from(up));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub struct OpTimer<'a> {
    metrics: &'a Metrics,
    op: &'static str,
    start: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .op_seconds
            .get_or_create(&OpLabel { op: self.op })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Serves `render()` over HTTP at `addr` (`GET /metrics`, or any path) from
/// a thread of its own. Binding happens here, so a taken or bad address
/// fails the mount instead of a background thread.
pub fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("kvfs-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &*render) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
        })?;
    Ok(bound)
}

/// Bytes of request line and headers read at most: a scraper sends a few
/// hundred; anything longer is refused rather than buffered.
const MAX_REQUEST_HEAD: u64 = 16 << 10;
/// Bytes of a refused request read and dropped before closing.
const MAX_DRAIN: u64 = 4 << 20;
/// Time a client gets to send its request, however slowly it trickles.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Reads one request (headers only) and answers it; scrapers send nothing
/// else. A slow, silent or oversized request is cut off: the server has one
/// thread, and a client must not hold it or its memory.
fn answer(stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut reader = BufReader::new(stream.try_clone()?.take(MAX_REQUEST_HEAD));
    let mut read_line = |buf: &mut Vec<u8>| -> std::io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        reader.read_until(b'\n', buf)
    };
    let mut line = Vec::new();
    read_line(&mut line)?;
    let is_get = line.starts_with(b"GET ");
    let mut complete = line.ends_with(b"\n");
    while complete {
        let mut header = Vec::new();
        let n = read_line(&mut header)?;
        if header == b"\r\n" || header == b"\n" {
            break;
        }
        complete = n > 0 && header.ends_with(b"\n");
    }
    let (status, body) = if !complete {
        (
            "431 Request Header Fields Too Large",
            format!("request head over {MAX_REQUEST_HEAD} bytes or cut short\n"),
        )
    } else if is_get {
        ("200 OK", render())
    } else {
        ("405 Method Not Allowed", "only GET\n".to_string())
    };
    let mut stream = stream;
    // One write: a client whose request was refused may reset the
    // connection at the first byte it gets.
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    if !complete {
        // Closing with the client's bytes unread would reset the
        // connection and drop the answer: read some of them first
        // (bounded in bytes and time).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            stream.set_read_timeout(Some(left.min(Duration::from_secs(1))))?;
            let _ = std::io::copy(&mut (&stream).take(MAX_DRAIN), &mut std::io::sink());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> HostUsage {
        HostUsage {
            capacity: 1000,
            used: 10,
            files: 2,
            locked_bytes: 0,
            locking: false,
            lock_policy: "off".into(),
            evictions: 0,
            spare_bytes: 0,
            spares_reused: 0,
            huge_pages: false,
        }
    }

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.counters.hits.inc();
        m.counters.sealed_bytes.inc_by(4096);
        drop(m.time("lookup"));
        m.error("lookup", libc::ENOENT);
        let lower = LowerUsage {
            nvme: Some((5000, 300, 3)),
            flush_queue: Some(2),
            upload_queue: Some(7),
            s3_up: Some(false),
        };
        let text = m.render(&usage(), &lower);
        for want in [
            "kvfs_tier_capacity_bytes{tier=\"nvme\"} 5000",
            "kvfs_tier_used_bytes{tier=\"nvme\"} 300",
            "kvfs_queue_jobs{queue=\"flush\"} 2",
            "kvfs_queue_jobs{queue=\"upload\"} 7",
            "kvfs_tier_up{tier=\"s3\"} 0",
            "kvfs_lookup_hits_total 1",
            "kvfs_sealed_bytes_total 4096",
            "kvfs_fuse_op_seconds_count{op=\"lookup\"} 1",
            "kvfs_fuse_errors_total{op=\"lookup\",errno=\"2\"} 1",
            "kvfs_tier_capacity_bytes{tier=\"host\"} 1000",
            "kvfs_tier_files{tier=\"host\"} 2",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn serves_http() {
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "x 1\n".to_string());
        let addr = serve("127.0.0.1:0".parse().unwrap(), render).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("\r\n\r\nx 1\n"), "{out}");
    }

    /// Hostile requests get an error answer or a closed connection, never
    /// the server's memory or its thread: it answers a scrape after them.
    #[test]
    fn bad_requests_leave_the_server_serving() {
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "x 1\n".to_string());
        let addr = serve("127.0.0.1:0".parse().unwrap(), render).unwrap();
        let ask = |req: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            // The server may answer and close before reading it all.
            let _ = s.write_all(req);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        };
        // Refused: a 431, or a reset when the server closes with the
        // client's bytes still unread (either way not buffered, not served).
        let refused = |out: String| out.is_empty() || out.starts_with("HTTP/1.1 431");
        let huge = [b"GET /".as_slice(), &vec![b'a'; 1 << 20]].concat();
        let out = ask(&huge);
        assert!(refused(out.clone()), "{out:?}");
        let many = [
            b"GET / HTTP/1.1\r\n".as_slice(),
            &b"X: y\r\n".repeat(10_000),
        ]
        .concat();
        assert!(refused(ask(&many)));
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let out = ask(&garbage);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 4"), "{out}");
        assert!(ask(b"POST / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(ask(b"GET / HTTP/1.1\r\n").starts_with("HTTP/1.1 431"));
        drop(TcpStream::connect(addr).unwrap());
        assert!(ask(b"GET /metrics HTTP/1.1\r\n\r\n").ends_with("x 1\n"));
    }
}
