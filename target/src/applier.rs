//! The group's applier: applies committed batches of records to the replicas, in commit
//! order, while the connection thread receives and commits the next batch. Every group's
//! applier is a task of one pool of threads (`hindsight_consistency::tasks`) shared by the
//! whole process, woken when a batch is queued; a round applies one batch.
//!
//! ```text
//! connection thread                            applier task
//!   validate · append · commit (fdatasync)
//!   save the marks (bookmarks, spans)
//!   Confirm(durable_seq) ──▶ engine
//!   Batch { frames | after | through } ──queue──▶ apply records after..=through
//!   read the next frames                          applied_seq = through
//!        ▲                                            │
//!        └────────────── frame buffers ◀── spares ◀─┘
//! ```
//!
//! Durability is the journal's: a record is confirmed once it is committed, and a crash before
//! it is applied is repaired by the start-up replay from the checkpointed `applied_seq`. The
//! queue holds at most [`MAX_QUEUED_BYTES`] of frame buffers (the connection thread waits for
//! room), so memory stays bounded whatever the replicas' speed.
//!
//! Whoever reads the replicas and names a sequence number takes [`ApplyShared::replicas`]:
//! the applier holds it for a whole batch, so a reader sees the replicas exactly at the
//! `applied_seq` beside them, never half a batch.
//!
//! Locks, in the order they may be taken after the group's: `replicas`, then `poisoned`,
//! `on_poison`, then the leaves `queued` and the spare buffers (never held while taking
//! another).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use hindsight_consistency::error_chain;
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{self, Next, Pool, Task, Waker};
use hindsight_consistency::Seq;

use crate::error::{ApplierError, TargetError};
use crate::image::ImageSet;
use crate::records::each_record;

