//! Raw S3 baseline: how fast plain aws-sdk-s3 PUTs and GETs whole objects
//! against an endpoint, with a fixed number of requests in flight.
//!
//! This deliberately does not use kvfs's S3 engine (`store::s3`): it is the
//! yardstick that engine's upload drain and cold reads are measured against
//! (`scripts/bench-s3`). Each object is one `PutObject` of the whole body and
//! one `GetObject` of the whole body, received into a buffer of the object's
//! size (the one copy any reader has to make). The SDK's defaults apply,
//! including its request checksum and payload signing on PUT
//! (`--unsigned-payload` turns the signing off, as kvfs's
//! `--s3-payload-signing off` does).
//!
//! Each phase prints one JSON line: `phase`, `objects`, `concurrency`,
//! `bytes`, `seconds` (wall time from the first request to the last answer)
//! and `gbps` (`bytes / seconds / 1e9`).

use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::body::SdkBody;

use crate::config::parse_size;

/// Which requests to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Put,
    Get,
    Both,
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "put" => Ok(Phase::Put),
            "get" => Ok(Phase::Get),
            "both" => Ok(Phase::Both),
            other => Err(format!(
                "unknown phase {other:?} (expected put, get or both)"
            )),
        }
    }
}

/// `kvfs bench s3-raw`: PUT and/or GET N objects with plain aws-sdk-s3.
/// Credentials and region come from the standard AWS chain (environment).
#[derive(Debug, Clone, clap::Args)]
pub struct RawArgs {
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: AWS).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub bucket: String,
    /// Key prefix; objects are PREFIX/obj-00000, PREFIX/obj-00001, ...
    #[arg(long, default_value = "kvfs-bench-raw")]
    pub prefix: String,
    #[arg(long, default_value_t = 32)]
    pub objects: u64,
    /// Size of each object (binary units).
    #[arg(long, default_value = "16MiB")]
    pub size: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// put, get or both (get reads what put wrote).
    #[arg(long, default_value = "both")]
    pub phase: Phase,
    /// Virtual-hosted addressing instead of path style (http://host/bucket/key).
    #[arg(long)]
    pub virtual_host: bool,
    /// PUT bodies without their SHA-256 in the signature (UNSIGNED-PAYLOAD),
    /// as kvfs sends them with --s3-payload-signing off.
    #[arg(long)]
    pub unsigned_payload: bool,
}

/// One phase's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RawReport {
    pub phase: String,
    pub objects: u64,
    pub concurrency: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum S3BenchError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{op} {key}: {message}")]
    Request {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("get {key}: {got} bytes, expected {want}")]
    Size { key: String, got: u64, want: u64 },
    #[error("write report: {0}")]
    Output(#[source] std::io::Error),
    #[error("a request task failed: {0}")]
    Task(String),
}

impl S3BenchError {
    /// The arguments were invalid (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, S3BenchError::Usage(_))
    }
}

