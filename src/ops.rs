//! Operator commands that work against a mounted kvfs through its files
//! only: `ls-tier` (which tier holds what), `warm` (make files resident in
//! the host tier) and `drain` (wait until write-back is done).
//!
//! Nothing here prints on its own: output goes to the writers passed in, and
//! progress lines go through [`Progress`].

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::config::format_size;

/// The control directory at the mount's root; never walked.
const CONTROL_DIR: &str = ".kvfs";

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{} is not a kvfs mount (cannot read .kvfs/status: {source})", mount.display())]
    NotMounted { mount: PathBuf, source: io::Error },
    #[error("the status document of {} is not usable: {reason}", mount.display())]
    BadStatus { mount: PathBuf, reason: String },
    #[error("cannot write output: {0}")]
    Output(#[source] io::Error),
}

impl OpsError {
    /// True when the path is not a kvfs mount (a usage error: exit code 2).
    pub fn is_not_mounted(&self) -> bool {
        matches!(self, OpsError::NotMounted { .. })
    }
}

/// A file (or a path given) that could not be handled.
#[derive(Debug)]
pub struct Failure {
    /// Relative to the mount where possible, else as given.
    pub path: PathBuf,
    pub error: io::Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

/// A regular file found by a walk.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// Relative to the mount.
    pub rel: PathBuf,
    pub size: u64,
}

/// Reads and parses `MOUNT/.kvfs/status`.
pub fn read_status(mount: &Path) -> Result<serde_json::Value, OpsError> {
    let mut text = String::new();
    std::fs::File::open(mount.join(CONTROL_DIR).join("status"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|source| OpsError::NotMounted {
            mount: mount.to_path_buf(),
            source,
        })?;
    serde_json::from_str(&text).map_err(|e| OpsError::BadStatus {
        mount: mount.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The path of `p` relative to the mount: a relative `p` is taken as
/// relative to the mount, an absolute one must lie inside it.
fn relative_to_mount(mount: &Path, p: &Path) -> io::Result<PathBuf> {
    let rel = if p.is_absolute() {
        let stripped = p.strip_prefix(mount).ok().map(Path::to_path_buf);
        match stripped {
            Some(r) => r,
            None => {
                let canon = std::fs::canonicalize(mount)?;
                p.strip_prefix(&canon)
                    .map(Path::to_path_buf)
                    .map_err(|_| io::Error::other("not inside the mount"))?
            }
        }
    } else {
        p.to_path_buf()
    };
    // Keep only normal components ("./a" is "a"); refuse to leave the mount.
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(io::Error::other("not inside the mount")),
        }
    }
    Ok(out)
}

fn is_control(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(CONTROL_DIR.as_ref()))
}

/// Walks `paths` (relative to the mount, or absolute inside it; the whole
/// mount when empty) and calls `visit` for every regular file, in name
/// order, directories recursively. `.kvfs` and symlinks are skipped. A path
/// given that cannot be read is a failure; a name that a directory listed
/// and that is gone by the time it is looked at (an eviction) is skipped.
pub fn walk(
    mount: &Path,
    paths: &[PathBuf],
    visit: &mut dyn FnMut(FileInfo) -> Result<(), OpsError>,
    failures: &mut Vec<Failure>,
) -> Result<(), OpsError> {
    let roots: Vec<PathBuf> = if paths.is_empty() {
        vec![PathBuf::new()]
    } else {
        paths.to_vec()
    };
    for given in &roots {
        let rel = match relative_to_mount(mount, given) {
            Ok(r) => r,
            Err(error) => {
                failures.push(Failure {
                    path: given.clone(),
                    error,
                });
                continue;
            }
        };
        if is_control(&rel) {
            continue;
        }
        match std::fs::symlink_metadata(mount.join(&rel)) {
            Ok(md) if md.is_dir() => walk_dir(mount, &rel, visit, failures)?,
            Ok(md) if md.is_file() => visit(FileInfo {
                rel,
                size: md.len(),
            })?,
            Ok(_) => {}
            Err(error) => failures.push(Failure { path: rel, error }),
        }
    }
    Ok(())
}

fn walk_dir(
    mount: &Path,
    rel: &Path,
    visit: &mut dyn FnMut(FileInfo) -> Result<(), OpsError>,
    failures: &mut Vec<Failure>,
) -> Result<(), OpsError> {
    let entries = match std::fs::read_dir(mount.join(rel)) {
        Ok(rd) => rd,
        Err(error) => {
            failures.push(Failure {
                path: rel.to_path_buf(),
                error,
            });
            return Ok(());
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => names.push(e.file_name()),
            Err(error) => {
                failures.push(Failure {
                    path: rel.to_path_buf(),
                    error,
                });
                return Ok(());
            }
        }
    }
    names.sort();
    for name in names {
        let child = rel.join(&name);
        if is_control(&child) {
            continue;
        }
        match std::fs::symlink_metadata(mount.join(&child)) {
            Ok(md) if md.is_dir() => walk_dir(mount, &child, visit, failures)?,
            Ok(md) if md.is_file() => visit(FileInfo {
                rel: child,
                size: md.len(),
            })?,
            Ok(_) => {}
            // Evicted since the listing: a cache miss, not a failure.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => failures.push(Failure { path: child, error }),
        }
    }
    Ok(())
}

/// The tiers holding a file, from its `user.kvfs.tier` xattr (e.g.
/// `["host", "nvme"]`).
pub fn tiers_of(path: &Path) -> io::Result<Vec<String>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let name = c"user.kvfs.tier";
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: valid C strings and a buffer of buf.len() bytes.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            let text = String::from_utf8_lossy(&buf[..n as usize]);
            return Ok(text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && buf.len() < 4096 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(err);
    }
}

