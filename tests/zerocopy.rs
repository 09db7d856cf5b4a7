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

/// One raw SOCK_SEQPACKET connection, for sending what no well-behaved
/// client would.
struct RawConn(std::os::fd::OwnedFd);

impl RawConn {
    fn connect(path: &std::path::Path) -> RawConn {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain socket syscalls on a zeroed sockaddr_un.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let sock = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_bytes();
            for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let rc = libc::connect(fd, (&raw const addr).cast(), len);
            assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            RawConn(sock)
        }
    }

    /// Sends one message and returns the reply (descriptors that come with
    /// it are closed by the kernel's MSG_CMSG_CLOEXEC-less default: we do
    /// not ask for them).
    fn ask(&self, msg: &[u8]) -> Vec<u8> {
        use std::os::fd::AsRawFd;
        let fd = self.0.as_raw_fd();
        // SAFETY: valid socket and buffers.
        unsafe {
            let n = libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL);
            assert_eq!(
                n,
                msg.len() as isize,
                "send: {}",
                std::io::Error::last_os_error()
            );
            let mut buf = vec![0u8; 1 << 17];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            assert!(n > 0, "no reply: {}", std::io::Error::last_os_error());
            buf.truncate(n as usize);
            buf
        }
    }
}

fn fuzz_message() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        Just("hello"),
        Just("alloc"),
        Just("commit"),
        Just("abort"),
        Just("open"),
        Just("close"),
        Just("bogus"),
    ];
    let number = prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(1.5)),
        Just(serde_json::json!("7")),
        Just(serde_json::json!(null)),
        (0u64..64).prop_map(|n| serde_json::json!(n)),
        (0u64..(1 << 22)).prop_map(|n| serde_json::json!(n)),
    ];
    let path = prop_oneof![
        Just(serde_json::json!("a/b.bin")),
        Just(serde_json::json!("../x")),
        Just(serde_json::json!("/abs")),
        Just(serde_json::json!(".kvfs/status")),
        Just(serde_json::json!("")),
        Just(serde_json::json!("a//b")),
        Just(serde_json::json!("x".repeat(5000))),
        Just(serde_json::json!(["not", "a", "string"])),
        "[a-z./]{0,20}".prop_map(|s| serde_json::json!(s)),
    ];
    let structured = (op, number.clone(), number, path).prop_map(|(op, a, b, p)| {
        serde_json::to_vec(&serde_json::json!({
            "op": op, "size": a, "slot": b.clone(), "handle": b, "path": p
        }))
        .unwrap()
    });
    prop_oneof![
        3 => structured,
        1 => proptest::collection::vec(any::<u8>(), 1..300),
        1 => Just(vec![b'{'; 70_000]),
    ]
}

