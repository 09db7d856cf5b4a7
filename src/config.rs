//! Configuration of `kvfs mount`.
//!
//! This module owns the single [`Config`] a mount runs with. It is built from
//! three sources in this order of precedence: command-line flags (with their
//! `KVFS_*` environment variables, which clap applies when a flag is absent),
//! then an optional TOML file (`--config` / `KVFS_CONFIG`), then built-in
//! defaults. [`Config::resolve`] merges them and validates the result, reporting
//! every problem it finds as one line of a [`ConfigError`].
//!
//! Sizes use binary units everywhere: `K`, `KB`, `Ki` and `KiB` all mean 1024
//! bytes, `G`, `GB`, `Gi` and `GiB` all mean 2^30 bytes, and so on. There are no
//! decimal (1000-based) units, so a size means the same thing in every place.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

const MIN_THREADS: i64 = 1;
const MAX_THREADS: i64 = 256;
const GIB: u64 = 1 << 30;
/// The default capacity is a share of RAM; past this the machine is big enough
/// that the user should choose the figure.
const DEFAULT_CAPACITY_CEILING: u64 = 16 * GIB;
/// Used only if the kernel will not tell us how much RAM there is.
const DEFAULT_CAPACITY_FALLBACK: u64 = GIB;
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
const SIZE_UNITS_HINT: &str = "B, K, KiB, M, MiB, G, GiB, T, TiB";

/// clap arguments of `kvfs mount` (flattened into the CLI by cli.rs).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MountArgs {
    /// Directory to mount kvfs on.
    pub mountpoint: PathBuf,

    /// TOML file with settings; flags and KVFS_* variables override it.
    #[arg(long, env = "KVFS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Host memory for cached blocks, e.g. 8GiB (binary units; default: 25% of RAM, at most 16GiB).
    #[arg(long, env = "KVFS_HOST_CAPACITY", value_name = "SIZE")]
    pub host_capacity: Option<String>,

    /// FUSE worker threads, 1 to 256 (default: number of CPUs).
    // A string, not a number, so that a bad value is reported by
    // `Config::resolve` together with every other problem and in the same words
    // as a bad `threads` in the config file.
    #[arg(long, env = "KVFS_THREADS", value_name = "N")]
    pub threads: Option<String>,

    /// Let users other than the one mounting access the mount (needs user_allow_other in /etc/fuse.conf).
    // Boolish so that KVFS_ALLOW_OTHER accepts the usual 1/0, yes/no, on/off.
    #[arg(long, env = "KVFS_ALLOW_OTHER", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_other: bool,

    /// Page-lock host tier memory (mlock): auto (only when swap is active), on or off (default: auto).
    #[arg(long, env = "KVFS_LOCK_MEMORY", value_name = "MODE")]
    pub lock_memory: Option<String>,

    /// Back the host tier's files with transparent huge pages (a tmpfs of its own; needs root): true or false (default: true).
    #[arg(long, env = "KVFS_HUGE_PAGES", value_name = "BOOL", value_parser = clap::builder::BoolishValueParser::new())]
    pub huge_pages: Option<bool>,

    /// Directory of the NVMe tier, or "none" (default: /var/lib/kvfs/<mount point> as root, else $XDG_CACHE_HOME/kvfs/<mount point>).
    #[arg(long, env = "KVFS_NVME_DIR", value_name = "DIR")]
    pub nvme_dir: Option<String>,

    /// Capacity of the NVMe tier, e.g. 500GiB (default: 50% of the directory's free space at mount).
    #[arg(long, env = "KVFS_NVME_CAPACITY", value_name = "SIZE")]
    pub nvme_capacity: Option<String>,

    /// When fsync returns: memory (at once), local (once the file is on NVMe) or remote (once it is in S3) (default: local with an NVMe tier).
    #[arg(long, env = "KVFS_DURABILITY", value_name = "LEVEL")]
    pub durability: Option<String>,

    /// S3 bucket of the S3 tier (default: no S3 tier). Credentials come from the standard AWS chain.
    #[arg(long, env = "KVFS_S3_BUCKET", value_name = "BUCKET")]
    pub s3_bucket: Option<String>,

    /// Key prefix in the bucket; nodes mounting the same bucket and prefix share files.
    #[arg(long, env = "KVFS_S3_PREFIX", value_name = "PREFIX")]
    pub s3_prefix: Option<String>,

    /// S3 endpoint URL for S3-compatible stores, e.g. http://127.0.0.1:9000 (default: AWS).
    #[arg(long, env = "KVFS_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// S3 region (default: from the AWS config chain, else us-east-1).
    #[arg(long, env = "KVFS_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Address buckets by path (http://host/bucket/key), as most S3-compatible servers want.
    #[arg(long, env = "KVFS_S3_PATH_STYLE", value_parser = clap::builder::BoolishValueParser::new())]
    pub s3_path_style: bool,

    /// Mount even if S3 cannot be reached; the tier reports itself down and catches up later.
    #[arg(long, env = "KVFS_S3_LAZY", value_parser = clap::builder::BoolishValueParser::new())]
    pub s3_lazy: bool,

    /// How long an answer from S3 to a lookup is reused, e.g. 1s or 500ms (default: 1s).
    #[arg(long, env = "KVFS_S3_CACHE_TTL", value_name = "DURATION")]
    pub s3_cache_ttl: Option<String>,

    /// Delete objects under the prefix uploaded longer ago than this, e.g. 7d or 12h, unless this node still holds the file locally (default: never).
    #[arg(long, env = "KVFS_S3_EXPIRE_AFTER", value_name = "DURATION")]
    pub s3_expire_after: Option<String>,

    /// Bytes of objects kept under the prefix; the oldest go first, except files this node still holds locally, e.g. 10TiB (default: unbounded).
    #[arg(long, env = "KVFS_S3_CAPACITY", value_name = "SIZE")]
    pub s3_capacity: Option<String>,

    /// Files uploaded to S3 at once, 1 to 256; half of them while writers are busy (default: 16).
    #[arg(long, env = "KVFS_S3_UPLOADS", value_name = "N")]
    pub s3_uploads: Option<String>,

    /// SHA-256 of every uploaded body in its signature: auto (only over http; over https TLS protects the body and the server checks its CRC32C), on or off (default: auto).
    #[arg(long, env = "KVFS_S3_PAYLOAD_SIGNING", value_name = "WHEN")]
    pub s3_payload_signing: Option<String>,

    /// Serve Prometheus metrics over HTTP at this address, e.g. 127.0.0.1:9464 (default: off).
    #[arg(long, env = "KVFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Log level: error, warn, info, debug or trace (default: info).
    #[arg(long, env = "KVFS_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log line format: text or json (one JSON object per line) (default: text).
    #[arg(long, env = "KVFS_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// How file data reaches the kernel: auto, passthrough or fallback (default: auto).
    #[arg(long, env = "KVFS_DATA_PATH", value_name = "MODE")]
    pub data_path: Option<String>,

    /// Return once the filesystem is mounted instead of staying in the foreground.
    #[arg(long)]
    pub daemon: bool,

    /// Write logs to this file instead of standard error.
    #[arg(long, env = "KVFS_LOG_FILE", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// How file data moves between the kernel and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// Passthrough when the kernel allows it, else fallback.
    Auto,
    Passthrough,
    Fallback,
}

