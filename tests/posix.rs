//! POSIX operations through the kernel's FUSE, in both data paths
//! (passthrough to shmem backing files, and the daemon's own handlers), with the errno of
//! every failure case a tool or connector can hit.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{KvfsMount, MODES, cstr, err_of, errno, renameat2};
use kvfs::bench::connector::{
    AlignedBuf, check_block, fill_block, vllm_load, vllm_probe_o_direct, vllm_store,
};

fn for_each_mode(extra: &[&str], f: impl Fn(&KvfsMount)) {
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, extra);
        assert_eq!(m.status()["data_path"], mode, "data path");
        f(&m);
    }
}

#[test]
fn file_contents_sizes_and_open_flags() {
    for_each_mode(&[], |m| {
        let p = m.path("f");
        fs::write(&p, b"hello").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");

        // O_EXCL on an existing name.
        let e = OpenOptions::new().write(true).create_new(true).open(&p);
        assert_eq!(err_of(e), libc::EEXIST);

        // O_APPEND, then a sparse write far past the end.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b" world").unwrap();
        drop(f);
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start((1 << 20) + 7)).unwrap();
        f.write_all(b"!").unwrap();
        drop(f);
        let data = fs::read(&p).unwrap();
        assert_eq!(data.len(), (1 << 20) + 8);
        assert_eq!(&data[..11], b"hello world");
        assert!(data[11..(1 << 20) + 7].iter().all(|&b| b == 0));
        assert_eq!(data[(1 << 20) + 7], b'!');

        // Truncate down and up.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(5).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 5);
        f.set_len(100).unwrap();
        drop(f);
        let data = fs::read(&p).unwrap();
        assert_eq!(&data[..5], b"hello");
        assert_eq!(data.len(), 100);

        // O_TRUNC empties it.
        drop(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p)
                .unwrap(),
        );
        assert_eq!(fs::metadata(&p).unwrap().len(), 0);

        // A 40 MiB block in one write and one read syscall, complete.
        let mut block = vec![0u8; 40 << 20];
        fill_block(&mut block, 7, 1);
        let mut f = File::create(m.path("big")).unwrap();
        assert_eq!(f.write(&block).unwrap(), block.len(), "short write");
        drop(f);
        let mut back = vec![0u8; block.len()];
        let mut f = File::open(m.path("big")).unwrap();
        assert_eq!(f.read(&mut back).unwrap(), back.len(), "short read");
        assert_eq!(check_block(&back, 7, 1), None);
    });
}

#[test]
fn o_direct_whole_blocks_never_short() {
    for_each_mode(&[], |m| {
        assert!(
            vllm_probe_o_direct(&m.mnt).unwrap(),
            "O_DIRECT open refused"
        );
        let mut block = AlignedBuf::zeroed(32 << 20);
        fill_block(&mut block, 3, 9);
        let p = m.path("model/aa/block.bin");
        vllm_store(&p, &block, true).unwrap();
        let mut back = AlignedBuf::zeroed(32 << 20);
        vllm_load(&p, &mut back, true).unwrap();
        assert_eq!(check_block(&back, 3, 9), None);
        // No temp file left next to it.
        let names: Vec<_> = fs::read_dir(m.path("model/aa"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["block.bin"]);
    });
}

#[test]
fn metadata_chmod_chown_utimens() {
    for_each_mode(&[], |m| {
        let p = m.path("f");
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        std::os::unix::fs::chown(&p, Some(1234), Some(4321)).unwrap();
        let md = fs::metadata(&p).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 4321));

        // atime set explicitly, mtime omitted: the llm-d skip path.
        let before = fs::metadata(&p).unwrap();
        let times = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 5,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        let c = cstr(&p);
        // SAFETY: valid path and two timespecs.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
            0
        );
        let after = fs::metadata(&p).unwrap();
        assert_eq!((after.atime(), after.atime_nsec()), (1_000_000, 5));
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec())
        );

        // UTIME_NOW moves atime to now.
        let now = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), now.as_ptr(), 0) },
            0
        );
        let t = fs::metadata(&p).unwrap().atime();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((wall - t).abs() < 60, "atime {t} not near now {wall}");

        // Directory times and modes too.
        fs::create_dir(m.path("d")).unwrap();
        fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o700);
    });
}

