//! The GPU companion client end to end: `kvfs gpu check` everywhere (exit
//! code 2 without a GPU), and on a machine with a GPU the bench's fuse,
//! zerocopy and gds paths through a real mount, every byte verified. Without
//! a GPU the GPU tests print "skipped: <reason>" and return.

mod common;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::KvfsMount;
use kvfs::zerocopy::{Backend, BackendError, Server};

fn kvfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .args(args)
        .output()
        .expect("run kvfs")
}

/// None when a GPU is usable, else why not.
fn no_gpu() -> Option<String> {
    let out = kvfs(&["gpu", "check"]);
    if out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
}

fn results(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON result line"))
        .collect()
}

fn row<'a>(rows: &'a [serde_json::Value], path: &str, op: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["path"] == path && r["op"] == op)
}

fn assert_measured(rows: &[serde_json::Value], path: &str, op: &str) {
    let r = row(rows, path, op).unwrap_or_else(|| panic!("no {path} {op} row in {rows:?}"));
    assert!(r["skipped"].is_null(), "{path} {op} skipped: {r}");
    assert!(r["gbps"].as_f64().expect("gbps") > 0.0, "{r}");
    // Loads through a path end in a byte-for-byte check; the raw and
    // GPU-only rows move no file data and have nothing to verify.
    if op == "load" && !["raw-pinned", "gpu-only"].contains(&path) {
        assert_eq!(r["verified"], true, "{r}");
    }
}

