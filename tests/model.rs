//! Reference-model property test: random sequences of filesystem operations
//! run against a real kvfs mount (through the kernel) and against a small
//! in-memory model of POSIX semantics; after every step the result (success
//! or errno) and the whole tree (names, types, sizes, contents, modes) must
//! agree. Failures shrink to a minimal sequence.
//!
//! `KVFS_MODEL_CASES` (default 64) sets the number of sequences per data
//! path, `KVFS_MODEL_SEED` replays a run (the seed is printed at the start),
//! and `KVFS_MODEL_OPS_FILE` receives the number of operations run (for
//! `scripts/soak`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{KvfsMount, MODES};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Every path an operation may name. Small on purpose, so that operations
/// collide: renames over existing names, dirs that are not empty, parents
/// that are files.
const PATHS: [&str; 10] = ["a", "b", "c", "d", "e", "d/a", "d/b", "d/e", "d/e/a", "e/a"];
/// Paths below this index have no parent to create first.
const TOP_LEVEL: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write {
        path: usize,
        offset: u32,
        len: u32,
        byte: u8,
    },
    Truncate(usize, u32),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Rename(usize, usize, u32),
    Chmod(usize, u32),
    Read(usize),
    Hold(usize),
    ReadHeld(usize),
    Release(usize),
}

/// A path, top-level ones likelier, so that most operations find their
/// parent and do something.
fn path() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![3 => 0..TOP_LEVEL, 2 => TOP_LEVEL..PATHS.len()]
}

fn op() -> impl Strategy<Value = Op> {
    let p = path();
    prop_oneof![
        3 => p.clone().prop_map(Op::Create),
        3 => (p.clone(), 0u32..(2 << 20), 1u32..(1536 << 10), any::<u8>())
            .prop_map(|(path, offset, len, byte)| Op::Write { path, offset, len, byte }),
        1 => (p.clone(), 0u32..(3 << 20)).prop_map(|(a, n)| Op::Truncate(a, n)),
        2 => p.clone().prop_map(Op::Unlink),
        2 => p.clone().prop_map(Op::Mkdir),
        1 => p.clone().prop_map(Op::Rmdir),
        3 => (p.clone(), p.clone(), prop_oneof![
                3 => Just(0u32),
                1 => Just(libc::RENAME_NOREPLACE),
                1 => Just(libc::RENAME_EXCHANGE)])
            .prop_map(|(a, b, f)| Op::Rename(a, b, f)),
        1 => (p.clone(), prop_oneof![Just(0o600u32), Just(0o644), Just(0o755)])
            .prop_map(|(a, m)| Op::Chmod(a, m)),
        2 => p.clone().prop_map(Op::Read),
        1 => p.clone().prop_map(Op::Hold),
        1 => (0usize..4).prop_map(Op::ReadHeld),
        1 => (0usize..4).prop_map(Op::Release),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir { mode: u32 },
    File { id: u64, mode: u32 },
}

/// The model: a tree of paths, and file contents by inode so that open
/// handles keep an unlinked or replaced file's bytes.
#[derive(Default, Clone)]
struct Model {
    tree: BTreeMap<String, Node>,
    data: HashMap<u64, Vec<u8>>,
    next: u64,
}

type Res = Result<(), i32>;

fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(d, _)| d)
}

impl Model {
    /// Resolves the parent directory of `p` as path lookup does.
    fn check_parent(&self, p: &str) -> Res {
        let mut acc = String::new();
        if let Some(dir) = parent(p) {
            for comp in dir.split('/') {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(comp);
                match self.tree.get(&acc) {
                    None => return Err(libc::ENOENT),
                    Some(Node::File { .. }) => return Err(libc::ENOTDIR),
                    Some(Node::Dir { .. }) => {}
                }
            }
        }
        Ok(())
    }

    fn lookup(&self, p: &str) -> Result<&Node, i32> {
        self.check_parent(p)?;
        self.tree.get(p).ok_or(libc::ENOENT)
    }

    fn is_empty_dir(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        !self.tree.keys().any(|k| k.starts_with(&prefix))
    }

