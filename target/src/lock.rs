//! Advisory file locks (flock) between the daemon and readers in other processes.
//!
//! A group's `lock` file is held shared by `recover` and `history` while they read `base/`,
//! `state` and the journal, and exclusively by the daemon while retention rolls the base
//! images forward and deletes journal segments. `target.lock` in the data directory is held
//! exclusively by the running daemon, so that two daemons never share a data directory.
//! flock locks belong to the open file, so two opens in one process exclude each other too.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// A held lock; released when dropped.
#[derive(Debug)]
pub(crate) struct FileLock {
    _lock: Flock<File>,
}

/// Lock strength.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// Readers: many at a time.
    Shared,
    /// The daemon's retention, alone.
    Exclusive,
}

/// Opens `path` (creating it if it is missing and `create` is set) and locks it, waiting for
/// the lock if `wait`. Returns `Ok(None)` when `wait` is false and someone else holds it.
pub(crate) fn lock_file(path: &Path, kind: LockKind, wait: bool, create: bool) -> io::Result<Option<FileLock>> {
    let file = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?
        }
        Err(e) => return Err(e),
    };
    let arg = match (kind, wait) {
        (LockKind::Shared, true) => FlockArg::LockShared,
        (LockKind::Shared, false) => FlockArg::LockSharedNonblock,
        (LockKind::Exclusive, true) => FlockArg::LockExclusive,
        (LockKind::Exclusive, false) => FlockArg::LockExclusiveNonblock,
    };
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Ok(lock) => return Ok(Some(FileLock { _lock: lock })),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, Errno::EWOULDBLOCK)) if !wait => return Ok(None),
            Err((_, errno)) => return Err(io::Error::from(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_and_release_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = lock_file(&p, LockKind::Shared, false, true).unwrap().unwrap();
        let b = lock_file(&p, LockKind::Shared, false, true).unwrap();
        assert!(b.is_some(), "two shared locks coexist");
        assert!(lock_file(&p, LockKind::Exclusive, false, true).unwrap().is_none());
        drop(a);
        drop(b);
        let x = lock_file(&p, LockKind::Exclusive, false, true).unwrap();
        assert!(x.is_some());
        assert!(lock_file(&p, LockKind::Shared, false, true).unwrap().is_none());
    }
}
