//! The S3 tier against a real S3 server (s3s-fs on 127.0.0.1), through the
//! kernel's FUSE: write-back of the connectors' store patterns, S3-only
//! files after a restart, two nodes sharing a bucket, readdir merging,
//! outages, bad settings, durability `remote` and NVMe eviction to S3.
//! The bucket is always checked with the tests' own aws-sdk-s3 client.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::{self, BUCKET, S3Server};
use common::{KvfsMount, cstr, err_of, errno};

/// Deterministic, file-specific contents.
fn block(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn crc_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(data))
}

fn mount(srv: &S3Server, prefix: &str, extra: &[&str]) -> KvfsMount {
    KvfsMount::start_env(&refs(&args(srv, prefix, extra)), &srv.env())
}

/// `kvfs mount` arguments for the server's bucket under `prefix`, then `extra`.
fn args(srv: &S3Server, prefix: &str, extra: &[&str]) -> Vec<String> {
    let mut v = srv.args(prefix);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A directory on a disk filesystem, as an NVMe tier would be.
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvfs-nvme-")
        .tempdir_in("/var/tmp")
        .expect("temp dir on disk")
}

/// `user.kvfs.tier` of a file, through getxattr(2).
fn tier(p: &Path) -> String {
    let c = cstr(p);
    let name = c"user.kvfs.tier";
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n >= 0, "getxattr {}: errno {}", p.display(), errno());
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `secs`.
fn poll<T>(secs: u64, what: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `key` holds exactly `data`, with its CRC32C in the metadata.
fn wait_object(srv: &S3Server, key: &str, data: &[u8], secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match srv.get(key) {
            None => "absent".to_string(),
            // s3s-fs writes an object's metadata beside its data, after it:
            // bytes without metadata yet are a copy or upload in progress.
            Some((got, meta)) if got == data && meta.contains_key("kvfs-crc32c") => {
                assert_eq!(meta["kvfs-crc32c"], crc_hex(data), "kvfs-crc32c of {key}");
                return;
            }
            Some((got, _)) if got == data => "bytes there, metadata not yet".to_string(),
            Some((got, _)) => format!("{} bytes, different", got.len()),
        };
        assert!(
            Instant::now() < deadline,
            "object {key} never matched within {secs} s (last: {last})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn s3_status(m: &KvfsMount) -> serde_json::Value {
    m.status()["s3"].clone()
}

/// Waits until the status counts `n` uploaded files.
fn wait_uploaded(m: &KvfsMount, n: u64, secs: u64) {
    poll(
        secs,
        || format!("uploads stalled: {}\n{}", m.status(), m.log()),
        || (s3_status(m)["uploaded_files"].as_u64() >= Some(n)).then_some(()),
    );
}

fn store_llmd(final_path: &Path, data: &[u8]) {
    common::store::llmd(final_path, data, false).expect("llm-d store");
}

fn store_vllm(final_path: &Path, data: &[u8]) {
    common::store::vllm(final_path, data).expect("vLLM store");
}

// 1. Write-back of both connectors' store patterns.
#[test]
fn write_back_of_both_store_patterns() {
    let srv = S3Server::start();
    let m = mount(&srv, "kv/wb", &[]);
    fs::create_dir_all(m.path("model/r0")).unwrap();
    let a = block(1, 1 << 20);
    // Above the single-PUT limit (64 MiB): a multipart upload.
    let b = block(2, 72 << 20);
    store_llmd(&m.path("model/r0/a.bin"), &a);
    store_vllm(&m.path("model/r0/b.bin"), &b);
    wait_object(&srv, "kv/wb/model/r0/a.bin", &a, 30);
    wait_object(&srv, "kv/wb/model/r0/b.bin", &b, 60);
    // The temp names never stay in the bucket.
    poll(
        10,
        || format!("temp keys remain: {:?}", srv.keys("kv/wb/")),
        || {
            let keys = srv.keys("kv/wb/");
            (keys == ["kv/wb/model/r0/a.bin", "kv/wb/model/r0/b.bin"]).then_some(())
        },
    );
    for name in ["a.bin", "b.bin"] {
        let p = m.path(&format!("model/r0/{name}"));
        poll(
            10,
            || format!("{name} tier: {}", tier(&p)),
            || tier(&p).split(',').any(|t| t == "s3").then_some(()),
        );
    }
    wait_uploaded(&m, 2, 10);
    let st = s3_status(&m);
    assert_eq!(st["bucket"], BUCKET, "{st}");
    // Reads on the mount still give the bytes.
    assert_eq!(fs::read(m.path("model/r0/a.bin")).unwrap(), a);
    assert_eq!(fs::read(m.path("model/r0/b.bin")).unwrap(), b);
    // The uploads and a lookup of a name nobody has show in the metrics.
    let put = m.metric("kvfs_tier_io_bytes_total{tier=\"s3\",op=\"put\"}");
    assert!(put >= (a.len() + b.len()) as f64, "put bytes {put}");
    let lookups = "kvfs_tier_io_seconds_count{tier=\"s3\",op=\"lookup\"}";
    let before = m.metric(lookups);
    assert_eq!(
        err_of(fs::metadata(m.path("model/r0/none.bin"))),
        libc::ENOENT
    );
    assert_eq!(m.metric(lookups), before + 1.0);
}

// 2a. Host tier only: a restart loses memory, S3 still has the file.
#[test]
fn s3_only_file_after_a_restart_without_nvme() {
    let srv = S3Server::start();
    let extra = ["--nvme-dir", "none"];
    let mut m = mount(&srv, "kv/restart", &extra);
    fs::create_dir(m.path("d")).unwrap();
    let small = block(3, 1 << 20);
    let big = block(4, 20 << 20); // several ranged GETs
    store_llmd(&m.path("d/small.bin"), &small);
    store_llmd(&m.path("d/big.bin"), &big);
    wait_uploaded(&m, 2, 30);
    wait_object(&srv, "kv/restart/d/small.bin", &small, 5);
    wait_object(&srv, "kv/restart/d/big.bin", &big, 5);
    m.restart(&refs(&args(&srv, "kv/restart", &extra)));
    assert_eq!(fs::metadata(m.path("d/small.bin")).unwrap().len(), 1 << 20);
    assert_eq!(fs::metadata(m.path("d/big.bin")).unwrap().len(), 20 << 20);
    assert_eq!(tier(&m.path("d/big.bin")), "s3");
    assert!(fs::read(m.path("d/big.bin")).unwrap() == big);
    assert!(fs::read(m.path("d/small.bin")).unwrap() == small);
    let names = sorted_names(&m.path("d"));
    assert_eq!(names, ["big.bin", "small.bin"]);
    let got = m.metric("kvfs_tier_io_bytes_total{tier=\"s3\",op=\"get\"}");
    assert!(got >= (big.len() + small.len()) as f64, "get bytes {got}");
}

// 2b. With an NVMe tier whose directory is wiped between mounts.
#[test]
fn s3_only_file_after_wiping_the_nvme_dir() {
    let srv = S3Server::start();
    let nvme = disk_dir();
    let extra = ["--nvme-dir", nvme.path().to_str().unwrap()];
    let mut m = mount(&srv, "kv/wipe", &extra);
    let data: Vec<Vec<u8>> = (0..3).map(|i| block(10 + i, 1 << 20)).collect();
    for (i, d) in data.iter().enumerate() {
        store_llmd(&m.path(&format!("f{i}.bin")), d);
    }
    wait_uploaded(&m, 3, 30);
    if let Some(status) = m.stop() {
        assert!(status.success(), "kvfs exited with {status}");
    }
    for e in fs::read_dir(nvme.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    m.restart(&refs(&args(&srv, "kv/wipe", &extra)));
    for (i, d) in data.iter().enumerate() {
        let p = m.path(&format!("f{i}.bin"));
        assert_eq!(fs::metadata(&p).unwrap().len(), 1 << 20);
        assert!(fs::read(&p).unwrap() == *d, "f{i}.bin differs");
    }
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// 3. Two nodes on one bucket and prefix.
#[test]
fn two_nodes_share_the_bucket() {
    let srv = S3Server::start();
    let ttl = ["--s3-cache-ttl", "1s"];
    let a = mount(&srv, "kv/shared", &ttl);
    let b = mount(&srv, "kv/shared", &ttl);
    fs::create_dir_all(a.path("m/g0")).unwrap();
    let x = block(20, 2 << 20);
    store_llmd(&a.path("m/g0/x.bin"), &x);
    wait_object(&srv, "kv/shared/m/g0/x.bin", &x, 30);
    // B finds it by name (stat), reads it, and lists it.
    let md = poll(
        10,
        || "B never found m/g0/x.bin".into(),
        || fs::metadata(b.path("m/g0/x.bin")).ok(),
    );
    assert_eq!(md.len(), x.len() as u64);
    assert!(fs::read(b.path("m/g0/x.bin")).unwrap() == x);
    assert_eq!(sorted_names(&b.path("m/g0")), ["x.bin"]);
    assert_eq!(sorted_names(&b.path("m")), ["g0"]);

    // Unlink on A: B sees ENOENT within a few seconds.
    fs::remove_file(a.path("m/g0/x.bin")).unwrap();
    poll(
        10,
        || format!("key still there: {:?}", srv.keys("kv/shared/")),
        || (!srv.exists("kv/shared/m/g0/x.bin")).then_some(()),
    );
    poll(
        10,
        || "B still sees the unlinked file".into(),
        || (fs::metadata(b.path("m/g0/x.bin")).is_err()).then_some(()),
    );
    assert_eq!(err_of(fs::metadata(b.path("m/g0/x.bin"))), libc::ENOENT);
    assert_eq!(err_of(fs::read(b.path("m/g0/x.bin"))), libc::ENOENT);

    // Rename on A of an uploaded file: the key moves, B reads the new name.
    let y = block(21, 1 << 20);
    store_llmd(&a.path("m/g0/y.bin"), &y);
    wait_object(&srv, "kv/shared/m/g0/y.bin", &y, 30);
    poll(
        10,
        || format!("y.bin tier on A: {}", tier(&a.path("m/g0/y.bin"))),
        || tier(&a.path("m/g0/y.bin")).contains("s3").then_some(()),
    );
    fs::rename(a.path("m/g0/y.bin"), a.path("m/g0/z.bin")).unwrap();
    wait_object(&srv, "kv/shared/m/g0/z.bin", &y, 30);
    poll(
        10,
        || format!("old key remains: {:?}", srv.keys("kv/shared/")),
        || (!srv.exists("kv/shared/m/g0/y.bin")).then_some(()),
    );
    let got = poll(
        10,
        || "B cannot read z.bin".into(),
        || fs::read(b.path("m/g0/z.bin")).ok(),
    );
    assert!(got == y, "B read other bytes for z.bin");
    poll(
        10,
        || "B still sees y.bin".into(),
        || (fs::metadata(b.path("m/g0/y.bin")).is_err()).then_some(()),
    );
}

/// uid, gid and permission bits of a file, if it can be stat'ed.
fn owner_of(p: &Path) -> Option<(u32, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(p).ok()?;
    Some((md.uid(), md.gid(), md.mode() & 0o7777))
}

/// The object's `kvfs-owner` metadata, read with the tests' own client.
fn owner_meta(srv: &S3Server, key: &str) -> Option<String> {
    srv.get(key)?.1.get("kvfs-owner").cloned()
}

// 3b. Owner and mode travel with the object: set before the upload, they
// are in its metadata, and a mount with empty local tiers shows them,
// whether it finds the file by name (HEAD) or by a listing (LIST, then a
// HEAD at the first lookup). Objects without them, or with a malformed
// value, show as the mount's owner with mode 0644.
#[test]
fn owner_and_mode_travel_with_the_object() {
    use std::os::unix::fs::{PermissionsExt, fchown};
    let srv = S3Server::start();
    let extra = ["--nvme-dir", "none"];
    let mut a = mount(&srv, "kv/own", &extra);
    fs::create_dir(a.path("d")).unwrap();
    let x = block(60, 1 << 20);
    // Above the single-PUT limit: the multipart upload's metadata.
    let y = block(61, 66 << 20);
    // Changed while still open for writing, so before the upload (a file
    // open for writing is not sent).
    for (name, data, mode, uid, gid) in [
        ("d/x.bin", &x, 0o600, 1234, 5678),
        ("d/y.bin", &y, 0o640, 4321, 8765),
    ] {
        let mut f = fs::File::create(a.path(name)).unwrap();
        f.write_all(data).unwrap();
        f.set_permissions(fs::Permissions::from_mode(mode)).unwrap();
        fchown(&f, Some(uid), Some(gid)).unwrap();
    }
    wait_object(&srv, "kv/own/d/x.bin", &x, 30);
    wait_object(&srv, "kv/own/d/y.bin", &y, 60);
    assert_eq!(
        owner_meta(&srv, "kv/own/d/x.bin").as_deref(),
        Some("1234:5678:600")
    );
    assert_eq!(
        owner_meta(&srv, "kv/own/d/y.bin").as_deref(),
        Some("4321:8765:640")
    );
    // Written by another tool: no owner, and a damaged one.
    let p = block(62, 64 << 10);
    let q = block(63, 64 << 10);
    for dir in ["d", "e"] {
        srv.put(
            &format!("kv/own/{dir}/plain.bin"),
            &p,
            &[("kvfs-crc32c", &crc_hex(&p))],
        );
        srv.put(
            &format!("kv/own/{dir}/bad.bin"),
            &q,
            &[("kvfs-crc32c", &crc_hex(&q)), ("kvfs-owner", "1234:5678")],
        );
    }
    wait_uploaded(&a, 2, 30);

    // B, a fresh mount: names from a listing, then stat.
    let b = mount(&srv, "kv/own", &extra);
    let root = owner_of(&b.path("")).unwrap();
    let default = (root.0, root.1, 0o644);
    assert_eq!(
        sorted_names(&b.path("d")),
        ["bad.bin", "plain.bin", "x.bin", "y.bin"]
    );
    assert_eq!(owner_of(&b.path("d/x.bin")), Some((1234, 5678, 0o600)));
    assert_eq!(owner_of(&b.path("d/y.bin")), Some((4321, 8765, 0o640)));
    assert_eq!(owner_of(&b.path("d/plain.bin")), Some(default));
    assert_eq!(owner_of(&b.path("d/bad.bin")), Some(default));
    assert!(fs::read(b.path("d/bad.bin")).unwrap() == q);

    // A again, its memory lost (no NVMe tier): names by lookup (HEAD).
    a.restart(&refs(&args(&srv, "kv/own", &extra)));
    assert_eq!(tier(&a.path("d/x.bin")), "s3");
    assert_eq!(owner_of(&a.path("d/x.bin")), Some((1234, 5678, 0o600)));
    assert_eq!(owner_of(&a.path("d/y.bin")), Some((4321, 8765, 0o640)));
    assert_eq!(owner_of(&a.path("e/plain.bin")), Some(default));
    assert_eq!(owner_of(&a.path("e/bad.bin")), Some(default));
    assert!(fs::read(a.path("e/bad.bin")).unwrap() == q);
    assert!(fs::read(a.path("d/x.bin")).unwrap() == x);
}

// 3c. A chmod or chown after the upload reaches the object (its bytes and
// other metadata kept), and the other node shows it after its TTL; one
// during an outage arrives when S3 is back, also when a rename of the file
// is queued behind it.
#[test]
fn chmod_after_the_upload_reaches_the_object() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let mut srv = S3Server::start();
    let extra = ["--s3-cache-ttl", "1s", "--nvme-dir", "none"];
    let a = mount(&srv, "kv/chmod", &extra);
    let b = mount(&srv, "kv/chmod", &extra);
    let x = block(70, 1 << 20);
    let w = block(71, 1 << 20);
    store_llmd(&a.path("x.bin"), &x);
    store_llmd(&a.path("w.bin"), &w);
    wait_object(&srv, "kv/chmod/x.bin", &x, 30);
    wait_object(&srv, "kv/chmod/w.bin", &w, 30);
    poll(
        10,
        || format!("x.bin tier on A: {}", tier(&a.path("x.bin"))),
        || tier(&a.path("x.bin")).contains("s3").then_some(()),
    );
    let (_, before) = srv.get("kv/chmod/x.bin").unwrap();
    let created = owner_of(&a.path("x.bin")).unwrap();
    assert_eq!(owner_of(&b.path("x.bin")), Some(created));

    fs::set_permissions(a.path("x.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    chown(a.path("x.bin"), Some(1234), Some(5678)).unwrap();
    let (data, meta) = poll(
        10,
        || {
            format!(
                "owner never reached the object: {:?}",
                srv.get("kv/chmod/x.bin").map(|o| o.1)
            )
        },
        || {
            let (data, meta) = srv.get("kv/chmod/x.bin")?;
            (meta.get("kvfs-owner").map(String::as_str) == Some("1234:5678:640"))
                .then_some((data, meta))
        },
    );
    assert!(data == x, "the object's bytes changed");
    for k in ["kvfs-crc32c", "kvfs-mtime-ns"] {
        assert_eq!(meta.get(k), before.get(k), "{k} after the owner update");
    }
    // B, which found it earlier, sees the change once its TTL has passed.
    poll(
        10,
        || format!("B shows {:?}", owner_of(&b.path("x.bin"))),
        || (owner_of(&b.path("x.bin")) == Some((1234, 5678, 0o640))).then_some(()),
    );
    assert!(fs::read(b.path("x.bin")).unwrap() == x);

    // During an outage: on A a chmod of a file it holds; on B, of a file
    // only in S3 between two renames (the chmod's job waits for the first
    // move, and then must wait for the second before it rewrites the
    // object at its final key).
    assert_eq!(owner_of(&b.path("w.bin")), Some(created));
    let errors = |m: &KvfsMount| s3_status(m)["errors"].as_u64().unwrap_or(0);
    let (errors_a, errors_b) = (errors(&a), errors(&b));
    srv.stop();
    fs::set_permissions(a.path("x.bin"), fs::Permissions::from_mode(0o604)).unwrap();
    fs::rename(b.path("w.bin"), b.path("u.bin")).unwrap();
    fs::set_permissions(b.path("u.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    for (m, before) in [(&a, errors_a), (&b, errors_b)] {
        poll(
            20,
            || format!("the owner job never failed: {}", m.status()),
            || (errors(m) >= before + 2).then_some(()),
        );
    }
    fs::rename(b.path("u.bin"), b.path("v.bin")).unwrap();
    srv.start_again();
    for m in [&a, &b] {
        poll(
            60,
            || format!("backlog never drained: {}", m.status()),
            || (s3_status(m)["backlog_jobs"].as_u64() == Some(0)).then_some(()),
        );
    }
    assert_eq!(
        owner_meta(&srv, "kv/chmod/x.bin").as_deref(),
        Some("1234:5678:604")
    );
    wait_object(&srv, "kv/chmod/v.bin", &w, 5);
    assert_eq!(
        owner_meta(&srv, "kv/chmod/v.bin"),
        Some(format!("{}:{}:600", created.0, created.1))
    );
    assert!(!srv.exists("kv/chmod/w.bin") && !srv.exists("kv/chmod/u.bin"));
    // A never held v.bin: it finds it with B's mode.
    poll(
        10,
        || format!("A shows {:?}", owner_of(&a.path("v.bin"))),
        || (owner_of(&a.path("v.bin")) == Some((created.0, created.1, 0o600))).then_some(()),
    );
}

// 3d. With an NVMe tier, a chmod whose job the unmount left undone (S3
// down) reaches the object at the next mount, without a new upload.
#[test]
fn a_chmod_left_undone_at_unmount_reaches_the_object_at_the_next_mount() {
    use std::os::unix::fs::PermissionsExt;
    let mut srv = S3Server::start();
    let nvme = disk_dir();
    let extra = ["--nvme-dir", nvme.path().to_str().unwrap()];
    let mut m = mount(&srv, "kv/undone", &extra);
    let x = block(80, 1 << 20);
    store_llmd(&m.path("x.bin"), &x);
    wait_object(&srv, "kv/undone/x.bin", &x, 30);
    poll(
        10,
        || format!("x.bin tier: {}", tier(&m.path("x.bin"))),
        || {
            (tier(&m.path("x.bin")) == "host,nvme,s3" || tier(&m.path("x.bin")) == "nvme,s3")
                .then_some(())
        },
    );
    let (uid, gid, _) = owner_of(&m.path("x.bin")).unwrap();
    srv.stop();
    fs::set_permissions(m.path("x.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    if let Some(status) = m.stop() {
        assert!(status.success(), "kvfs exited with {status}");
    }
    srv.start_again();
    assert_ne!(
        owner_meta(&srv, "kv/undone/x.bin"),
        Some(format!("{uid}:{gid}:600"))
    );
    m.restart(&refs(&args(&srv, "kv/undone", &extra)));
    poll(
        30,
        || format!("owner never reached the object: {}", m.status()),
        || (owner_meta(&srv, "kv/undone/x.bin") == Some(format!("{uid}:{gid}:600"))).then_some(()),
    );
    assert_eq!(owner_of(&m.path("x.bin")), Some((uid, gid, 0o600)));
    // Rewritten in place: nothing uploaded again.
    assert_eq!(
        m.metric("kvfs_tier_io_bytes_total{tier=\"s3\",op=\"put\"}"),
        0.0
    );
    wait_object(&srv, "kv/undone/x.bin", &x, 5);
}

// 4. readdir merges local names with the bucket's; a damaged object is
// never data.
#[test]
fn readdir_merges_local_and_s3_and_never_serves_a_bad_object() {
    let srv = S3Server::start();
    let x = block(30, 1 << 20);
    let y = block(31, 64 << 10);
    srv.put("kv/merge/d/x.bin", &x, &[("kvfs-crc32c", &crc_hex(&x))]);
    srv.put("kv/merge/d/sub/y.bin", &y, &[("kvfs-crc32c", &crc_hex(&y))]);
    let bad = block(32, 256 << 10);
    srv.put("kv/merge/d/bad.bin", &bad, &[("kvfs-crc32c", "deadbeef")]);
    let m = mount(&srv, "kv/merge", &[]);
    fs::create_dir(m.path("d")).unwrap_or_else(|e| {
        // The bucket already has the directory: the mount may show it.
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "mkdir d: {e}");
    });
    let z = block(33, 1 << 20);
    store_llmd(&m.path("d/z.bin"), &z);
    let names = sorted_names(&m.path("d"));
    for want in ["sub", "x.bin", "z.bin"] {
        assert!(names.iter().any(|n| n == want), "ls d: {names:?}");
    }
    assert!(m.path("d/sub").is_dir());
    assert_eq!(sorted_names(&m.path("d/sub")), ["y.bin"]);
    assert!(fs::read(m.path("d/x.bin")).unwrap() == x);
    assert!(fs::read(m.path("d/sub/y.bin")).unwrap() == y);
    assert!(fs::read(m.path("d/z.bin")).unwrap() == z);
    // The damaged object: an error (EIO) or a vanished name, never bytes.
    for _ in 0..2 {
        match fs::read(m.path("d/bad.bin")) {
            Ok(got) => panic!(
                "read of an object with a wrong checksum returned {} bytes",
                got.len()
            ),
            Err(e) => {
                let code = e.raw_os_error();
                assert!(
                    code == Some(libc::EIO) || code == Some(libc::ENOENT),
                    "read d/bad.bin: {e}"
                );
            }
        }
    }
}

// Found by the model test: a name that once was an object and then a
// directory must not come back as a file. (s3s-fs keeps a deleted object's
// metadata and answers HEAD of the directory that replaced it with it.)
#[test]
fn a_name_that_was_an_object_then_a_directory_is_not_a_file() {
    let srv = S3Server::start();
    let x = block(34, 64 << 10);
    let meta = [("kvfs-crc32c", crc_hex(&x))];
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    srv.put("kv/was/e", &x, &meta);
    srv.delete("kv/was/e");
    srv.put("kv/was/e/a", &x, &meta);
    srv.delete("kv/was/e/a");
    srv.put("kv/was/f/a", &x, &meta);
    let m = mount(&srv, "kv/was", &[]);
    assert_eq!(err_of(fs::metadata(m.path("e"))), libc::ENOENT);
    assert_eq!(err_of(fs::metadata(m.path("e/a"))), libc::ENOENT);
    assert_eq!(sorted_names(&m.path("")), ["f"]);
    // A directory still is one, and a file below it still reads.
    assert!(m.path("f").is_dir());
    assert!(fs::read(m.path("f/a")).unwrap() == x);
}

/// `chattr +i` on a file of the server: even root cannot delete it, so the
/// server refuses DELETE while LIST and GET still work. Undone on drop.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: std::path::PathBuf) -> Immutable {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chattr +i {} (e2fsprogs, on ext4/xfs)", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

// Found by the model soak: a directory whose objects this node is still
// deleting must not come back from a lookup.
#[test]
fn a_directory_being_deleted_does_not_come_back() {
    let srv = S3Server::start();
    // A short negative-lookup TTL: the mkdir's own miss must not answer
    // the lookup below.
    let m = mount(&srv, "kv/leave", &["--s3-cache-ttl", "100ms"]);
    fs::create_dir(m.path("e")).unwrap();
    let x = block(35, 64 << 10);
    store_llmd(&m.path("e/a"), &x);
    wait_object(&srv, "kv/leave/e/a", &x, 30);
    let stuck = Immutable::set(srv.bucket_dir().join("kv/leave/e/a"));
    fs::remove_file(m.path("e/a")).unwrap();
    fs::remove_dir(m.path("e")).unwrap();
    assert!(
        srv.exists("kv/leave/e/a"),
        "the server deleted an immutable file"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(err_of(fs::metadata(m.path("e"))), libc::ENOENT);
    assert!(sorted_names(&m.path("")).is_empty());
    fs::create_dir(m.path("e")).expect("mkdir of the removed name");
    fs::remove_dir(m.path("e")).unwrap();
    // Once the server lets go, the delete lands and the name stays gone.
    drop(stuck);
    poll(
        30,
        || format!("e/a never deleted: {}", m.log()),
        || (!srv.exists("kv/leave/e/a")).then_some(()),
    );
    assert_eq!(err_of(fs::metadata(m.path("e"))), libc::ENOENT);
}

/// Makes `key`'s object look uploaded `secs` ago (s3s-fs reports a file's
/// mtime as LastModified).
fn age(srv: &S3Server, key: &str, secs: u64) {
    let f = fs::File::options()
        .write(true)
        .open(srv.bucket_dir().join(key))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

// The connectors never clean up: --s3-expire-after does, sparing files
// this node holds locally.
#[test]
fn old_objects_expire_unless_held_here() {
    let srv = S3Server::start();
    let nvme = disk_dir();
    let x = block(36, 64 << 10);
    let crc = crc_hex(&x);
    let meta = [("kvfs-crc32c", crc.as_str())];
    for key in ["old/a.bin", "old/s3only.bin", "new/c.bin"] {
        srv.put(&format!("kv/exp/{key}"), &x, &meta);
    }
    // A file of this node: on its NVMe tier and in S3.
    let local = ["--nvme-dir", nvme.path().to_str().unwrap()];
    let mut m = mount(&srv, "kv/exp", &local);
    fs::create_dir(m.path("mine")).unwrap();
    store_llmd(&m.path("mine/b.bin"), &x);
    wait_object(&srv, "kv/exp/mine/b.bin", &x, 30);
    m.stop();
    for key in ["old/a.bin", "old/s3only.bin", "mine/b.bin"] {
        age(&srv, &format!("kv/exp/{key}"), 2 * 3600);
    }
    let mut expiring = local.to_vec();
    expiring.extend(["--s3-expire-after", "1h"]);
    m.restart(&refs(&args(&srv, "kv/exp", &expiring)));
    // Known here from S3 only: forgotten with its object.
    assert!(fs::metadata(m.path("old/s3only.bin")).is_ok());
    poll(
        20,
        || format!("old objects remain: {:?}\n{}", srv.keys("kv/exp/"), m.log()),
        || (!srv.exists("kv/exp/old/a.bin") && !srv.exists("kv/exp/old/s3only.bin")).then_some(()),
    );
    assert!(srv.exists("kv/exp/new/c.bin"), "a fresh object expired");
    assert!(
        srv.exists("kv/exp/mine/b.bin"),
        "a file held here lost its object"
    );
    assert_eq!(err_of(fs::metadata(m.path("old/s3only.bin"))), libc::ENOENT);
    assert!(fs::read(m.path("mine/b.bin")).unwrap() == x);
    assert_eq!(s3_status(&m)["expired_objects"], 2);
}

#[test]
fn the_oldest_objects_go_beyond_the_capacity() {
    let srv = S3Server::start();
    let x = block(37, 64 << 10);
    let crc = crc_hex(&x);
    let meta = [("kvfs-crc32c", crc.as_str())];
    // Oldest first: o0 (4 h) ... o4 (now): 320 KiB, 200 KiB allowed.
    for i in 0..5u64 {
        let key = format!("kv/cap/o{i}");
        srv.put(&key, &x, &meta);
        age(&srv, &key, (4 - i) * 3600);
    }
    let m = mount(&srv, "kv/cap", &["--s3-capacity", "200KiB"]);
    // o1 is read here first, so it is held on the host tier: spared.
    assert!(fs::read(m.path("o1")).unwrap() == x);
    poll(
        20,
        || format!("objects: {:?}\n{}", srv.keys("kv/cap/"), m.log()),
        || (s3_status(&m)["expired_objects"] == 2).then_some(()),
    );
    poll(
        20,
        || format!("objects: {:?}", srv.keys("kv/cap/")),
        || {
            let mut keys = srv.keys("kv/cap/");
            keys.sort();
            (keys == ["kv/cap/o1", "kv/cap/o3", "kv/cap/o4"]).then_some(())
        },
    );
}

// 5. An S3 outage: writes and reads go on, the backlog arrives afterwards.
#[test]
fn outage_then_the_backlog_arrives() {
    let mut srv = S3Server::start();
    let m = mount(&srv, "kv/outage", &[]);
    let first = block(40, 256 << 10);
    store_llmd(&m.path("first.bin"), &first);
    wait_object(&srv, "kv/outage/first.bin", &first, 30);
    srv.stop();
    let data: Vec<Vec<u8>> = (0..20).map(|i| block(100 + i, 256 << 10)).collect();
    for (i, d) in data.iter().enumerate() {
        store_llmd(&m.path(&format!("f{i:02}.bin")), d);
    }
    for (i, d) in data.iter().enumerate() {
        assert!(
            fs::read(m.path(&format!("f{i:02}.bin"))).unwrap() == *d,
            "local read of f{i:02}.bin"
        );
    }
    poll(
        15,
        || format!("status never showed the outage: {}", m.status()),
        || {
            let st = s3_status(&m);
            (st["healthy"] == false || st["backlog_jobs"].as_u64() > Some(0)).then_some(())
        },
    );
    srv.start_again();
    for (i, d) in data.iter().enumerate() {
        wait_object(&srv, &format!("kv/outage/f{i:02}.bin"), d, 60);
    }
    poll(
        20,
        || format!("backlog never drained: {}", m.status()),
        || {
            let st = s3_status(&m);
            (st["healthy"] == true && st["backlog_jobs"].as_u64() == Some(0)).then_some(())
        },
    );
    let mut keys = srv.keys("kv/outage/");
    keys.sort();
    assert_eq!(keys.len(), 21, "{keys:?}");
    // The operator sees the outage as two lines, in order.
    let log = fs::read_to_string(m.log_path()).unwrap();
    let down = log.find("S3 tier down").expect("no line when S3 went down");
    let up = log
        .find("S3 tier up again")
        .expect("no line when S3 came back");
    assert!(down < up);
}

/// Runs `kvfs mount` in the foreground expecting a failure: its exit
/// status, stderr and how long it took.
fn failing_mount(args: &[&str], envs: &[(String, String)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .arg("mount")
        .arg(&mnt)
        .args(args)
        .env("KVFS_NVME_DIR", "none")
        .env("NO_COLOR", "1")
        .env("KVFS_LOG_LEVEL", "warn")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let c = cstr(&mnt);
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            panic!("kvfs mount {args:?} did not fail within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// The one `kvfs: ...` line of a failed mount.
fn error_line(err: &str) -> String {
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("kvfs:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, stderr:\n{err}");
    lines[0].to_string()
}

// A clean unmount frees the host tier's memory with an S3 tier too: the
// uploader threads must not keep the core (and its backing tmpfs) alive
// past the daemon's exit. Found by hand: /dev/shm/kvfs-PID stayed mounted.
#[test]
fn unmount_frees_the_backing_files_with_an_s3_tier() {
    let srv = S3Server::start();
    let mut m = mount(&srv, "kv/free", &[]);
    let data = block(21, 4 << 20);
    store_llmd(&m.path("a.bin"), &data);
    wait_object(&srv, "kv/free/a.bin", &data, 30);
    let dir = std::path::PathBuf::from(format!("/dev/shm/kvfs-{}", m.pid().unwrap()));
    assert!(dir.is_dir(), "backing dir {} missing", dir.display());
    let status = m.stop().unwrap();
    assert!(status.success(), "kvfs exited with {status}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", dir.display())),
        "backing tmpfs still mounted at {}",
        dir.display()
    );
    assert!(!dir.exists(), "backing files left in {}", dir.display());
}

/// Name and nice value of every thread of `pid`, from /proc.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let dir = t.expect("task entry").path();
        let (Ok(comm), Ok(stat)) = (
            fs::read_to_string(dir.join("comm")),
            fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the command's closing parenthesis: state is field
        // 3 of stat(5), nice field 19.
        let rest = stat.rsplit_once(')').expect("stat format").1;
        let nice = rest.split_whitespace().nth(16).expect("nice field");
        out.push((comm.trim().to_string(), nice.parse().expect("nice value")));
    }
    out
}

// Uploads are background work: their threads, and the threads that send
// their bodies, give the CPU to the writers (nice 10); the daemon's other
// threads, the S3 runtime's that serve lookups and reads among them, keep
// the normal priority.
#[test]
fn uploader_threads_run_below_the_writers_priority() {
    let srv = S3Server::start();
    let m = mount(&srv, "kv/nice", &["--s3-uploads", "3"]);
    assert_eq!(s3_status(&m)["uploads"], 3);
    let pid = m.pid().expect("daemon pid");
    let background = |n: &str| n == "kvfs-upload" || n == "kvfs-s3-upload";
    let threads = poll(
        10,
        || format!("threads: {:?}", thread_nices(pid)),
        || {
            let t = thread_nices(pid);
            let count = |name: &str| t.iter().filter(|(n, _)| n == name).count();
            (count("kvfs-upload") == 3 && count("kvfs-s3-upload") >= 1).then_some(t)
        },
    );
    for (name, nice) in &threads {
        if background(name) {
            assert_eq!(*nice, 10, "{name} at nice {nice}: {threads:?}");
        }
    }
    assert!(
        threads.iter().any(|(n, nice)| n == "kvfs-s3" && *nice == 0),
        "no S3 runtime thread at nice 0: {threads:?}"
    );
    // Still uploading, of course.
    let data = block(7, 1 << 20);
    store_llmd(&m.path("a.bin"), &data);
    wait_object(&srv, "kv/nice/a.bin", &data, 30);
}

// While a writer is busy, half of the uploads run (each takes CPU and
// memory bandwidth from the writers); once it stops, all of them drain
// what is left. The backlog is built during an outage, so that it does not
// depend on how fast this machine writes.
#[test]
fn half_the_uploads_run_while_writers_store() {
    let mut srv = S3Server::start();
    let m = mount(&srv, "kv/held", &["--s3-uploads", "4"]);
    let field = |k: &str| s3_status(&m)[k].as_u64().expect(k);
    assert_eq!(field("uploads_allowed"), 4, "nothing written yet");
    srv.stop();
    const FILES: u64 = 24;
    let data = block(11, 8 << 20);
    for i in 0..FILES {
        store_llmd(&m.path(&format!("w{i:02}.bin")), &data);
    }
    // A writer that stays busy: a file open for writing.
    let busy = fs::File::create(m.path("busy.bin")).expect("create busy.bin");
    assert_eq!(field("uploads_allowed"), 2, "a file is open for writing");
    // Attempts that started before it opened end (the server is down).
    poll(
        60,
        || {
            format!(
                "attempts from before the writer never ended: {}",
                m.status()
            )
        },
        || (field("uploads_running") <= 2).then_some(()),
    );
    srv.start_again();
    // Half of the backlog goes up beside the writer, never more than two
    // at once.
    let mut most = 0;
    poll(
        60,
        || format!("uploads stalled beside the writer: {}", m.status()),
        || {
            most = most.max(field("uploads_running"));
            (field("uploaded_files") >= FILES / 2).then_some(())
        },
    );
    assert!(most <= 2, "{most} uploads ran beside a busy writer");
    assert!(most >= 1, "no upload was ever seen running");
    // The writer stops: all four run on what is left.
    drop(busy);
    let mut most = 0;
    while field("backlog_jobs") > 0 {
        if field("uploads_allowed") == 4 {
            most = most.max(field("uploads_running"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        most > 2,
        "at most {most} uploads ran after the writer stopped"
    );
    wait_uploaded(&m, FILES + 1, 60);
    wait_object(&srv, "kv/held/w23.bin", &data, 30);
}

/// A TCP proxy in front of the server that records the value of every
/// `x-amz-content-sha256` header kvfs sends (plain http, so readable).
struct HeaderTap {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HeaderTap {
    fn start(upstream: &str) -> HeaderTap {
        use std::io::Read;
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tap");
        let port = listener.local_addr().expect("tap addr").port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let log = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                let log = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    // Headers may straddle reads: scan a sliding tail.
                    let mut buf = vec![0u8; 1 << 16];
                    let mut tail: Vec<u8> = Vec::new();
                    while let Ok(n) = c_in.read(&mut buf) {
                        if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        tail.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&tail).to_ascii_lowercase();
                        let mut used = 0;
                        let key = "\r\nx-amz-content-sha256:";
                        while let Some(i) = text[used..].find(key) {
                            let start = used + i + key.len();
                            let Some(end) = text[start..].find("\r\n") else {
                                break;
                            };
                            log.lock()
                                .unwrap()
                                .push(text[start..start + end].trim().to_string());
                            used = start + end;
                        }
                        let keep = tail.len().saturating_sub(256).max(used.min(tail.len()));
                        tail.drain(..keep);
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(Shutdown::Write);
                });
            }
        });
        HeaderTap { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// SHA-256 of the empty string: what a signed request without a body says.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// With payload signing off the bodies go up unsigned (UNSIGNED-PAYLOAD),
// still checked by the server through their CRC32C; over http the default
// (auto) signs them. Single PUT and multipart parts both.
#[test]
fn payload_signing_off_sends_unsigned_bodies_auto_signs_over_http() {
    let srv = S3Server::start();
    for (prefix, signing) in [("kv/unsigned", Some("off")), ("kv/signed", None)] {
        let tap = HeaderTap::start(&srv.endpoint());
        let mut a = args(&srv, prefix, &[]);
        let at = a.iter().position(|x| x == "--s3-endpoint").unwrap();
        a[at + 1] = tap.endpoint();
        if let Some(v) = signing {
            a.extend(["--s3-payload-signing".to_string(), v.to_string()]);
        }
        let m = KvfsMount::start_env(&refs(&a), &srv.env());
        assert_eq!(
            s3_status(&m)["payload_signing"],
            serde_json::json!(signing != Some("off")),
            "status says what the mount does"
        );
        let small = block(11, 1 << 20);
        // Above the single-PUT limit: parts.
        let big = block(12, 72 << 20);
        store_llmd(&m.path("small.bin"), &small);
        store_llmd(&m.path("big.bin"), &big);
        wait_object(&srv, &format!("{prefix}/small.bin"), &small, 30);
        wait_object(&srv, &format!("{prefix}/big.bin"), &big, 60);
        let seen = tap.seen();
        let unsigned = seen.iter().filter(|v| *v == "unsigned-payload").count();
        let hashed = seen
            .iter()
            .filter(|v| v.len() == 64 && *v != EMPTY_SHA256)
            .count();
        if signing == Some("off") {
            // 1 PUT + 9 parts of 8 MiB.
            assert!(unsigned >= 10, "{unsigned} unsigned bodies: {seen:?}");
            // Only the CompleteMultipartUpload's small XML body is hashed.
            assert!(hashed <= 1, "{hashed} bodies hashed: {seen:?}");
        } else {
            assert!(hashed >= 10, "{hashed} hashed bodies: {seen:?}");
            assert_eq!(unsigned, 0, "a body went unsigned over http: {seen:?}");
        }
    }
}

// 6. Settings that cannot work fail the mount quickly and say why.
#[test]
fn bad_settings_fail_the_mount_with_one_line() {
    let srv = S3Server::start();
    let endpoint = srv.endpoint();
    let closed = format!("http://127.0.0.1:{}", s3::free_port());
    let check =
        |what: &str, bucket: &str, endpoint: &str, env: &[(String, String)], words: &[&str]| {
            let args = [
                "--s3-bucket",
                bucket,
                "--s3-endpoint",
                endpoint,
                "--s3-region",
                "us-east-1",
                "--s3-path-style",
            ];
            let (status, err) = failing_mount(&args, env);
            assert!(!status.success(), "{what}: kvfs mount succeeded");
            let line = error_line(&err);
            for w in words {
                assert!(line.contains(w), "{what}: {line:?} does not say {w:?}");
            }
        };
    check(
        "missing bucket",
        "no-such-bucket",
        &endpoint,
        &srv.env(),
        &["no-such-bucket", "does not exist"],
    );
    check(
        "unreachable endpoint",
        BUCKET,
        &closed,
        &srv.env(),
        &["unreachable"],
    );
    check(
        "bad credentials",
        BUCKET,
        &endpoint,
        &s3::env_with("wrongkey", "wrongsecret"),
        &["credentials"],
    );
    let mut none = s3::env_with("", "");
    none.retain(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"));
    none.push(("AWS_ACCESS_KEY_ID".into(), String::new()));
    check(
        "no credentials",
        BUCKET,
        &endpoint,
        &none,
        &["no S3 credentials found", "AWS_ACCESS_KEY_ID"],
    );
}

// 6a. The one line says its reason once.
#[test]
fn bad_settings_line_says_its_reason_once() {
    let srv = S3Server::start();
    let args = [
        "--s3-bucket",
        "no-such-bucket",
        "--s3-endpoint",
        &srv.endpoint(),
        "--s3-region",
        "us-east-1",
        "--s3-path-style",
    ]
    .map(String::from);
    let (status, err) = failing_mount(&refs(&args), &srv.env());
    assert!(!status.success());
    let line = error_line(&err);
    assert_eq!(line.matches("does not exist").count(), 1, "{line:?}");
}

// 6b. --s3-lazy: an unreachable endpoint does not stop the mount.
#[test]
fn lazy_mount_comes_up_with_s3_down() {
    let port = s3::free_port();
    let args = [
        "--s3-bucket",
        BUCKET,
        "--s3-endpoint",
        &format!("http://127.0.0.1:{port}"),
        "--s3-region",
        "us-east-1",
        "--s3-path-style",
        "--s3-lazy",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = KvfsMount::start_env(&args, &s3::env_with(s3::ACCESS_KEY, s3::SECRET_KEY));
    let st = s3_status(&m);
    assert_eq!(st["healthy"], false, "{st}");
    // The mount works locally.
    let d = block(50, 64 << 10);
    fs::write(m.path("a.bin"), &d).unwrap();
    assert!(fs::read(m.path("a.bin")).unwrap() == d);
    assert_eq!(s3_status(&m)["healthy"], false);
}

// 7. --durability remote: fsync returns once the object is in S3.
#[test]
fn durability_remote_fsync_means_in_s3() {
    let srv = S3Server::start();
    let m = mount(&srv, "kv/durable", &["--durability", "remote"]);
    // fsync while the writer is still open (write, fsync, close).
    let a = block(60, 3 << 20);
    let mut f = fs::File::create(m.path("a.bin")).unwrap();
    f.write_all(&a).unwrap();
    f.sync_all().unwrap();
    let got = srv.get("kv/durable/a.bin");
    drop(f);
    let (bytes, meta) = got.expect("kv/durable/a.bin not in S3 when fsync returned");
    assert!(bytes == a, "object differs");
    assert_eq!(meta.get("kvfs-crc32c"), Some(&crc_hex(&a)));
}

// 7b. fsync of a file reopened after it was closed (sealed).
#[test]
fn durability_remote_fsync_of_a_sealed_file() {
    let srv = S3Server::start();
    let m = mount(&srv, "kv/durable2", &["--durability", "remote"]);
    let b = block(61, 1 << 20);
    store_llmd(&m.path("b.bin"), &b);
    let f = fs::File::open(m.path("b.bin")).unwrap();
    f.sync_all().unwrap();
    let (bytes, meta) = srv
        .get("kv/durable2/b.bin")
        .expect("kv/durable2/b.bin not in S3 when fsync returned");
    assert!(bytes == b, "object differs");
    assert_eq!(meta.get("kvfs-crc32c"), Some(&crc_hex(&b)));
}

// 8. NVMe eviction demotes files to S3 only; they still read back.
#[test]
fn nvme_eviction_demotes_to_s3_only() {
    let srv = S3Server::start();
    let nvme = disk_dir();
    let m = mount(
        &srv,
        "kv/evict",
        &[
            "--host-capacity",
            "4MiB",
            "--nvme-dir",
            nvme.path().to_str().unwrap(),
            "--nvme-capacity",
            "8MiB",
        ],
    );
    let data: Vec<Vec<u8>> = (0..12).map(|i| block(200 + i, 1 << 20)).collect();
    for (i, d) in data.iter().enumerate() {
        store_llmd(&m.path(&format!("f{i:02}.bin")), d);
        wait_object(&srv, &format!("kv/evict/f{i:02}.bin"), d, 30);
    }
    let tiers: Vec<String> = (0..12)
        .map(|i| tier(&m.path(&format!("f{i:02}.bin"))))
        .collect();
    assert!(
        tiers.iter().any(|t| t == "s3"),
        "no file is S3-only: {tiers:?}\n{}",
        m.status()
    );
    for (i, d) in data.iter().enumerate() {
        let got = fs::read(m.path(&format!("f{i:02}.bin"))).unwrap();
        assert!(got == *d, "f{i:02}.bin differs (tiers {tiers:?})");
    }
}

// A file renamed over a name whose old object is in S3, while its own
// upload is still queued (S3 was down): the upload lands under the new name
// first, and the delete of the old object queued at the rename must not
// remove it afterwards.
#[test]
fn rename_over_an_uploaded_name_during_an_outage_keeps_the_new_object() {
    let mut srv = S3Server::start();
    let m = mount(&srv, "kv/over", &["--nvme-dir", "none"]);
    let old = block(40, 1 << 20);
    let new = block(41, 1 << 20);
    fs::write(m.path("f.bin"), &old).unwrap();
    wait_object(&srv, "kv/over/f.bin", &old, 30);
    srv.stop();
    fs::write(m.path("f.bin.tmp"), &new).unwrap();
    // The upload of the temp file failed a few times and waits in the
    // queue (its backoff keeps it there most of the time) when the rename
    // queues the delete of the old object behind it.
    poll(
        20,
        || format!("upload never failed: {}", m.status()),
        || (s3_status(&m)["errors"].as_u64() >= Some(3)).then_some(()),
    );
    fs::rename(m.path("f.bin.tmp"), m.path("f.bin")).unwrap();
    srv.start_again();
    poll(
        60,
        || format!("backlog never drained: {}", m.status()),
        || (s3_status(&m)["backlog_jobs"].as_u64() == Some(0)).then_some(()),
    );
    wait_object(&srv, "kv/over/f.bin", &new, 5);
    assert_eq!(srv.keys("kv/over/"), ["kv/over/f.bin"]);
}

// `kvfs status` (the table for people) shows every tier.
#[test]
fn status_table_shows_the_nvme_and_s3_tiers() {
    let srv = S3Server::start();
    let nvme = disk_dir();
    let m = mount(
        &srv,
        "kv/status",
        &["--nvme-dir", nvme.path().to_str().unwrap()],
    );
    fs::write(m.path("f.bin"), block(50, 1 << 20)).unwrap();
    wait_uploaded(&m, 1, 30);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .arg("status")
        .arg(&m.mnt)
        .output()
        .expect("run kvfs status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |tier: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(tier))
            .unwrap_or_else(|| panic!("no {tier} line in:\n{text}"))
            .to_string()
    };
    assert!(line("nvme").contains("write-backs queued"), "{text}");
    let s3 = line("s3");
    assert!(
        s3.contains(" up ") && s3.contains("uploaded 1 files"),
        "{text}"
    );
    // The same through Prometheus (the upload job ends just after its
    // count moves: poll).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stats = fs::read_to_string(m.path(".kvfs/stats")).unwrap();
    while !stats.contains("kvfs_queue_jobs{queue=\"upload\"} 0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        stats = fs::read_to_string(m.path(".kvfs/stats")).unwrap();
    }
    for want in [
        "kvfs_tier_up{tier=\"s3\"} 1",
        "kvfs_queue_jobs{queue=\"upload\"} 0",
        "kvfs_queue_jobs{queue=\"flush\"} 0",
        "kvfs_tier_files{tier=\"nvme\"} 1",
    ] {
        assert!(stats.contains(want), "missing {want:?} in:\n{stats}");
    }
}
