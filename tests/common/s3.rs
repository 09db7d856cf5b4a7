//! A real S3 server for the S3-tier tests: s3s-fs (the s3s project's
//! filesystem-backed server, `scripts/s3-server install`) on a free
//! 127.0.0.1 port, its data in a temp dir, one bucket. It is killed by PID
//! when dropped. The tests check the bucket through their own aws-sdk-s3
//! client, never through kvfs's engine.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;

pub const ACCESS_KEY: &str = "kvfstest";
pub const SECRET_KEY: &str = "kvfstestsecret";
pub const BUCKET: &str = "kvfs-test";
pub const REGION: &str = "us-east-1";

/// The s3s-fs binary: `$KVFS_S3S_FS`, else on PATH, else where
/// `scripts/s3-server install` puts it.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVFS_S3S_FS") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KVFS_S3S_FS={} is not a file: run scripts/s3-server install",
            p.display()
        );
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("s3s-fs");
            if p.is_file() {
                return p;
            }
        }
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        let p = cache.join("kvfs-tools/bin/s3s-fs");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "s3s-fs not found (KVFS_S3S_FS, PATH, ~/.cache/kvfs-tools/bin): run scripts/s3-server install"
    );
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

pub struct S3Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl S3Server {
    /// Starts s3s-fs on a free port with an empty bucket [`BUCKET`].
    pub fn start() -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("kvfs-s3-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data").join(BUCKET)).expect("mkdir bucket");
        let port = free_port();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = client_for(&format!("http://127.0.0.1:{port}"), ACCESS_KEY, SECRET_KEY);
        let mut s = S3Server {
            dir,
            port,
            child: None,
            rt,
            client,
        };
        s.start_again();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The directory holding the bucket's files.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(BUCKET)
    }

    /// (Re)starts the server on the same port and data directory; waits
    /// until it listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is already running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("server log");
            let mut child = Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port"])
                .arg(self.port.to_string())
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(self.dir.path().join("data"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .expect("spawn s3s-fs");
            // Listening, or exited (the port may still be held a moment
            // after a stop: try again).
            let exited = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break true;
                }
                if listening(self.port) {
                    break false;
                }
                if Instant::now() > deadline {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if !exited {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on port {} within 20 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL), by its PID.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Until the port is closed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while listening(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The environment a kvfs daemon needs for this server (credentials
    /// from the AWS env chain; nothing from this machine's AWS config).
    pub fn env(&self) -> Vec<(String, String)> {
        env_with(ACCESS_KEY, SECRET_KEY)
    }

    /// `kvfs mount` arguments for this server's bucket under `prefix`.
    pub fn args(&self, prefix: &str) -> Vec<String> {
        vec![
            "--s3-bucket".into(),
            BUCKET.into(),
            "--s3-prefix".into(),
            prefix.into(),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-region".into(),
            REGION.into(),
            "--s3-path-style".into(),
        ]
    }

    // --- the independent client (aws-sdk-s3, blocking wrappers) ---

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The object's bytes and metadata, `None` if there is no such key.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, HashMap<String, String>)> {
        self.rt.block_on(async {
            let out = match self
                .client
                .get_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    assert_eq!(
                        status,
                        Some(404),
                        "GET {key}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    );
                    return None;
                }
            };
            let meta = out.metadata().cloned().unwrap_or_default();
            let body = out.body.collect().await.expect("read body").into_bytes();
            Some((body.to_vec(), meta))
        })
    }

    pub fn exists(&self, key: &str) -> bool {
        self.keys(key.rsplit_once('/').map(|(d, _)| d).unwrap_or(""))
            .iter()
            .any(|k| k == key)
    }

    /// Every key under `prefix` (recursively).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.rt.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(BUCKET)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "LIST {prefix}: {}",
                            aws_sdk_s3::error::DisplayErrorContext(&e)
                        )
                    });
                keys.extend(
                    out.contents()
                        .iter()
                        .filter_map(|o| o.key().map(String::from)),
                );
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            keys
        })
    }

    pub fn delete(&self, key: &str) {
        self.rt.block_on(async {
            self.client
                .delete_object()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "DELETE {key}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    )
                });
        });
    }

    /// Puts an object, with the given metadata.
    pub fn put(&self, key: &str, data: &[u8], meta: &[(&str, &str)]) {
        self.rt.block_on(async {
            let mut req = self
                .client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(ByteStream::from(data.to_vec()));
            for (k, v) in meta {
                req = req.metadata(*k, *v);
            }
            req.send().await.unwrap_or_else(|e| {
                panic!("PUT {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e))
            });
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "s3s-fs log (last lines):\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// AWS environment for a daemon with these credentials, shielded from the
/// machine's own AWS configuration.
pub fn env_with(access_key: &str, secret_key: &str) -> Vec<(String, String)> {
    let none = Path::new("/nonexistent/kvfs-test-aws");
    [
        ("AWS_ACCESS_KEY_ID", access_key),
        ("AWS_SECRET_ACCESS_KEY", secret_key),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", none.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", none.to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// An aws-sdk-s3 client of its own: path-style, static credentials.
pub fn client_for(endpoint: &str, access_key: &str, secret_key: &str) -> Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .force_path_style(true)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "kvfs-test",
        ))
        .build();
    Client::from_conf(conf)
}
