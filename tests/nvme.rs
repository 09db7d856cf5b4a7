//! The NVMe tier through the real FUSE mount: write-back, demotion when the
//! host tier is full, promotion on open, remount recovery, a crash during a
//! write burst, checksum mismatches and the tier's own capacity.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{KvfsMount, err_of};
use kvfs::bench::connector::{Pattern, RunSpec, check_block, fill_block, run_load, run_store};

const SEED: u64 = 77;

/// A directory on a disk filesystem (not tmpfs), as an NVMe tier would be.
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvfs-nvme-")
        .tempdir_in("/var/tmp")
        .expect("temp dir on disk")
}

fn mount(nvme: &Path, host: &str, extra: &[&str]) -> KvfsMount {
    let mut args = vec![
        "--host-capacity",
        host,
        "--nvme-dir",
        nvme.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    KvfsMount::start(&args)
}

fn block(i: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_block(&mut b, SEED, i);
    b
}

fn tier(p: &Path) -> String {
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.kvfs.tier"])
        .arg(p)
        .output()
        .expect("getfattr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the NVMe tier holds `n` files (write-back is asynchronous).
fn wait_flushed(m: &KvfsMount, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = m.status();
        if st["nvme"]["files"].as_u64() >= Some(n) {
            return;
        }
        assert!(Instant::now() < deadline, "write-back stalled: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn write_back_demotion_and_promotion() {
    let nvme = disk_dir();
    let m = mount(nvme.path(), "16MiB", &[]);
    for i in 0..6 {
        fs::write(m.path(&format!("f{i}")), block(i, 4 << 20)).unwrap();
    }
    wait_flushed(&m, 6);
    // The host tier holds 16 MiB: the oldest files were demoted, not lost.
    assert_eq!(tier(&m.path("f0")), "nvme");
    assert!(tier(&m.path("f5")).contains("host"));
    assert_eq!(fs::metadata(m.path("f0")).unwrap().len(), 4 << 20);
    // Reading an NVMe-only file promotes it, verified.
    let data = fs::read(m.path("f0")).unwrap();
    assert_eq!(check_block(&data, SEED, 0), None);
    assert_eq!(tier(&m.path("f0")), "host,nvme");
    let st = m.status();
    assert!(st["counters"]["promotions"].as_u64() >= Some(1));
    assert!(st["host"]["used"].as_u64().unwrap() <= 16 << 20);
    // The disk mirrors the mount's paths.
    assert!(nvme.path().join("data/f3").is_file());
    // The tier's I/O shows in the metrics.
    let io = |what: &str| m.metric(&format!("kvfs_tier_io_{what}"));
    assert!(io("bytes_total{tier=\"nvme\",op=\"write\"}") >= (24 << 20) as f64);
    assert!(io("bytes_total{tier=\"nvme\",op=\"read\"}") >= (4 << 20) as f64);
    assert!(io("seconds_count{tier=\"nvme\",op=\"write\"}") >= 6.0);
    assert!(io("seconds_count{tier=\"nvme\",op=\"read\"}") >= 1.0);
    assert_eq!(io("errors_total{tier=\"nvme\",op=\"read\"}"), 0.0);
    assert!(m.metric("kvfs_promotions_total") >= 1.0);
}

#[test]
fn remount_recovers_every_file_that_reached_nvme() {
    let nvme = disk_dir();
    let mut m = mount(nvme.path(), "64MiB", &[]);
    fs::create_dir_all(m.path("model/ab")).unwrap();
    for i in 0..5 {
        fs::write(
            m.path(&format!("model/ab/b{i}.bin")),
            block(i, (1 << 20) + 7 * i as usize),
        )
        .unwrap();
    }
    fs::rename(m.path("model/ab/b4.bin"), m.path("model/moved.bin")).unwrap();
    fs::remove_file(m.path("model/ab/b3.bin")).unwrap();
    // Owner and mode: one changed before the write-back, one after.
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
    fs::set_permissions(m.path("model/ab/b0.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    chown(m.path("model/ab/b0.bin"), Some(1234), Some(5678)).unwrap();
    wait_flushed(&m, 4);
    fs::set_permissions(m.path("model/ab/b1.bin"), fs::Permissions::from_mode(0o640)).unwrap();
    chown(m.path("model/ab/b1.bin"), Some(4321), None).unwrap();
    // A leftover of a crashed copy must be cleaned at mount.
    fs::write(nvme.path().join("tmp/leftover"), b"torn").unwrap();
    let args = [
        "--host-capacity",
        "64MiB",
        "--nvme-dir",
        nvme.path().to_str().unwrap(),
    ];
    m.restart(&args);
    for i in 0..3 {
        let data = fs::read(m.path(&format!("model/ab/b{i}.bin"))).unwrap();
        assert_eq!(data.len(), (1 << 20) + 7 * i as usize);
        assert_eq!(check_block(&data, SEED, i), None, "b{i}");
    }
    assert_eq!(
        err_of(fs::metadata(m.path("model/ab/b3.bin"))),
        libc::ENOENT
    );
    assert_eq!(
        check_block(&fs::read(m.path("model/moved.bin")).unwrap(), SEED, 4),
        None
    );
    assert!(
        !nvme.path().join("tmp/leftover").exists(),
        "temp leftover kept"
    );
    let owner = |p: &str| {
        let md = fs::metadata(m.path(p)).unwrap();
        (md.uid(), md.gid(), md.mode() & 0o7777)
    };
    assert_eq!(owner("model/ab/b0.bin"), (1234, 5678, 0o600));
    assert_eq!(owner("model/ab/b1.bin"), (4321, 0, 0o640));
    assert_eq!(owner("model/ab/b2.bin"), (0, 0, 0o644));
    assert_eq!(m.status()["files"], 4);
}

#[test]
fn a_damaged_copy_is_discarded_never_served() {
    let nvme = disk_dir();
    let mut m = mount(nvme.path(), "64MiB", &[]);
    fs::write(m.path("f"), block(1, 2 << 20)).unwrap();
    wait_flushed(&m, 1);
    let args = [
        "--host-capacity",
        "64MiB",
        "--nvme-dir",
        nvme.path().to_str().unwrap(),
    ];
    let backing = std::path::PathBuf::from(format!("/dev/shm/kvfs-{}", m.pid().unwrap()));
    assert!(
        backing.is_dir(),
        "backing dir {} missing",
        backing.display()
    );
    m.stop();
    // A clean stop frees the host tier's memory with an NVMe tier too.
    assert!(
        !backing.exists(),
        "backing files left in {}",
        backing.display()
    );
    // Flip one byte of the copy on disk, keeping its size.
    let copy = nvme.path().join("data/f");
    let mut bytes = fs::read(&copy).unwrap();
    bytes[12345] ^= 0xff;
    fs::write(&copy, &bytes).unwrap();
    m.restart(&args);
    assert_eq!(tier(&m.path("f")), "nvme");
    let res = fs::read(m.path("f"));
    assert!(res.is_err(), "a damaged copy was served");
    assert_eq!(common::gone(&m.path("f")), libc::ENOENT);
    assert!(!copy.exists(), "the damaged copy was kept");
}

#[test]
fn crash_during_a_write_burst_leaves_whole_files_or_none() {
    let nvme = disk_dir();
    let mut m = mount(nvme.path(), "32MiB", &[]);
    // fsync'd files must survive the crash (durability local).
    for i in 0..3 {
        let mut f = fs::File::create(m.path(&format!("synced{i}"))).unwrap();
        std::io::Write::write_all(&mut f, &block(100 + i, 3 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    let writer = {
        let root = m.mnt.clone();
        std::thread::spawn(move || {
            for i in 0..40 {
                if fs::write(root.join(format!("burst{i}")), block(i, 2 << 20)).is_err() {
                    break; // the daemon is gone
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    m.kill9();
    let _ = writer.join();
    let args = [
        "--host-capacity",
        "32MiB",
        "--nvme-dir",
        nvme.path().to_str().unwrap(),
    ];
    m.restart(&args);
    for i in 0..3 {
        let data = fs::read(m.path(&format!("synced{i}"))).expect("an fsync'd file was lost");
        assert_eq!(check_block(&data, SEED, 100 + i), None);
    }
    let mut whole = 0;
    for i in 0..40 {
        match fs::read(m.path(&format!("burst{i}"))) {
            Ok(data) => {
                assert_eq!(data.len(), 2 << 20, "burst{i} is torn");
                assert_eq!(
                    check_block(&data, SEED, i),
                    None,
                    "burst{i} has wrong bytes"
                );
                whole += 1;
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "burst{i}: {e}"),
        }
    }
    eprintln!("{whole} of 40 burst files survived the crash");
}

#[test]
fn nvme_capacity_is_enforced_by_lru() {
    let nvme = disk_dir();
    let m = mount(nvme.path(), "8MiB", &["--nvme-capacity", "16MiB"]);
    for i in 0..8 {
        fs::write(m.path(&format!("f{i}")), block(i, 4 << 20)).unwrap();
        // One at a time, so the LRU order is the write order.
        wait_flushed(&m, 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = m.status();
    assert!(st["nvme"]["used"].as_u64().unwrap() <= 16 << 20, "{st}");
    assert_eq!(common::gone(&m.path("f0")), libc::ENOENT);
    let data = fs::read(m.path("f7")).unwrap();
    assert_eq!(check_block(&data, SEED, 7), None);
}

#[test]
fn connector_with_a_host_tier_far_smaller_than_the_data() {
    let nvme = disk_dir();
    let m = mount(nvme.path(), "16MiB", &[]);
    for pattern in [Pattern::Llmd, Pattern::Vllm] {
        let spec = RunSpec {
            root: m.path(&format!("{pattern}")),
            pattern,
            files: 24,
            file_size: 2 << 20,
            threads: 2,
            seed: SEED,
        };
        fs::create_dir(&spec.root).unwrap();
        run_store(&spec).unwrap();
        wait_flushed(&m, 24);
        // Most loads come from NVMe (the host tier holds 8 of 24 files).
        let report = run_load(&spec).expect("every block loads whole and correct");
        assert_eq!(report.files, 24);
    }
    assert!(m.status()["counters"]["promotions"].as_u64().unwrap() > 0);
}

#[test]
fn the_embedded_default_nvme_dir_is_per_mount_point() {
    let mut m = KvfsMount::start_with_defaults(&[]);
    let dir = kvfs::config::default_nvme_dir(&m.mnt);
    // Removed even if an assertion fails.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    assert!(m.status()["nvme"]["capacity"].as_u64() > Some(0));
    fs::write(m.path("f"), block(3, 1 << 20)).unwrap();
    wait_flushed(&m, 1);
    assert!(dir.join("data/f").is_file(), "no copy in {}", dir.display());
    m.stop();
}

/// An fsync while the file is still open puts a copy on NVMe; writes after
/// it must reach NVMe too before the host may drop the file, or a later
/// open would promote the older bytes.
#[test]
fn writes_after_an_fsync_reach_nvme_before_demotion() {
    use std::io::{Seek, SeekFrom, Write};
    let nvme = disk_dir();
    let m = mount(nvme.path(), "4MiB", &["--durability", "local"]);
    let len = 1 << 20;
    let path = m.path("f.bin");
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(&block(1, len)).unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&block(2, len)).unwrap();
    drop(f);
    // Push it out of the host tier.
    for i in 0..8 {
        fs::write(m.path(&format!("other{i}.bin")), block(10 + i, len)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while tier(&path) != "nvme" {
        assert!(
            Instant::now() < deadline,
            "never demoted: tier {:?} {}",
            tier(&path),
            m.status()
        );
        fs::write(m.path("push.bin"), block(99, len)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fs::read(&path).unwrap() == block(2, len),
        "older bytes came back from NVMe"
    );
}