impl DataPath {
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "passthrough" => Some(Self::Passthrough),
            "fallback" => Some(Self::Fallback),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Passthrough => "passthrough",
            Self::Fallback => "fallback",
        }
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When fsync returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// At once: nothing waits for a lower tier.
    Memory,
    /// Once the file is on the NVMe tier.
    Local,
    /// Once the file is in S3.
    Remote,
}

/// The S3 tier's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Mount even if the bucket cannot be reached.
    pub lazy: bool,
    /// How long a lookup's answer from S3 is reused.
    pub cache_ttl: std::time::Duration,
    /// Objects uploaded longer ago are deleted by a periodic sweep.
    pub expire_after: Option<std::time::Duration>,
    /// The oldest objects beyond this many bytes are deleted by it too.
    pub capacity: Option<u64>,
    /// Files uploaded at once.
    pub uploads: usize,
    /// Whether an upload's body is hashed into its signature.
    pub sign_payload: bool,
}

/// Default of `--s3-uploads`. S3 answers each request slowly but takes
/// many at once; uploads also take CPU and memory bandwidth from writers,
/// so while writers are busy only half of them run. H100 machine, local
/// server, 16 writers, scripts/bench-s3 (drain vs raw PUT, connector write
/// rate), before the hold-back: 4 uploads 0.27x, 5.9 GB/s; 8: 0.54x, 5.4;
/// 16: 0.55x, 2.0; 32: 0.49x, 1.7. With it, 16 keep the writers at the
/// rate 8 gave and drain the tail after a burst with 16 in flight.
pub const DEFAULT_S3_UPLOADS: usize = 16;
const MAX_S3_UPLOADS: i64 = 256;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Whether sealed host tier files are page-locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMemory {
    /// Lock only when swap is active: without swap nothing can page the
    /// blocks out, and locking costs writers throughput (mlock contends for
    /// the same page lists: 0.4x of tmpfs store rate with 16 writers on the
    /// H100 machine, against 0.9x unlocked).
    Auto,
    On,
    Off,
}

impl LockMemory {
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "on" | "true" | "yes" => Some(Self::On),
            "off" | "false" | "no" => Some(Self::Off),
            _ => None,
        }
    }
}

/// The validated settings of one mount.
#[derive(Debug, Clone)]
pub struct Config {
    /// Canonical absolute path.
    pub mountpoint: PathBuf,
    /// Bytes, greater than 0.
    pub host_capacity: u64,
    /// 1..=256.
    pub threads: usize,
    pub allow_other: bool,
    /// Whether to page-lock sealed host tier files (mlock).
    pub lock_memory: LockMemory,
    /// Whether to back host tier files with huge pages.
    pub huge_pages: bool,
    pub log_format: LogFormat,
    /// The NVMe tier's directory, if the tier is on.
    pub nvme_dir: Option<PathBuf>,
    /// Its capacity; `None` means half the free space at mount.
    pub nvme_capacity: Option<u64>,
    pub durability: Durability,
    /// The S3 tier, if configured.
    pub s3: Option<S3Settings>,
    /// Where to serve Prometheus metrics over HTTP, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// One of error, warn, info, debug, trace.
    pub log_level: String,
    pub data_path: DataPath,
    pub daemon: bool,
    /// Absolute, so that it stays valid if the daemon changes directory.
    pub log_file: Option<PathBuf>,
}

/// A problem with the configuration. Each displays as a single line, except
/// [`ConfigError::Several`], which displays one line per problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no mountpoint given")]
    MissingMountpoint,
    #[error("mountpoint {} does not exist", .path.display())]
    MountpointNotFound { path: PathBuf },
    #[error("mountpoint {} is not a directory", .path.display())]
    MountpointNotADirectory { path: PathBuf },
    #[error("mountpoint {} is already a mount point", .path.display())]
    AlreadyMounted { path: PathBuf },
    #[error(
        "mountpoint {} is already a mount point (a dead FUSE mount? run `kvfs unmount {}`)",
        .path.display(),
        .path.display()
    )]
    DeadMount { path: PathBuf },
    // The I/O error is part of the message rather than a `source`, so that
    // printing the error chain does not repeat it.
    #[error("cannot access mountpoint {}: {error}", .path.display())]
    MountpointInaccessible { path: PathBuf, error: io::Error },
    #[error("cannot read config file {}: {error}", .path.display())]
    ReadFile { path: PathBuf, error: io::Error },
    #[error("config file {}: {message}", .path.display())]
    ParseFile { path: PathBuf, message: String },
    #[error(
        "invalid size {value:?}{}: expected a number with an optional unit ({SIZE_UNITS_HINT})",
        for_origin(.origin)
    )]
    InvalidSize {
        value: String,
        origin: Option<String>,
    },
    #[error("size {value:?}{} is too large (at most {} bytes)", for_origin(.origin), u64::MAX)]
    SizeTooLarge {
        value: String,
        origin: Option<String>,
    },
    #[error("host capacity must be greater than 0")]
    ZeroCapacity,
    #[error(
        "invalid thread count {value:?} for {origin}: expected a whole number between {MIN_THREADS} and {MAX_THREADS}"
    )]
    InvalidThreads { value: String, origin: String },
    #[error(
        "invalid S3 upload count {value:?} for {origin}: expected a whole number between 1 and {MAX_S3_UPLOADS}"
    )]
    InvalidS3Uploads { value: String, origin: String },
    #[error("invalid payload signing {value:?} for {origin} (expected auto, on or off)")]
    InvalidPayloadSigning { value: String, origin: String },
    #[error("threads must be between {MIN_THREADS} and {MAX_THREADS}, got {got}")]
    ThreadsOutOfRange { got: i64 },
    #[error(
        "invalid log level {value:?} for {origin} (expected error, warn, info, debug or trace)"
    )]
    InvalidLogLevel { value: String, origin: String },
    #[error("invalid data path {value:?} for {origin} (expected auto, passthrough or fallback)")]
    InvalidDataPath { value: String, origin: String },
    #[error("invalid lock-memory mode {value:?} for {origin} (expected auto, on or off)")]
    InvalidLockMemory { value: String, origin: String },
    #[error("NVMe directory {} for {origin} does not exist or is not a directory", .path.display())]
    NvmeDir { path: PathBuf, origin: String },
    #[error("NVMe capacity must be greater than 0")]
    ZeroNvmeCapacity,
    #[error("invalid durability {value:?} for {origin} (expected memory, local or remote)")]
    InvalidDurability { value: String, origin: String },
    #[error("durability remote needs an S3 tier (--s3-bucket)")]
    RemoteWithoutS3,
    #[error("S3 setting {origin} given without an S3 bucket (--s3-bucket)")]
    S3WithoutBucket { origin: String },
    #[error("invalid S3 bucket name {value:?} for {origin} (3 to 63 of a-z, 0-9, '.', '-')")]
    InvalidBucket { value: String, origin: String },
    #[error(
        "invalid S3 endpoint {value:?} for {origin} (expected http://HOST[:PORT] or https://...)"
    )]
    InvalidEndpoint { value: String, origin: String },
    #[error("invalid duration {value:?} for {origin} (expected e.g. 500ms, 1s, 2m)")]
    InvalidDuration { value: String, origin: String },
    #[error("invalid log format {value:?} for {origin} (expected text or json)")]
    InvalidLogFormat { value: String, origin: String },
    #[error(
        "invalid metrics address {value:?} for {origin} (expected IP:PORT, e.g. 127.0.0.1:9464)"
    )]
    InvalidMetricsAddr { value: String, origin: String },
    #[error("log file path for {origin} is empty")]
    EmptyLogFile { origin: String },
    #[error("cannot resolve log file path {}: {error}", .path.display())]
    LogFile { path: PathBuf, error: io::Error },
    /// More than one problem, in the order the settings are checked.
    #[error("{}", join_lines(.0))]
    Several(Vec<ConfigError>),
}

