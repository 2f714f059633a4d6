//! The local half of a replicating disk: opening the local disk ([`LocalDisk`]), the ranges
//! whose local write is under way (a write overlapping one waits for it), applying a write to
//! the disk, and the writer threads, shared by every disk of the agent, which take the large
//! writes off the front end's thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crossbeam_channel::Sender;
use hindsight_consistency::storage::{OpenMode, Storage, StorageFile};
use hindsight_consistency::sync::lock;
use log::error;
use thiserror::Error;

use super::join::Join;
use crate::block::BlockError;

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
    pub(super) file: Box<dyn StorageFile>,
    pub(super) size: u64,
    pub(super) path: PathBuf,
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

/// Local writes of at least this many bytes run on the writer threads, so that the front end
/// reads and forwards the next request meanwhile; smaller ones run inline, where a thread
/// hand-off would cost more than the write.
const OFFLOAD_MIN: u64 = 128 << 10;
/// Writer threads, for every disk of the agent together: however many disks it serves, the
/// local disks are written by the front ends' threads and these few.
const LOCAL_WRITERS: usize = 4;

/// The local half of a disk, shared with the writer threads.
pub(super) struct Local {
    pub(super) disk: LocalDisk,
    pub(super) volume: String,
    /// Ranges whose local write is under way. A write that overlaps one waits for it before
    /// it is sent anywhere, so overlapping writes reach the local disk in the order the engine
    /// numbers them, and the replica ends equal to the source.
    pub(super) in_flight: Ranges,
}

/// The ranges whose local write is under way, and the threads waiting for one to finish.
#[derive(Default)]
pub(super) struct Ranges {
    state: Mutex<RangesState>,
    done: Condvar,
}

/// What the ranges' mutex guards.
#[derive(Default)]
pub(super) struct RangesState {
    pub(super) ranges: Vec<(u64, u64)>,
    /// Threads waiting in `clear`: a finished write wakes them only when there are some
    /// (a wake-up is a system call, and almost no write overlaps one in flight).
    waiting: usize,
}

impl Ranges {
    /// Waits until no write under way overlaps `start..end`; returns with the ranges locked,
    /// so that the caller can act (read, or add its own range) before another write starts.
    pub(super) fn clear(&self, start: u64, end: u64) -> MutexGuard<'_, RangesState> {
        let mut st = lock(&self.state);
        while st.ranges.iter().any(|&(s, e)| s < end && start < e) {
            st.waiting += 1;
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiting -= 1;
        }
        st
    }

    /// The write of `start..end` has finished.
    fn finish(&self, start: u64, end: u64) {
        let mut st = lock(&self.state);
        let found = st.ranges.iter().position(|&r| r == (start, end));
        debug_assert!(found.is_some(), "a local write finished that was not under way: {start}..{end}");
        if let Some(i) = found {
            st.ranges.swap_remove(i);
        }
        if st.waiting > 0 {
            drop(st);
            self.done.notify_all();
        }
    }
}

/// What the local disk must do for one request.
pub(super) enum LocalBody {
    Data(Arc<Vec<u8>>),
    Zeroes(u64),
}

/// One request's local part.
pub(super) struct LocalJob {
    pub(super) offset: u64,
    pub(super) body: LocalBody,
    pub(super) fua: bool,
    pub(super) join: Arc<Join>,
}

impl Local {
    /// Applies `job` to the local disk and finishes its local part.
    pub(super) fn run(&self, job: LocalJob) {
        let LocalJob { offset, body, fua, join } = job;
        let len = match &body {
            LocalBody::Data(d) => d.len() as u64,
            LocalBody::Zeroes(n) => *n,
        };
        let file = &self.disk.file;
        let res = match &body {
            LocalBody::Data(d) => file.write_all_at(d, offset),
            LocalBody::Zeroes(n) => file.zero_range(offset, *n),
        };
        let res = res.and_then(|()| if fua { file.sync_data() } else { Ok(()) });
        self.in_flight.finish(offset, offset + len);
        join.finish(res.map_err(|e| {
            error!("volume {}: local write of {len} bytes at offset {offset} to {} failed: {e}", self.volume, self.disk.path.display());
            BlockError::from_io(&e)
        }));
    }
}

/// The writer threads, shared by every disk; `None` if none could be started (then every
/// write runs inline).
pub(super) struct Writers(Option<Sender<(Arc<Local>, LocalJob)>>);

/// Started by the first disk.
static WRITERS: OnceLock<Writers> = OnceLock::new();

impl Writers {
    /// The writer threads of the process, started on first use.
    pub(super) fn shared() -> &'static Writers {
        WRITERS.get_or_init(Writers::start)
    }

    fn start() -> Writers {
        let (tx, rx) = crossbeam_channel::unbounded::<(Arc<Local>, LocalJob)>();
        let mut started = 0;
        for i in 0..LOCAL_WRITERS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("local-writer-{i}")).spawn(move || {
                for (local, job) in rx {
                    local.run(job);
                }
            });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => error!("cannot start a local writer thread ({e}); {started} run, or large writes run inline if none"),
            }
        }
        Writers((started > 0).then_some(tx))
    }

    /// Applies `job`, of `len` bytes, to the local disk: on a writer thread if it is large,
    /// inline otherwise (or if no writer thread runs).
    pub(super) fn apply(&self, local: &Arc<Local>, job: LocalJob, len: u64) {
        match &self.0 {
            Some(tx) if len >= OFFLOAD_MIN => {
                if let Err(crossbeam_channel::SendError((local, job))) = tx.send((Arc::clone(local), job)) {
                    local.run(job);
                }
            }
            _ => local.run(job),
        }
    }
}