#[test]
fn gpu_check_lists_devices_or_exits_2() {
    let out = kvfs(&["gpu", "check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(stdout.contains("CUDA driver"), "{stdout}");
        assert!(stdout.contains("GPU 0:"), "{stdout}");
        let json = kvfs(&["gpu", "check", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
        assert!(
            doc["driver_version"].as_i64().expect("version") >= 11000,
            "{doc}"
        );
    } else {
        assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
        assert!(stderr.contains("no GPU available"), "{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
}

#[test]
fn gpu_bench_refuses_bad_shapes_before_touching_the_gpu() {
    let out = kvfs(&[
        "gpu",
        "bench",
        "--file-block-tokens",
        "250",
        "--blocks",
        "1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("multiple of gpu_block_tokens"), "{stderr}");
    let out = kvfs(&["gpu", "bench", "--dtype", "int4"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype"));
    let out = kvfs(&[
        "gpu",
        "bench",
        "--staging-memory",
        "1MiB",
        "--mount",
        "/nonexistent",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("smaller than one file block"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Small shape: 4 layers, 2 heads, dim 64, bf16, 16-token GPU blocks,
/// 64-token files = 128 KiB per file.
const SHAPE: [&str; 12] = [
    "--layers",
    "4",
    "--kv-heads",
    "2",
    "--head-dim",
    "64",
    "--gpu-block-tokens",
    "16",
    "--file-block-tokens",
    "64",
    "--dtype",
    "bf16",
];

fn bench(mnt: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["gpu", "bench", "--mount", mnt.to_str().expect("utf-8")];
    args.extend_from_slice(&SHAPE);
    args.extend_from_slice(&[
        "--blocks",
        "12",
        "--threads",
        "4",
        "--staging-memory",
        "512KiB",
    ]);
    args.extend_from_slice(extra);
    let out = kvfs(&args);
    assert!(
        out.status.success(),
        "kvfs {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    results(&out)
}

#[test]
fn gpu_bench_every_path_round_trips() {
    if let Some(why) = no_gpu() {
        println!("skipped: {why}");
        return;
    }
    let nvme = tempfile::Builder::new()
        .prefix("kvfs-gpu-nvme-")
        .tempdir_in("/var/tmp")
        .expect("nvme dir");
    let baseline = tempfile::Builder::new()
        .prefix("kvfs-gpu-base-")
        .tempdir_in("/var/tmp")
        .expect("baseline dir");
    let nvme_s = nvme.path().to_str().expect("utf-8");
    let m = KvfsMount::start(&["--nvme-dir", nvme_s, "--host-capacity", "1GiB"]);
    let rows = bench(
        &m.mnt,
        &[
            "--path",
            "all",
            "--baseline-dir",
            baseline.path().to_str().expect("utf-8"),
            "--gds-dir",
            nvme_s,
            "--flush-timeout-s",
            "60",
        ],
    );
    for (path, op) in [
        ("raw-pinned", "store"),
        ("raw-pinned", "load"),
        ("gpu-only", "store"),
        ("baseline", "store"),
        ("baseline", "load"),
        ("fuse", "store"),
        ("fuse", "load"),
    ] {
        assert_measured(&rows, path, op);
    }
    // The zero-copy server and cuFile are optional on a given machine: each
    // path either ran and verified, or says exactly why it did not.
    for (path, op) in [("zerocopy", "store"), ("zerocopy", "load"), ("gds", "load")] {
        match row(&rows, path, op) {
            Some(r) if !r["skipped"].is_null() => {
                println!("{path} {op} skipped: {}", r["skipped"]);
                assert!(!r["skipped"].as_str().expect("reason").is_empty());
            }
            Some(_) => assert_measured(&rows, path, op),
            None => assert!(
                path == "zerocopy" && op == "load" && row(&rows, "zerocopy", "store").is_some(),
                "no {path} {op} row in {rows:?}"
            ),
        }
    }
    if let Some(r) = row(&rows, "gds", "load")
        && r["skipped"].is_null()
    {
        let mode = &r["detail"]["cufile"]["mode"];
        assert!(mode == "gds" || mode == "compat", "{r}");
    }
    // Nothing left behind in the mount or the baseline directory.
    assert_eq!(std::fs::read_dir(&m.mnt).expect("readdir").count(), 0);
    assert_eq!(
        std::fs::read_dir(baseline.path()).expect("readdir").count(),
        0
    );
}

#[test]
fn gpu_bench_scattered_blocks_every_copy_mode() {
    if let Some(why) = no_gpu() {
        println!("skipped: {why}");
        return;
    }
    let m = KvfsMount::start(&["--host-capacity", "1GiB"]);
    for mode in ["chunk", "run", "2d", "3d"] {
        let rows = bench(
            &m.mnt,
            &[
                "--path",
                "fuse",
                "--copy-mode",
                mode,
                "--shuffle",
                "--seed",
                "9",
            ],
        );
        assert_measured(&rows, "fuse", "store");
        assert_measured(&rows, "fuse", "load");
        assert_eq!(row(&rows, "fuse", "load").expect("row")["copy_mode"], mode);
    }
}

/// A zero-copy backend that does what the daemon's host tier does with
/// memory: a slot is a memfd, a commit keeps that very memfd as the file, an
/// open hands out a read-only descriptor to the same pages. It lets the GPU
/// side of the zero-copy path run (and be timed) without the mount.
#[derive(Default)]
struct MemfdBackend {
    state: Mutex<MemfdState>,
}

/// (last id, open slots, committed files).
type MemfdState = (u64, HashMap<u64, OwnedFd>, HashMap<String, OwnedFd>);

fn memfd(size: u64) -> Result<OwnedFd, BackendError> {
    // SAFETY: plain syscall; the result is checked before it is owned.
    let fd = unsafe { libc::memfd_create(c"kvfs-gpu-test".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BackendError::new(libc::ENOMEM, "memfd_create"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(BackendError::new(libc::ENOSPC, "ftruncate"));
    }
    Ok(fd)
}

impl Backend for MemfdBackend {
    fn alloc(&self, size: u64) -> Result<(u64, OwnedFd), BackendError> {
        let fd = memfd(size)?;
        let dup = fd
            .try_clone()
            .map_err(|_| BackendError::new(libc::EMFILE, "dup"))?;
        let mut st = self.state.lock().expect("lock");
        st.0 += 1;
        let id = st.0;
        st.1.insert(id, fd);
        Ok((id, dup))
    }

    fn commit(&self, slot: u64, path: &str) -> Result<(), BackendError> {
        let mut st = self.state.lock().expect("lock");
        if st.2.contains_key(path) {
            return Err(BackendError::new(libc::EEXIST, "exists"));
        }
        let fd =
            st.1.remove(&slot)
                .ok_or_else(|| BackendError::new(libc::EBADF, "no slot"))?;
        st.2.insert(path.to_owned(), fd);
        Ok(())
    }

    fn abort(&self, slot: u64) {
        self.state.lock().expect("lock").1.remove(&slot);
    }

    fn open(&self, path: &str) -> Result<(u64, u64, OwnedFd), BackendError> {
        let mut st = self.state.lock().expect("lock");
        let fd =
            st.2.get(path)
                .ok_or_else(|| BackendError::new(libc::ENOENT, "no such file"))?;
        let size = std::fs::File::from(
            fd.try_clone()
                .map_err(|_| BackendError::new(libc::EMFILE, "dup"))?,
        )
        .metadata()
        .map_err(|_| BackendError::new(libc::EIO, "fstat"))?
        .len();
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| BackendError::new(libc::EIO, "reopen read-only"))?;
        st.0 += 1;
        Ok((st.0, size, ro.into()))
    }

    fn close(&self, _handle: u64) {}
}

#[test]
fn gpu_zerocopy_rounds_reuse_the_memory_of_deleted_blocks() {
    if let Some(why) = no_gpu() {
        println!("skipped: {why}");
        return;
    }
    for mode in ["register", "copy"] {
        let m = KvfsMount::start(&["--host-capacity", "1GiB"]);
        let rows = bench(
            &m.mnt,
            &["--path", "zerocopy", "--zc-mode", mode, "--zc-rounds", "2"],
        );
        // Every round's load verified every byte, including the second
        // round's, whose slots held the first round's bytes before the DMA.
        let rounds: Vec<_> = rows
            .iter()
            .filter(|r| r["path"] == "zerocopy" && r["op"] == "load")
            .collect();
        assert_eq!(rounds.len(), 2, "{rows:?}");
        for r in rounds {
            assert!(r["skipped"].is_null(), "{r}");
            assert_eq!(r["verified"], true, "{r}");
        }
        // The second round's slots were the first round's memory.
        let reused = m.status()["host"]["spares_reused"]
            .as_u64()
            .expect("spares_reused");
        assert!(reused >= 8, "mode {mode}: {reused} slots reused");
    }
}

#[test]
fn gpu_zerocopy_client_against_a_memfd_server() {
    if let Some(why) = no_gpu() {
        println!("skipped: {why}");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join(".kvfs")).expect("mkdir");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let server = Server::start(
        &root.path().join(kvfs::zerocopy::SOCKET_REL_PATH),
        uid,
        Arc::new(MemfdBackend::default()),
    )
    .expect("zero-copy server");
    // KVFS_GPU_ZC_ARGS replaces the small default shape, to time the client
    // side at a real model's shape on a GPU machine.
    let extra = std::env::var("KVFS_GPU_ZC_ARGS").unwrap_or_default();
    let rows = if extra.is_empty() {
        let mut rows = Vec::new();
        for prefetch in ["0", "8"] {
            rows = bench(
                root.path(),
                &["--path", "zerocopy", "--zc-prefetch", prefetch],
            );
            assert_measured(&rows, "zerocopy", "store");
            assert_measured(&rows, "zerocopy", "load");
        }
        rows
    } else {
        let mut args = vec!["gpu", "bench", "--path", "zerocopy", "--mount"];
        args.push(root.path().to_str().expect("utf-8"));
        args.extend(extra.split_whitespace());
        let out = kvfs(&args);
        println!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        results(&out)
    };
    assert_measured(&rows, "zerocopy", "store");
    assert_measured(&rows, "zerocopy", "load");
    server.shutdown();
}