fn for_origin(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" for {o}"))
        .unwrap_or_default()
}

fn join_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The TOML file. Every key is optional; unknown keys are an error so that a
/// misspelt setting is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_capacity: Option<FileSize>,
    // Signed, so that 0 and negative values get the same range error as the
    // flag rather than a serde type error.
    threads: Option<i64>,
    allow_other: Option<bool>,
    lock_memory: Option<String>,
    huge_pages: Option<bool>,
    metrics_addr: Option<String>,
    nvme_dir: Option<String>,
    nvme_capacity: Option<FileSize>,
    durability: Option<String>,
    s3_bucket: Option<String>,
    s3_prefix: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_path_style: Option<bool>,
    s3_lazy: Option<bool>,
    s3_cache_ttl: Option<String>,
    s3_expire_after: Option<String>,
    s3_capacity: Option<String>,
    s3_uploads: Option<i64>,
    s3_payload_signing: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    data_path: Option<String>,
    log_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "host_capacity must be a size string such as \"8GiB\" or a whole number of bytes"
)]
enum FileSize {
    // Signed because TOML integers are; a negative count is rejected later
    // with the same message as a bad size string.
    Bytes(i64),
    Text(String),
}

/// A parsed config file and where it came from, for error messages and for
/// resolving relative paths in it.
struct LoadedFile {
    path: PathBuf,
    values: FileConfig,
}

impl LoadedFile {
    fn origin(&self, key: &str) -> String {
        format!("{key} in {}", self.path.display())
    }
}

fn load_file(path: &Path) -> Result<LoadedFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
        path: path.to_path_buf(),
        error,
    })?;
    let values = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message: toml_error_line(&text, &e),
    })?;
    Ok(LoadedFile {
        path: path.to_path_buf(),
        values,
    })
}

/// toml's own Display draws a multi-line source snippet; we want one line.
fn toml_error_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
                before[nl + 1..].chars().count()
            }) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

impl Config {
    /// Merges args (which already contain env values via clap) over the TOML
    /// file over defaults, then validates.
    ///
    /// A config file that cannot be read or parsed stops resolution at once;
    /// otherwise every invalid setting is reported, so that one run shows all
    /// that needs fixing.
    pub fn resolve(args: &MountArgs) -> Result<Config, ConfigError> {
        let file = args.config.as_deref().map(load_file).transpose()?;
        let values = file.as_ref().map(|f| &f.values);
        let mut problems = Vec::new();

        let mountpoint = keep(&mut problems, check_mountpoint(&args.mountpoint));

        let host_capacity = match (
            &args.host_capacity,
            values.and_then(|v| v.host_capacity.as_ref()),
            &file,
        ) {
            (Some(s), _, _) => parse_size_from(s, Some("--host-capacity".to_string())),
            (None, Some(FileSize::Text(s)), Some(f)) => {
                parse_size_from(s, Some(f.origin("host_capacity")))
            }
            (None, Some(FileSize::Bytes(n)), Some(f)) => {
                u64::try_from(*n).map_err(|_| ConfigError::InvalidSize {
                    value: n.to_string(),
                    origin: Some(f.origin("host_capacity")),
                })
            }
            _ => Ok(default_host_capacity()),
        }
        .and_then(|bytes| {
            if bytes == 0 {
                Err(ConfigError::ZeroCapacity)
            } else {
                Ok(bytes)
            }
        });
        let host_capacity = keep(&mut problems, host_capacity);

        let threads = match (&args.threads, values.and_then(|v| v.threads)) {
            (Some(s), _) => parse_threads(s, "--threads"),
            (None, Some(n)) => check_threads(n),
            (None, None) => Ok(default_threads()),
        };
        let threads = keep(&mut problems, threads);

        let log_level = match pick(
            &args.log_level,
            "--log-level",
            &file,
            |v| &v.log_level,
            "log_level",
        ) {
            Some((s, origin)) => parse_log_level(s, origin),
            None => Ok("info".to_string()),
        };
        let log_level = keep(&mut problems, log_level);

        let data_path = match pick(
            &args.data_path,
            "--data-path",
            &file,
            |v| &v.data_path,
            "data_path",
        ) {
            Some((s, origin)) => DataPath::parse(s).ok_or_else(|| ConfigError::InvalidDataPath {
                value: s.to_string(),
                origin,
            }),
            None => Ok(DataPath::Auto),
        };
        let data_path = keep(&mut problems, data_path);

        let lock_memory = match pick(
            &args.lock_memory,
            "--lock-memory",
            &file,
            |v| &v.lock_memory,
            "lock_memory",
        ) {
            Some((s, origin)) => {
                LockMemory::parse(s).ok_or_else(|| ConfigError::InvalidLockMemory {
                    value: s.to_string(),
                    origin,
                })
            }
            None => Ok(LockMemory::Auto),
        };
        let lock_memory = keep(&mut problems, lock_memory);

        let metrics_addr = match pick(
            &args.metrics_addr,
            "--metrics-addr",
            &file,
            |v| &v.metrics_addr,
            "metrics_addr",
        ) {
            Some((s, origin)) => s
                .trim()
                .parse::<std::net::SocketAddr>()
                .map(Some)
                .map_err(|_| ConfigError::InvalidMetricsAddr {
                    value: s.to_string(),
                    origin,
                }),
            None => Ok(None),
        };
        let metrics_addr = keep(&mut problems, metrics_addr);

        let log_format = match pick(
            &args.log_format,
            "--log-format",
            &file,
            |v| &v.log_format,
            "log_format",
        ) {
            Some((s, origin)) => match s.trim().to_ascii_lowercase().as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(ConfigError::InvalidLogFormat {
                    value: s.to_string(),
                    origin,
                }),
            },
            None => Ok(LogFormat::Text),
        };
        let log_format = keep(&mut problems, log_format);

