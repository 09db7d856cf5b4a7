//! Crash points: `kill -9` of the daemon at random moments of a store burst
//! (both connectors' patterns, some llm-d writers calling fsync before the
//! rename), a remount over the same NVMe directory, and a check of every
//! name against what the writers knew when the daemon died:
//! - a file whose fsync and rename both returned is there, whole;
//! - a file stored in an earlier round (so recovered at least once) is
//!   there, whole, or replaced by a whole later version of its name;
//! - every other final name holds one whole version of its name or is
//!   absent: never a torn or mixed file;
//! - temp names are either gone or still temp names (never final ones).
//!
//! `KVFS_CRASH_POINTS` sets how many kills (default 6); `scripts/soak` runs
//! many more and prints the counts.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::KvfsMount;
use kvfs::bench::connector::{check_block, fill_block};

const SEED: u64 = 4242;
const WRITERS: usize = 3;
/// Names the rounds share, so that a store replaces an earlier version.
const SHARED_NAMES: u64 = 12;

/// What the writers knew about a name when the daemon died.
#[derive(Default, Clone)]
struct Known {
    /// Block ids of every version a store of this name began.
    versions: Vec<u64>,
    /// The last version whose store returned with its bytes durable
    /// (fsync, then rename) while no other store of the name was running.
    durable: Option<u64>,
    /// Stores of this name begun and not returned.
    running: u32,
}

impl Known {
    /// Must the name be there after a crash? Only if the durable version
    /// is the newest begun: a later store may have renamed over it.
    fn must_exist(&self) -> bool {
        self.durable.is_some() && self.durable == self.versions.last().copied()
    }
}

type Ledger = Arc<Mutex<BTreeMap<String, Known>>>;

fn block(id: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_block(&mut b, SEED, id);
    b
}

/// Sizes a multiple of 4 KiB (O_DIRECT), from 64 KiB to 2 MiB.
fn size_of(id: u64) -> usize {
    (16 + (id.wrapping_mul(2654435761) % 496) as usize) * 4096
}

fn args(nvme: &Path) -> Vec<String> {
    [
        "--host-capacity",
        "12MiB",
        "--huge-pages",
        "false",
        "--nvme-dir",
        nvme.to_str().expect("utf-8 path"),
        "--nvme-capacity",
        "4GiB",
    ]
    .map(String::from)
    .to_vec()
}

/// One writer: stores until a store fails (the daemon died).
fn writer(root: &Path, round: u64, w: usize, ledger: &Ledger) {
    for n in 0u64.. {
        let id = (round << 32) | ((w as u64) << 24) | n;
        // Every third store replaces a shared name; the others are new.
        let name = if n % 3 == 0 {
            format!("shared/s{}", fastrand::u64(..SHARED_NAMES))
        } else {
            format!("r{round}/w{w}-{n}")
        };
        let data = block(id, size_of(id));
        let fsync = w == 0 || n % 4 == 1;
        let path = root.join(&name);
        {
            let mut l = ledger.lock().expect("ledger");
            let k = l.entry(name.clone()).or_default();
            k.versions.push(id);
            k.running += 1;
        }
        let res = if w == 2 {
            common::store::vllm(&path, &data)
        } else {
            common::store::llmd(&path, &data, fsync)
        };
        if res.is_err() {
            return;
        }
        let mut l = ledger.lock().expect("ledger");
        let k = l.get_mut(&name).expect("entry");
        k.running -= 1;
        // Another store of the name still running could rename after this
        // one: then nothing about the name is durable yet.
        if fsync && w != 2 && k.running == 0 && k.versions.last() == Some(&id) {
            k.durable = Some(id);
        }
    }
}