#[test]
fn directories_rename_and_errnos() {
    for_each_mode(&[], |m| {
        fs::create_dir_all(m.path("a/b/c")).unwrap();
        fs::write(m.path("a/b/c/f"), b"1").unwrap();
        assert_eq!(err_of(fs::remove_dir(m.path("a/b/c"))), libc::ENOTEMPTY);
        assert_eq!(err_of(fs::remove_file(m.path("a/b"))), libc::EISDIR);
        assert_eq!(err_of(File::open(m.path("a/b/c/f/x"))), libc::ENOTDIR);
        assert_eq!(err_of(File::open(m.path("missing"))), libc::ENOENT);
        assert_eq!(err_of(fs::create_dir(m.path("a"))), libc::EEXIST);
        let long = "n".repeat(256);
        assert_eq!(err_of(File::create(m.path(&long))), libc::ENAMETOOLONG);
        File::create(m.path(&"n".repeat(255))).unwrap();
        assert_eq!(
            err_of(fs::hard_link(m.path("a/b/c/f"), m.path("hl"))),
            libc::EPERM
        );
        assert_eq!(
            err_of(std::os::unix::fs::symlink("a", m.path("sl"))),
            libc::EPERM
        );

        // Rename replaces an existing target atomically.
        fs::write(m.path("x"), b"new").unwrap();
        fs::write(m.path("y"), b"old").unwrap();
        fs::rename(m.path("x"), m.path("y")).unwrap();
        assert_eq!(fs::read(m.path("y")).unwrap(), b"new");
        assert_eq!(err_of(fs::metadata(m.path("x"))), libc::ENOENT);
        // Across directories, and type rules.
        fs::rename(m.path("y"), m.path("a/b/y")).unwrap();
        assert_eq!(fs::read(m.path("a/b/y")).unwrap(), b"new");
        assert_eq!(
            err_of(fs::rename(m.path("a/b/c"), m.path("a/b/y"))),
            libc::ENOTDIR
        );
        assert_eq!(
            err_of(fs::rename(m.path("a/b/y"), m.path("a/b/c"))),
            libc::EISDIR
        );
        assert_eq!(
            err_of(fs::rename(m.path("a"), m.path("a/b/z"))),
            libc::EINVAL
        );

        // renameat2 flags.
        fs::write(m.path("p"), b"P").unwrap();
        fs::write(m.path("q"), b"Q").unwrap();
        assert_eq!(
            renameat2(&m.path("p"), &m.path("q"), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST)
        );
        assert_eq!(
            renameat2(&m.path("p"), &m.path("r"), libc::RENAME_NOREPLACE),
            Ok(())
        );
        assert_eq!(
            renameat2(&m.path("r"), &m.path("q"), libc::RENAME_EXCHANGE),
            Ok(())
        );
        assert_eq!(fs::read(m.path("q")).unwrap(), b"P");
        assert_eq!(fs::read(m.path("r")).unwrap(), b"Q");

        // readdir sees exactly what is there; the control dir stays hidden.
        let mut names: Vec<String> = fs::read_dir(&m.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want = vec!["a".to_string(), "n".repeat(255), "q".into(), "r".into()];
        want.sort();
        assert_eq!(names, want);

        fs::remove_dir_all(m.path("a")).unwrap();
        assert_eq!(err_of(fs::metadata(m.path("a"))), libc::ENOENT);
    });
}

#[test]
fn unlink_and_rename_over_open_files() {
    for_each_mode(&[], |m| {
        let p = m.path("f");
        fs::write(&p, vec![5u8; 3 << 20]).unwrap();
        let mut reader = File::open(&p).unwrap();
        fs::remove_file(&p).unwrap();
        assert_eq!(err_of(fs::metadata(&p)), libc::ENOENT);
        let mut data = Vec::new();
        reader.read_to_end(&mut data).unwrap();
        assert_eq!(
            data,
            vec![5u8; 3 << 20],
            "unlinked open file must stay readable"
        );
        assert_eq!(reader.metadata().unwrap().len(), 3 << 20);
        drop(reader);

        fs::write(&p, b"old contents").unwrap();
        let mut old = File::open(&p).unwrap();
        fs::write(m.path("tmp"), b"new contents").unwrap();
        fs::rename(m.path("tmp"), &p).unwrap();
        let mut s = String::new();
        old.read_to_string(&mut s).unwrap();
        assert_eq!(s, "old contents");
        assert_eq!(fs::read(&p).unwrap(), b"new contents");
    });
}

#[test]
fn rename_while_writer_open_is_whole_to_readers() {
    for_each_mode(&[], |m| {
        let tmp = m.path("blk.bin_1234.tmp");
        let fin = m.path("blk.bin");
        let mut block = vec![0u8; 8 << 20];
        fill_block(&mut block, 1, 2);
        let mut w = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .unwrap();
        w.write_all(&block).unwrap();
        fs::rename(&tmp, &fin).unwrap();
        // Writer still open: another reader already sees the whole file.
        let state = xattr(&fin, "user.kvfs.state");
        assert_eq!(state, b"writing");
        let data = std::thread::spawn({
            let fin = fin.clone();
            move || fs::read(fin).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(check_block(&data, 1, 2), None);
        drop(w);
        assert_eq!(state_after_close(&fin), b"sealed");
    });
}

fn xattr(p: &std::path::Path, name: &str) -> Vec<u8> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr {name}: errno {}", errno());
    buf.truncate(r as usize);
    buf
}

/// `user.kvfs.state` once the last close has reached the daemon: the
/// kernel sends RELEASE after close returns, so waits (up to 3 s) while the
/// file still reads as being written.
fn state_after_close(p: &std::path::Path) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let state = xattr(p, "user.kvfs.state");
        if state != b"writing" || std::time::Instant::now() > deadline {
            return state;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn setxattr(p: &std::path::Path, name: &str, v: &[u8]) -> i32 {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r == 0 { 0 } else { errno() }
}

#[test]
fn xattrs_builtin_and_user() {
    let m = KvfsMount::start(&[]);
    let p = m.path("f");
    fs::write(&p, b"abc").unwrap();
    assert_eq!(xattr(&p, "user.kvfs.tier"), b"host");
    assert_eq!(state_after_close(&p), b"sealed");
    assert_eq!(setxattr(&p, "user.kvfs.tier", b"s3"), libc::EPERM);
    assert_eq!(setxattr(&p, "trusted.x", b"1"), libc::EOPNOTSUPP);
    assert_eq!(setxattr(&p, "user.note", b"kept"), 0);
    assert_eq!(xattr(&p, "user.note"), b"kept");
    let c = cstr(&p);
    let mut buf = vec![0u8; 256];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0);
    buf.truncate(n as usize);
    assert_eq!(buf, b"user.kvfs.tier\0user.kvfs.state\0user.note\0");
    let name = std::ffi::CString::new("user.note").unwrap();
    // SAFETY: valid strings.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), name.as_ptr()) }, 0);
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!((r, errno()), (-1, libc::ENODATA));
}

#[test]
fn statfs_reports_the_tier_capacity() {
    let m = KvfsMount::start(&["--host-capacity", "256MiB"]);
    fs::write(m.path("f"), vec![1u8; 8 << 20]).unwrap();
    let c = cstr(&m.mnt);
    // SAFETY: zeroed statvfs is valid; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_blocks * st.f_frsize, 256 << 20);
    assert_eq!((st.f_blocks - st.f_bfree) * st.f_frsize, 8 << 20);
    assert_eq!(st.f_namemax, 255);
}

#[test]
fn directory_of_100k_entries_lists_completely() {
    let m = KvfsMount::start(&[]);
    let d = m.path("big");
    fs::create_dir(&d).unwrap();
    const N: usize = 100_000;
    for i in 0..N {
        let c = cstr(&d.join(format!("e{i:06}")));
        // SAFETY: valid path; a regular file node.
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o644, 0) },
            0,
            "mknod {i}: {}",
            errno()
        );
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), N);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), N, "duplicates in the listing");
    assert_eq!(m.status()["files"], N as u64);
}

