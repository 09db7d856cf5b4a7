//! Both reference connectors' exact syscall sequences (DESIGN.md,
//! "Semantics"), from several processes at once, with readers racing the
//! writers on the same names, in both data paths.

mod common;

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{KvfsMount, MODES};
use kvfs::bench::connector::{
    AlignedBuf, ConnectorError, Pattern, RunSpec, StoreOutcome, block_path, check_block,
    fill_block, llmd_load, llmd_store, run_load, vllm_load,
};

const SEED: u64 = 42;

fn bench_store(root: &Path, pattern: &str, files: u64, size: &str, threads: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .args([
            "bench",
            "connector",
            "--phase",
            "store",
            "--pattern",
            pattern,
        ])
        .args(["--files", &files.to_string(), "--file-size", size])
        .args([
            "--threads",
            &threads.to_string(),
            "--seed",
            &SEED.to_string(),
        ])
        .arg("--dir")
        .arg(root)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn kvfs bench")
}

/// Reads every name over and over while writers run: each read must find
/// either nothing (ENOENT) or the whole, correct block.
fn race_reader(
    root: PathBuf,
    pattern: Pattern,
    files: u64,
    size: usize,
    stop: Arc<AtomicBool>,
    whole: Arc<AtomicU64>,
) {
    let mut aligned = AlignedBuf::zeroed(size);
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for i in 0..files {
            let p = block_path(&root, pattern, i);
            let res = match pattern {
                // The real vLLM client only loads what a lookup found.
                Pattern::Vllm if !p.exists() => continue,
                Pattern::Vllm => vllm_load(&p, &mut aligned, true).map(|()| &aligned[..]),
                Pattern::Llmd => llmd_load(&p, &mut buf).map(|_| &buf[..]),
            };
            match res {
                Ok(data) => {
                    assert_eq!(data.len(), size, "{} came back short", p.display());
                    assert_eq!(
                        check_block(data, SEED, i),
                        None,
                        "{} has wrong bytes",
                        p.display()
                    );
                    whole.fetch_add(1, Ordering::Relaxed);
                }
                Err(ConnectorError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => panic!("reader of {}: {e}", p.display()),
            }
        }
    }
}

fn no_temp_files(root: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".tmp") {
                left.push(p);
            }
        }
    }
    left
}

#[test]
fn writers_and_racing_readers_both_connectors() {
    const FILES: u64 = 24;
    const SIZE: usize = 4 << 20;
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, &["--host-capacity", "1GiB"]);
        for (pattern, name) in [(Pattern::Llmd, "llmd"), (Pattern::Vllm, "vllm")] {
            let root = m.path(name);
            std::fs::create_dir(&root).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let whole = Arc::new(AtomicU64::new(0));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (root, stop, whole) = (root.clone(), stop.clone(), whole.clone());
                    std::thread::spawn(move || race_reader(root, pattern, FILES, SIZE, stop, whole))
                })
                .collect();
            // Three writer processes store the same names at once: the real
            // clients do, when two engines miss on the same prefix.
            let writers: Vec<Child> = (0..3)
                .map(|_| bench_store(&root, name, FILES, "4MiB", 2))
                .collect();
            for mut w in writers {
                assert!(
                    w.wait().unwrap().success(),
                    "{mode}/{name}: a writer failed"
                );
            }
            stop.store(true, Ordering::Relaxed);
            for r in readers {
                r.join().expect("reader saw a torn or wrong file");
            }
            let spec = RunSpec {
                root: root.clone(),
                pattern,
                files: FILES,
                file_size: SIZE,
                threads: 2,
                seed: SEED,
            };
            let report = run_load(&spec).expect("every stored block loads whole and correct");
            assert_eq!(report.files, FILES);
            assert_eq!(
                no_temp_files(&root),
                Vec::<PathBuf>::new(),
                "temp files left"
            );
            assert!(
                whole.load(Ordering::Relaxed) > 0,
                "readers never saw a file"
            );
        }
    }
}

#[test]
fn llmd_skip_path_moves_atime_not_mtime() {
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, &[]);
        let p = block_path(&m.mnt, Pattern::Llmd, 1);
        let mut block = vec![0u8; 1 << 20];
        fill_block(&mut block, SEED, 1);
        assert_eq!(llmd_store(&p, &block).unwrap(), StoreOutcome::Stored);
        // Age atime so that "now" is visibly later.
        let old = [
            libc::timespec {
                tv_sec: 1000,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        let c = common::cstr(&p);
        // SAFETY: valid path and two timespecs.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), old.as_ptr(), 0) },
            0
        );
        let before = std::fs::metadata(&p).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(llmd_store(&p, &block).unwrap(), StoreOutcome::Skipped);
        let after = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(after.atime() > 1000, "atime did not move on the skip path");
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec())
        );
    }
}

