//! A [`Storage`] that injects faults, for tests: EIO or ENOSPC on chosen operations of chosen
//! files, torn writes (a prefix reaches the file, then an error), and a simulated crash that
//! loses every write not yet made durable by `sync_data`.
//!
//! Rules match a path substring and an operation; each can skip its first `after` matches and
//! fire `times` times (or for ever). The engine and the target take any [`Storage`], so a test
//! starts them over a [`FaultyStorage`] and changes its [`FaultPlan`] while they run.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

use crate::storage::{OpenMode, Storage, StorageFile};

/// Which operation a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `write_all_at` (also `zero_range`, `allocate`, `set_len`).
    Write,
    /// `sync_data` (and `sync_dir`).
    Sync,
    /// `open` (creating included).
    Open,
}

/// What a matching operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails with EIO, changing nothing.
    Eio,
    /// Fails with ENOSPC, changing nothing.
    NoSpace,
    /// A write stores its first `keep` bytes, then fails with EIO (a torn write).
    Torn { keep: usize },
}

/// One fault rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Matches files whose path contains this.
    pub path_contains: String,
    /// The operation.
    pub op: Op,
    /// What happens.
    pub fault: Fault,
    /// Matching operations let through before the first fault.
    pub after: u64,
    /// How many times it fires (`None`: every time from then on).
    pub times: Option<u64>,
}

impl Rule {
    /// A rule that fails every matching operation from now on.
    pub fn always(path_contains: &str, op: Op, fault: Fault) -> Rule {
        Rule { path_contains: path_contains.to_owned(), op, fault, after: 0, times: None }
    }
}

#[derive(Debug)]
struct Armed {
    rule: Rule,
    seen: u64,
    fired: u64,
}

/// The rules in force, changeable while the storage is in use.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<Armed>>,
    fired: Mutex<u64>,
}

impl FaultPlan {
    /// Adds a rule.
    pub fn add(&self, rule: Rule) {
        lock(&self.rules).push(Armed { rule, seen: 0, fired: 0 });
    }

    /// Removes every rule (the operator fixed the disk).
    pub fn clear(&self) {
        lock(&self.rules).clear();
    }

    /// How many faults have fired so far.
    pub fn fired(&self) -> u64 {
        *lock(&self.fired)
    }

    /// The fault for this operation, if a rule fires.
    fn check(&self, path: &Path, op: Op) -> Option<Fault> {
        let path = path.to_string_lossy();
        let mut rules = lock(&self.rules);
        for a in rules.iter_mut() {
            if a.rule.op != op || !path.contains(&a.rule.path_contains) {
                continue;
            }
            a.seen += 1;
            if a.seen <= a.rule.after || a.rule.times.is_some_and(|t| a.fired >= t) {
                continue;
            }
            a.fired += 1;
            *lock(&self.fired) += 1;
            return Some(a.rule.fault);
        }
        None
    }
}

fn error(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace => io::Error::from_raw_os_error(28),
        Fault::Eio | Fault::Torn { .. } => io::Error::from_raw_os_error(5),
    }
}

/// What was overwritten since the last sync of a file, to put back on a crash.
#[derive(Debug, Default)]
struct Undo {
    /// Length at the last sync.
    synced_len: u64,
    /// (offset, bytes before the write), oldest first.
    before: Vec<(u64, Vec<u8>)>,
}

/// A storage over another one, with faults.
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    plan: Arc<FaultPlan>,
    undo: Arc<Mutex<HashMap<PathBuf, Undo>>>,
}

impl fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStorage").field("plan", &self.plan).finish_non_exhaustive()
    }
}