    fn file_id(&self, p: &str) -> Result<u64, i32> {
        match self.lookup(p)? {
            Node::File { id, .. } => Ok(*id),
            Node::Dir { .. } => Err(libc::EISDIR),
        }
    }

    fn create(&mut self, p: &str) -> Res {
        self.check_parent(p)?;
        if self.tree.contains_key(p) {
            return Err(libc::EEXIST);
        }
        self.next += 1;
        self.data.insert(self.next, Vec::new());
        self.tree.insert(
            p.into(),
            Node::File {
                id: self.next,
                mode: 0o644,
            },
        );
        Ok(())
    }

    fn write(&mut self, p: &str, offset: usize, len: usize, byte: u8) -> Res {
        let id = self.file_id(p)?;
        let d = self.data.get_mut(&id).expect("file data");
        if d.len() < offset + len {
            d.resize(offset + len, 0);
        }
        d[offset..offset + len].fill(byte);
        Ok(())
    }

    fn truncate(&mut self, p: &str, n: usize) -> Res {
        let id = self.file_id(p)?;
        self.data.get_mut(&id).expect("file data").resize(n, 0);
        Ok(())
    }

    fn unlink(&mut self, p: &str) -> Res {
        match self.lookup(p)? {
            Node::Dir { .. } => Err(libc::EISDIR),
            Node::File { .. } => {
                self.tree.remove(p);
                Ok(())
            }
        }
    }

    fn mkdir(&mut self, p: &str) -> Res {
        self.check_parent(p)?;
        if self.tree.contains_key(p) {
            return Err(libc::EEXIST);
        }
        self.tree.insert(p.into(), Node::Dir { mode: 0o755 });
        Ok(())
    }

    fn rmdir(&mut self, p: &str) -> Res {
        match self.lookup(p)? {
            Node::File { .. } => Err(libc::ENOTDIR),
            Node::Dir { .. } if !self.is_empty_dir(p) => Err(libc::ENOTEMPTY),
            Node::Dir { .. } => {
                self.tree.remove(p);
                Ok(())
            }
        }
    }

    fn chmod(&mut self, p: &str, m: u32) -> Res {
        self.check_parent(p)?;
        match self.tree.get_mut(p) {
            None => Err(libc::ENOENT),
            Some(Node::Dir { mode } | Node::File { mode, .. }) => {
                *mode = m;
                Ok(())
            }
        }
    }

    /// Moves `from` and everything below it to `to`.
    fn move_subtree(&mut self, from: &str, to: &str) -> Vec<(String, Node)> {
        let prefix = format!("{from}/");
        let keys: Vec<String> = self
            .tree
            .keys()
            .filter(|k| *k == from || k.starts_with(&prefix))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|k| {
                let node = self.tree.remove(&k).expect("key listed");
                (format!("{to}{}", &k[from.len()..]), node)
            })
            .collect()
    }

    /// rename(2) as Linux orders its checks (fs/namei.c do_renameat2, then
    /// vfs_rename's may_delete, then the filesystem).
    fn rename(&mut self, a: &str, b: &str, flags: u32) -> Res {
        // Both parents are resolved before either last component.
        self.check_parent(a)?;
        self.check_parent(b)?;
        let src_dir = matches!(self.lookup(a)?, Node::Dir { .. });
        let dst = self.tree.get(b).cloned();
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if flags & libc::RENAME_EXCHANGE != 0 && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if a != b && b.starts_with(&format!("{a}/")) {
            return Err(libc::EINVAL);
        }
        if a != b && a.starts_with(&format!("{b}/")) {
            return Err(if flags & libc::RENAME_EXCHANGE != 0 {
                libc::EINVAL
            } else {
                libc::ENOTEMPTY
            });
        }
        if a == b {
            return Ok(());
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            let moved_a = self.move_subtree(a, "\u{0}tmp");
            let moved_b = self.move_subtree(b, a);
            self.tree.extend(moved_b);
            let moved_a: Vec<_> = moved_a
                .into_iter()
                .map(|(k, n)| (format!("{b}{}", &k["\u{0}tmp".len()..]), n))
                .collect();
            self.tree.extend(moved_a);
            return Ok(());
        }
        if let Some(dst) = dst {
            match (src_dir, matches!(dst, Node::Dir { .. })) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.is_empty_dir(b) => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.tree.remove(b);
        }
        let moved = self.move_subtree(a, b);
        self.tree.extend(moved);
        Ok(())
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn io(r: std::io::Result<()>) -> Res {
    r.map_err(errno_of)
}

/// The real side: the same operations through the mount.
struct Real<'a> {
    root: &'a Path,
    held: Vec<(File, u64)>,
    /// The host tier's capacity where it is small enough to fill.
    capacity: Option<u64>,
}