/// Most bytes of frame buffers queued for the applier (a batch larger than this is queued
/// alone).
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Most batches queued for the applier (many small batches cost little memory each, but
/// bound them anyway). The channel is unbounded underneath (a bounded one allocates and
/// touches a slot per batch up front, for every group), and this count bounds it.
const MAX_QUEUED_BATCHES: usize = 256;
/// Most bytes of spare frame buffers kept for reuse (fresh memory is slow to touch first), for
/// all the groups of the process together: enough for the frames of a few batches, and no
/// memory held by a group that is idle.
const MAX_SPARE_BYTES: usize = 64 << 20;

/// Records committed together, for the applier: those with `after < seq <= through`
/// (earlier ones in the frames are resends, already applied).
pub(crate) struct Batch {
    pub frames: Vec<Vec<u8>>,
    pub after: Seq,
    pub through: Seq,
}

impl Batch {
    /// The memory the batch holds.
    fn bytes(&self) -> usize {
        self.frames.iter().map(Vec::capacity).sum()
    }
}

/// The replicas and how far they are applied.
pub(crate) struct Replicas {
    pub images: Arc<ImageSet>,
    /// The replicas hold every record up to here (synced or not).
    pub applied_seq: Seq,
    /// Bytes of records applied since the applier started (to checkpoint by volume too).
    pub applied_bytes: u64,
    /// Time of the last record applied since the applier started (0 before the first), to
    /// check that times never decrease.
    last_time_ns: u64,
}

/// What is queued for the applier.
#[derive(Default)]
struct Queued {
    bytes: usize,
    batches: usize,
}

/// Spare frame buffers, shared by every group of the process.
struct Spares {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

static SPARES: Mutex<Spares> = Mutex::new(Spares { bufs: Vec::new(), bytes: 0 });

/// What the group and its applier task share.
pub(crate) struct ApplyShared {
    group: String,
    /// Held by the applier for a whole batch, and by readers of the replicas.
    pub replicas: Mutex<Replicas>,
    /// Signalled when `applied_seq` advances, the group is poisoned or the applier stops.
    progress: Condvar,
    /// Why the group stopped, if it did.
    poisoned: Mutex<Option<String>>,
    /// Called once when the group is poisoned: wakes the connection thread, which may be
    /// waiting for frames while the applier fails, so that it tells the engine.
    on_poison: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Bytes and batches queued for the applier.
    queued: Mutex<Queued>,
    /// Signalled when queued bytes are released or the applier stops.
    room: Condvar,
    /// Set when the applier is asked to stop (or has ended): it finishes the batch in hand and
    /// drops the rest, which the journal holds.
    stop: AtomicBool,
    /// Set once the applier's task has ended: no batch is being applied any more.
    ended: AtomicBool,
}

impl ApplyShared {
    pub fn new(group: &str, images: ImageSet, applied_seq: Seq) -> ApplyShared {
        ApplyShared {
            group: group.to_owned(),
            replicas: Mutex::new(Replicas { images: Arc::new(images), applied_seq, applied_bytes: 0, last_time_ns: 0 }),
            progress: Condvar::new(),
            poisoned: Mutex::new(None),
            on_poison: Mutex::new(None),
            queued: Mutex::new(Queued::default()),
            room: Condvar::new(),
            stop: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// Why the group stopped, if it did.
    pub fn poisoned(&self) -> Option<String> {
        lock(&self.poisoned).clone()
    }

    /// Stops the group for good (the first cause is kept) and wakes whoever waits on the
    /// applier. Must not be called with `replicas` held.
    pub fn poison(&self, cause: String) {
        {
            let mut p = lock(&self.poisoned);
            if p.is_some() {
                return;
            }
            log::error!("group {:?}: stopped: {cause}; it accepts nothing more until the target is restarted", self.group);
            *p = Some(cause);
        }
        if let Some(f) = lock(&self.on_poison).as_ref() {
            f();
        }
        self.wake();
    }

    /// True once the applier is asked to stop.
    #[cfg(test)]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sets (or clears) what to call when the group is poisoned.
    pub fn on_poison(&self, f: Option<Box<dyn Fn() + Send>>) {
        *lock(&self.on_poison) = f;
    }

    /// Calls what `on_poison` set (wakes the group's connection) without poisoning.
    pub fn wake_connection(&self) {
        if let Some(f) = lock(&self.on_poison).as_ref() {
            f();
        }
    }

    fn wake(&self) {
        drop(lock(&self.replicas));
        self.progress.notify_all();
        drop(lock(&self.queued));
        self.room.notify_all();
    }

    /// A buffer for the next frame: a spare one if there is one.
    pub fn buffer(&self) -> Vec<u8> {
        let mut pool = lock(&SPARES);
        match pool.bufs.pop() {
            Some(b) => {
                pool.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }

    /// Keeps buffers for reuse, up to [`MAX_SPARE_BYTES`] in all.
    pub fn recycle(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let mut pool = lock(&SPARES);
        for b in bufs {
            if b.capacity() > 0 && pool.bytes + b.capacity() <= MAX_SPARE_BYTES {
                pool.bytes += b.capacity();
                pool.bufs.push(b);
            }
        }
    }

    /// Waits for room in the queue for a batch of `bytes` (always room when it is empty) and
    /// takes it.
    fn reserve(&self, bytes: usize) {
        let mut q = lock(&self.queued);
        while q.batches > 0 && (q.bytes + bytes > MAX_QUEUED_BYTES || q.batches >= MAX_QUEUED_BATCHES) && !self.stop.load(Ordering::SeqCst)
        {
            q = self.room.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.bytes += bytes;
        q.batches += 1;
    }

    /// Gives back the room of one batch of `bytes`.
    fn release(&self, bytes: usize) {
        let mut q = lock(&self.queued);
        q.bytes = q.bytes.saturating_sub(bytes);
        q.batches = q.batches.saturating_sub(1);
        drop(q);
        self.room.notify_all();
    }

    /// Runs `f` on the replicas once every record up to `seq` is applied, holding them so
    /// that they are exactly at the `applied_seq` given to `f`. Fails if the group is
    /// poisoned or the applier stopped short of `seq`.
    pub fn with_applied<T>(&self, seq: Seq, f: impl FnOnce(&ImageSet, Seq) -> T) -> Result<T, ApplierError> {
        let mut r = lock(&self.replicas);
        loop {
            if let Some(cause) = self.poisoned() {
                return Err(ApplierError::Poisoned { group: self.group.clone(), cause });
            }
            if r.applied_seq >= seq {
                return Ok(f(&r.images, r.applied_seq));
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(ApplierError::Stopping { group: self.group.clone(), applied_seq: r.applied_seq, seq });
            }
            r = self.progress.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Applies one batch, then moves `applied_seq`, under `replicas`. A failure poisons the
    /// group and leaves `applied_seq` before the batch.
    fn apply(&self, batch: &Batch) {
        let mut r = lock(&self.replicas);
        debug_assert!(batch.after <= r.applied_seq, "batches are applied in commit order");
        debug_assert!(batch.through >= r.applied_seq, "applied_seq never goes back");
        let images = Arc::clone(&r.images);
        let (applied_before, mut next, mut last_time) = (r.applied_seq, batch.after + 1, r.last_time_ns);
        let res = batch.frames.iter().try_for_each(|payload| {
            each_record(payload, |rec, _| {
                let seq = rec.header.seq;
                if seq > batch.after && seq <= batch.through {
                    // The frames hold the batch's records once each, in order (validated
                    // and journaled so), all after what the replicas already hold.
                    debug_assert!(seq > applied_before, "seq {seq} applied again (the replicas hold seq {applied_before})");
                    debug_assert_eq!(seq, next, "the records of a batch are applied in sequence");
                    debug_assert!(rec.header.time_ns >= last_time, "seq {seq} is stamped before the record applied before it");
                    next = seq + 1;
                    last_time = rec.header.time_ns;
                    images.apply(rec)?;
                }
                Ok::<_, TargetError>(())
            })
        });
        match res {
            Ok(()) => {
                debug_assert_eq!(next, batch.through + 1, "every record of the batch is applied");
                r.last_time_ns = last_time;
                r.applied_seq = r.applied_seq.max(batch.through);
                r.applied_bytes += batch.frames.iter().map(|f| f.len() as u64).sum::<u64>();
                drop(r);
                self.progress.notify_all();
            }
            Err(e) => {
                drop(r);
                self.poison(error_chain(&e));
            }
        }
    }
}

/// The group's side of its applier task.
pub(crate) struct Applier {
    shared: Arc<ApplyShared>,
    tx: Mutex<Option<Sender<Batch>>>,
    waker: Waker,
}

/// Marks the applier stopped however its task ends, so that nobody waits on it forever.
struct Ended<'a>(&'a ApplyShared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison("the replicas' applier panicked".to_owned());
        }
        self.0.stop.store(true, Ordering::SeqCst);
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.wake();
    }
}

/// A group's applier task: each round applies one queued batch.
struct ApplyTask {
    shared: Arc<ApplyShared>,
    rx: Receiver<Batch>,
}

impl Task for ApplyTask {
    fn run(&self) -> Next {
        let shared = &*self.shared;
        if shared.ended.load(Ordering::SeqCst) {
            return Next::Done;
        }
        let batch = match self.rx.try_recv() {
            Ok(batch) => batch,
            Err(TryRecvError::Empty) if !shared.stop.load(Ordering::SeqCst) => return Next::Idle,
            // Stopped, or every sender gone: the queued batches are dropped (the journal holds
            // them).
            Err(_) => {
                drop(Ended(shared));
                return Next::Done;
            }
        };
        let ended = Ended(shared);
        if !shared.stop.load(Ordering::SeqCst) && shared.poisoned().is_none() {
            shared.apply(&batch);
        }
        std::mem::forget(ended);
        let bytes = batch.bytes();
        shared.recycle(batch.frames);
        shared.release(bytes);
        Next::Again
    }
}

/// The threads that run every group's applier in this process, started with the first group.
fn pool() -> Result<&'static Pool, TargetError> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    Pool::process_wide(&POOL, "target-apply", tasks::io_threads()).map_err(|source| TargetError::Spawn { what: "applier", source })
}

impl Applier {
    /// Starts the applier of a group.
    pub fn start(shared: Arc<ApplyShared>) -> Result<Applier, TargetError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Batch>();
        let waker = pool()?.add(&format!("target-apply-{}", shared.group), ApplyTask { shared: Arc::clone(&shared), rx });
        Ok(Applier { shared, tx: Mutex::new(Some(tx)), waker })
    }

    pub fn shared(&self) -> &ApplyShared {
        &self.shared
    }

    /// Queues a committed batch, waiting for room. The caller holds the group's `inner` lock,
    /// which keeps batches in commit order. Fails if the applier has stopped.
    pub fn queue(&self, batch: Batch) -> Result<(), ApplierError> {
        debug_assert!(batch.after < batch.through, "a batch holds at least one committed record");
        let bytes = batch.bytes();
        self.shared.reserve(bytes);
        let sent = match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(batch).map_err(|e| e.into_inner()),
            None => Err(batch),
        };
        self.waker.wake();
        sent.map_err(|batch| {
            self.shared.recycle(batch.frames);
            self.shared.release(bytes);
            ApplierError::Stopped { group: self.shared.group.clone() }
        })
    }

    /// Stops the applier: it finishes the batch in hand and drops those queued (the journal
    /// holds them; start-up applies them). Waits for its task to end. Idempotent.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        drop(lock(&self.tx).take());
        self.waker.wake();
        let mut r = lock(&self.shared.replicas);
        while !self.shared.ended.load(Ordering::SeqCst) && !self.waker.is_done() {
            r = self.shared.progress.wait_timeout(r, std::time::Duration::from_millis(50)).map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop();
    }
}