/// Checks every name after a remount; returns the new ledger: what is there
/// now is durable (it came back from NVMe).
fn check(root: &Path, ledger: &BTreeMap<String, Known>, point: usize) -> BTreeMap<String, Known> {
    let mut now = BTreeMap::new();
    for (name, k) in ledger {
        let path = root.join(name);
        match fs::read(&path) {
            Ok(data) => {
                let id = k
                    .versions
                    .iter()
                    .rev()
                    .find(|&&id| data.len() == size_of(id) && check_block(&data, SEED, id).is_none())
                    .unwrap_or_else(|| {
                        panic!(
                            "crash point {point}: {name} is torn or mixed ({} bytes, versions {:?})",
                            data.len(),
                            k.versions
                        )
                    });
                if let Some(d) = k.durable {
                    // A durable version may only be replaced by a later one.
                    let (pos_d, pos) = (
                        k.versions.iter().position(|&v| v == d),
                        k.versions.iter().position(|&v| v == *id),
                    );
                    assert!(
                        pos >= pos_d,
                        "crash point {point}: {name} went back from {d:#x} to {id:#x}"
                    );
                }
                now.insert(
                    name.clone(),
                    Known {
                        versions: vec![*id],
                        durable: Some(*id),
                        running: 0,
                    },
                );
            }
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOENT),
                    "crash point {point}: read {name}: {e}"
                );
                assert!(
                    !k.must_exist(),
                    "crash point {point}: {name} was fsync'd and renamed, and is lost"
                );
            }
        }
    }
    now
}

/// Every name under `dir`, recursively, relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).expect("readdir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .expect("below root")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

#[test]
fn kill_9_at_random_points_of_store_bursts() {
    let points: usize = std::env::var("KVFS_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed = std::env::var("KVFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    fastrand::seed(seed);
    eprintln!("crash test: {points} kill points, KVFS_CRASH_SEED={seed}");
    let nvme = tempfile::Builder::new()
        .prefix("kvfs-crash-nvme-")
        .tempdir_in("/var/tmp")
        .expect("temp dir on disk");
    let args = args(nvme.path());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut m = KvfsMount::start(&refs);
    let mut ledger: BTreeMap<String, Known> = BTreeMap::new();
    let (mut stored, mut temps_left) = (0usize, 0usize);
    for point in 0..points {
        let round = point as u64;
        fs::create_dir_all(m.path("shared")).expect("mkdir shared");
        fs::create_dir_all(m.path(&format!("r{round}"))).expect("mkdir round");
        let shared: Ledger = Arc::new(Mutex::new(std::mem::take(&mut ledger)));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let root = m.mnt.clone();
                let l = shared.clone();
                std::thread::spawn(move || writer(&root, round, w, &l))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(fastrand::u64(30..700)));
        m.kill9();
        for w in writers {
            w.join().expect("writer thread");
        }
        ledger = Arc::try_unwrap(shared)
            .ok()
            .expect("writers done")
            .into_inner()
            .expect("ledger");
        m.restart(&refs);
        ledger = check(&m.mnt, &ledger, point);
        stored += ledger.len();
        // The round before last has been checked after two crashes: remove
        // it, so that a long soak checks what is new rather than rereading
        // everything.
        if round >= 2 {
            let old = format!("r{}/", round - 2);
            // Gone already if none of its files reached NVMe before the
            // kill: a directory lives on disk only through its files.
            match fs::remove_dir_all(m.path(&old)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    panic!("remove round {}: {e}", round - 2)
                }
                _ => {}
            }
            ledger.retain(|name, _| !name.starts_with(&old));
        }
        // Temp names left by the dead burst: whole or not, they stay temp
        // names; the connector never reads them. Clean them as it would.
        let mut names = Vec::new();
        walk(&m.mnt, &m.mnt, &mut names);
        for n in names {
            if n.ends_with(".tmp") {
                temps_left += 1;
                fs::remove_file(m.path(&n)).expect("remove a temp leftover");
            } else {
                assert!(
                    ledger.contains_key(&n),
                    "crash point {point}: {n} appeared from nowhere\n{}",
                    m.log()
                );
            }
        }
    }
    eprintln!(
        "crash test: {points} kill points, {stored} files found whole after them, \
         {temps_left} temp leftovers removed, 0 divergences"
    );
}