/// Whether kvfs may answer ENOSPC to `op`, as documented: a writer needs
/// room in the host tier, and files held open cannot be evicted to make it.
/// So it may only when the held files and the one being written together
/// come close to the capacity (by logical size, which bounds what they
/// allocate; the slack covers page rounding).
fn may_be_full(op: &Op, model: &Model, real: &Real) -> bool {
    let Some(capacity) = real.capacity else {
        return false;
    };
    let target = match *op {
        Op::Create(_) => None,
        Op::Write { path, .. } | Op::Truncate(path, _) => model.file_id(PATHS[path]).ok(),
        _ => return false,
    };
    let mut ids: Vec<u64> = real.held.iter().map(|(_, id)| *id).collect();
    ids.extend(target);
    ids.sort_unstable();
    ids.dedup();
    let size = |id: &u64| model.data.get(id).map_or(0, |d| d.len() as u64);
    let grown = match *op {
        Op::Write { offset, len, .. } => u64::from(offset) + u64::from(len),
        Op::Truncate(_, n) => n.into(),
        _ => 0,
    };
    let pinned: u64 = ids.iter().map(size).sum::<u64>() + grown;
    pinned + (64 << 10) >= capacity
}

impl Real<'_> {
    fn p(&self, i: usize) -> PathBuf {
        self.root.join(PATHS[i])
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn step(op: &Op, model: &mut Model, real: &mut Real) -> Result<(), TestCaseError> {
    let before = may_be_full(op, model, real).then(|| model.clone());
    let (want, got): (Res, Res) = match *op {
        Op::Create(i) => (
            model.create(PATHS[i]),
            io(OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(real.p(i))
                .map(drop)),
        ),
        Op::Write {
            path,
            offset,
            len,
            byte,
        } => (
            model.write(PATHS[path], offset as usize, len as usize, byte),
            io(OpenOptions::new()
                .write(true)
                .open(real.p(path))
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(offset.into()))?;
                    f.write_all(&vec![byte; len as usize])
                })),
        ),
        Op::Truncate(i, n) => (
            model.truncate(PATHS[i], n as usize),
            io(OpenOptions::new()
                .write(true)
                .open(real.p(i))
                .and_then(|f| f.set_len(n.into()))),
        ),
        Op::Unlink(i) => (model.unlink(PATHS[i]), io(fs::remove_file(real.p(i)))),
        Op::Mkdir(i) => (model.mkdir(PATHS[i]), io(fs::create_dir(real.p(i)))),
        Op::Rmdir(i) => (model.rmdir(PATHS[i]), io(fs::remove_dir(real.p(i)))),
        Op::Rename(a, b, flags) => (
            model.rename(PATHS[a], PATHS[b], flags),
            common::renameat2(&real.p(a), &real.p(b), flags),
        ),
        Op::Chmod(i, m) => (
            model.chmod(PATHS[i], m),
            io(fs::set_permissions(
                real.p(i),
                fs::Permissions::from_mode(m),
            )),
        ),
        Op::Read(i) => {
            let want = model.file_id(PATHS[i]).map(|id| model.data[&id].clone());
            let got = fs::read(real.p(i)).map_err(errno_of);
            if let (Ok(w), Ok(g)) = (&want, &got)
                && w != g
            {
                return Err(fail(format!(
                    "{op:?}: read {} bytes, model has {}",
                    g.len(),
                    w.len()
                )));
            }
            (want.map(drop), got.map(drop))
        }
        Op::Hold(i) => {
            // Opening a directory read-only works too; only files are held.
            let want = model.lookup(PATHS[i]).map(|n| match n {
                Node::File { id, .. } => Some(*id),
                Node::Dir { .. } => None,
            });
            let got = File::open(real.p(i)).map_err(errno_of);
            let res = (want.map(drop), got.as_ref().map(drop).map_err(|e| *e));
            if let (Ok(Some(id)), Ok(f)) = (want, got)
                && real.held.len() < 4
            {
                real.held.push((f, id));
            }
            res
        }
        Op::ReadHeld(k) => {
            if let Some((f, id)) = real.held.get_mut(k) {
                let mut buf = Vec::new();
                f.seek(SeekFrom::Start(0))
                    .map_err(|e| fail(e.to_string()))?;
                f.read_to_end(&mut buf).map_err(|e| fail(e.to_string()))?;
                if buf != model.data[id] {
                    return Err(fail(format!(
                        "{op:?}: held file has {} bytes, model {}",
                        buf.len(),
                        model.data[id].len()
                    )));
                }
            }
            (Ok(()), Ok(()))
        }
        Op::Release(k) => {
            if k < real.held.len() {
                real.held.remove(k);
            }
            (Ok(()), Ok(()))
        }
    };
    if want.is_ok()
        && got == Err(libc::ENOSPC)
        && let Some(before) = before
    {
        // The documented refusal: nothing changed (the tree comparison
        // below checks that kvfs agrees).
        *model = before;
        OPS_FULL.fetch_add(1, Ordering::Relaxed);
    } else if want != got {
        return Err(fail(format!("{op:?}: model says {want:?}, kvfs {got:?}")));
    }
    if got.is_ok() {
        OPS_OK.fetch_add(1, Ordering::Relaxed);
    }
    compare_trees(model, real.root).map_err(|e| fail(format!("after {op:?}: {e}")))
}

