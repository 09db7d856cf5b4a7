//! The S3 tier's storage engine: whole files as objects in one bucket under
//! a prefix, over aws-sdk-s3. It knows keys (paths in the mount), never
//! inodes or FUSE; the policy (what to upload when, what S3 holds for whom)
//! lives in the core.
//!
//! Blocking API over a small tokio runtime the tier owns, because its
//! callers are FUSE worker threads and the core's background threads.
//! Uploads have a runtime and a client of their own whose threads run at
//! a lower priority: the socket sends of a drain are background work, and
//! on a shared runtime they would take the writers' CPU at full priority
//! (a separate client, because a connection is driven by the runtime that
//! opened it, and lookups and reads must never wait on a niced thread).
//!
//! Integrity: every object carries the CRC32C of its whole contents in its
//! metadata (`x-amz-meta-kvfs-crc32c`), and every request body carries an
//! `x-amz-checksum-crc32c` the server verifies. Reads verify the whole file
//! against the metadata before anyone sees it: never wrong bytes.
//!
//! Ownership: every object carries its file's owner and mode
//! (`x-amz-meta-kvfs-owner` = `uid:gid:mode`, the NVMe tier's format), so
//! another node or a later mount shows the file as it was; a chmod or chown
//! after the upload rewrites it in place (CopyObject onto itself).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::list_objects_v2::{ListObjectsV2Error, ListObjectsV2Output};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, MetadataDirective,
};

use super::body_pool::BodyPool;
use super::{FileOwner, pread_full, pwrite_all};

/// Metadata keys (sent as `x-amz-meta-*`).
const META_CRC: &str = "kvfs-crc32c";
const META_MTIME: &str = "kvfs-mtime-ns";
const META_OWNER: &str = "kvfs-owner";

/// How a mount reaches its bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every key; normalised to end in `/` unless empty.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Objects above this size are uploaded in parts of this size, and read
    /// back in ranges of this size, several at once.
    pub part_size: u64,
    /// Parts or ranges in flight per object.
    pub concurrency: usize,
    /// Hash every uploaded body into the request's signature (SigV4
    /// payload signing). Without it the body is still checked: its CRC32C
    /// travels in a signed header and the server verifies it; what is lost
    /// is protection against someone on the path who forges a body with
    /// the same CRC, which TLS gives on https. The hash is about half of
    /// an upload's CPU (48% of the daemon's time in a profile of a drain).
    pub sign_payload: bool,
}

impl S3Config {
    pub fn new(bucket: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            part_size: 8 << 20,
            concurrency: 8,
            sign_payload: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("s3 object {0} not found")]
    NotFound(String),
    /// The settings cannot work (bucket missing, credentials refused, no
    /// endpoint answering): one line a user can act on.
    #[error("{0}")]
    Settings(String),
    #[error("s3 {op} {key}: {message}")]
    Service {
        op: &'static str,
        key: String,
        message: String,
        /// The server answered (with an error), as opposed to no answer.
        answered: bool,
    },
    #[error("s3 {op} {key}: no answer within {secs} s")]
    Timeout {
        op: &'static str,
        key: String,
        secs: u64,
    },
    #[error("s3 object {key}: {what}")]
    Corrupt { key: String, what: String },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl S3Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, S3Error::NotFound(_))
    }

    /// Damaged or absent: the copy cannot be used (a cache miss), as
    /// opposed to an outage, after which it may come back.
    pub fn is_missing(&self) -> bool {
        matches!(self, S3Error::NotFound(_) | S3Error::Corrupt { .. })
    }

    /// The server answered with an error (not a missing object): trying
    /// again may not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, S3Error::Service { answered: true, .. })
    }
}

type Result<T> = std::result::Result<T, S3Error>;

/// What HEAD or LIST tells about an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub mtime: SystemTime,
    /// From the `kvfs-owner` metadata, which only a HEAD brings (never a
    /// LIST); `None` where it is absent or malformed.
    pub owner: Option<FileOwner>,
}

/// What a name is in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    File(ObjectInfo),
    /// Objects lie below `name/`.
    Dir,
}

const NO_CREDENTIALS: &str = "no S3 credentials found: set AWS_ACCESS_KEY_ID and \
     AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role";