        let nvme_dir = match pick(
            &args.nvme_dir,
            "--nvme-dir",
            &file,
            |v| &v.nvme_dir,
            "nvme_dir",
        ) {
            Some((s, _)) if s.trim().eq_ignore_ascii_case("none") => Ok(None),
            Some((s, origin)) => {
                let p = PathBuf::from(s.trim());
                if p.is_dir() {
                    Ok(Some(std::fs::canonicalize(&p).unwrap_or(p)))
                } else {
                    Err(ConfigError::NvmeDir { path: p, origin })
                }
            }
            // The embedded default: a directory of its own per mount point,
            // created at mount.
            None => Ok(mountpoint.as_deref().map(default_nvme_dir)),
        };
        let nvme_dir = keep(&mut problems, nvme_dir);
        let nvme_capacity = match (
            &args.nvme_capacity,
            file.as_ref().and_then(|f| f.values.nvme_capacity.as_ref()),
        ) {
            (Some(s), _) => parse_size(s).map(Some),
            (None, Some(FileSize::Bytes(n))) => u64::try_from(*n)
                .map(Some)
                .map_err(|_| ConfigError::ZeroNvmeCapacity),
            (None, Some(FileSize::Text(s))) => parse_size(s).map(Some),
            (None, None) => Ok(None),
        };
        let nvme_capacity = match nvme_capacity {
            Ok(Some(0)) => Err(ConfigError::ZeroNvmeCapacity),
            other => other,
        };
        let nvme_capacity = keep(&mut problems, nvme_capacity);
        let durability = match pick(
            &args.durability,
            "--durability",
            &file,
            |v| &v.durability,
            "durability",
        ) {
            Some((s, origin)) => match s.trim().to_ascii_lowercase().as_str() {
                "memory" => Ok(Some(Durability::Memory)),
                "local" => Ok(Some(Durability::Local)),
                "remote" => Ok(Some(Durability::Remote)),
                _ => Err(ConfigError::InvalidDurability {
                    value: s.to_string(),
                    origin,
                }),
            },
            None => Ok(None),
        };
        let durability = keep(&mut problems, durability);
        let s3 = resolve_s3(args, &file);
        let s3 = keep(&mut problems, s3);
        if let (Some(Some(Durability::Remote)), Some(None)) = (&durability, &s3) {
            problems.push(ConfigError::RemoteWithoutS3);
        }

        let log_file = match (&args.log_file, &file) {
            (Some(p), _) => absolute_log_file(p, "--log-file".to_string()).map(Some),
            (None, Some(f)) => match &f.values.log_file {
                // Relative to the file that names it, not to wherever kvfs
                // happens to be started from.
                Some(p) if !p.as_os_str().is_empty() => {
                    let dir = f.path.parent().unwrap_or(Path::new(""));
                    absolute_log_file(&dir.join(p), f.origin("log_file")).map(Some)
                }
                Some(_) => Err(ConfigError::EmptyLogFile {
                    origin: f.origin("log_file"),
                }),
                None => Ok(None),
            },
            (None, None) => Ok(None),
        };
        let log_file = keep(&mut problems, log_file);

        // A plain bool flag cannot say "not given", so the flag or
        // KVFS_ALLOW_OTHER can turn this on over the file but not off.
        let allow_other = args.allow_other || values.and_then(|v| v.allow_other).unwrap_or(false);