#[test]
fn eviction_drops_least_recent_and_spares_open_files() {
    for_each_mode(&["--host-capacity", "32MiB"], |m| {
        let block = |i: u64| {
            let mut b = vec![0u8; 4 << 20];
            fill_block(&mut b, 11, i);
            b
        };
        fs::write(m.path("f0"), block(0)).unwrap();
        let mut held = File::open(m.path("f0")).unwrap();
        for i in 1..=12 {
            fs::write(m.path(&format!("f{i}")), block(i)).unwrap();
        }
        // The open file survived; the oldest closed ones went.
        let mut data = Vec::new();
        held.read_to_end(&mut data).unwrap();
        assert_eq!(check_block(&data, 11, 0), None);
        assert!(m.path("f0").exists(), "an open file was evicted");
        assert_eq!(common::gone(&m.path("f1")), libc::ENOENT);
        for i in 9..=12 {
            let data = fs::read(m.path(&format!("f{i}"))).unwrap();
            assert_eq!(check_block(&data, 11, i), None, "f{i}");
        }
        let st = m.status();
        assert!(st["host"]["evictions"].as_u64().unwrap() > 0);
        assert!(st["host"]["used"].as_u64().unwrap() <= 32 << 20);
    });
}

#[test]
fn full_of_open_files_gives_enospc_and_harms_nothing() {
    for_each_mode(&["--host-capacity", "8MiB"], |m| {
        let mut w = File::create(m.path("a")).unwrap();
        w.write_all(&vec![9u8; 8 << 20]).unwrap();
        assert_eq!(err_of(File::create(m.path("b"))), libc::ENOSPC);
        assert_eq!(err_of(fs::metadata(m.path("b"))), libc::ENOENT);
        drop(w);
        assert_eq!(fs::read(m.path("a")).unwrap(), vec![9u8; 8 << 20]);
        // Once closed, it can make room for the next file.
        fs::write(m.path("b"), b"fits").unwrap();
        assert_eq!(fs::read(m.path("b")).unwrap(), b"fits");
    });
}