/// What a LIST says a name is.
enum Named {
    Absent,
    File,
    Dir,
}

/// One level of a directory in the bucket: names relative to it.
#[derive(Debug, Default)]
pub struct Listing {
    pub dirs: Vec<String>,
    pub files: Vec<(String, ObjectInfo)>,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct S3Counters {
    pub put_bytes: AtomicU64,
    pub get_bytes: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

pub struct S3Tier {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// Uploads only; see the module doc.
    upload_rt: tokio::runtime::Runtime,
    upload_client: Client,
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    bucket: String,
    prefix: String,
    part_size: u64,
    concurrency: usize,
    sign_payload: bool,
    /// Upload bodies' memory, reused from one upload to the next.
    bodies: Arc<BodyPool>,
    /// Whether the last request got an answer (any answer, even 404).
    healthy: AtomicBool,
    pub counters: Arc<S3Counters>,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// How long one attempt of a request may take; a lookup must not hang on
/// an outage.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Objects up to this size are uploaded with one PUT.
const SINGLE_PUT_MAX: u64 = 64 << 20;
/// At most this many idle upload bodies are kept. The pool never holds
/// more than were in flight at once (a buffer is made only when none is
/// free), so this only bounds what an unusually wide moment leaves behind.
const BODIES_KEPT: usize = 64;
/// Threads that drive the uploads' connections: sending is a copy into
/// the socket, so two keep 16 uploads in flight.
const UPLOAD_WORKERS: usize = 2;
/// The largest object one CopyObject may copy (S3's limit).
const COPY_MAX: u64 = 5 << 30;
/// A metadata rewrite whose object keeps changing under it gives up after
/// this many tries (each one HEAD and one conditional copy).
const OWNER_TRIES: usize = 3;
/// Lookups (HEAD, small LIST) give up sooner: the caller is a stat.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Pages of names that sort between `key` and `key/` a lookup reads at
/// most before it decides.
const LOOKUP_PAGES: usize = 4;

fn b64(crc: u32) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

fn parse_mtime(ns: Option<&String>) -> Option<SystemTime> {
    let ns: u64 = ns?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(ns))
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn smithy_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(UNIX_EPOCH)
}

/// The owner in an object's metadata. Absent (an object another tool
/// wrote, or one from before kvfs stored owners) or malformed is `None`:
/// the caller keeps its default, and a lookup never fails for it.
fn owner_of(
    meta: Option<&std::collections::HashMap<String, String>>,
    key: &str,
) -> Option<FileOwner> {
    let value = meta?.get(META_OWNER)?;
    let owner = FileOwner::decode(value.as_bytes());
    if owner.is_none() {
        tracing::debug!(key, value = %value, "malformed kvfs-owner metadata ignored");
    }
    owner
}

/// Size, time and owner of an object from its HEAD (the time kvfs stored,
/// else the server's).
fn object_info(
    out: &aws_sdk_s3::operation::head_object::HeadObjectOutput,
    key: &str,
) -> ObjectInfo {
    let mtime = parse_mtime(out.metadata().and_then(|m| m.get(META_MTIME)))
        .unwrap_or_else(|| smithy_time(out.last_modified()));
    ObjectInfo {
        size: out.content_length().unwrap_or(0).max(0) as u64,
        mtime,
        owner: owner_of(out.metadata(), key),
    }
}

/// HTTP status of a failed request, when the server answered at all.
fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Tier {
    /// Builds the client; no request is made (see [`S3Tier::check`]).
    pub fn connect(cfg: &S3Config) -> Result<S3Tier> {
        if cfg.bucket.is_empty() {
            return Err(S3Error::Settings("s3 bucket name is empty".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.concurrency.clamp(2, 8))
            .thread_name("kvfs-s3")
            .enable_all()
            .build()
            .map_err(|source| S3Error::Io {
                op: "start s3 runtime",
                source,
            })?;
        let upload_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(UPLOAD_WORKERS)
            .thread_name("kvfs-s3-upload")
            .on_thread_start(|| super::lower_this_threads_priority(super::BACKGROUND_NICE))
            .enable_all()
            .build()
            .map_err(|source| S3Error::Io {
                op: "start s3 upload runtime",
                source,
            })?;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let shared = rt.block_on(loader.load());
        let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.path_style);
        if shared.region().is_none() {
            // S3-compatible servers rarely care; the signer needs one.
            conf = conf.region(aws_config::Region::new("us-east-1"));
        }
        let conf = conf.build();
        // Each client gets its own HTTP client and connection pool.
        let upload_client = Client::from_conf(conf.clone());
        let client = Client::from_conf(conf);
        let credentials = shared.credentials_provider();
        let prefix = match cfg.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Ok(S3Tier {
            rt,
            client,
            upload_rt,
            upload_client,
            credentials,
            bucket: cfg.bucket.clone(),
            prefix,
            part_size: cfg.part_size.max(5 << 20),
            concurrency: cfg.concurrency.max(1),
            sign_payload: cfg.sign_payload,
            bodies: BodyPool::new(BODIES_KEPT),
            healthy: AtomicBool::new(true),
            counters: Arc::default(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the last request was answered.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records whether the server answered; a change is one line at info
    /// (back up) or warn (down), the events an operator looks for.
    fn set_healthy(&self, up: bool) {
        if self.healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(bucket = %self.bucket, "S3 tier up again");
            } else {
                tracing::warn!(bucket = %self.bucket, "S3 tier down: it does not answer");
            }
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key.trim_start_matches('/'))
    }

    /// Records whether the server answered, and turns an SDK error into ours.
    fn fail<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = status_of(&e);
        let answered = status.is_some();
        self.set_healthy(answered);
        if status == Some(404) || matches!(e.code(), Some("NoSuchKey" | "NotFound")) {
            return S3Error::NotFound(key.to_string());
        }
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        S3Error::Service {
            op,
            key: key.to_string(),
            message: DisplayErrorContext(&e).to_string(),
            answered,
        }
    }

    /// A lookup S3 did not answer in time: the tier counts as down.
    fn lookup_timed_out(&self, op: &'static str, key: &str) -> S3Error {
        self.set_healthy(false);
        S3Error::Timeout {
            op,
            key: key.to_string(),
            secs: LOOKUP_TIMEOUT.as_secs(),
        }
    }

    fn ok(&self) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.set_healthy(true);
    }

    /// Checks that the bucket exists and the credentials work; errors are
    /// one line naming the problem.
    pub fn check(&self) -> Result<()> {
        self.check_credentials()?;
        let req = self.client.head_bucket().bucket(&self.bucket).send();
        let res = self
            .rt
            .block_on(async { tokio::time::timeout(LOOKUP_TIMEOUT * 2, req).await });
        let bucket = &self.bucket;
        match res {
            Err(_) => Err(S3Error::Settings(format!(
                "s3 endpoint does not answer (bucket {bucket}) within {} s",
                (LOOKUP_TIMEOUT * 2).as_secs()
            ))),
            Ok(Ok(_)) => {
                self.ok();
                Ok(())
            }
            Ok(Err(e)) => {
                self.set_healthy(status_of(&e).is_some());
                Err(S3Error::Settings(match status_of(&e) {
                    Some(404) => format!("s3 bucket {bucket} does not exist"),
                    Some(401 | 403) => {
                        format!("s3 credentials refused for bucket {bucket} (HTTP 403)")
                    }
                    Some(code) => format!("s3 bucket {bucket}: HTTP {code} from the server"),
                    None => format!(
                        "s3 endpoint unreachable (bucket {bucket}): {}",
                        DisplayErrorContext(&e)
                    ),
                }))
            }
        }
    }

    /// The credential chain found something: without this, a missing key
    /// shows as a dispatch failure that reads like an unreachable endpoint.
    fn check_credentials(&self) -> Result<()> {
        use aws_sdk_s3::config::ProvideCredentials;
        let Some(provider) = &self.credentials else {
            return Err(S3Error::Settings(NO_CREDENTIALS.into()));
        };
        let found = self.rt.block_on(async {
            tokio::time::timeout(LOOKUP_TIMEOUT * 2, provider.provide_credentials()).await
        });
        match found {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(S3Error::Settings(format!("{NO_CREDENTIALS} ({e})"))),
            Err(_) => Err(S3Error::Settings(format!(
                "{NO_CREDENTIALS} (the credential chain did not answer within {} s)",
                (LOOKUP_TIMEOUT * 2).as_secs()
            ))),
        }
    }

    /// Lets go of upload memory not in use once uploads have been quiet
    /// for a second; the uploaders call it when they wait for work.
    pub fn trim_bodies(&self) {
        self.bodies.trim_if_quiet(Duration::from_secs(1));
    }

    /// Whether uploaded bodies are hashed into their requests' signature.
    pub fn signs_payload(&self) -> bool {
        self.sign_payload
    }

    /// Uploads `len` bytes of `src` as `key`, with the file's `mtime` and
    /// `owner` in the metadata; returns their CRC32C. Single PUT up to one
    /// part, multipart with parallel parts above.
    pub fn put_from_fd(
        &self,
        key: &str,
        src: BorrowedFd<'_>,
        len: u64,
        mtime: SystemTime,
        owner: FileOwner,
    ) -> Result<u32> {
        let full = self.full_key(key);
        let fd = src.as_raw_fd();
        // KV blocks (tens of MiB) go up whole: parallelism comes from
        // several files in flight, and a multipart upload costs three more
        // requests and a server-side join.
        let crc = if len <= SINGLE_PUT_MAX.max(self.part_size) {
            let buf = self.bodies.body(len as usize, |b| {
                pread_full(fd, b, 0).map_err(|source| S3Error::Io {
                    op: "read for upload",
                    source,
                })
            })?;
            let crc = crc32c::crc32c(&buf);
            let req = self
                .upload_client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .checksum_crc32_c(b64(crc))
                .metadata(META_CRC, format!("{crc:08x}"))
                .metadata(META_MTIME, nanos(mtime).to_string())
                .metadata(META_OWNER, owner.encode())
                .body(ByteStream::from(buf));
            let sign = self.sign_payload;
            self.upload_rt
                .block_on(async move {
                    if sign {
                        req.send().await
                    } else {
                        req.customize().disable_payload_signing().send().await
                    }
                })
                .map_err(|e| self.fail("put", key, e))?;
            crc
        } else {
            self.upload_rt
                .block_on(self.multipart(key, &full, fd, len, mtime, owner))?
        };
        self.ok();
        self.counters.put_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(crc)
    }

    /// The whole object's CRC32C must be in the metadata when the upload
    /// starts, so it is computed first (one pass over memory-speed data).
    async fn multipart(
        &self,
        key: &str,
        full: &str,
        fd: i32,
        len: u64,
        mtime: SystemTime,
        owner: FileOwner,
    ) -> Result<u32> {
        let parts = len.div_ceil(self.part_size);
        let mut whole = 0u32;
        for i in 0..parts {
            let off = i * self.part_size;
            let n = (len - off).min(self.part_size) as usize;
            // A pooled buffer: it goes back at the end of the pass and is
            // the first part's body a moment later.
            let buf = self.bodies.body(n, |b| {
                pread_full(fd, b, off).map_err(|source| S3Error::Io {
                    op: "read for upload",
                    source,
                })
            })?;
            whole = crc32c::crc32c_append(whole, &buf);
        }
        let created = self
            .upload_client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .metadata(META_CRC, format!("{whole:08x}"))
            .metadata(META_MTIME, nanos(mtime).to_string())
            .metadata(META_OWNER, owner.encode())
            .send()
            .await
            .map_err(|e| self.fail("create multipart upload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let res = self.upload_parts(key, full, &upload_id, fd, len).await;
        match res {
            Ok(done) => {
                self.upload_client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(done))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| self.fail("complete multipart upload", key, e))?;
                Ok(whole)
            }
            Err(e) => {
                // Best effort: a leftover upload is invisible to readers.
                let _ = self
                    .upload_client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        fd: i32,
        len: u64,
    ) -> Result<Vec<CompletedPart>> {
        let parts = len.div_ceil(self.part_size);
        let sem = Arc::new(tokio::sync::Semaphore::new(self.concurrency));
        let mut tasks = Vec::with_capacity(parts as usize);
        for i in 0..parts {
            let off = i * self.part_size;
            let n = (len - off).min(self.part_size) as usize;
            let permit = Arc::clone(&sem).acquire_owned().await;
            let buf = self.bodies.body(n, |b| {
                pread_full(fd, b, off).map_err(|source| S3Error::Io {
                    op: "read for upload",
                    source,
                })
            })?;
            let crc = b64(crc32c::crc32c(&buf));
            let req = self
                .upload_client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(i as i32 + 1)
                .checksum_crc32_c(crc.clone())
                .body(ByteStream::from(buf));
            let sign = self.sign_payload;
            tasks.push(self.upload_rt.spawn(async move {
                let out = if sign {
                    req.send().await
                } else {
                    req.customize().disable_payload_signing().send().await
                };
                drop(permit);
                (out, crc)
            }));
        }
        let mut done = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.into_iter().enumerate() {
            let (out, crc) = t.await.map_err(|e| S3Error::Service {
                op: "upload part",
                key: key.to_string(),
                message: e.to_string(),
                answered: false,
            })?;
            let out = out.map_err(|e| self.fail("upload part", key, e))?;
            done.push(
                CompletedPart::builder()
                    .part_number(i as i32 + 1)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .checksum_crc32_c(crc)
                    .build(),
            );
        }
        Ok(done)
    }

    /// Size, time and owner of `key`, or `None` if there is no such object.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let full = self.full_key(key);
        let req = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send();
        let res = self
            .rt
            .block_on(async { tokio::time::timeout(LOOKUP_TIMEOUT, req).await });
        match res {
            Err(_) => Err(self.lookup_timed_out("head", key)),
            Ok(Ok(out)) => {
                self.ok();
                Ok(Some(object_info(&out, key)))
            }
            Ok(Err(e)) => match self.fail("head", key, e) {
                S3Error::NotFound(_) => {
                    self.set_healthy(true);
                    Ok(None)
                }
                e => Err(e),
            },
        }
    }

    /// What `key` is: an object, a directory (objects below `key/`), or
    /// nothing. One LIST (prefix `key`, delimiter `/`) decides, because it
    /// sees both the object and the directory: a HEAD alone can be fooled
    /// (s3s-fs answers HEAD of a directory that once was an object with the
    /// old object's metadata). The HEAD that brings a file's metadata goes
    /// out beside the LIST, so a lookup costs one round trip.
    pub fn lookup(&self, key: &str) -> Result<Option<Found>> {
        // One attempt: a lookup that fails is a miss, and a retry would
        // hold the caller's stat for up to a second of backoff.
        let quick = aws_sdk_s3::config::Builder::new()
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
        let full = self.full_key(key);
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .customize()
            .config_override(quick.clone())
            .send();
        let head = self.rt.spawn(head);
        let both = async {
            tokio::time::timeout(LOOKUP_TIMEOUT, async {
                let named = self.list_name(&full, &quick).await;
                if !matches!(named, Ok(Named::File)) {
                    head.abort();
                    return (named, None);
                }
                (named, head.await.ok())
            })
            .await
        };
        let Ok((named, head)) = self.rt.block_on(both) else {
            return Err(self.lookup_timed_out("lookup", key));
        };
        match named.map_err(|e| self.fail("list", key, e))? {
            Named::Absent => {
                self.ok();
                Ok(None)
            }
            Named::Dir => {
                self.ok();
                Ok(Some(Found::Dir))
            }
            Named::File => match head {
                Some(Ok(out)) => {
                    self.ok();
                    Ok(Some(Found::File(object_info(&out, key))))
                }
                Some(Err(e)) => match self.fail("head", key, e) {
                    // Deleted between the LIST and the HEAD.
                    S3Error::NotFound(_) => {
                        self.set_healthy(true);
                        Ok(None)
                    }
                    e => Err(e),
                },
                None => Err(S3Error::Timeout {
                    op: "head",
                    key: key.to_string(),
                    secs: LOOKUP_TIMEOUT.as_secs(),
                }),
            },
        }
    }

    /// Lists prefix `full` with delimiter `/`: a common prefix `full/` is a
    /// directory, a key equal to `full` an object. Keys sort by byte, so
    /// only names that extend `full` with a byte below `/` (`e-1`, `e.x`)
    /// come before `full/`: more than one page is rare, and bounded.
    async fn list_name(
        &self,
        full: &str,
        quick: &aws_sdk_s3::config::Builder,
    ) -> std::result::Result<Named, SdkError<ListObjectsV2Error, HttpResponse>> {
        let dir = format!("{full}/");
        let mut file = false;
        let mut token: Option<String> = None;
        for _ in 0..LOOKUP_PAGES {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(full)
                .delimiter("/")
                .set_continuation_token(token.take())
                .customize()
                .config_override(quick.clone())
                .send()
                .await?;
            if page
                .common_prefixes()
                .iter()
                .any(|p| p.prefix() == Some(&dir))
            {
                return Ok(Named::Dir);
            }
            file |= page.contents().iter().any(|o| o.key() == Some(full));
            let last = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .chain(page.common_prefixes().iter().filter_map(|p| p.prefix()))
                .max();
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) && last < Some(dir.as_str()) => {
                    token = Some(t.to_string());
                }
                _ => break,
            }
        }
        Ok(if file { Named::File } else { Named::Absent })
    }

    /// Reads the whole object into `dst` (from offset 0) with parallel
    /// ranged GETs; verifies its CRC32C before returning. Returns its size.
    /// With the size known (`size_hint`, from a HEAD or a listing) every
    /// range goes out at once; without it the first range tells the size.
    pub fn get_to_fd(&self, key: &str, dst: BorrowedFd<'_>, size_hint: Option<u64>) -> Result<u64> {
        let full = self.full_key(key);
        let fd = dst.as_raw_fd();
        let got = self.rt.block_on(self.get_ranges(key, &full, fd, size_hint));
        let (len, crc, want) = got?;
        self.ok();
        self.counters.get_bytes.fetch_add(len, Ordering::Relaxed);
        match want {
            Some(want) if want != crc => Err(S3Error::Corrupt {
                key: key.to_string(),
                what: format!("crc32c {crc:08x}, metadata says {want:08x}"),
            }),
            // Written by another tool: nothing to check against.
            _ => Ok(len),
        }
    }

    /// One ranged GET, written at its offset: its CRC32C, the object's
    /// checksum from the metadata, and the object's total size.
    async fn get_range(
        &self,
        key: &str,
        full: &str,
        fd: i32,
        off: u64,
        n: u64,
    ) -> Result<(u32, Option<u32>, Option<u64>, u64)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .range(format!("bytes={}-{}", off, off + n - 1))
            .send()
            .await
            .map_err(|e| self.fail("get", key, e))?;
        let want = out
            .metadata()
            .and_then(|m| m.get(META_CRC))
            .and_then(|v| u32::from_str_radix(v, 16).ok());
        // "bytes A-B/TOTAL"; a server that ignores ranges sends it all.
        let total = out
            .content_range()
            .and_then(|r| r.rsplit('/').next())
            .and_then(|t| t.parse::<u64>().ok());
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| S3Error::Service {
                op: "get",
                key: key.to_string(),
                message: e.to_string(),
                answered: false,
            })?
            .into_bytes();
        pwrite_all(fd, &bytes, off).map_err(|source| S3Error::Io {
            op: "write fetched data",
            source,
        })?;
        Ok((crc32c::crc32c(&bytes), want, total, bytes.len() as u64))
    }