        match (
            mountpoint,
            host_capacity,
            threads,
            log_level,
            data_path,
            lock_memory,
            metrics_addr,
            log_format,
            nvme_dir,
            nvme_capacity,
            durability,
            s3,
            log_file,
        ) {
            (
                Some(mountpoint),
                Some(host_capacity),
                Some(threads),
                Some(log_level),
                Some(data_path),
                Some(lock_memory),
                Some(metrics_addr),
                Some(log_format),
                Some(nvme_dir),
                Some(nvme_capacity),
                Some(durability),
                Some(s3),
                Some(log_file),
            ) if problems.is_empty() => Ok(Config {
                mountpoint,
                host_capacity,
                threads,
                allow_other,
                lock_memory,
                huge_pages: args
                    .huge_pages
                    .or(values.and_then(|v| v.huge_pages))
                    .unwrap_or(true),
                metrics_addr,
                log_format,
                durability: durability.unwrap_or(if nvme_dir.is_some() {
                    Durability::Local
                } else {
                    Durability::Memory
                }),
                nvme_dir,
                nvme_capacity,
                s3,
                log_level,
                data_path,
                daemon: args.daemon,
                log_file,
            }),
            _ if problems.len() == 1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

/// The S3 settings: `None` without a bucket (and then no other S3 key may
/// be set).
fn resolve_s3(
    args: &MountArgs,
    file: &Option<LoadedFile>,
) -> Result<Option<S3Settings>, ConfigError> {
    let values = file.as_ref().map(|f| &f.values);
    let bucket = pick(
        &args.s3_bucket,
        "--s3-bucket",
        file,
        |v| &v.s3_bucket,
        "s3_bucket",
    );
    let prefix = pick(
        &args.s3_prefix,
        "--s3-prefix",
        file,
        |v| &v.s3_prefix,
        "s3_prefix",
    );
    let endpoint = pick(
        &args.s3_endpoint,
        "--s3-endpoint",
        file,
        |v| &v.s3_endpoint,
        "s3_endpoint",
    );
    let region = pick(
        &args.s3_region,
        "--s3-region",
        file,
        |v| &v.s3_region,
        "s3_region",
    );
    let ttl = pick(
        &args.s3_cache_ttl,
        "--s3-cache-ttl",
        file,
        |v| &v.s3_cache_ttl,
        "s3_cache_ttl",
    );
    let expire = pick(
        &args.s3_expire_after,
        "--s3-expire-after",
        file,
        |v| &v.s3_expire_after,
        "s3_expire_after",
    );
    let capacity = pick(
        &args.s3_capacity,
        "--s3-capacity",
        file,
        |v| &v.s3_capacity,
        "s3_capacity",
    );
    let uploads = match (&args.s3_uploads, values.and_then(|v| v.s3_uploads)) {
        (Some(s), _) => Some((
            s.trim().parse::<i64>().ok(),
            s.clone(),
            "--s3-uploads".to_string(),
        )),
        (None, Some(n)) => file
            .as_ref()
            .map(|f| (Some(n), n.to_string(), f.origin("s3_uploads"))),
        (None, None) => None,
    };
    let signing = pick(
        &args.s3_payload_signing,
        "--s3-payload-signing",
        file,
        |v| &v.s3_payload_signing,
        "s3_payload_signing",
    );
    let path_style = args.s3_path_style || values.and_then(|v| v.s3_path_style).unwrap_or(false);
    let lazy = args.s3_lazy || values.and_then(|v| v.s3_lazy).unwrap_or(false);
    let Some((bucket, origin)) = bucket else {
        let stray = [
            prefix.map(|p| p.1),
            endpoint.map(|p| p.1),
            region.map(|p| p.1),
            ttl.map(|p| p.1),
            expire.map(|p| p.1),
            capacity.map(|p| p.1),
            uploads.as_ref().map(|u| u.2.clone()),
            signing.map(|p| p.1),
        ]
        .into_iter()
        .flatten()
        .next();
        return match stray {
            Some(origin) => Err(ConfigError::S3WithoutBucket { origin }),
            None => Ok(None),
        };
    };
    let bucket = bucket.trim();
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(ConfigError::InvalidBucket {
            value: bucket.to_string(),
            origin,
        });
    }
    let endpoint = match endpoint {
        Some((e, origin)) => {
            let e = e.trim();
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && e.split("://").nth(1).is_some_and(|h| !h.is_empty());
            if !ok {
                return Err(ConfigError::InvalidEndpoint {
                    value: e.to_string(),
                    origin,
                });
            }
            Some(e.to_string())
        }
        None => None,
    };
    let cache_ttl = match ttl {
        Some((t, origin)) => parse_duration(t).ok_or_else(|| ConfigError::InvalidDuration {
            value: t.to_string(),
            origin,
        })?,
        None => std::time::Duration::from_secs(1),
    };
    let expire_after = match expire {
        Some((t, origin)) => Some(parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
            ConfigError::InvalidDuration {
                value: t.to_string(),
                origin,
            }
        })?),
        None => None,
    };
    let capacity = match capacity {
        Some((c, origin)) => match parse_size_from(c, Some(origin.clone()))? {
            0 => {
                return Err(ConfigError::InvalidSize {
                    value: c.to_string(),
                    origin: Some(origin),
                });
            }
            n => Some(n),
        },
        None => None,
    };
    let uploads = match uploads {
        Some((Some(n), _, _)) if (1..=MAX_S3_UPLOADS).contains(&n) => n as usize,
        Some((_, value, origin)) => {
            return Err(ConfigError::InvalidS3Uploads { value, origin });
        }
        None => DEFAULT_S3_UPLOADS,
    };
    // Without an endpoint the SDK talks to AWS over https.
    let over_http = endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let sign_payload = match signing {
        None => over_http,
        Some((value, origin)) => match value.trim().to_ascii_lowercase().as_str() {
            "auto" => over_http,
            "on" => true,
            "off" => false,
            _ => {
                return Err(ConfigError::InvalidPayloadSigning {
                    value: value.to_string(),
                    origin,
                });
            }
        },
    };
    Ok(Some(S3Settings {
        bucket: bucket.to_string(),
        prefix: prefix.map(|p| p.0.trim().to_string()).unwrap_or_default(),
        endpoint,
        region: region.map(|r| r.0.trim().to_string()),
        path_style,
        lazy,
        cache_ttl,
        expire_after,
        capacity,
        uploads,
        sign_payload,
    }))
}

/// "500ms", "2s", "1m", "12h", "7d", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// Records a failed check and carries on, so that all problems are reported.
fn keep<T>(problems: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    result.map_err(|e| problems.push(e)).ok()
}

/// The string setting that wins, with a label saying where it came from.
fn pick<'a>(
    arg: &'a Option<String>,
    flag: &str,
    file: &'a Option<LoadedFile>,
    field: impl Fn(&FileConfig) -> &Option<String>,
    key: &str,
) -> Option<(&'a str, String)> {
    if let Some(s) = arg {
        return Some((s.as_str(), flag.to_string()));
    }
    let f = file.as_ref()?;
    let s = field(&f.values).as_deref()?;
    Some((s, f.origin(key)))
}

fn check_mountpoint(path: &Path) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::MissingMountpoint);
    }
    let meta = std::fs::metadata(path).map_err(|e| mountpoint_error(path, e))?;
    if !meta.is_dir() {
        return Err(ConfigError::MountpointNotADirectory {
            path: path.to_path_buf(),
        });
    }
    let canonical = path.canonicalize().map_err(|e| mountpoint_error(path, e))?;
    // A different device than the parent means something is mounted here. This
    // misses a bind mount of a directory from the same filesystem, which is
    // rare enough not to need /proc/self/mountinfo.
    let Some(parent) = canonical.parent() else {
        return Err(ConfigError::AlreadyMounted {
            path: path.to_path_buf(),
        });
    };
    let parent_meta = std::fs::metadata(parent).map_err(|e| mountpoint_error(path, e))?;
    if parent_meta.dev() != meta.dev() {
        return Err(ConfigError::AlreadyMounted {
            path: path.to_path_buf(),
        });
    }
    Ok(canonical)
}

fn mountpoint_error(path: &Path, error: io::Error) -> ConfigError {
    let path = path.to_path_buf();
    match error.raw_os_error() {
        // A FUSE daemon that died without unmounting leaves the mount in
        // place, and every stat of it fails this way.
        Some(libc::ENOTCONN) => ConfigError::DeadMount { path },
        Some(libc::ENOENT | libc::ENOTDIR) => ConfigError::MountpointNotFound { path },
        _ => ConfigError::MountpointInaccessible { path, error },
    }
}

fn parse_threads(s: &str, origin: &str) -> Result<usize, ConfigError> {
    let n = s
        .trim()
        .parse::<i64>()
        .map_err(|_| ConfigError::InvalidThreads {
            value: s.to_string(),
            origin: origin.to_string(),
        })?;
    check_threads(n)
}