#[test]
fn status_counts_files_and_modes() {
    let m = KvfsMount::start(&["--data-path", "fallback"]);
    fs::write(m.path("f"), vec![1u8; 1000]).unwrap();
    let _ = fs::metadata(m.path("nope"));
    let _ = fs::read(m.path("f")).unwrap();
    let st = m.status();
    assert_eq!(st["files"], 1);
    assert_eq!(st["counters"]["creates"], 1);
    assert_eq!(st["counters"]["sealed_bytes"], 1000);
    assert!(st["counters"]["misses"].as_u64().unwrap() >= 1);
    assert_eq!(st["counters"]["daemon_write_bytes"], 1000);
    assert!(st["counters"]["daemon_read_bytes"].as_u64().unwrap() >= 1000);
    assert_eq!(st["counters"]["passthrough_opens"], 0);
}

#[test]
fn a_file_larger_than_the_tier_never_costs_the_others() {
    for_each_mode(&["--host-capacity", "64MiB"], |m| {
        for i in 0..4 {
            let mut b = vec![0u8; 8 << 20];
            fill_block(&mut b, 5, i);
            fs::write(m.path(&format!("f{i}")), b).unwrap();
        }
        let chunk = vec![1u8; 1 << 20];
        let mut big = File::create(m.path("big")).unwrap();
        let mut res = Ok(());
        for _ in 0..100 {
            res = big.write_all(&chunk);
            if res.is_err() {
                break;
            }
        }
        drop(big);
        if m.status()["data_path"] == "fallback" {
            // The daemon sees the writes: older files make room while the
            // file grows (it might have stopped in time), and the write that
            // cannot fit even in an empty tier is refused.
            assert_eq!(err_of(res), libc::ENOSPC);
            assert!(m.status()["host"]["used"].as_u64().unwrap() <= 64 << 20);
            return;
        }
        // Passthrough writes bypass the daemon: the file is dropped when it
        // is sealed, alone.
        res.unwrap();
        assert_eq!(err_of(fs::metadata(m.path("big"))), libc::ENOENT);
        for i in 0..4 {
            let data = fs::read(m.path(&format!("f{i}"))).unwrap();
            assert_eq!(check_block(&data, 5, i), None, "f{i} was harmed");
        }
    });
}