    async fn get_ranges(
        &self,
        key: &str,
        full: &str,
        fd: i32,
        size_hint: Option<u64>,
    ) -> Result<(u64, u32, Option<u32>)> {
        let corrupt = |what: String| S3Error::Corrupt {
            key: key.to_string(),
            what,
        };
        let (total, first) = match size_hint {
            Some(total) => (total, None),
            None => {
                let (crc, want, total, got) =
                    self.get_range(key, full, fd, 0, self.part_size).await?;
                (total.unwrap_or(got), Some((crc, want, got)))
            }
        };
        // SAFETY: fd is valid for the whole call (the caller borrows it).
        if unsafe { libc::ftruncate(fd, total as libc::off_t) } != 0 {
            return Err(S3Error::Io {
                op: "size fetched file",
                source: std::io::Error::last_os_error(),
            });
        }
        let start = first.map_or(0, |f| f.2);
        let mut ranges = Vec::new();
        let mut off = start;
        while off < total {
            let n = (total - off).min(self.part_size);
            ranges.push((off, n));
            off += n;
        }
        if total == 0 && first.is_none() {
            // An empty object: one GET of it for its metadata.
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(full)
                .send()
                .await
                .map_err(|e| self.fail("get", key, e))?;
            let want = out
                .metadata()
                .and_then(|m| m.get(META_CRC))
                .and_then(|v| u32::from_str_radix(v, 16).ok());
            return Ok((0, 0, want));
        }
        let parts = futures_bounded(
            ranges
                .iter()
                .map(|&(off, n)| self.get_range(key, full, fd, off, n)),
            self.concurrency,
        )
        .await;
        let (mut crc, mut want) = match first {
            Some((c, w, _)) => (c, w),
            None => (0, None),
        };
        for ((off, n), part) in ranges.iter().zip(parts) {
            let (c, w, t, got) = part?;
            if got != *n || t.is_some_and(|t| t != total) {
                return Err(corrupt(format!(
                    "range at {off}: {got} of {n} bytes, object size {t:?} not {total} (changed meanwhile?)"
                )));
            }
            crc = if *off == 0 {
                c
            } else {
                crc32c::crc32c_combine(crc, c, *n as usize)
            };
            want = want.or(w);
        }
        Ok((total, crc, want))
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key);
        let req = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send();
        match self.rt.block_on(req) {
            Ok(_) => {
                self.ok();
                Ok(())
            }
            Err(e) => match self.fail("delete", key, e) {
                S3Error::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Server-side copy then delete. Not atomic: between the two, both names
    /// exist (never neither, and never half an object).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let src = format!("{}/{}", self.bucket, urlencode_path(&self.full_key(from)));
        let req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(self.full_key(to))
            .copy_source(src)
            .send();
        self.rt
            .block_on(req)
            .map_err(|e| self.fail("copy", from, e))?;
        self.ok();
        self.delete(from)
    }

    /// Sets `key`'s `kvfs-owner` metadata to `owner` (after a chmod or
    /// chown of a file already uploaded): a CopyObject of the key onto
    /// itself with MetadataDirective REPLACE, which S3 and s3s-fs do
    /// without moving the bytes. REPLACE drops what it is not sent, so the
    /// other metadata (`kvfs-crc32c`, `kvfs-mtime-ns`, anything another
    /// tool set) is read first with a HEAD and sent back; the copy is
    /// conditional on the ETag that HEAD saw, so an object another node
    /// replaced meanwhile never gets the old object's checksum (it is
    /// looked at again instead). Nothing is sent when the object already
    /// says `owner`. `Ok(false)`: left as it is, the object being above
    /// what one CopyObject may copy. A missing object is `NotFound`.
    pub fn set_owner(&self, key: &str, owner: FileOwner) -> Result<bool> {
        let full = self.full_key(key);
        let value = owner.encode();
        for _ in 0..OWNER_TRIES {
            let head = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send();
            let head = self
                .rt
                .block_on(head)
                .map_err(|e| self.fail("head", key, e))?;
            self.ok();
            let mut meta = head.metadata().cloned().unwrap_or_default();
            if meta.get(META_OWNER) == Some(&value) {
                return Ok(true);
            }
            if head.content_length().unwrap_or(0).max(0) as u64 > COPY_MAX {
                return Ok(false);
            }
            meta.insert(META_OWNER.to_string(), value.clone());
            let copy = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(&full)
                .copy_source(format!("{}/{}", self.bucket, urlencode_path(&full)))
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(meta))
                .set_content_type(head.content_type().map(str::to_string))
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .set_copy_source_if_match(head.e_tag().map(str::to_string))
                .send();
            match self.rt.block_on(copy) {
                Ok(_) => {
                    self.ok();
                    return Ok(true);
                }
                // Replaced since the HEAD: look again.
                Err(e) if status_of(&e) == Some(412) => {
                    self.set_healthy(true);
                    tracing::debug!(key, "object changed during an owner update; again");
                }
                Err(e) => return Err(self.fail("copy", key, e)),
            }
        }
        Err(S3Error::Service {
            op: "copy",
            key: key.to_string(),
            message: format!("the object changed during each of {OWNER_TRIES} owner updates"),
            answered: true,
        })
    }

