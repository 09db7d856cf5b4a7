//! The command line: `kvfs mount | unmount | status | ls-tier | warm |
//! drain | bench`. Each command parses its arguments and calls the library;
//! `anyhow` lives only here.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use kvfs::bench::connector::{self, Pattern, RunSpec};
use kvfs::config::{Config, LogFormat, MountArgs, format_size, parse_size};
use kvfs::fs::mount;
use kvfs::ops;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Environment variable through which a `--daemon` parent hands its child
/// the write end of the readiness pipe.
const READY_FD_ENV: &str = "KVFS_READY_FD";

#[derive(Parser)]
#[command(
    name = "kvfs",
    version,
    about = "A tiered FUSE filesystem for LLM KV-cache blocks"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount kvfs on a directory (foreground unless --daemon).
    Mount(Box<MountArgs>),
    /// Unmount a kvfs mount point.
    Unmount {
        mountpoint: PathBuf,
        /// Detach now even if files are open; the mount goes when they close.
        #[arg(long)]
        lazy: bool,
    },
    /// Show tiers, capacity, counters and the data path of a mount.
    Status {
        mountpoint: PathBuf,
        /// Print the raw JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List regular files with the tiers holding them (`TIERS SIZE PATH`),
    /// then files and bytes per tier combination.
    LsTier {
        mountpoint: PathBuf,
        /// Files or directories to list, relative to the mount or absolute
        /// inside it (default: the whole mount).
        paths: Vec<PathBuf>,
        /// One JSON object per file, then a summary object.
        #[arg(long)]
        json: bool,
    },
    /// Make files resident in the host tier by opening each for reading
    /// (directories recursively). Warming more than the host tier's
    /// capacity just evicts what it warmed first.
    Warm {
        mountpoint: PathBuf,
        /// Files or directories, relative to the mount or absolute inside it.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Files opened in parallel.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Wait until write-back is done (NVMe and S3 queues empty): exit 0 when
    /// drained, 1 on timeout, 2 if the path is not a kvfs mount.
    Drain {
        mountpoint: PathBuf,
        /// Give up after this long ("500ms", "30s", "5m"); default: wait on.
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<std::time::Duration>,
    },
    /// Benchmarks and workload generators.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The GPU companion client: `check`, `bench`.
    #[command(subcommand)]
    Gpu(kvfs::gpu::command::GpuCommand),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Store and/or load block files exactly as a reference connector does;
    /// prints one JSON report per phase.
    Connector {
        /// Directory to use as the connector's root (a kvfs mount, tmpfs, ...).
        #[arg(long)]
        dir: PathBuf,
        /// vllm (O_DIRECT, one write/readv) or llmd (rename while open).
        #[arg(long, default_value = "llmd")]
        pattern: Pattern,
        #[arg(long, default_value_t = 16)]
        files: u64,
        #[arg(long, default_value = "32MiB")]
        file_size: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// store, load or both.
        #[arg(long, default_value = "both")]
        phase: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Raw S3 baseline: PUT/GET whole objects with plain aws-sdk-s3; prints
    /// one JSON report per phase.
    S3Raw(kvfs::bench::s3::RawArgs),
}

/// Errors that mean "you asked for something invalid": exit code 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Mount(args) => cmd_mount(*args),
        Cmd::Unmount { mountpoint, lazy } => {
            mount::unmount(&mountpoint, lazy).map_err(anyhow::Error::from)
        }
        Cmd::Status { mountpoint, json } => cmd_status(&mountpoint, json),
        Cmd::LsTier {
            mountpoint,
            paths,
            json,
        } => cmd_ls_tier(&mountpoint, &paths, json),
        Cmd::Warm {
            mountpoint,
            paths,
            threads,
        } => cmd_warm(&mountpoint, &paths, threads),
        Cmd::Drain {
            mountpoint,
            timeout,
        } => cmd_drain(&mountpoint, timeout),
        Cmd::Bench(BenchCmd::Connector {
            dir,
            pattern,
            files,
            file_size,
            threads,
            phase,
            seed,
        }) => cmd_bench_connector(dir, pattern, files, &file_size, threads, &phase, seed),
        Cmd::Bench(BenchCmd::S3Raw(args)) => kvfs::bench::s3::run(&args, &mut std::io::stdout())
            .map(drop)
            .map_err(|e| match e {
                e if e.is_usage() => UsageError(e.to_string()).into(),
                e => anyhow::Error::from(e),
            }),
        Cmd::Gpu(cmd) => {
            kvfs::gpu::command::run(cmd, &mut std::io::stdout()).map_err(|e| match e {
                // No GPU is a "cannot run here" answer: exit code 2, one line.
                e if e.is_no_gpu() => UsageError(e.to_string()).into(),
                e => anyhow::Error::from(e),
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfs: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVFS_LOG")
        // fuser warns about its own second unmount attempt after a clean
        // unmount, and dumps every unimplemented request (copy_file_range,
        // which cp tries first): noise, not problems.
        .unwrap_or_else(|_| format!("kvfs={0},fuser=error", config.log_level).into());
    let (writer, ansi) = match &config.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Arc::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn cmd_mount(args: MountArgs) -> anyhow::Result<()> {
    let config = Config::resolve(&args).map_err(|e| UsageError(e.to_string()))?;
    if config.daemon {
        return spawn_daemon(&config);
    }
    // A daemon child reports readiness (or the reason it failed) here.
    let mut ready: Option<std::fs::File> = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        // SAFETY: the parent passed us this fd for exactly this purpose.
        .map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    let outcome = run_foreground(&config, &mut ready);
    if let (Err(e), Some(mut r)) = (&outcome, ready) {
        let _ = writeln!(r, "{e:#}");
    }
    outcome
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; the mask is inherited by
    // every thread spawned afterwards, so only the waiter sees the signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Mounts and serves until unmounted. `ready` is taken (and so closed, which
/// the waiting parent sees as end of file) once the mount is up.
fn run_foreground(config: &Config, ready: &mut Option<std::fs::File>) -> anyhow::Result<()> {
    init_logging(config)?;
    let signals = block_signals();
    let mounted = mount::mount(config)?;
    let mountpoint = mounted.mountpoint.clone();
    std::thread::Builder::new()
        .name("kvfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on the set blocked above.
            unsafe { libc::sigwait(&signals, &mut sig) };
            tracing::info!(signal = sig, "unmounting on signal");
            if let Err(e) = mount::unmount(&mountpoint, false) {
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                let _ = mount::unmount(&mountpoint, true);
            }
        })
        .context("cannot start the signal thread")?;
    if let Some(mut r) = ready.take() {
        writeln!(r, "ready").context("cannot report readiness")?;
    }
    mounted.wait().context("FUSE session ended with an error")?;
    tracing::info!("unmounted");
    Ok(())
}

/// Starts `kvfs mount` again in the background and returns once it has
/// mounted (exit 0) or failed (its reason on stderr, exit 1).
fn spawn_daemon(config: &Config) -> anyhow::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    let (mut rd, wr) = unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let wr_fd = fds[1];
    let exe = std::env::current_exe().context("cannot find the kvfs executable")?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(READY_FD_ENV, wr_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The child logs to --log-file if given; its failure to mount comes
        // back through the pipe.
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Keep the write end across exec (it was opened close-on-exec).
            if libc::fcntl(wr_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the kvfs daemon")?;
    drop(wr);
    let mut answer = String::new();
    rd.read_to_string(&mut answer)
        .context("cannot read the daemon's readiness")?;
    if answer.trim() == "ready" {
        println!(
            "kvfs mounted on {} (pid {})",
            config.mountpoint.display(),
            child.id()
        );
        return Ok(());
    }
    let status = child.wait().ok();
    let reason = answer.trim();
    if reason.is_empty() {
        bail!("the kvfs daemon exited before mounting ({status:?})");
    }
    bail!("{reason}");
}

fn cmd_status(mountpoint: &Path, json: bool) -> anyhow::Result<()> {
    let path = mountpoint.join(".kvfs/status");
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| {
            UsageError(format!(
                "{} is not a kvfs mount ({e})",
                mountpoint.display()
            ))
        })?;
    if json {
        print!("{text}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).context("the status document is not JSON")?;
    let n = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let s = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "kvfs {} on {}  data path: {}",
        s("/version"),
        mountpoint.display(),
        s("/data_path")
    );
    println!(
        "{:<6} {:>12} {:>12} {:>8}  page-locked",
        "tier", "used", "capacity", "files"
    );
    let locked = if v
        .pointer("/host/locking")
        .and_then(serde_json::Value::as_bool)
        == Some(true)
    {
        format!(
            "{} ({})",
            format_size(n("/host/locked_bytes")),
            s("/host/lock_policy")
        )
    } else {
        format!("no ({})", s("/host/lock_policy"))
    };
    println!(
        "{:<6} {:>12} {:>12} {:>8}  {}",
        "host",
        format_size(n("/host/used")),
        format_size(n("/host/capacity")),
        n("/host/files"),
        locked
    );
    if v.get("nvme").is_some() {
        println!(
            "{:<6} {:>12} {:>12} {:>8}  write-backs queued {}{}",
            "nvme",
            format_size(n("/nvme/used")),
            format_size(n("/nvme/capacity")),
            n("/nvme/files"),
            n("/nvme/pending_flushes"),
            if v.pointer("/nvme/o_direct")
                .and_then(serde_json::Value::as_bool)
                == Some(false)
            {
                "  (buffered: no O_DIRECT)"
            } else {
                ""
            }
        );
    }
    if v.get("s3").is_some() {
        let healthy = v
            .pointer("/s3/healthy")
            .and_then(serde_json::Value::as_bool)
            == Some(true);
        println!(
            "{:<6} s3://{}/{}  {}  uploaded {} files ({}), fetched {}, backlog {} jobs ({})",
            "s3",
            s("/s3/bucket"),
            s("/s3/prefix"),
            if healthy { "up" } else { "DOWN" },
            n("/s3/uploaded_files"),
            format_size(n("/s3/put_bytes")),
            format_size(n("/s3/get_bytes")),
            n("/s3/backlog_jobs"),
            format_size(n("/s3/backlog_bytes")),
        );
    }
    println!(
        "files {}  hits {}  misses {}  creates {}  opens {}  evictions {}",
        n("/files"),
        n("/counters/hits"),
        n("/counters/misses"),
        n("/counters/creates"),
        n("/counters/opens"),
        n("/host/evictions"),
    );
    println!(
        "stored {} files, {}  daemon-served read {}, written {}",
        n("/counters/sealed_files"),
        format_size(n("/counters/sealed_bytes")),
        format_size(n("/counters/daemon_read_bytes")),
        format_size(n("/counters/daemon_write_bytes")),
    );
    Ok(())
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    kvfs::config::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m)"))
}

/// A path that is not a kvfs mount is a usage error (exit code 2).
fn ops_error(e: ops::OpsError) -> anyhow::Error {
    if e.is_not_mounted() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

fn report_failures(failures: &[ops::Failure]) -> anyhow::Result<()> {
    for f in failures {
        eprintln!("kvfs: {f}");
    }
    if !failures.is_empty() {
        bail!("{} path(s) failed", failures.len());
    }
    Ok(())
}

fn cmd_ls_tier(mountpoint: &Path, paths: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let report = ops::ls_tier(mountpoint, paths, json, &mut out).map_err(ops_error)?;
    out.flush().context("cannot write output")?;
    report_failures(&report.failures)
}

fn cmd_warm(mountpoint: &Path, paths: &[PathBuf], threads: usize) -> anyhow::Result<()> {
    if threads == 0 {
        return Err(UsageError("--threads must be at least 1".into()).into());
    }
    let mut err = std::io::stderr();
    let terminal = err.is_terminal();
    let mut progress = ops::Progress::new(&mut err, terminal);
    let report = ops::warm(mountpoint, paths, threads, &mut progress).map_err(ops_error)?;
    println!("{}", report.summary());
    report_failures(&report.failures)
}

fn cmd_drain(mountpoint: &Path, timeout: Option<std::time::Duration>) -> anyhow::Result<()> {
    let mut err = std::io::stderr();
    let terminal = err.is_terminal();
    let mut progress = ops::Progress::new(&mut err, terminal);
    match ops::drain(mountpoint, timeout, &mut progress).map_err(ops_error)? {
        ops::DrainOutcome::Drained { elapsed } => {
            println!("drained in {:.1} s", elapsed.as_secs_f64());
            Ok(())
        }
        ops::DrainOutcome::TimedOut { left } => bail!("not drained before the timeout: {left}"),
    }
}

fn cmd_bench_connector(
    dir: PathBuf,
    pattern: Pattern,
    files: u64,
    file_size: &str,
    threads: usize,
    phase: &str,
    seed: u64,
) -> anyhow::Result<()> {
    let file_size = parse_size(file_size).map_err(|e| UsageError(e.to_string()))? as usize;
    if threads == 0 {
        return Err(UsageError("--threads must be at least 1".into()).into());
    }
    let spec = RunSpec {
        root: dir,
        pattern,
        files,
        file_size,
        threads,
        seed,
    };
    let (store, load) = match phase {
        "store" => (true, false),
        "load" => (false, true),
        "both" => (true, true),
        other => {
            return Err(UsageError(format!(
                "--phase must be store, load or both, not {other:?}"
            ))
            .into());
        }
    };
    if store {
        let r = connector::run_store(&spec)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    if load {
        let r = connector::run_load(&spec)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
