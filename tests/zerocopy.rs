//! The zero-copy path through a real daemon: a client fills a slot through
//! its own mapping and commits it, and the file is then exactly what FUSE
//! shows; loads map a resident file; a client that dies leaves nothing.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::KvfsMount;
use kvfs::zerocopy::Client;

/// A shared mapping of `len` bytes of `fd`; unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: &impl AsRawFd, len: usize, writable: bool) -> Map {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a valid descriptor.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is len bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn host_used(m: &KvfsMount) -> u64 {
    m.status()["host"]["used"].as_u64().expect("host.used")
}

#[test]
fn committed_slot_is_a_file_like_any_other() {
    for mode in common::MODES {
        let m = KvfsMount::with_mode(mode, &[]);
        let link = std::fs::read_link(m.path(".kvfs/zerocopy.sock")).expect("readlink");
        assert!(link.is_absolute(), "{link:?}");
        let c = Client::connect(&m.mnt).expect("connect");
        let len = 3 << 20;
        let data = pattern(len, 7);
        let slot = c.alloc(len as u64).expect("alloc");
        {
            let mut map = Map::new(&slot.fd, len, true);
            map.bytes().copy_from_slice(&data);
        }
        // Not visible before the commit.
        assert!(!m.path("model/blk/a.bin").exists());
        c.commit(slot.id, "model/blk/a.bin").expect("commit");
        let path = m.path("model/blk/a.bin");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data, "mode {mode}");
        let names: Vec<_> = std::fs::read_dir(m.path("model/blk"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.bin"]);
        let tier = xattr(&path, "user.kvfs.tier");
        assert_eq!(tier, "host");

        // A commit over an existing name replaces it, as rename does.
        let other = pattern(4096, 9);
        let slot = c.alloc(4096).unwrap();
        Map::new(&slot.fd, 4096, true)
            .bytes()
            .copy_from_slice(&other);
        c.commit(slot.id, "model/blk/a.bin").unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while std::fs::read(&path).unwrap() != other {
            assert!(Instant::now() < deadline, "old contents still served");
            std::thread::sleep(Duration::from_millis(20));
        }

        // Loads: a read-only mapping of the resident file.
        let r = c.open("model/blk/a.bin").expect("open");
        assert_eq!(r.size, 4096);
        let mut map = Map::new(&r.fd, 4096, false);
        assert_eq!(map.bytes(), &other[..]);
        drop(map);
        c.close(r.handle).unwrap();

        // Errors have their errno.
        assert_eq!(c.open("model/nope.bin").unwrap_err().errno(), libc::ENOENT);
        let slot = c.alloc(4096).unwrap();
        assert_eq!(
            c.commit(slot.id, ".kvfs/x").unwrap_err().errno(),
            libc::EROFS
        );
        assert_eq!(
            c.commit(slot.id, "model").unwrap_err().errno(),
            libc::EISDIR
        );
        c.abort(slot.id).unwrap();
    }
}

fn xattr(path: &std::path::Path, name: &str) -> String {
    let p = common::cstr(path);
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        len >= 0,
        "getxattr {name}: {}",
        std::io::Error::last_os_error()
    );
    buf.truncate(len as usize);
    String::from_utf8(buf).unwrap()
}

/// Run as a child process by the next test: allocates, fills half a slot,
/// and dies without committing.
#[test]
fn child_dies_mid_write() {
    let Ok(mnt) = std::env::var("KVFS_ZC_CHILD_MOUNT") else {
        return;
    };
    let c = Client::connect(std::path::Path::new(&mnt)).expect("connect");
    let slot = c.alloc(8 << 20).expect("alloc");
    let mut map = Map::new(&slot.fd, 8 << 20, true);
    map.bytes()[..4 << 20].fill(1);
    println!("SLOT {}", slot.id);
    // SAFETY: killing ourselves, as a crash would.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

#[test]
fn a_client_that_dies_leaves_no_file_and_no_used_memory() {
    let m = KvfsMount::start(&[]);
    let before = host_used(&m);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_dies_mid_write",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KVFS_ZC_CHILD_MOUNT", &m.mnt)
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SLOT "),
        "child did not allocate: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the child was to die");
    // The server notices the hang-up and frees the slot.
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_used(&m) > before {
        assert!(
            Instant::now() < deadline,
            "slot memory not freed: {} > {before}",
            host_used(&m)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let entries: Vec<_> = std::fs::read_dir(&m.mnt).unwrap().collect();
    assert!(entries.is_empty(), "a file appeared: {entries:?}");
}

#[test]
fn slots_count_against_the_host_tier() {
    let m = KvfsMount::start(&["--host-capacity", "8MiB"]);
    let c = Client::connect(&m.mnt).expect("connect");
    let a = c.alloc(6 << 20).expect("alloc within capacity");
    assert!(host_used(&m) >= 6 << 20);
    // More than what is left while the first is held.
    assert_eq!(c.alloc(6 << 20).unwrap_err().errno(), libc::ENOSPC);
    c.abort(a.id).unwrap();
    let b = c.alloc(6 << 20).expect("room again after abort");
    c.abort(b.id).unwrap();
}