    /// Every object under the prefix, recursively: (key relative to the
    /// prefix, size, LastModified). For the cleanup sweep.
    pub fn list_all(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        let mut out = Vec::new();
        self.list_pages(&self.prefix, None, "", |page| {
            for o in page.contents() {
                if let Some(key) = o.key().and_then(|k| k.strip_prefix(self.prefix.as_str()))
                    && !key.is_empty()
                {
                    out.push((
                        key.to_string(),
                        o.size().unwrap_or(0).max(0) as u64,
                        smithy_time(o.last_modified()),
                    ));
                }
            }
        })?;
        Ok(out)
    }

    /// The entries directly below `dir` ("" for the root), all pages.
    pub fn list(&self, dir: &str) -> Result<Listing> {
        let base = match dir.trim_matches('/') {
            "" => self.prefix.clone(),
            d => format!("{}{d}/", self.prefix),
        };
        let mut out = Listing::default();
        self.list_pages(&base, Some("/"), dir, |page| {
            for p in page.common_prefixes() {
                if let Some(name) = p
                    .prefix()
                    .and_then(|p| p.strip_prefix(base.as_str()))
                    .map(|p| p.trim_end_matches('/'))
                    .filter(|p| !p.is_empty())
                {
                    out.dirs.push(name.to_string());
                }
            }
            for o in page.contents() {
                let Some(name) = o.key().and_then(|k| k.strip_prefix(base.as_str())) else {
                    continue;
                };
                if name.is_empty() || name.contains('/') {
                    continue;
                }
                out.files.push((
                    name.to_string(),
                    ObjectInfo {
                        size: o.size().unwrap_or(0).max(0) as u64,
                        mtime: smithy_time(o.last_modified()),
                        // LIST carries no user metadata.
                        owner: None,
                    },
                ));
            }
        })?;
        Ok(out)
    }