fn compare_trees(model: &Model, root: &Path) -> Result<(), String> {
    let mut real = BTreeMap::new();
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(|e| format!("readdir {rel}: {e}"))? {
            let e = e.map_err(|e| e.to_string())?;
            let name = e.file_name().into_string().map_err(|_| "non-UTF-8 name")?;
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = fs::symlink_metadata(e.path()).map_err(|e| format!("stat {path}: {e}"))?;
            let mode = md.permissions().mode() & 0o7777;
            if md.is_dir() {
                stack.push((e.path(), path.clone()));
                real.insert(path, (true, mode, 0));
            } else {
                real.insert(path, (false, mode, md.len()));
            }
        }
    }
    let want: BTreeMap<String, (bool, u32, u64)> = model
        .tree
        .iter()
        .map(|(k, n)| {
            let v = match n {
                Node::Dir { mode } => (true, *mode, 0),
                Node::File { id, mode } => (false, *mode, model.data[id].len() as u64),
            };
            (k.clone(), v)
        })
        .collect();
    if want != real {
        return Err(format!("tree differs:\n model {want:?}\n kvfs  {real:?}"));
    }
    Ok(())
}

fn clear(root: &Path) {
    for e in fs::read_dir(root).expect("list root") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            fs::remove_dir_all(&p).expect("clear dir");
        } else {
            fs::remove_file(&p).expect("clear file");
        }
    }
}

static OPS_RUN: AtomicU64 = AtomicU64::new(0);
/// Operations that succeeded: a run where almost everything fails with
/// ENOENT would test little.
static OPS_OK: AtomicU64 = AtomicU64::new(0);
/// Operations refused with the documented ENOSPC (see [`may_be_full`]).
static OPS_FULL: AtomicU64 = AtomicU64::new(0);

/// Shrinking replays many sequences after the first failure, so the daemon
/// log at the panic no longer shows the one that failed first: keep a copy of
/// it, with that sequence, next to the test's temp files.
fn keep_first_failure(m: &KvfsMount, mode: &str, ops: &[Op], e: &TestCaseError) {
    static KEPT: std::sync::Once = std::sync::Once::new();
    KEPT.call_once(|| {
        let path = std::env::temp_dir().join(format!(
            "kvfs-model-failure-{}-{}.log",
            mode.replace('+', "-"),
            std::process::id()
        ));
        let log = fs::read(m.log_path()).unwrap_or_default();
        // The failing sequence is at the end; the whole log may be huge.
        let log = String::from_utf8_lossy(&log[log.len().saturating_sub(8 << 20)..]);
        let text = format!("{e}\nsequence: {ops:?}\n--- daemon log ---\n{log}");
        if fs::write(&path, text).is_ok() {
            eprintln!("first failure and daemon log kept in {}", path.display());
        }
    });
}