fn check_threads(n: i64) -> Result<usize, ConfigError> {
    if (MIN_THREADS..=MAX_THREADS).contains(&n) {
        usize::try_from(n).map_err(|_| ConfigError::ThreadsOutOfRange { got: n })
    } else {
        Err(ConfigError::ThreadsOutOfRange { got: n })
    }
}

/// One per CPU, clamped to the valid range so that a very large machine gets
/// a working default instead of a validation error it never asked for.
fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.clamp(MIN_THREADS as usize, MAX_THREADS as usize)
}

fn parse_log_level(s: &str, origin: String) -> Result<String, ConfigError> {
    let level = s.trim().to_ascii_lowercase();
    if LOG_LEVELS.contains(&level.as_str()) {
        Ok(level)
    } else {
        Err(ConfigError::InvalidLogLevel {
            value: s.to_string(),
            origin,
        })
    }
}

fn absolute_log_file(path: &Path, origin: String) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::EmptyLogFile { origin });
    }
    std::path::absolute(path).map_err(|error| ConfigError::LogFile {
        path: path.to_path_buf(),
        error,
    })
}

/// The NVMe tier's embedded default directory for a mount point: under
/// /var/lib/kvfs as root, else under $XDG_CACHE_HOME/kvfs (~/.cache/kvfs),
/// named after the mount point ("/mnt/kv" -> "mnt-kv").
pub fn default_nvme_dir(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    let name = if name.is_empty() {
        "root".to_string()
    } else {
        name
    };
    // SAFETY: geteuid cannot fail.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/kvfs")
    } else {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("kvfs")
    };
    base.join(name)
}

/// Parses a size such as "8GiB", "512MiB", "1.5G", "4096" or "64k".
///
/// Units are case-insensitive and always binary: K, KB, Ki and KiB all mean
/// 1024 bytes; likewise M, G and T. Space between number and unit is allowed,
/// so the output of [`format_size`] parses back. A fraction is allowed with a
/// unit of K or larger and rounds down to whole bytes. Rejects empty input,
/// negative numbers, unknown units and values over `u64::MAX`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    parse_size_from(s, None)
}

fn parse_size_from(s: &str, origin: Option<String>) -> Result<u64, ConfigError> {
    let invalid = || ConfigError::InvalidSize {
        value: s.to_string(),
        origin: origin.clone(),
    };
    let too_large = || ConfigError::SizeTooLarge {
        value: s.to_string(),
        origin: origin.clone(),
    };

    let trimmed = s.trim();
    let number_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let multiplier = unit_multiplier(unit.trim_start()).ok_or_else(invalid)?;

    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || (number.contains('.') && !all_digits(fraction)) {
        return Err(invalid());
    }
    if !fraction.is_empty() && multiplier == 1 {
        return Err(invalid());
    }

    // Only digits remain, so a parse failure can only be overflow.
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?;
    if !fraction.is_empty() {
        // Digits past the 18th are worth less than a byte at any unit we
        // accept, and dropping them keeps the arithmetic within u128.
        let digits = &fraction[..fraction.len().min(18)];
        let numerator: u128 = digits.parse().map_err(|_| invalid())?;
        let denominator = 10u128.pow(digits.len() as u32);
        bytes = bytes
            .checked_add(numerator * u128::from(multiplier) / denominator)
            .ok_or_else(too_large)?;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return None,
    };
    Some(1 << shift)
}

/// Human form for logs and status: 8589934592 -> "8.0 GiB", 512 -> "512 B".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up a unit once one decimal place would round to 1024.0.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Embedded default host capacity: 25% of physical RAM, at most 16 GiB.
pub fn default_host_capacity() -> u64 {
    match physical_memory().map(|ram| ram / 4) {
        Some(quarter) if quarter > 0 => quarter.min(DEFAULT_CAPACITY_CEILING),
        _ => DEFAULT_CAPACITY_FALLBACK,
    }
}

fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant; it returns -1 on failure,
    // which the conversions below reject.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).ok()?;
    let page_size = u64::try_from(page_size).ok()?;
    pages.checked_mul(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::fs;

    const MIB: u64 = 1 << 20;

    /// Wraps the args the way cli.rs does, to check the clap definitions.
    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        mount: MountArgs,
    }

    fn args_for(dir: &Path) -> MountArgs {
        MountArgs {
            mountpoint: dir.to_path_buf(),
            ..MountArgs::default()
        }
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("kvfs.toml");
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn parse_duration_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        for bad in ["", "d", "1w", "-1s", "1.5h", "99999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn parse_size_accepts_plain_and_binary_units() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("4096 b", 4096),
            ("64k", 64 * 1024),
            ("64K", 64 * 1024),
            ("64KB", 64 * 1024),
            ("64KiB", 64 * 1024),
            ("64kib", 64 * 1024),
            ("512MiB", 512 * MIB),
            ("512m", 512 * MIB),
            ("8GiB", 8 * GIB),
            ("8gb", 8 * GIB),
            ("8Gi", 8 * GIB),
            (" 8 GiB ", 8 * GIB),
            ("1.5G", 3 * GIB / 2),
            ("0.5KiB", 512),
            ("1T", 1 << 40),
            ("2TiB", 2 << 40),
            ("16777215TiB", u64::MAX - ((1 << 40) - 1)),
            ("18446744073709551615", u64::MAX),
        ];
        for &(input, expected) in cases {
            assert_eq!(parse_size(input).unwrap(), expected, "input {input:?}");
        }
    }

    #[test]
    fn parse_size_rejects_malformed_input() {
        for input in [
            "", "   ", "-1", "-1G", "+1G", "8XB", "G", "GiB", "1.", ".5G", "1.2.3G", "1.5", "1.5B",
            "1e9", "0x10", "8 G B", "8PiB", "eight",
        ] {
            match parse_size(input) {
                Err(ConfigError::InvalidSize {
                    value,
                    origin: None,
                }) => assert_eq!(value, input),
                other => panic!("input {input:?}: expected InvalidSize, got {other:?}"),
            }
        }
    }

    #[test]
    fn parse_size_rejects_overflow() {
        for input in [
            "18446744073709551616",
            "16777216TiB",
            "99999999999999999999999999999999999999999999G",
        ] {
            assert!(
                matches!(parse_size(input), Err(ConfigError::SizeTooLarge { .. })),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn format_size_picks_binary_unit() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(MIB - 1), "1.0 MiB");
        assert_eq!(format_size(8_589_934_592), "8.0 GiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn format_size_output_parses_back() {
        for bytes in [512, 4 * 1024, 512 * MIB, 8 * GIB, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn default_host_capacity_is_positive_and_capped() {
        let capacity = default_host_capacity();
        assert!(capacity > 0);
        assert!(capacity <= 16 * GIB);
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::resolve(&args_for(dir.path())).unwrap();
        assert_eq!(config.mountpoint, dir.path().canonicalize().unwrap());
        assert!(config.mountpoint.is_absolute());
        assert_eq!(config.host_capacity, default_host_capacity());
        assert_eq!(config.threads, default_threads());
        assert!(config.threads >= 1);
        assert!(!config.allow_other);
        assert_eq!(config.log_level, "info");
        assert_eq!(config.data_path, DataPath::Auto);
        assert!(!config.daemon);
        assert_eq!(config.log_file, None);
    }

    #[test]
    fn args_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(
            dir.path(),
            r#"
                host_capacity = "2GiB"
                threads = 3
                allow_other = true
                log_level = "debug"
                data_path = "fallback"
                log_file = "kvfs.log"
            "#,
        );
        let args = MountArgs {
            config: Some(config_path),
            host_capacity: Some("1GiB".into()),
            log_level: Some("WARN".into()),
            daemon: true,
            ..args_for(dir.path())
        };
        let config = Config::resolve(&args).unwrap();
        assert_eq!(config.host_capacity, GIB);
        assert_eq!(config.threads, 3);
        assert!(config.allow_other);
        assert_eq!(config.log_level, "warn");
        assert_eq!(config.data_path, DataPath::Fallback);
        assert!(config.daemon);
        assert_eq!(config.log_file, Some(dir.path().join("kvfs.log")));

        let args = MountArgs {
            threads: Some("5".into()),
            data_path: Some("Passthrough".into()),
            log_file: Some(dir.path().join("other.log")),
            ..args
        };
        let config = Config::resolve(&args).unwrap();
        assert_eq!(config.threads, 5);
        assert_eq!(config.data_path, DataPath::Passthrough);
        assert_eq!(config.log_file, Some(dir.path().join("other.log")));
    }

    #[test]
    fn file_accepts_integer_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            config: Some(write_config(dir.path(), "host_capacity = 4096\n")),
            ..args_for(dir.path())
        };
        assert_eq!(Config::resolve(&args).unwrap().host_capacity, 4096);
    }

    #[test]
    fn file_rejects_wrong_capacity_type_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            config: Some(write_config(dir.path(), "host_capacity = 1.5\n")),
            ..args_for(dir.path())
        };
        let message = Config::resolve(&args).unwrap_err().to_string();
        assert!(
            message.contains("host_capacity must be a size string"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn unknown_file_key_is_named_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), "threads = 4\nhost_capcity = \"1GiB\"\n");
        let args = MountArgs {
            config: Some(config_path.clone()),
            ..args_for(dir.path())
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
        let message = err.to_string();
        let prefix = format!("config file {}: line 2, column 1: ", config_path.display());
        assert!(message.starts_with(&prefix), "{message}");
        assert!(
            message.contains("unknown field `host_capcity`"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn unreadable_config_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let args = MountArgs {
            config: Some(missing.clone()),
            ..args_for(dir.path())
        };
        let message = Config::resolve(&args).unwrap_err().to_string();
        let prefix = format!("cannot read config file {}: ", missing.display());
        assert!(message.starts_with(&prefix), "{message}");
    }

    #[test]
    fn missing_mountpoint_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Config::resolve(&args_for(&missing)).unwrap_err();
        assert!(
            matches!(err, ConfigError::MountpointNotFound { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("mountpoint {} does not exist", missing.display())
        );
        assert!(matches!(
            Config::resolve(&MountArgs::default()),
            Err(ConfigError::MissingMountpoint)
        ));
    }

    #[test]
    fn mountpoint_that_is_a_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        fs::write(&file, b"").unwrap();
        let err = Config::resolve(&args_for(&file)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("mountpoint {} is not a directory", file.display())
        );
    }

    #[test]
    fn root_counts_as_a_mount_point() {
        let err = Config::resolve(&args_for(Path::new("/"))).unwrap_err();
        assert_eq!(err.to_string(), "mountpoint / is already a mount point");
    }

    #[test]
    fn dead_fuse_mount_is_reported_as_mounted() {
        let path = Path::new("/mnt/kv");
        let err = mountpoint_error(path, io::Error::from_raw_os_error(libc::ENOTCONN));
        assert_eq!(
            err.to_string(),
            "mountpoint /mnt/kv is already a mount point (a dead FUSE mount? run `kvfs unmount /mnt/kv`)"
        );
    }

    #[test]
    fn zero_capacity_is_rejected_from_args_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            host_capacity: Some("0GiB".into()),
            ..args_for(dir.path())
        };
        let err = Config::resolve(&args).unwrap_err();
        assert_eq!(err.to_string(), "host capacity must be greater than 0");

        let args = MountArgs {
            config: Some(write_config(dir.path(), "host_capacity = 0\n")),
            ..args_for(dir.path())
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::ZeroCapacity)
        ));
    }

    #[test]
    fn bad_capacity_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            host_capacity: Some("8XB".into()),
            ..args_for(dir.path())
        };
        assert_eq!(
            Config::resolve(&args).unwrap_err().to_string(),
            "invalid size \"8XB\" for --host-capacity: expected a number with an optional unit \
             (B, K, KiB, M, MiB, G, GiB, T, TiB)"
        );

        let config_path = write_config(dir.path(), "host_capacity = -5\n");
        let args = MountArgs {
            config: Some(config_path.clone()),
            ..args_for(dir.path())
        };
        let message = Config::resolve(&args).unwrap_err().to_string();
        let expected = format!(
            "invalid size \"-5\" for host_capacity in {}:",
            config_path.display()
        );
        assert!(message.starts_with(&expected), "{message}");
    }

    #[test]
    fn thread_count_must_be_in_range() {
        let dir = tempfile::tempdir().unwrap();
        for (input, message) in [
            ("0", "threads must be between 1 and 256, got 0"),
            ("257", "threads must be between 1 and 256, got 257"),
            ("-3", "threads must be between 1 and 256, got -3"),
            (
                "many",
                "invalid thread count \"many\" for --threads: expected a whole number between 1 and 256",
            ),
        ] {
            let args = MountArgs {
                threads: Some(input.into()),
                ..args_for(dir.path())
            };
            assert_eq!(Config::resolve(&args).unwrap_err().to_string(), message);
        }

        let args = MountArgs {
            config: Some(write_config(dir.path(), "threads = 0\n")),
            ..args_for(dir.path())
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::ThreadsOutOfRange { got: 0 })
        ));

        let args = MountArgs {
            threads: Some("256".into()),
            ..args_for(dir.path())
        };
        assert_eq!(Config::resolve(&args).unwrap().threads, 256);
    }

    #[test]
    fn s3_payload_signing_follows_the_scheme_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let with = |endpoint: Option<&str>, signing: Option<&str>| MountArgs {
            s3_bucket: Some("kv-cache".into()),
            s3_endpoint: endpoint.map(String::from),
            s3_payload_signing: signing.map(String::from),
            ..args_for(dir.path())
        };
        let sign = |args: &MountArgs| Config::resolve(args).map(|c| c.s3.unwrap().sign_payload);
        let http = Some("http://127.0.0.1:9000");
        let https = Some("https://s3.example.com");
        // auto: only where nothing else protects the body on the way.
        assert!(sign(&with(http, None)).unwrap());
        assert!(!sign(&with(https, None)).unwrap());
        assert!(!sign(&with(None, None)).unwrap());
        assert!(sign(&with(http, Some("auto"))).unwrap());
        assert!(!sign(&with(https, Some("Auto"))).unwrap());
        assert!(sign(&with(https, Some("on"))).unwrap());
        assert!(!sign(&with(http, Some("off"))).unwrap());
        assert_eq!(
            sign(&with(http, Some("yes"))).unwrap_err().to_string(),
            "invalid payload signing \"yes\" for --s3-payload-signing (expected auto, on or off)"
        );
        let args = MountArgs {
            config: Some(write_config(
                dir.path(),
                "s3_bucket = \"kv-cache\"\ns3_endpoint = \"http://127.0.0.1:9000\"\ns3_payload_signing = \"off\"\n",
            )),
            ..args_for(dir.path())
        };
        assert!(!sign(&args).unwrap());
        let args = MountArgs {
            s3_payload_signing: Some("on".into()),
            ..args_for(dir.path())
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::S3WithoutBucket { .. })
        ));
    }

    #[test]
    fn s3_uploads_default_bounds_and_sources() {
        let dir = tempfile::tempdir().unwrap();
        let with_bucket = |uploads: Option<&str>| MountArgs {
            s3_bucket: Some("kv-cache".into()),
            s3_uploads: uploads.map(String::from),
            ..args_for(dir.path())
        };
        let uploads = |args: &MountArgs| Config::resolve(args).map(|c| c.s3.unwrap().uploads);
        assert_eq!(uploads(&with_bucket(None)).unwrap(), DEFAULT_S3_UPLOADS);
        assert_eq!(uploads(&with_bucket(Some("64"))).unwrap(), 64);
        for bad in ["0", "257", "-1", "lots"] {
            assert_eq!(
                uploads(&with_bucket(Some(bad))).unwrap_err().to_string(),
                format!(
                    "invalid S3 upload count \"{bad}\" for --s3-uploads: expected a whole number between 1 and 256"
                )
            );
        }
        let args = MountArgs {
            config: Some(write_config(
                dir.path(),
                "s3_bucket = \"kv-cache\"\ns3_uploads = 32\n",
            )),
            ..args_for(dir.path())
        };
        assert_eq!(uploads(&args).unwrap(), 32);
        let args = MountArgs {
            config: Some(write_config(
                dir.path(),
                "s3_bucket = \"kv-cache\"\ns3_uploads = 0\n",
            )),
            ..args_for(dir.path())
        };
        assert!(
            uploads(&args)
                .unwrap_err()
                .to_string()
                .contains("s3_uploads")
        );
        // Without a bucket it is a mistake, not ignored.
        let args = MountArgs {
            s3_uploads: Some("8".into()),
            ..args_for(dir.path())
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::S3WithoutBucket { .. })
        ));
    }

    #[test]
    fn lock_memory_modes_parse_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let args = |v: &str| MountArgs {
            mountpoint: dir.path().to_owned(),
            lock_memory: Some(v.into()),
            ..MountArgs::default()
        };
        assert_eq!(
            Config::resolve(&args("on")).unwrap().lock_memory,
            LockMemory::On
        );
        assert_eq!(
            Config::resolve(&args("OFF")).unwrap().lock_memory,
            LockMemory::Off
        );
        let defaults = MountArgs {
            mountpoint: dir.path().to_owned(),
            ..MountArgs::default()
        };
        assert_eq!(
            Config::resolve(&defaults).unwrap().lock_memory,
            LockMemory::Auto
        );
        let err = Config::resolve(&args("sometimes")).unwrap_err().to_string();
        assert!(
            err.contains("sometimes") && err.contains("--lock-memory"),
            "{err}"
        );
    }

    #[test]
    fn bad_data_path_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            data_path: Some("direct".into()),
            ..args_for(dir.path())
        };
        assert_eq!(
            Config::resolve(&args).unwrap_err().to_string(),
            "invalid data path \"direct\" for --data-path (expected auto, passthrough or fallback)"
        );
    }

    #[test]
    fn bad_log_level_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), "log_level = \"verbose\"\n");
        let args = MountArgs {
            config: Some(config_path.clone()),
            ..args_for(dir.path())
        };
        assert_eq!(
            Config::resolve(&args).unwrap_err().to_string(),
            format!(
                "invalid log level \"verbose\" for log_level in {} \
                 (expected error, warn, info, debug or trace)",
                config_path.display()
            )
        );
    }

    #[test]
    fn empty_log_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            config: Some(write_config(dir.path(), "log_file = \"\"\n")),
            ..args_for(dir.path())
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::EmptyLogFile { .. })
        ));
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let args = MountArgs {
            threads: Some("0".into()),
            data_path: Some("direct".into()),
            host_capacity: Some("0".into()),
            ..args_for(&dir.path().join("nope"))
        };
        let err = Config::resolve(&args).unwrap_err();
        let ConfigError::Several(problems) = &err else {
            panic!("expected Several, got {err:?}");
        };
        assert_eq!(problems.len(), 4);
        let message = err.to_string();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 4, "{message}");
        assert!(lines[0].ends_with("does not exist"), "{message}");
        assert_eq!(lines[1], "host capacity must be greater than 0");
        assert_eq!(lines[2], "threads must be between 1 and 256, got 0");
        assert!(lines[3].starts_with("invalid data path"), "{message}");
    }

    #[test]
    fn clap_definition_is_consistent_and_parses_flags() {
        use clap::CommandFactory;
        TestCli::command().debug_assert();

        let cli = TestCli::try_parse_from([
            "kvfs",
            "/mnt/kv",
            "--allow-other",
            "--daemon",
            "--threads",
            "8",
            "--host-capacity",
            "8GiB",
        ])
        .unwrap();
        assert_eq!(cli.mount.mountpoint, PathBuf::from("/mnt/kv"));
        assert!(cli.mount.allow_other);
        assert!(cli.mount.daemon);
        assert_eq!(cli.mount.threads.as_deref(), Some("8"));
        assert_eq!(cli.mount.host_capacity.as_deref(), Some("8GiB"));
    }
}