/// Bad input to the zero-copy socket: every message gets an answer, the
/// daemon stays up, stored files stay intact, and what a connection
/// allocated is freed when it goes.
#[test]
fn fuzzed_control_messages_get_answers_and_harm_nothing() {
    use proptest::test_runner::{Config, TestRunner};
    // Room for every slot a case can allocate (40 x 4 MiB), so that no
    // eviction (a legitimate cache miss) takes the file kept below.
    let m = KvfsMount::start(&["--host-capacity", "512MiB"]);
    let c = Client::connect(&m.mnt).expect("connect");
    let keep = pattern(1 << 20, 3);
    let slot = c.alloc(keep.len() as u64).unwrap();
    Map::new(&slot.fd, keep.len(), true)
        .bytes()
        .copy_from_slice(&keep);
    c.commit(slot.id, "keep/me.bin").unwrap();
    let before = host_used(&m);
    let sock = std::fs::read_link(m.path(".kvfs/zerocopy.sock")).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 8,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(fuzz_message(), 1..40), |msgs| {
            let conn = RawConn::connect(&sock);
            for msg in &msgs {
                let reply = conn.ask(msg);
                let v: serde_json::Value = serde_json::from_slice(&reply).map_err(|e| {
                    proptest::test_runner::TestCaseError::fail(format!("reply not JSON: {e}"))
                })?;
                proptest::prop_assert!(v.get("ok").is_some(), "reply without ok: {v}");
            }
            Ok(())
        })
        .unwrap();
    // Still serving, the file intact, and every slot the fuzzer allocated
    // freed with its connection.
    let got = std::fs::read(m.path("keep/me.bin"));
    assert!(
        got.as_ref().is_ok_and(|g| *g == keep),
        "stored file: {:?} {}",
        got.as_ref().map(Vec::len),
        m.log()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_used(&m) > before {
        assert!(
            Instant::now() < deadline,
            "slots leaked: {} > {before}",
            host_used(&m)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let names: Vec<_> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // A fuzzed commit may have published a slot under a valid name; only
    // names a message could have given are allowed.
    for n in names {
        let n = n.to_string_lossy().into_owned();
        assert!(
            n.chars().all(|ch| ch.is_ascii_lowercase() || ch == '.'),
            "odd name {n}"
        );
    }
}

fn inode(fd: &impl AsRawFd) -> u64 {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-parameter.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st.st_ino
}

fn spare_bytes(m: &KvfsMount) -> u64 {
    m.status()["host"]["spare_bytes"]
        .as_u64()
        .expect("host.spare_bytes")
}

/// Stores `data` as `path` through a new slot; returns the slot's inode.
fn store(c: &Client, path: &str, data: &[u8]) -> u64 {
    let slot = c.alloc(data.len() as u64).expect("alloc");
    Map::new(&slot.fd, data.len(), true)
        .bytes()
        .copy_from_slice(data);
    c.commit(slot.id, path).expect("commit");
    inode(&slot.fd)
}

#[test]
fn a_deleted_blocks_memory_is_the_next_slot() {
    let m = KvfsMount::with_mode("passthrough", &["--host-capacity", "64MiB"]);
    let c = Client::connect(&m.mnt).expect("connect");
    let len = 4 << 20;
    let a = store(&c, "blk/a", &pattern(len, 1));
    // Deleted through the mount, as an engine drops a block: its memory is
    // kept, outside `used`, for the next slot of that size.
    std::fs::remove_file(m.path("blk/a")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spare_bytes(&m) != len as u64 {
        assert!(Instant::now() < deadline, "no spare kept: {}", m.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host_used(&m), 0);
    // The next slot is the same memory, so a client that kept it
    // registered needs no new registration. It holds old bytes until filled.
    let data = pattern(len, 2);
    let b = store(&c, "blk/b", &data);
    assert_eq!(b, a, "the slot is not the deleted block's memory");
    assert_eq!(m.status()["host"]["spares_reused"], 1);
    assert_eq!(spare_bytes(&m), 0);
    assert_eq!(std::fs::read(m.path("blk/b")).unwrap(), data);
    // That read opened it through the kernel (passthrough), which may have
    // mapped it: its memory is never handed out again.
    std::fs::remove_file(m.path("blk/b")).unwrap();
    let c2 = store(&c, "blk/c", &pattern(len, 3));
    assert_ne!(c2, b, "a file the kernel had was reused");
    assert_eq!(m.status()["host"]["spares_reused"], 1);
    assert_eq!(std::fs::read(m.path("blk/c")).unwrap(), pattern(len, 3));
    std::fs::remove_file(m.path("blk/c")).unwrap();
    // Spares count against the capacity and go before any file: with two
    // kept, a 58 MiB file leaves room for only one of them.
    store(&c, "blk/e", &pattern(len, 4));
    store(&c, "blk/f", &pattern(len, 5));
    std::fs::remove_file(m.path("blk/e")).unwrap();
    std::fs::remove_file(m.path("blk/f")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spare_bytes(&m) != 2 * len as u64 {
        assert!(Instant::now() < deadline, "spares not kept: {}", m.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let big = pattern(58 << 20, 6);
    std::fs::write(m.path("big"), &big).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spare_bytes(&m) != len as u64 {
        assert!(
            Instant::now() < deadline,
            "spare bytes {} with a 58 MiB file in a 64 MiB tier",
            spare_bytes(&m)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(m.status()["host"]["evictions"], 0);
    assert_eq!(std::fs::read(m.path("big")).unwrap(), big);
    // Another slot size: the spares of the old one fit nothing and go.
    let d = c.alloc(1 << 20).expect("alloc");
    assert_eq!(spare_bytes(&m), 0);
    c.abort(d.id).unwrap();
}