/// One writer unlinks and re-stores names while readers open them: every
/// open must succeed with whole data or fail with ENOENT, never EIO (the
/// kernel refuses a passthrough open whose backing id conflicts).
#[test]
fn unlink_and_restore_race_never_eio() {
    const FILES: u64 = 8;
    const SIZE: usize = 256 << 10;
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, &[]);
        let root = m.mnt.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let whole = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (root, stop, whole) = (root.clone(), stop.clone(), whole.clone());
                std::thread::spawn(move || {
                    race_reader(root, Pattern::Llmd, FILES, SIZE, stop, whole)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut rounds = 0u64;
        let mut block = vec![0u8; SIZE];
        while Instant::now() < deadline {
            for i in 0..FILES {
                let p = block_path(&root, Pattern::Llmd, i);
                let _ = std::fs::remove_file(&p);
                fill_block(&mut block, SEED, i);
                llmd_store(&p, &block).unwrap();
            }
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("a reader failed (EIO or wrong bytes)");
        }
        assert!(rounds > 5, "{mode}: only {rounds} rounds");
        assert!(whole.load(Ordering::Relaxed) > 0);
    }
}

/// The proposed O_TMPFILE + linkat(AT_EMPTY_PATH) variant: kvfs does not
/// support O_TMPFILE, and says so with EOPNOTSUPP so a client can fall back.
#[test]
fn o_tmpfile_is_refused_cleanly() {
    let m = KvfsMount::start(&[]);
    let c = common::cstr(&m.mnt);
    // SAFETY: valid path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_WRONLY, 0o644) };
    let err = common::errno();
    if fd >= 0 {
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
    }
    assert_eq!((fd, err), (-1, libc::EOPNOTSUPP));
}

/// A name that always exists must always open: a writer keeps replacing it
/// by rename while readers open it. The inode a reader's path walk found may
/// be replaced before its open arrives; the kernel still holds a reference,
/// so the open must succeed (with the old bytes), never fail with ENOENT.
#[test]
fn rename_over_an_existing_name_never_hides_it() {
    const SIZE: usize = 64 << 10;
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, &[]);
        let fin = m.path("block.bin");
        let mut block = vec![0u8; SIZE];
        fill_block(&mut block, SEED, 0);
        std::fs::write(&fin, &block).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (fin, stop, opened) = (fin.clone(), stop.clone(), opened.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let data = std::fs::read(&fin)
                            .unwrap_or_else(|e| panic!("open of an existing name failed: {e}"));
                        assert_eq!(check_block(&data, SEED, 0), None, "wrong bytes");
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(3);
        let tmp = m.path("block.bin_x.tmp");
        while Instant::now() < deadline {
            std::fs::write(&tmp, &block).unwrap();
            std::fs::rename(&tmp, &fin).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("a reader lost the name");
        }
        assert!(
            opened.load(Ordering::Relaxed) > 100,
            "{mode}: too few opens"
        );
    }
}

/// Pages in the page cache of the mount's inode behind `f` (not a backing
/// file's), from the cachestat syscall (Linux 6.5). Measured on the fd the
/// I/O went through: a new open of a FUSE file drops its cache.
fn cached_pages(f: &std::fs::File) -> u64 {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 }; // len 0: to the end
    let mut st = Stat::default();
    // SAFETY: a valid fd, and two structs of the kernel's layout.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    st.nr_cache
}

/// vLLM opens with O_DIRECT so that a block is not cached twice: kvfs must
/// keep the mount's own page cache empty for those writes and reads (and
/// for a plain `cat` too: the host tier is the cache), and whole-block I/O
/// never comes back short.
#[test]
fn o_direct_blocks_bypass_the_mounts_page_cache() {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    const LEN: usize = 32 << 20;
    for mode in MODES {
        let m = KvfsMount::with_mode(mode, &[]);
        let p = m.path("blk");
        let tmp = m.path("blk_1234.tmp");
        let mut block = AlignedBuf::zeroed(LEN);
        fill_block(&mut block, SEED, 7);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&tmp)
            .unwrap();
        assert_eq!(
            f.write(&block).unwrap(),
            LEN,
            "{mode}: short O_DIRECT write"
        );
        assert_eq!(cached_pages(&f), 0, "{mode}: the O_DIRECT write was cached");
        drop(f);
        std::fs::rename(&tmp, &p).unwrap();

        let mut back = AlignedBuf::zeroed(LEN);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        let iov = libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: LEN,
        };
        // SAFETY: one iovec over a buffer we own.
        let n = unsafe { libc::readv(f.as_raw_fd(), &iov, 1) };
        assert_eq!(n, LEN as isize, "{mode}: short O_DIRECT readv");
        assert_eq!(check_block(&back, SEED, 7), None, "{mode}: wrong bytes");
        assert_eq!(cached_pages(&f), 0, "{mode}: the O_DIRECT read was cached");

        let mut f2 = std::fs::File::open(&p).unwrap();
        let mut plain = Vec::new();
        f2.read_to_end(&mut plain).unwrap();
        assert_eq!(plain.len(), LEN);
        assert_eq!(cached_pages(&f2), 0, "{mode}: a buffered read was cached");
        if mode == "fallback" {
            // The measurement sees the mount's cache: an mmap fills it (in
            // passthrough mode the mapping is the backing file's).
            // SAFETY: a private read-only mapping of a file we opened.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    1 << 20,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_POPULATE,
                    f2.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            assert!(
                cached_pages(&f2) > 0,
                "cachestat does not see the mount's cache"
            );
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(addr, 1 << 20) };
        }
    }
}
