//! The operator commands `kvfs ls-tier`, `warm` and `drain`, run as the
//! built binary against a real mount: NVMe demotion seen by ls-tier, warm
//! promoting a file back into the host tier, drain after writes and during
//! an S3 outage, and the exit codes for a path that is not a mount or a
//! file that is missing.

mod common;

use std::fs;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::KvfsMount;
use common::s3::S3Server;
use kvfs::bench::connector::fill_block;
use kvfs::ops::tiers_of;

const MIB: usize = 1 << 20;

/// A directory on a disk filesystem (not tmpfs), as an NVMe tier would be.
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvfs-nvme-")
        .tempdir_in("/var/tmp")
        .expect("temp dir on disk")
}

fn kvfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .args(args)
        .output()
        .expect("run kvfs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn block(i: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_block(&mut b, 5, i);
    b
}

/// `kvfs ls-tier MNT --json [paths]`: the per-file objects (path -> tiers,
/// size) and the summary object.
fn ls_json(
    mnt: &str,
    paths: &[&str],
) -> (
    std::collections::BTreeMap<String, (String, u64)>,
    serde_json::Value,
) {
    let mut args = vec!["ls-tier", mnt, "--json"];
    args.extend_from_slice(paths);
    let out = kvfs(&args);
    assert!(out.status.success(), "{}", show(&out));
    let mut files = std::collections::BTreeMap::new();
    let mut summary = None;
    for line in text(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(p) = v["path"].as_str() {
            let tiers: Vec<&str> = v["tiers"]
                .as_array()
                .expect("tiers")
                .iter()
                .map(|t| t.as_str().expect("tier name"))
                .collect();
            files.insert(
                p.to_string(),
                (tiers.join(","), v["size"].as_u64().expect("size")),
            );
        } else {
            assert!(summary.is_none(), "two summaries: {}", show(&out));
            summary = Some(v);
        }
    }
    (files, summary.expect("a summary object"))
}