impl FaultyStorage {
    /// Wraps `inner`; faults follow `plan`.
    pub fn new(inner: Arc<dyn Storage>, plan: Arc<FaultPlan>) -> FaultyStorage {
        FaultyStorage { inner, plan, undo: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Simulates a power loss: every file goes back to what its last `sync_data` made
    /// durable (overwritten bytes restored, appended bytes cut). Call it with the processes
    /// using the storage stopped.
    pub fn crash(&self) -> io::Result<()> {
        let mut undo = lock(&self.undo);
        for (path, u) in undo.drain() {
            let Ok(f) = self.inner.open(&path, OpenMode::ReadWrite) else { continue };
            for (offset, bytes) in u.before.iter().rev() {
                f.write_all_at(bytes, *offset)?;
            }
            f.set_len(u.synced_len)?;
            f.sync_data()?;
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        if let Some(f) = self.plan.check(path, Op::Open) {
            return Err(error(f));
        }
        let file = self.inner.open(path, mode)?;
        if mode != OpenMode::Read {
            let len = file.len()?;
            lock(&self.undo).entry(path.to_owned()).or_insert(Undo { synced_len: len, before: Vec::new() });
        }
        Ok(Box::new(FaultyFile { file, path: path.to_owned(), plan: Arc::clone(&self.plan), undo: Arc::clone(&self.undo) }))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        lock(&self.undo).remove(path);
        self.inner.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut undo = lock(&self.undo);
        if let Some(u) = undo.remove(from) {
            undo.insert(to.to_owned(), u);
        }
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if let Some(f) = self.plan.check(dir, Op::Sync) {
            return Err(error(f));
        }
        self.inner.sync_dir(dir)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
}

struct FaultyFile {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    plan: Arc<FaultPlan>,
    undo: Arc<Mutex<HashMap<PathBuf, Undo>>>,
}

impl FaultyFile {
    /// Remembers what `len` bytes at `offset` held, for a crash.
    fn remember(&self, offset: u64, len: usize) -> io::Result<()> {
        let size = self.file.len()?;
        let mut before = vec![0u8; len.min(usize::try_from(size.saturating_sub(offset)).unwrap_or(usize::MAX))];
        if !before.is_empty() {
            self.file.read_exact_at(&mut before, offset)?;
        }
        if let Some(u) = lock(&self.undo).get_mut(&self.path) {
            u.before.push((offset, before));
        }
        Ok(())
    }
}

impl StorageFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.plan.check(&self.path, Op::Write) {
            None => {
                self.remember(offset, buf.len())?;
                self.file.write_all_at(buf, offset)
            }
            Some(Fault::Torn { keep }) => {
                let keep = keep.min(buf.len());
                self.remember(offset, keep)?;
                self.file.write_all_at(&buf[..keep], offset)?;
                Err(error(Fault::Torn { keep }))
            }
            Some(f) => Err(error(f)),
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        if let Some(f) = self.plan.check(&self.path, Op::Sync) {
            return Err(error(f));
        }
        self.file.sync_data()?;
        if let Some(u) = lock(&self.undo).get_mut(&self.path) {
            u.before.clear();
            u.synced_len = self.file.len()?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Some(f) = self.plan.check(&self.path, Op::Write) {
            return Err(error(f));
        }
        self.file.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(f) = self.plan.check(&self.path, Op::Write) {
            return Err(error(f));
        }
        self.remember(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        self.file.zero_range(offset, len)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        if let Some(f) = self.plan.check(&self.path, Op::Write) {
            return Err(error(f));
        }
        self.file.allocate(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StdStorage;

    #[test]
    fn rules_fire_where_and_when_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(FaultPlan::default());
        let fs = FaultyStorage::new(StdStorage::shared(), Arc::clone(&plan));
        let path = dir.path().join("journal.bin");
        let f = fs.open(&path, OpenMode::Create).unwrap();
        plan.add(Rule { after: 1, times: Some(1), ..Rule::always("journal", Op::Write, Fault::NoSpace) });
        f.write_all_at(b"one", 0).unwrap();
        assert_eq!(f.write_all_at(b"two", 3).unwrap_err().raw_os_error(), Some(28));
        f.write_all_at(b"two", 3).unwrap();
        plan.add(Rule::always("journal", Op::Sync, Fault::Eio));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));
        assert_eq!(plan.fired(), 2);
        plan.clear();
        f.sync_data().unwrap();
        // A torn write stores its prefix and fails.
        plan.add(Rule::always("journal", Op::Write, Fault::Torn { keep: 2 }));
        assert!(f.write_all_at(b"xyz", 6).is_err());
        plan.clear();
        assert_eq!(std::fs::read(&path).unwrap(), b"onetwoxy");
        // Other files are untouched by the rules.
        plan.add(Rule::always("journal", Op::Open, Fault::Eio));
        assert!(fs.open(&path, OpenMode::Read).is_err());
        assert!(fs.open(&dir.path().join("state"), OpenMode::Create).is_ok());
    }

    #[test]
    fn a_crash_loses_what_was_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyStorage::new(StdStorage::shared(), Arc::new(FaultPlan::default()));
        let path = dir.path().join("f");
        let f = fs.open(&path, OpenMode::Create).unwrap();
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"DUR", 0).unwrap();
        f.write_all_at(b"-lost tail", 7).unwrap();
        drop(f);
        fs.crash().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"durable");
    }
}