/// Files and bytes of one tier combination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub files: u64,
    pub bytes: u64,
}

/// What `ls-tier` found.
#[derive(Debug, Default)]
pub struct LsReport {
    /// Keyed by the tier combination as `user.kvfs.tier` gives it
    /// (`host,nvme`, `nvme`, `s3`, ...; `none` for a file no tier holds).
    pub by_tiers: BTreeMap<String, Tally>,
    pub total: Tally,
    pub failures: Vec<Failure>,
}

fn tier_key(tiers: &[String]) -> String {
    if tiers.is_empty() {
        "none".to_string()
    } else {
        tiers.join(",")
    }
}

/// `kvfs ls-tier`: one line per regular file (`TIERS SIZE PATH`, or a JSON
/// object per file with `json`), then a summary per tier combination.
/// Failures are returned, not printed.
pub fn ls_tier(
    mount: &Path,
    paths: &[PathBuf],
    json: bool,
    out: &mut dyn Write,
) -> Result<LsReport, OpsError> {
    read_status(mount)?;
    let mut report = LsReport::default();
    let mut failures = Vec::new();
    let mut visit = |f: FileInfo| -> Result<(), OpsError> {
        let tiers = match tiers_of(&mount.join(&f.rel)) {
            Ok(t) => t,
            // Evicted between the stat and now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                report.failures.push(Failure { path: f.rel, error });
                return Ok(());
            }
        };
        let key = tier_key(&tiers);
        let t = report.by_tiers.entry(key.clone()).or_default();
        t.files += 1;
        t.bytes += f.size;
        report.total.files += 1;
        report.total.bytes += f.size;
        if json {
            let v = serde_json::json!({
                "path": f.rel.to_string_lossy(),
                "size": f.size,
                "tiers": tiers,
            });
            writeln!(out, "{v}")
        } else {
            writeln!(out, "{key:<12} {:>12} {}", f.size, f.rel.display())
        }
        .map_err(OpsError::Output)
    };
    walk(mount, paths, &mut visit, &mut failures)?;
    report.failures.extend(failures);
    if json {
        let v = serde_json::json!({
            "summary": report.by_tiers,
            "total": report.total,
            "failed": report.failures.len(),
        });
        writeln!(out, "{v}").map_err(OpsError::Output)?;
    } else {
        let line = |out: &mut dyn Write, key: &str, t: &Tally| {
            writeln!(
                out,
                "{key:<12} {:>8} files {:>14} bytes ({})",
                t.files,
                t.bytes,
                format_size(t.bytes)
            )
        };
        (|| {
            writeln!(out)?;
            for (key, t) in &report.by_tiers {
                line(out, key, t)?;
            }
            line(out, "total", &report.total)
        })()
        .map_err(OpsError::Output)?;
    }
    Ok(report)
}