/// Runs the phases `args` asks for and writes one JSON line per phase.
pub fn run(args: &RawArgs, out: &mut impl Write) -> Result<Vec<RawReport>, S3BenchError> {
    let size = parse_size(&args.size).map_err(|e| S3BenchError::Usage(e.to_string()))?;
    if args.concurrency == 0 {
        return Err(S3BenchError::Usage(
            "--concurrency must be at least 1".into(),
        ));
    }
    if args.objects == 0 || size == 0 {
        return Err(S3BenchError::Usage(
            "--objects and --size must be positive".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(S3BenchError::Runtime)?;
    let client = rt.block_on(client(args));
    let prefix = match args.prefix.trim_matches('/') {
        "" => String::new(),
        p => format!("{p}/"),
    };
    let bench = Arc::new(Bench {
        client,
        bucket: args.bucket.clone(),
        prefix,
        size,
        unsigned_payload: args.unsigned_payload,
    });
    let mut reports = Vec::new();
    let phases: &[&'static str] = match args.phase {
        Phase::Put => &["put"],
        Phase::Get => &["get"],
        Phase::Both => &["put", "get"],
    };
    for &phase in phases {
        let report = rt.block_on(run_phase(&bench, phase, args.objects, args.concurrency))?;
        let line = serde_json::to_string(&report)
            .map_err(|e| S3BenchError::Output(std::io::Error::other(e)))?;
        writeln!(out, "{line}").map_err(S3BenchError::Output)?;
        out.flush().map_err(S3BenchError::Output)?;
        reports.push(report);
    }
    Ok(reports)
}

async fn client(args: &RawArgs) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = &args.endpoint {
        loader = loader.endpoint_url(endpoint.clone());
    }
    let shared = loader.load().await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(!args.virtual_host);
    if shared.region().is_none() {
        conf = conf.region(aws_config::Region::new("us-east-1"));
    }
    Client::from_conf(conf.build())
}

struct Bench {
    client: Client,
    bucket: String,
    prefix: String,
    size: u64,
    unsigned_payload: bool,
}

impl Bench {
    fn key(&self, index: u64) -> String {
        format!("{}obj-{index:05}", self.prefix)
    }

    async fn put(&self, index: u64, body: &SdkBody) -> Result<u64, S3BenchError> {
        let key = self.key(index);
        let body = body.try_clone().ok_or_else(|| S3BenchError::Request {
            op: "put",
            key: key.clone(),
            message: "request body cannot be cloned".into(),
        })?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(ByteStream::new(body));
        let sent = if self.unsigned_payload {
            req.customize().disable_payload_signing().send().await
        } else {
            req.send().await
        };
        sent.map_err(|e| S3BenchError::Request {
            op: "put",
            key: key.clone(),
            message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
        })?;
        Ok(self.size)
    }

    async fn get(&self, index: u64) -> Result<u64, S3BenchError> {
        let key = self.key(index);
        let fail = |message: String| S3BenchError::Request {
            op: "get",
            key: key.clone(),
            message,
        };
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| fail(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
        let mut body = resp.body;
        let mut buf: Vec<u8> = Vec::with_capacity(self.size as usize);
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| fail(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?
        {
            buf.extend_from_slice(&chunk);
        }
        let got = buf.len() as u64;
        if got != self.size {
            return Err(S3BenchError::Size {
                key,
                got,
                want: self.size,
            });
        }
        Ok(got)
    }
}

/// `concurrency` workers pull object indexes from a shared counter until all
/// `objects` are done; the first error ends the phase.
async fn run_phase(
    bench: &Arc<Bench>,
    phase: &'static str,
    objects: u64,
    concurrency: usize,
) -> Result<RawReport, S3BenchError> {
    // Built before the clock starts: one body, shared by every PUT.
    let body = if phase == "put" {
        Some(SdkBody::from(pattern(bench.size as usize)))
    } else {
        None
    };
    let body = Arc::new(body);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(objects as usize) {
        let bench = Arc::clone(bench);
        let next = Arc::clone(&next);
        let body = Arc::clone(&body);
        tasks.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= objects {
                    return Ok::<u64, S3BenchError>(bytes);
                }
                bytes += match body.as_ref() {
                    Some(body) => bench.put(index, body).await?,
                    None => bench.get(index).await?,
                };
            }
        });
    }
    let mut bytes = 0u64;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(n)) => bytes += n,
            Ok(Err(e)) => {
                tasks.abort_all();
                return Err(e);
            }
            Err(e) => {
                tasks.abort_all();
                return Err(S3BenchError::Task(e.to_string()));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RawReport {
        phase: phase.to_string(),
        objects,
        concurrency,
        bytes,
        seconds,
        gbps: if seconds > 0.0 {
            bytes as f64 / seconds / 1e9
        } else {
            0.0
        },
    })
}

/// Incompressible-looking content (xorshift), so nothing on the way can
/// shortcut zero pages.
fn pattern(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_parses() {
        assert_eq!("put".parse::<Phase>(), Ok(Phase::Put));
        assert_eq!("get".parse::<Phase>(), Ok(Phase::Get));
        assert_eq!("both".parse::<Phase>(), Ok(Phase::Both));
        assert!("load".parse::<Phase>().is_err());
    }

    #[test]
    fn pattern_fills_odd_lengths() {
        let p = pattern(13);
        assert_eq!(p.len(), 13);
        assert!(p.iter().any(|&b| b != 0));
    }
}