#[test]
fn ls_tier_warm_and_drain_on_an_nvme_mount() {
    let nvme = disk_dir();
    let nvme_dir = nvme.path().to_str().unwrap();
    let m = KvfsMount::start(&["--host-capacity", "8MiB", "--nvme-dir", nvme_dir]);
    let mnt = m.mnt.to_str().unwrap();
    fs::create_dir_all(m.path("model/layer0")).unwrap();
    for i in 0..6 {
        fs::write(m.path(&format!("model/layer0/b{i}.bin")), block(i, 3 * MIB)).unwrap();
    }
    fs::write(m.path("top.bin"), block(9, 1000)).unwrap();

    // drain: every closed file reaches NVMe.
    let out = kvfs(&["drain", mnt, "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(m.status()["nvme"]["pending_flushes"], 0);
    assert_eq!(m.status()["nvme"]["files"], 7);

    // ls-tier: 18 MiB into an 8 MiB host tier demoted the oldest files.
    let (files, summary) = ls_json(mnt, &[]);
    assert_eq!(files.len(), 7, "{files:?}");
    assert_eq!(files["model/layer0/b0.bin"], ("nvme".to_string(), 3 << 20));
    assert_eq!(files["top.bin"].1, 1000);
    assert!(files["top.bin"].0.contains("nvme"), "{files:?}");
    assert!(!files.keys().any(|k| k.starts_with(".kvfs")), "{files:?}");
    for (path, (tiers, _)) in &files {
        assert_eq!(
            *tiers,
            tiers_of(&m.path(path)).unwrap().join(","),
            "{path} in ls-tier vs user.kvfs.tier"
        );
    }
    // The summary adds up per tier combination.
    let nvme_only = files.values().filter(|(t, _)| t == "nvme").count() as u64;
    assert!(nvme_only >= 3, "{files:?}");
    assert_eq!(summary["summary"]["nvme"]["files"], nvme_only);
    assert_eq!(summary["summary"]["nvme"]["bytes"], nvme_only * (3 << 20));
    assert_eq!(summary["total"]["files"], 7);
    assert_eq!(summary["total"]["bytes"], 6 * (3 << 20) + 1000);

    // The text form: `TIERS SIZE PATH`, then the summary.
    let out = kvfs(&["ls-tier", mnt, "model"]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().expect("a line");
    let cols: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(cols, ["nvme", "3145728", "model/layer0/b0.bin"], "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("total") && l.contains(" 6 files")),
        "{stdout}"
    );

    // warm (path absolute inside the mount) brings b0 back into the host tier.
    let b0 = m.path("model/layer0/b0.bin");
    let out = kvfs(&["warm", mnt, b0.to_str().unwrap(), "--threads", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("warmed 1 of 1 files"),
        "{}",
        show(&out)
    );
    assert!(
        text(&out.stderr).contains("warm: 1/1 files"),
        "{}",
        show(&out)
    );
    assert_eq!(tiers_of(&b0).unwrap(), ["host", "nvme"]);
    let (files, _) = ls_json(mnt, &["model/layer0/b0.bin"]);
    assert_eq!(files["model/layer0/b0.bin"].0, "host,nvme");
    assert!(m.status()["counters"]["promotions"].as_u64() >= Some(1));
    // The promoted copy is the file's bytes.
    assert!(fs::read(&b0).unwrap() == block(0, 3 * MIB));

    // warm of a directory larger than the host tier warns about it.
    let out = kvfs(&["warm", mnt, "model"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("more than the host tier's capacity"),
        "{}",
        show(&out)
    );
    assert!(
        text(&out.stdout).contains("warmed 6 of 6 files"),
        "{}",
        show(&out)
    );
}

#[test]
fn warm_reports_a_missing_path_and_exits_1() {
    let nvme = disk_dir();
    let m = KvfsMount::start(&[
        "--host-capacity",
        "8MiB",
        "--nvme-dir",
        nvme.path().to_str().unwrap(),
    ]);
    let mnt = m.mnt.to_str().unwrap();
    fs::write(m.path("here.bin"), b"abc").unwrap();
    let out = kvfs(&["warm", mnt, "here.bin", "no/such.bin"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no/such.bin: No such file or directory"),
        "{}",
        show(&out)
    );
    assert!(
        text(&out.stdout).contains("warmed 1 of 1 files"),
        "{}",
        show(&out)
    );
    // ls-tier says the same of a missing path, and still lists the rest.
    let out = kvfs(&["ls-tier", mnt, "here.bin", "no/such.bin"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text(&out.stdout).contains("here.bin"), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("no/such.bin: No such file or directory"),
        "{}",
        show(&out)
    );
    // A path outside the mount is refused.
    let out = kvfs(&["warm", mnt, "/etc/hostname"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text(&out.stderr).contains("not inside the mount"));
}

#[test]
fn not_a_mount_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        vec!["drain", d],
        vec!["drain", d, "--timeout", "1s"],
        vec!["ls-tier", d],
        vec!["warm", d, "x"],
    ] {
        let out = kvfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(
            text(&out.stderr).contains("is not a kvfs mount"),
            "{args:?}: {}",
            show(&out)
        );
    }
    // A bad duration is a usage error too.
    let out = kvfs(&["drain", d, "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

#[test]
fn drain_without_lower_tiers_returns_at_once() {
    let m = KvfsMount::start(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    let start = Instant::now();
    let out = kvfs(&["drain", m.mnt.to_str().unwrap(), "--timeout", "5s"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// During an S3 outage the backlog stays: drain times out (exit 1, saying
/// what is left); once S3 is back it drains, and ls-tier shows the S3 copy.
#[test]
fn drain_waits_for_s3_and_times_out_during_an_outage() {
    let mut srv = S3Server::start();
    let args = srv.args("kv/ops");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = KvfsMount::start_env(&args, &srv.env());
    let mnt = m.mnt.to_str().unwrap();
    fs::write(m.path("first.bin"), block(1, 64 << 10)).unwrap();
    let out = kvfs(&["drain", mnt, "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(srv.exists("kv/ops/first.bin"));
    let (files, _) = ls_json(mnt, &[]);
    assert!(files["first.bin"].0.contains("s3"), "{files:?}");

    srv.stop();
    fs::write(m.path("second.bin"), block(2, 64 << 10)).unwrap();
    let out = kvfs(&["drain", mnt, "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("not drained before the timeout: s3 backlog_jobs"),
        "{}",
        show(&out)
    );

    srv.start_again();
    let out = kvfs(&["drain", mnt, "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(srv.exists("kv/ops/second.bin"));
    assert_eq!(m.status()["s3"]["backlog_jobs"], 0);
}