/// A progress line on a terminal (redrawn in place with `\r`) or in a log
/// (one line every `interval`).
pub struct Progress<'a> {
    out: &'a mut dyn Write,
    terminal: bool,
    interval: Duration,
    last: Option<Instant>,
    drawn: usize,
}

impl<'a> Progress<'a> {
    /// How often a line is written when the output is not a terminal.
    pub const LOG_INTERVAL: Duration = Duration::from_secs(5);
    const TERMINAL_INTERVAL: Duration = Duration::from_millis(200);

    pub fn new(out: &'a mut dyn Write, terminal: bool) -> Self {
        Self::with_interval(out, terminal, Self::LOG_INTERVAL)
    }

    /// Like [`Progress::new`], with the interval between lines written to a
    /// non-terminal.
    pub fn with_interval(out: &'a mut dyn Write, terminal: bool, interval: Duration) -> Self {
        Progress {
            out,
            terminal,
            interval,
            last: None,
            drawn: 0,
        }
    }

    /// Shows `line` if it is time to (always when `force`). Write errors
    /// are ignored: progress is a courtesy.
    pub fn update(&mut self, line: &str, force: bool) {
        let every = if self.terminal {
            Self::TERMINAL_INTERVAL
        } else {
            self.interval
        };
        let due = self.last.is_none_or(|t| t.elapsed() >= every);
        if !force && !due {
            return;
        }
        self.last = Some(Instant::now());
        let _ = if self.terminal {
            let pad = self.drawn.saturating_sub(line.chars().count());
            self.drawn = line.chars().count();
            write!(self.out, "\r{line}{:pad$}", "")
        } else {
            writeln!(self.out, "{line}")
        };
        let _ = self.out.flush();
    }

    /// Ends a line drawn in place, so that what follows starts on its own.
    pub fn finish(&mut self) {
        self.last = None;
        if self.terminal && self.drawn > 0 {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.drawn = 0;
        }
    }
}

/// Bytes of files being warmed right now, bounded.
struct InFlight {
    limit: u64,
    bytes: Mutex<u64>,
    freed: Condvar,
}

/// Returns its bytes to the [`InFlight`] budget when dropped.
struct Slot<'a> {
    of: &'a InFlight,
    bytes: u64,
}