#[test]
fn kvfs_matches_the_model() {
    let cases: u32 = std::env::var("KVFS_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seed: u64 = std::env::var("KVFS_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("model test: {cases} cases per data path, KVFS_MODEL_SEED={seed}");
    // The third setup keeps a host tier smaller than the files a sequence
    // makes, so files are written back, demoted and promoted as it runs:
    // none of that may change what a caller sees.
    let nvme = tempfile::Builder::new()
        .prefix("kvfs-model-nvme-")
        .tempdir_in("/var/tmp")
        .expect("temp dir on disk");
    let nvme_dir = nvme.path().to_str().expect("utf-8 path").to_owned();
    // The fourth: host tier only, far too small, over S3: files leave the
    // host for S3 as soon as they are uploaded, and come back on open;
    // unlinks and renames are applied to the bucket while names are looked
    // up and listed from it.
    let srv = common::s3::S3Server::start();
    let mut s3_args = srv.args("model");
    s3_args.extend(
        [
            "--host-capacity",
            "6MiB",
            "--huge-pages",
            "false",
            "--nvme-dir",
            "none",
        ]
        .map(String::from),
    );
    let setups: [(&str, Vec<&str>); 4] = [
        (
            MODES[0],
            vec!["--data-path", MODES[0], "--host-capacity", "1GiB"],
        ),
        (
            MODES[1],
            vec!["--data-path", MODES[1], "--host-capacity", "1GiB"],
        ),
        (
            "passthrough+nvme",
            // 4 MiB: files are demoted and promoted all the time (ten times
            // as often as at 6 MiB). The files a sequence holds open can
            // then pin the whole tier, and a writer gets the documented
            // ENOSPC, which the model allows only then (`may_be_full`).
            // 4 KiB pages: with huge pages each small file would cost 2 MiB
            // and a few held files would fill the tier.
            vec![
                "--host-capacity",
                "4MiB",
                "--huge-pages",
                "false",
                "--nvme-dir",
                &nvme_dir,
            ],
        ),
        (
            "passthrough+s3",
            s3_args.iter().map(String::as_str).collect(),
        ),
    ];
    // KVFS_MODEL_SETUP=NAME runs one setup only (a soak of the slowest).
    let only = std::env::var("KVFS_MODEL_SETUP").ok();
    for (mode, args) in setups {
        if only.as_deref().is_some_and(|o| o != mode) {
            continue;
        }
        // Small host tiers are given in MiB; the others never fill.
        let capacity = args
            .iter()
            .position(|a| *a == "--host-capacity")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.strip_suffix("MiB"))
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n << 20);
        let m = if mode.ends_with("s3") {
            KvfsMount::start_env(&args, &srv.env())
        } else {
            KvfsMount::start(&args)
        };
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
            clear(&m.mnt);
            let mut model = Model::default();
            let mut real = Real {
                root: &m.mnt,
                held: Vec::new(),
                capacity,
            };
            for (n, op) in ops.iter().enumerate() {
                OPS_RUN.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = step(op, &mut model, &mut real) {
                    keep_first_failure(&m, mode, &ops[..=n], &e);
                    return Err(e);
                }
            }
            Ok(())
        });
        let st = m.status();
        eprintln!(
            "{mode}: {} operations so far, {} succeeded, {} refused as full; evictions {}, promotions {}",
            OPS_RUN.load(Ordering::Relaxed),
            OPS_OK.load(Ordering::Relaxed),
            OPS_FULL.load(Ordering::Relaxed),
            st["host"]["evictions"],
            st["counters"]["promotions"],
        );
        if let Ok(path) = std::env::var("KVFS_MODEL_OPS_FILE") {
            let _ = fs::write(path, OPS_RUN.load(Ordering::Relaxed).to_string());
        }
        if let Err(e) = result {
            panic!(
                "{mode}: kvfs diverged from the model (replay with KVFS_MODEL_SEED={seed}):\n{e}"
            );
        }
    }
}