#[test]
fn page_locking_follows_the_lock_memory_setting() {
    let on = KvfsMount::start(&["--lock-memory", "on"]);
    fs::write(on.path("f"), vec![1u8; 2 << 20]).unwrap();
    // The locker thread works in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let st = on.status();
        assert_eq!(st["host"]["lock_policy"], "on");
        if st["host"]["locked_bytes"] == 2 << 20 {
            assert_eq!(st["host"]["locking"], true);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never locked: {st}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(on);

    let off = KvfsMount::start(&["--lock-memory", "off"]);
    fs::write(off.path("f"), vec![1u8; 2 << 20]).unwrap();
    let st = off.status();
    assert_eq!(
        (
            st["host"]["locking"].clone(),
            st["host"]["locked_bytes"].clone()
        ),
        (false.into(), 0.into())
    );

    let swap = fs::read_to_string("/proc/swaps")
        .unwrap()
        .lines()
        .skip(1)
        .count()
        > 0;
    let auto = KvfsMount::start(&[]);
    assert_eq!(auto.status()["host"]["locking"], swap);
}

#[test]
fn unmount_frees_the_backing_files() {
    let mut m = KvfsMount::start(&["--metrics-addr", "127.0.0.1:0"]);
    fs::write(m.path("f"), vec![1u8; 1 << 20]).unwrap();
    let dir = std::path::PathBuf::from(format!("/dev/shm/kvfs-{}", m.pid().unwrap()));
    assert!(dir.is_dir(), "backing dir {} missing", dir.display());
    let status = m.stop().unwrap();
    assert!(status.success(), "kvfs exited with {status}");
    assert!(!dir.exists(), "backing files left in {}", dir.display());
}

#[test]
fn metrics_move_with_the_workload() {
    let m = KvfsMount::start(&["--data-path", "fallback"]);
    let read = |m: &KvfsMount| fs::read_to_string(m.path(".kvfs/stats")).unwrap();
    let value = |text: &str, key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let before = read(&m);
    fs::write(m.path("f"), vec![1u8; 3000]).unwrap();
    let _ = fs::metadata(m.path("missing"));
    let _ = fs::read(m.path("f")).unwrap();
    let after = read(&m);
    assert_eq!(
        value(&after, "kvfs_creates_total") - value(&before, "kvfs_creates_total"),
        1.0
    );
    assert_eq!(value(&after, "kvfs_sealed_bytes_total"), 3000.0);
    assert!(value(&after, "kvfs_daemon_read_bytes_total") >= 3000.0);
    assert!(value(&after, "kvfs_lookup_misses_total") >= 1.0);
    assert!(
        value(&after, "kvfs_fuse_op_seconds_count{op=\"create\"}") >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, "kvfs_fuse_errors_total{op=\"lookup\",errno=\"2\"}") >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, "kvfs_tier_used_bytes{tier=\"host\"}") >= 3000.0,
        "{after}"
    );
    // At debug level each request's events carry the operation's span.
    let log = fs::read_to_string(m.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("fuse{op=\"lookup\"}") && l.contains("request failed")),
        "no lookup span in the debug log"
    );
}

/// The control directory takes no changes: every attempt fails with an
/// errno, and the status file, the stats and the mount keep working.
#[test]
fn the_control_directory_refuses_every_change() {
    let m = KvfsMount::start(&[]);
    fs::write(m.path("f"), b"data").unwrap();
    let status = m.path(".kvfs/status");
    let attempts: Vec<(&str, i32)> = vec![
        (
            "open status for writing",
            err_of(OpenOptions::new().write(true).open(&status)),
        ),
        ("truncate status", {
            let c = cstr(&status);
            // SAFETY: a valid C string.
            if unsafe { libc::truncate(c.as_ptr(), 0) } == 0 {
                0
            } else {
                errno()
            }
        }),
        ("create in .kvfs", err_of(File::create(m.path(".kvfs/new")))),
        ("mkdir in .kvfs", err_of(fs::create_dir(m.path(".kvfs/d")))),
        ("unlink status", err_of(fs::remove_file(&status))),
        (
            "rename status out",
            err_of(fs::rename(&status, m.path("s"))),
        ),
        (
            "rename a file in",
            err_of(fs::rename(m.path("f"), m.path(".kvfs/f"))),
        ),
        (
            "rename over status",
            err_of(fs::rename(m.path("f"), &status)),
        ),
        (
            "rename a file to .kvfs",
            err_of(fs::rename(m.path("f"), m.path(".kvfs"))),
        ),
        ("mkdir .kvfs", err_of(fs::create_dir(m.path(".kvfs")))),
        ("rmdir .kvfs", err_of(fs::remove_dir(m.path(".kvfs")))),
        (
            "chmod status",
            err_of(fs::set_permissions(
                &status,
                fs::Permissions::from_mode(0o666),
            )),
        ),
        (
            "symlink in .kvfs",
            err_of(std::os::unix::fs::symlink("f", m.path(".kvfs/l"))),
        ),
    ];
    for (what, e) in &attempts {
        assert!(
            [
                libc::EACCES,
                libc::EPERM,
                libc::EEXIST,
                libc::EBUSY,
                libc::EROFS,
                libc::ENOTEMPTY,
                libc::EISDIR
            ]
            .contains(e),
            "{what}: errno {e}"
        );
    }
    let st = m.status();
    assert!(st["host"]["files"].as_u64() == Some(1), "{st}");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
    assert!(
        fs::read_to_string(m.path(".kvfs/stats"))
            .unwrap()
            .contains("kvfs_")
    );
}