impl InFlight {
    fn new(limit: u64) -> Self {
        InFlight {
            limit,
            bytes: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` more fit (or nothing else is in flight).
    fn take(&self, bytes: u64) -> Slot<'_> {
        let mut used = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && used.saturating_add(bytes) > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        Slot { of: self, bytes }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut used = self.of.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.bytes;
        self.of.freed.notify_all();
    }
}

/// What `warm` did.
#[derive(Debug)]
pub struct WarmReport {
    pub files: u64,
    pub bytes: u64,
    pub total_files: u64,
    pub elapsed: Duration,
    pub failures: Vec<Failure>,
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { bytes as f64 / 1e6 / s } else { 0.0 }
}

/// Opens `path` for reading and reads one byte: the open brings the file
/// into the host tier (from NVMe or S3) before it returns.
fn warm_one(path: &Path) -> io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut byte = [0u8; 1];
    // An empty file reads 0 bytes; that is fine too.
    let _n: usize = f.read(&mut byte)?;
    Ok(())
}

/// `kvfs warm`: opens every file under `paths` for reading with `threads`
/// threads, showing progress, and returns what was done. When the files add
/// up to more than the host tier's capacity, a warning goes to the progress
/// writer first: the files warmed first will be evicted again.
pub fn warm(
    mount: &Path,
    paths: &[PathBuf],
    threads: usize,
    progress: &mut Progress<'_>,
) -> Result<WarmReport, OpsError> {
    let status = read_status(mount)?;
    let mut files = Vec::new();
    let mut failures = Vec::new();
    walk(
        mount,
        paths,
        &mut |f| {
            files.push(f);
            Ok(())
        },
        &mut failures,
    )?;
    let total_files = files.len() as u64;
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    let host_capacity = status
        .pointer("/host/capacity")
        .and_then(serde_json::Value::as_u64);
    if let Some(cap) = host_capacity
        && total_bytes > cap
    {
        progress.update(
            &format!(
                "warning: {} to warm is more than the host tier's capacity of {}; \
                 the files warmed first will be evicted again",
                format_size(total_bytes),
                format_size(cap)
            ),
            true,
        );
        // The warning keeps its own line.
        progress.finish();
    }
    let next = AtomicUsize::new(0);
    let done_files = AtomicU64::new(0);
    let done_bytes = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    let start = Instant::now();
    let line = |files_done: u64, bytes: u64| {
        format!(
            "warm: {files_done}/{total_files} files, {} of {}, {:.1} MB/s",
            format_size(bytes),
            format_size(total_bytes),
            mb_per_s(bytes, start.elapsed())
        )
    };
    // Files being opened count toward the host tier and cannot be evicted
    // while open: keep at most half its capacity in flight (one file at
    // least), so that parallel opens do not fill it with each other.
    let budget = InFlight::new(host_capacity.map_or(u64::MAX, |c| c / 2));
    let workers = threads.clamp(1, files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let result = {
                        let _slot = budget.take(f.size);
                        warm_one(&mount.join(&f.rel))
                    };
                    match result {
                        Ok(()) => {
                            done_bytes.fetch_add(f.size, Ordering::Relaxed);
                        }
                        Err(error) => {
                            tracing::debug!(path = %f.rel.display(), %error, "warm failed");
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Failure {
                                    path: f.rel.clone(),
                                    error,
                                });
                        }
                    }
                    done_files.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while done_files.load(Ordering::Relaxed) < total_files {
            progress.update(
                &line(
                    done_files.load(Ordering::Relaxed),
                    done_bytes.load(Ordering::Relaxed),
                ),
                false,
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let bytes = done_bytes.load(Ordering::Relaxed);
    progress.update(&line(total_files, bytes), true);
    progress.finish();
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let ok_files = total_files.saturating_sub(failed.len() as u64);
    failures.extend(failed);
    Ok(WarmReport {
        files: ok_files,
        bytes,
        total_files,
        elapsed: start.elapsed(),
        failures,
    })
}

impl WarmReport {
    /// One line: files and bytes warmed, time, rate, failures.
    pub fn summary(&self) -> String {
        format!(
            "warmed {} of {} files, {} in {:.1} s ({:.1} MB/s); {} failed",
            self.files,
            self.total_files,
            format_size(self.bytes),
            self.elapsed.as_secs_f64(),
            mb_per_s(self.bytes, self.elapsed),
            self.failures.len()
        )
    }
}

/// Write-back still to do, from one status snapshot. `None`: that tier is
/// not configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub nvme_pending_flushes: Option<u64>,
    pub s3_backlog_jobs: Option<u64>,
    pub s3_backlog_bytes: Option<u64>,
    pub s3_healthy: Option<bool>,
}

impl Backlog {
    /// Reads the write-back counters from a status document.
    pub fn from_status(mount: &Path, status: &serde_json::Value) -> Result<Backlog, OpsError> {
        let field = |tier: &str, key: &str| -> Result<Option<u64>, OpsError> {
            let Some(t) = status.get(tier) else {
                return Ok(None);
            };
            t.get(key)
                .and_then(serde_json::Value::as_u64)
                .map(Some)
                .ok_or_else(|| OpsError::BadStatus {
                    mount: mount.to_path_buf(),
                    reason: format!("no {tier}.{key} (a daemon older than this command?)"),
                })
        };
        Ok(Backlog {
            nvme_pending_flushes: field("nvme", "pending_flushes")?,
            s3_backlog_jobs: field("s3", "backlog_jobs")?,
            s3_backlog_bytes: field("s3", "backlog_bytes")?,
            s3_healthy: status
                .pointer("/s3/healthy")
                .and_then(serde_json::Value::as_bool),
        })
    }

    /// True when no write-back is queued or running.
    pub fn is_drained(&self) -> bool {
        self.nvme_pending_flushes.unwrap_or(0) == 0 && self.s3_backlog_jobs.unwrap_or(0) == 0
    }
}

impl std::fmt::Display for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.nvme_pending_flushes {
            parts.push(format!("nvme pending_flushes {n}"));
        }
        if let Some(n) = self.s3_backlog_jobs {
            let mut s = format!(
                "s3 backlog_jobs {n} ({})",
                format_size(self.s3_backlog_bytes.unwrap_or(0))
            );
            if self.s3_healthy == Some(false) {
                s.push_str(", s3 unhealthy");
            }
            parts.push(s);
        }
        if parts.is_empty() {
            f.write_str("no NVMe or S3 tier")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// How a drain ended.
#[derive(Debug)]
pub enum DrainOutcome {
    Drained { elapsed: Duration },
    TimedOut { left: Backlog },
}

/// `kvfs drain`: polls `.kvfs/status` until no write-back is queued or
/// running (NVMe `pending_flushes` and S3 `backlog_jobs` both 0), or until
/// `timeout`. The drained state must be seen twice, `SETTLE` apart: a
/// close reaches the daemon asynchronously, so a file closed just before
/// may not be queued yet at the first look.
pub fn drain(
    mount: &Path,
    timeout: Option<Duration>,
    progress: &mut Progress<'_>,
) -> Result<DrainOutcome, OpsError> {
    const POLL: Duration = Duration::from_millis(100);
    const SETTLE: Duration = Duration::from_millis(300);
    let start = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        let backlog = Backlog::from_status(mount, &read_status(mount)?)?;
        if backlog.is_drained() {
            let since = *empty_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SETTLE {
                progress.update(&format!("drain: {backlog}"), true);
                progress.finish();
                return Ok(DrainOutcome::Drained {
                    elapsed: start.elapsed(),
                });
            }
        } else {
            empty_since = None;
        }
        progress.update(
            &format!("drain: {backlog} ({:.0} s)", start.elapsed().as_secs_f64()),
            false,
        );
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            progress.update(&format!("drain: {backlog}"), true);
            progress.finish();
            return Ok(DrainOutcome::TimedOut { left: backlog });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_relative_to_the_mount() {
        let m = Path::new("/mnt/kv");
        assert_eq!(
            relative_to_mount(m, Path::new("/mnt/kv/a/b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert_eq!(
            relative_to_mount(m, Path::new("./a")).unwrap(),
            PathBuf::from("a")
        );
        assert!(relative_to_mount(m, Path::new("../x")).is_err());
        assert!(is_control(Path::new(".kvfs/status")));
        assert!(!is_control(Path::new("a/.kvfs")));
    }

    #[test]
    fn backlog_reads_only_the_tiers_present() {
        let m = Path::new("/m");
        let v = serde_json::json!({"host": {"used": 1}});
        let b = Backlog::from_status(m, &v).unwrap();
        assert!(b.is_drained());
        assert_eq!(b.to_string(), "no NVMe or S3 tier");
        let v = serde_json::json!({"nvme": {"pending_flushes": 2},
            "s3": {"backlog_jobs": 0, "backlog_bytes": 0, "healthy": false}});
        let b = Backlog::from_status(m, &v).unwrap();
        assert!(!b.is_drained());
        assert_eq!(
            b.to_string(),
            "nvme pending_flushes 2, s3 backlog_jobs 0 (0 B), s3 unhealthy"
        );
        let v = serde_json::json!({"nvme": {"files": 2}});
        assert!(Backlog::from_status(m, &v).is_err());
    }

    #[test]
    fn progress_redraws_on_a_terminal_and_paces_a_log() {
        let mut buf = Vec::new();
        let mut p = Progress::new(&mut buf, true);
        p.update("long line", true);
        p.update("short", true);
        p.finish();
        assert_eq!(String::from_utf8_lossy(&buf), "\rlong line\rshort    \n");
        let mut buf = Vec::new();
        let mut p = Progress::with_interval(&mut buf, false, Duration::from_secs(60));
        p.update("one", false);
        p.update("two", false);
        p.update("three", true);
        p.finish();
        assert_eq!(String::from_utf8_lossy(&buf), "one\nthree\n");
    }
}
