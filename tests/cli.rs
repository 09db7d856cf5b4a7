//! The command line as an operator meets it: log formats, and bad settings
//! refused with exit code 2 before anything is mounted.

mod common;

use std::process::Command;

use common::KvfsMount;

fn kvfs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .args(args)
        .output()
        .expect("run kvfs")
}

#[test]
fn json_logs_are_one_object_per_line() {
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("kvfs.json");
    let log_arg = log.to_str().unwrap();
    let mut m = KvfsMount::start(&["--log-format", "json", "--log-file", log_arg]);
    std::fs::write(m.path("f"), b"x").unwrap();
    // The kernel shows the subtype, so findmnt -t fuse.kvfs finds mounts.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == m.mnt.to_str())
        .expect("mounted");
    assert_eq!(line.split(' ').nth(2), Some("fuse.kvfs"), "{line}");
    m.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "too few log lines: {text}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(text.contains("\"message\":\"mounted\""), "{text}");
}

#[test]
fn bad_operational_settings_exit_2_and_mount_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["--log-format", "xml"], "log format"),
        (vec!["--metrics-addr", "localhost"], "metrics address"),
        (vec!["--lock-memory", "maybe"], "lock-memory"),
        (vec!["--nvme-dir", "/nonexistent/kvfs"], "NVMe directory"),
        (vec!["--durability", "sometimes"], "durability"),
        (vec!["--nvme-capacity", "0"], "NVMe capacity"),
    ] {
        let mut all = vec!["mount", mnt];
        all.extend(args.iter().copied());
        let out = kvfs(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(mnt), "something was mounted");
}