    /// Every page of a ListObjectsV2 of `prefix` (with `delimiter`), in
    /// order; `what` names the listing in errors.
    fn list_pages(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        what: &str,
        mut each: impl FnMut(&ListObjectsV2Output),
    ) -> Result<()> {
        let mut token: Option<String> = None;
        loop {
            let req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(token.take())
                .send();
            let page = self
                .rt
                .block_on(req)
                .map_err(|e| self.fail("list", what, e))?;
            self.ok();
            each(&page);
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }
}

/// Runs the futures with at most `limit` in flight; results in order.
async fn futures_bounded<F, T>(futs: impl Iterator<Item = F>, limit: usize) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let sem = tokio::sync::Semaphore::new(limit.max(1));
    let all = futs.map(|f| async {
        let _permit = sem.acquire().await;
        f.await
    });
    join_all(all).await
}

/// Polls every future in one task until all are done; results in order.
async fn join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// CopySource is `bucket/key` URL-encoded, except for the slashes.
fn urlencode_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_keeps_slashes_and_escapes_the_rest() {
        assert_eq!(urlencode_path("a/b c/d+e.bin"), "a/b%20c/d%2Be.bin");
    }

    #[test]
    fn checksum_header_is_big_endian_base64() {
        // CRC32C of "123456789" is e3069283.
        let crc = crc32c::crc32c(b"123456789");
        assert_eq!(crc, 0xe306_9283);
        assert_eq!(b64(crc), "4waSgw==");
    }

    #[test]
    fn owner_metadata_absent_or_malformed_is_none() {
        let meta =
            |v: &str| std::collections::HashMap::from([(META_OWNER.to_string(), v.to_string())]);
        assert_eq!(
            owner_of(Some(&meta("1000:100:640")), "k"),
            Some(FileOwner {
                uid: 1000,
                gid: 100,
                perm: 0o640
            })
        );
        assert_eq!(owner_of(None, "k"), None);
        assert_eq!(owner_of(Some(&Default::default()), "k"), None);
        for bad in [
            "",
            "1000",
            "1000:100",
            "x:100:640",
            "1000:100:648",
            "1000:100:640:1",
        ] {
            assert_eq!(owner_of(Some(&meta(bad)), "k"), None, "{bad}");
        }
    }

    #[test]
    fn bad_bucket_name_is_a_settings_error() {
        assert!(matches!(
            S3Tier::connect(&S3Config::new("")),
            Err(S3Error::Settings(_))
        ));
    }
}
