//! Shared harness for the integration tests: mounts a real kvfs daemon (the
//! built binary, in the foreground, as a child process) through the kernel's
//! FUSE in a temp dir, and always unmounts it again, even when a test fails.

#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod s3;
pub mod store;

/// The two data paths every filesystem test runs in.
pub const MODES: [&str; 2] = ["passthrough", "fallback"];

pub struct KvfsMount {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    child: Option<Child>,
    /// Extra environment of the daemon (`start_env`), kept for `restart`.
    envs: Vec<(String, String)>,
}

fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_ref()))
}

fn umount(path: &Path, flags: i32) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: c is a valid C string.
    unsafe { libc::umount2(c.as_ptr(), flags) };
}

/// Starts `kvfs mount MNT ARGS` in the foreground, logging into `dir`.
fn spawn_daemon(
    dir: &Path,
    mnt: &Path,
    args: &[&str],
    host_only: bool,
    envs: &[(String, String)],
) -> Child {
    let log = std::fs::File::create(dir.join("kvfs.log")).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    if host_only {
        // Host tier only unless a test asks for NVMe (--nvme-dir wins over
        // the variable): tests must not share the embedded default directory.
        cmd.env("KVFS_NVME_DIR", "none");
    } else {
        cmd.env_remove("KVFS_NVME_DIR");
    }
    cmd.arg("mount")
        .arg(mnt)
        .args(args)
        .env("KVFS_LOG_LEVEL", "debug")
        .env("NO_COLOR", "1")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kvfs")
}

impl KvfsMount {
    /// Mounts kvfs with `args` (e.g. `["--data-path", "fallback"]`) and
    /// waits until it serves requests.
    pub fn start(args: &[&str]) -> KvfsMount {
        KvfsMount::launch(args, true, Vec::new())
    }

    /// Like [`KvfsMount::start`], with extra environment variables for the
    /// daemon (kept for [`KvfsMount::restart`]).
    pub fn start_env(args: &[&str], envs: &[(String, String)]) -> KvfsMount {
        KvfsMount::launch(args, true, envs.to_vec())
    }

    /// Mounts in a fresh temp dir; `host_only` keeps the NVMe tier off
    /// unless `args` name one.
    fn launch(args: &[&str], host_only: bool, envs: Vec<(String, String)>) -> KvfsMount {
        assert!(
            Path::new("/dev/fuse").exists(),
            "these tests need /dev/fuse (the kernel's FUSE) and root"
        );
        let dir = tempfile::Builder::new()
            .prefix("kvfs-test-")
            .tempdir()
            .expect("temp dir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mountpoint");
        let child = spawn_daemon(dir.path(), &mnt, args, host_only, &envs);
        let mut m = KvfsMount {
            dir,
            mnt,
            child: Some(child),
            envs,
        };
        m.wait_mounted();
        m
    }

    /// Mounts with every embedded default, the NVMe tier's directory too.
    pub fn start_with_defaults(args: &[&str]) -> KvfsMount {
        KvfsMount::launch(args, false, Vec::new())
    }

    pub fn with_mode(mode: &str, extra: &[&str]) -> KvfsMount {
        let mut args = vec!["--data-path", mode];
        args.extend_from_slice(extra);
        KvfsMount::start(&args)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kvfs.log")
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log(&self) -> String {
        let all = std::fs::read_to_string(self.dir.path().join("kvfs.log")).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The value of one line of `.kvfs/stats` (Prometheus text), e.g.
    /// `kvfs_creates_total` or `kvfs_tier_io_bytes_total{tier="nvme",op="write"}`;
    /// 0 when absent.
    pub fn metric(&self, key: &str) -> f64 {
        let text = std::fs::read_to_string(self.path(".kvfs/stats")).expect("read stats");
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(".kvfs/status")).expect("read status");
        serde_json::from_str(&text).expect("status is JSON")
    }

    /// Kills the daemon with SIGKILL (a crash) and detaches its dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        umount(&self.mnt, libc::MNT_DETACH);
    }

    /// Mounts again on the same mountpoint with `args` (after a stop or a
    /// crash), keeping the temp dir.
    pub fn restart(&mut self, args: &[&str]) {
        if let Some(status) = self.stop() {
            assert!(status.success(), "kvfs exited with {status}");
        }
        self.child = Some(spawn_daemon(
            self.dir.path(),
            &self.mnt,
            args,
            true,
            &self.envs,
        ));
        self.wait_mounted();
    }

    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.mnt.join(".kvfs/status").exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kvfs exited before mounting ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "kvfs did not mount within 15 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM, as a user would, and returns its exit
    /// status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                umount(&self.mnt, libc::MNT_DETACH);
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KvfsMount {
    fn drop(&mut self) {
        let status = self.stop();
        if is_mounted(&self.mnt) {
            umount(&self.mnt, libc::MNT_DETACH);
        }
        if std::thread::panicking() {
            eprintln!("kvfs exited with {status:?}; its log:\n{}", self.log());
        }
    }
}

/// errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// The errno an `std::io::Result` failed with.
pub fn err_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .expect("an OS error")
}

/// renameat2(2) with flags, as `Err(errno)` on failure.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> Result<(), i32> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

/// Waits (up to 3 s) for a name the daemon removed on its own (an eviction)
/// to disappear: the kernel hears of it from a notification thread, and a
/// cached entry may answer for a moment, at most the 1 s entry TTL. Returns
/// the errno `stat` then fails with.
pub fn gone(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::fs::metadata(path).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    err_of(std::fs::metadata(path))
}
