//! The replicating block device: every write goes to the engine and to the local disk, and
//! completes once both hold it.
//!
//! A write is sent to the engine first, then applied to the local disk (`pwrite` for data, a
//! punched hole or written zeroes for write-zeroes and trim, `fdatasync` when FUA is set). A
//! small `Join` counts the parts down; whichever part finishes last runs the front end's
//! completion, exactly once, failing it if any part failed. Reads and flushes touch only the
//! local disk: the engine's acknowledgement already means the write is durable there (cdp
//! mode).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use hindsight_consistency::record::MAX_WRITE_LEN;
use hindsight_consistency::storage::{OpenMode, Storage, StorageFile};
use log::error;
use thiserror::Error;

use crate::block::{BlockDevice, BlockError, Completion, WriteKind, WriteOp};
use crate::engine_link::{EngineLink, WriteBody};

/// Why a local disk cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Opening it read-write failed.
    #[error("cannot open {} read-write (check the path and the agent's permissions)", path.display())]
    Open {
        /// The disk's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Its size could not be read.
    #[error("cannot read the size of {}", path.display())]
    Size {
        /// The disk's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It is empty.
    #[error("{} has size 0; give a block device or a file of the volume's size", path.display())]
    Empty {
        /// The disk's path.
        path: PathBuf,
    },
}

/// A local disk (a block device or a regular file), opened read-write.
pub struct LocalDisk {
    file: Box<dyn StorageFile>,
    size: u64,
    path: PathBuf,
}

impl LocalDisk {
    /// Opens the disk at `path` read-write and reads its size (for a block device, by
    /// seeking to its end).
    pub fn open(fs: &dyn Storage, path: &Path) -> Result<LocalDisk, DiskError> {
        let file = fs.open(path, OpenMode::ReadWrite).map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
        let size = file.len().map_err(|source| DiskError::Size { path: path.to_owned(), source })?;
        if size == 0 {
            return Err(DiskError::Empty { path: path.to_owned() });
        }
        Ok(LocalDisk { file, size, path: path.to_owned() })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A local disk whose every write is also sent to the engine, as disk number `disk` of the
/// link.
pub struct ReplicatedDisk {
    local: LocalDisk,
    link: Arc<EngineLink>,
    disk: u16,
    volume: String,
    /// Held from sending a write to the engine until it is applied locally, so that writes
    /// of different client connections reach the local disk in the order the engine journals
    /// them: two overlapping writes in flight together then leave the same bytes on both.
    order: Mutex<()>,
}

impl ReplicatedDisk {
    /// Serves `local` as volume `volume`, disk number `disk` of `link`.
    pub fn new(local: LocalDisk, link: Arc<EngineLink>, disk: u16, volume: String) -> Self {
        ReplicatedDisk { local, link, disk, volume, order: Mutex::new(()) }
    }

    /// The volume name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.local.size => Ok(()),
            _ => Err(BlockError::Invalid),
        }
    }

    /// Sends one write to the engine; its acknowledgement finishes one count of `join`.
    fn send(&self, offset: u64, body: WriteBody, join: &Arc<Join>) {
        let j = Arc::clone(join);
        let done = Box::new(move |r: Result<_, BlockError>| j.finish(r.map(|_seq| ())));
        self.link.submit(self.disk, offset, body, done);
    }

    /// Sends a write-zeroes or trim of `len` bytes as writes of at most `MAX_WRITE_LEN`
    /// bytes each (the front end accepts longer ones than a `Write` may carry).
    fn send_split(&self, mut offset: u64, mut len: u32, body: fn(u32) -> WriteBody, join: &Arc<Join>) {
        while len > 0 {
            let part = len.min(MAX_WRITE_LEN);
            self.send(offset, body(part), join);
            offset += u64::from(part);
            len -= part;
        }
    }
}

/// Number of engine writes a request becomes.
fn parts(len: u64) -> u32 {
    u32::try_from(len.div_ceil(u64::from(MAX_WRITE_LEN))).unwrap_or(u32::MAX)
}

impl BlockDevice for ReplicatedDisk {
    fn size(&self) -> u64 {
        self.local.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        self.local.file.read_exact_at(buf, offset).map_err(|e| {
            error!("volume {}: reading {} bytes at offset {} of {} failed: {e}", self.volume, buf.len(), offset, self.local.path.display());
            BlockError::from_io(&e)
        })
    }

    fn submit(&self, op: WriteOp, done: Completion) {
        let WriteOp { offset, kind, fua } = op;
        let len = kind.len();
        if let Err(e) = self.check(offset, len) {
            return done(Err(e));
        }
        if len == 0 {
            return done(Ok(()));
        }
        if len > u64::from(MAX_WRITE_LEN) && matches!(kind, WriteKind::Data(_)) {
            return done(Err(BlockError::Overflow));
        }
        // The engine's parts, then the local one.
        let join = Arc::new(Join::new(parts(len) + 1, done));
        let local = {
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            match kind {
                WriteKind::Data(data) => {
                    let data = Arc::new(data);
                    self.send(offset, WriteBody::Data(Arc::clone(&data)), &join);
                    self.local.file.write_all_at(&data, offset)
                }
                WriteKind::Zeroes { len } => {
                    self.send_split(offset, len, WriteBody::Zeroes, &join);
                    self.local.file.zero_range(offset, u64::from(len))
                }
                WriteKind::Trim { len } => {
                    self.send_split(offset, len, WriteBody::Trim, &join);
                    self.local.file.zero_range(offset, u64::from(len))
                }
            }
        };
        let local = local.and_then(|()| if fua { self.local.file.sync_data() } else { Ok(()) });
        join.finish(local.map_err(|e| {
            error!("volume {}: local write of {len} bytes at offset {offset} to {} failed: {e}", self.volume, self.local.path.display());
            BlockError::from_io(&e)
        }));
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.local.file.sync_data().map_err(|e| {
            error!("volume {}: flushing {} failed: {e}", self.volume, self.local.path.display());
            BlockError::from_io(&e)
        })
    }
}

/// Joins the parts of one request: counts them down and keeps the first error; the part that
/// finishes last runs the completion.
struct Join {
    left: AtomicU32,
    error: OnceLock<BlockError>,
    done: Mutex<Option<Completion>>,
}

impl Join {
    fn new(parts: u32, done: Completion) -> Join {
        Join { left: AtomicU32::new(parts), error: OnceLock::new(), done: Mutex::new(Some(done)) }
    }

    fn finish(&self, result: Result<(), BlockError>) {
        if let Err(e) = result {
            let _ = self.error.set(e);
        }
        // AcqRel: the last part sees every earlier part's error.
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(done) = done {
            done(match self.error.get() {
                Some(&e) => Err(e),
                None => Ok(()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Results = Arc<Mutex<Vec<Result<(), BlockError>>>>;

    fn recorder() -> (Results, Completion) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        (got, Box::new(move |r| g.lock().unwrap().push(r)))
    }

    #[test]
    fn join_completes_once_after_the_last_part() {
        let (got, done) = recorder();
        let j = Join::new(2, done);
        j.finish(Ok(()));
        assert!(got.lock().unwrap().is_empty());
        j.finish(Ok(()));
        assert_eq!(*got.lock().unwrap(), vec![Ok(())]);
    }

    #[test]
    fn join_reports_the_first_error_whichever_part_is_last() {
        let (got, done) = recorder();
        let j = Join::new(3, done);
        j.finish(Err(BlockError::NoSpace));
        j.finish(Err(BlockError::Io));
        j.finish(Ok(()));
        assert_eq!(*got.lock().unwrap(), vec![Err(BlockError::NoSpace)]);
    }

    #[test]
    fn long_zeroing_splits_into_engine_sized_parts() {
        assert_eq!(parts(1), 1);
        assert_eq!(parts(u64::from(MAX_WRITE_LEN)), 1);
        assert_eq!(parts(u64::from(MAX_WRITE_LEN) + 1), 2);
        assert_eq!(parts(u64::from(u32::MAX)), 128);
    }
}
