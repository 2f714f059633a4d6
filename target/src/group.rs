//! One consistency group inside the daemon: its journal, replicas, state and retention.
//!
//! The connection thread validates, journals and commits each batch of frames and confirms
//! it; the group's applier thread ([`crate::applier`]) applies committed batches to the
//! replicas in commit order meanwhile.
//!
//! Locks, always taken in this order: `persist` (held by the maintenance thread while it
//! checkpoints or trims), then `inner` (held by the connection thread for one batch of frames:
//! validate, append, commit, queue for the applier), then the applier's `replicas` (held by
//! the applier for one batch, and by readers of the replicas), then its leaf locks.
//! `shipper` and `notice` are independent.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hindsight_consistency::config::JournalFull;
use hindsight_consistency::journal::{Journal, JournalOptions, JournalReader};
use hindsight_consistency::record::{decode_record, DecodeError};
use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::time::{format_duration, format_rfc3339, now_ns};
use hindsight_consistency::wire::JournalStateMsg;
use hindsight_consistency::{BookmarkBody, Seq, WriteKind};

use crate::applier::{each_record, Applier, ApplyShared, Batch};
use crate::apply::{for_each_record, in_bounds, Image, ImageSet};
use crate::error::{data_dir_err, window, TargetError};
use crate::layout::GroupPaths;
use crate::lock::{lock_file, FileLock, LockKind};
use crate::marks::Marks;
use crate::meta::GroupMeta;
use crate::state::{read_state, write_state, GroupState, StateReadError};
use crate::Volume;

/// Replicas are synced and `state.applied_seq` advanced this often while data flows, or once
/// [`CHECKPOINT_BYTES`] were applied since the last time, whichever comes first. Rarer
/// checkpoints let the page cache gather more writes of the same blocks into one write back
/// (random 4 KiB writes ran 7-9 % faster, sustained, at 10 s than at 2 s); the byte bound keeps
/// the replay after a crash short however fast records come.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// See [`CHECKPOINT_INTERVAL`] (small in unit tests, which cannot write a GiB).
pub(crate) const CHECKPOINT_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 1 << 30 };

/// How long retention waits for readers to let go of a group's lock before it gives up until
/// the next round.
const RETENTION_LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// The retention settings of the target, applied to every group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupOptions {
    pub segment_size: u64,
    pub retention: Option<Duration>,
    pub journal_size: Option<u64>,
    /// Direct I/O for the journal and large replica writes, where the file system allows it.
    pub direct_io: bool,
}

/// A group served by the daemon.
pub(crate) struct Group {
    pub name: String,
    paths: GroupPaths,
    fs: Arc<dyn Storage>,
    opts: GroupOptions,
    persist: Mutex<Persist>,
    inner: Mutex<Inner>,
    shipper: Mutex<Option<String>>,
    /// Time of the oldest recoverable point (the base images'), for `JournalState`.
    oldest_ns: AtomicU64,
    /// A trim of history inside retention not yet told to the engine.
    notice: Mutex<Option<JournalStateMsg>>,
    /// Applies committed batches to the replicas; holds them and the poisoning.
    applier: Applier,
}

/// What the maintenance thread owns.
struct Persist {
    /// The state as it is on disk.
    state: GroupState,
    last_checkpoint: Instant,
    /// The applier's `applied_bytes` at the last checkpoint.
    checkpointed_bytes: u64,
    /// Time of the first record of a segment, by the segment's first seq (looked up once).
    first_time_cache: Option<(Seq, u64)>,
}

/// What the connection thread works on.
struct Inner {
    meta: GroupMeta,
    journal: Journal,
    /// What to do when the journal is full (from the engine's hello).
    on_journal_full: JournalFull,
    /// Since when batches are refused because the journal is full.
    full_since: Option<Instant>,
}

impl Inner {
    fn new(meta: GroupMeta, journal: Journal) -> Inner {
        Inner { meta, journal, on_journal_full: JournalFull::TrimHistory, full_since: None }
    }
}

/// The outcome of one batch of `Records` frames.
pub(crate) struct Receipt {
    /// Durable seq after the batch (sent back in `Confirm`).
    pub durable_seq: Seq,
    /// A reason to send an `Error` frame and close (protocol violation or poisoning).
    pub error: Option<String>,
    /// Set when nothing was taken because the journal is full: sent as `JournalState`
    /// before the connection closes.
    pub full: Option<JournalStateMsg>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the group down with it: the data under these locks is
    // kept consistent step by step, not across the panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Group {
    fn journal_err(&self, step: &'static str) -> impl FnOnce(hindsight_consistency::journal::JournalError) -> TargetError + '_ {
        move |source| TargetError::Journal { group: self.name.clone(), step, source }
    }

    /// Creates a new group at the engine's first hello. `group.toml` is written last: until
    /// it exists the directory is an unfinished creation.
    pub fn create(fs: Arc<dyn Storage>, paths: GroupPaths, name: &str, meta: GroupMeta, opts: GroupOptions) -> Result<Group, TargetError> {
        for dir in [paths.dir.clone(), paths.replica_dir(), paths.base_dir()] {
            fs.create_dir_all(&dir).map_err(data_dir_err(&dir, "create directory"))?;
        }
        // The group's own entry; the entries inside it are synced with `state` below.
        if let Some(parent) = paths.dir.parent() {
            fs.sync_dir(parent).map_err(data_dir_err(parent, "sync directory"))?;
        }
        fs.open(&paths.lock(), OpenMode::Create).map_err(data_dir_err(&paths.lock(), "create lock file"))?;
        let journal =
            Journal::open(Arc::clone(&fs), &paths.journal(), JournalOptions { segment_size: opts.segment_size, direct: opts.direct_io })
                .map_err(|source| TargetError::Journal { group: name.to_owned(), step: "create", source })?;
        if journal.durable_seq() > 0 {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "{} holds records up to seq {} but group.toml is missing; move {} aside to start the group afresh",
                    paths.journal().display(),
                    journal.durable_seq(),
                    paths.dir.display()
                ),
            });
        }
        let mut replicas = ImageSet::empty(name);
        for v in &meta.volumes {
            replicas.insert(Image::create(fs.as_ref(), name, &paths.replica_dir(), v, true)?.with_direct_io(
                fs.as_ref(),
                name,
                opts.direct_io,
            )?);
            Image::create(fs.as_ref(), name, &paths.base_dir(), v, false)?;
        }
        for dir in [paths.replica_dir(), paths.base_dir()] {
            fs.sync_dir(&dir).map_err(data_dir_err(&dir, "sync directory"))?;
        }
        let state = GroupState { applied_seq: 0, base_seq: 0, base_time_ns: now_ns() };
        write_state(fs.as_ref(), &paths.state(), &state).map_err(data_dir_err(&paths.state(), "write state"))?;
        if fs.exists(&paths.state_next()) {
            fs.remove_file(&paths.state_next()).map_err(data_dir_err(&paths.state_next(), "remove"))?;
        }
        meta.store(fs.as_ref(), &paths.meta())?;
        log::info!(
            "group {name:?}: created for engine {} with volumes {}",
            meta.engine,
            meta.volumes.iter().map(|v| format!("{} ({} bytes, vm {})", v.name, v.size, v.vm)).collect::<Vec<_>>().join(", ")
        );
        Group::assemble(fs, paths, name, opts, state, (meta, journal, replicas))
    }

    /// The group of a journal whose every durable record the replicas hold; starts its applier.
    fn assemble(
        fs: Arc<dyn Storage>,
        paths: GroupPaths,
        name: &str,
        opts: GroupOptions,
        state: GroupState,
        (meta, journal, replicas): (GroupMeta, Journal, ImageSet),
    ) -> Result<Group, TargetError> {
        let applied = ApplyShared::new(name, replicas, journal.durable_seq());
        let applier = Applier::start(Arc::new(applied))?;
        Ok(Group {
            name: name.to_owned(),
            paths,
            fs,
            opts,
            oldest_ns: AtomicU64::new(state.base_time_ns),
            persist: Mutex::new(Persist { state, last_checkpoint: Instant::now(), checkpointed_bytes: 0, first_time_cache: None }),
            inner: Mutex::new(Inner::new(meta, journal)),
            shipper: Mutex::new(None),
            notice: Mutex::new(None),
            applier,
        })
    }

    /// Opens an existing group at start-up: finishes an interrupted roll of the base images
    /// and journal trim, and replays into the replicas every record they may have missed.
    pub fn load(fs: Arc<dyn Storage>, paths: GroupPaths, name: &str, opts: GroupOptions) -> Result<Group, TargetError> {
        let meta = GroupMeta::load(fs.as_ref(), name, &paths.meta())?;
        let mut state = load_state(fs.as_ref(), name, &paths.state())?.ok_or_else(|| TargetError::Inconsistent {
            group: name.to_owned(),
            reason: format!("{} is missing", paths.state().display()),
        })?;
        let jerr = |step| move |source| TargetError::Journal { group: name.to_owned(), step, source };
        let mut journal =
            Journal::open(Arc::clone(&fs), &paths.journal(), JournalOptions { segment_size: opts.segment_size, direct: opts.direct_io })
                .map_err(jerr("open"))?;
        // Journal::open takes every record it finds in the active segment as durable, but a
        // previous run may have stopped after a failed fdatasync with some of them only in the
        // page cache. Sync them before the engine is told they are held.
        if let Some(active) = journal.segments().last() {
            let f = fs.open(&active.path, OpenMode::Read).map_err(data_dir_err(&active.path, "open segment"))?;
            f.sync_data().map_err(data_dir_err(&active.path, "fdatasync segment"))?;
        }
        let durable = journal.durable_seq();
        if durable < state.applied_seq {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "the journal ends at seq {durable} but the replicas hold seq {}; journal/ was lost or truncated",
                    state.applied_seq
                ),
            });
        }

        if let Some(next) = load_state(fs.as_ref(), name, &paths.state_next())? {
            // A roll of the base images was interrupted: they hold some mix of the records
            // between the two base points. Applying the whole range again in order makes them
            // exact at the new point.
            let _lock = lock_file(&paths.lock(), LockKind::Exclusive, true, true).map_err(data_dir_err(&paths.lock(), "lock"))?;
            if next.base_seq > state.base_seq {
                if next.base_seq > durable {
                    return Err(TargetError::Inconsistent {
                        group: name.to_owned(),
                        reason: format!("state.next names seq {} beyond the journal's end at seq {durable}", next.base_seq),
                    });
                }
                log::info!(
                    "group {name:?}: finishing the interrupted roll of the base images from seq {} to seq {}",
                    state.base_seq,
                    next.base_seq
                );
                let base = ImageSet::open(fs.as_ref(), name, &paths.base_dir(), &meta.volumes)?;
                for_each_record(&fs, name, &paths.journal(), state.base_seq + 1, next.base_seq, |r| {
                    base.apply(r)?;
                    Ok(ControlFlow::Continue(()))
                })?;
                base.sync()?;
                // Retention checkpoints the replicas past the new base before it writes
                // state.next, so its applied_seq is a true claim.
                state = GroupState { applied_seq: state.applied_seq.max(next.applied_seq), ..next };
            }
            finish_roll(fs.as_ref(), &paths, &state)?;
        }
        let trimmed = journal.trim_through(state.base_seq).map_err(jerr("trim"))?;
        if trimmed > 0 {
            log::info!("group {name:?}: removed {trimmed} journal segment(s) already folded into the base images");
        }
        if journal.first_seq() > state.applied_seq + 1 {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "the journal starts at seq {} but the replicas need seq {} onwards",
                    journal.first_seq(),
                    state.applied_seq + 1
                ),
            });
        }

        if !fs.exists(&paths.bookmarks()) || !fs.exists(&paths.spans()) {
            // No index (a group from before it existed, or the file was removed): the journal
            // is the truth; rebuild them once.
            let _ = fs.remove_file(&paths.bookmarks());
            let _ = fs.remove_file(&paths.spans());
            let mut marks = Marks::default();
            for_each_record(&fs, name, &paths.journal(), state.base_seq + 1, durable, |r| {
                marks.see(r);
                Ok(ControlFlow::Continue(()))
            })?;
            let text_err = |reason| TargetError::Inconsistent { group: name.to_owned(), reason };
            marks.save(fs.as_ref(), &paths).map_err(text_err)?;
            for index in [paths.bookmarks(), paths.spans()] {
                if !fs.exists(&index) {
                    write_file_atomic(fs.as_ref(), &index, b"").map_err(|e| text_err(e.to_string()))?;
                }
            }
            log::info!("group {name:?}: rebuilt the bookmark and span indexes from the journal ({} bookmark(s))", marks.bookmark_count());
        }
        let replicas = ImageSet::open_replicas(fs.as_ref(), name, &paths.replica_dir(), &meta.volumes, opts.direct_io)?;
        if durable > state.applied_seq {
            let started = Instant::now();
            let mut n = 0u64;
            let mut marks = Marks::default();
            for_each_record(&fs, name, &paths.journal(), state.applied_seq + 1, durable, |r| {
                replicas.apply(r)?;
                marks.see(r);
                n += 1;
                Ok(ControlFlow::Continue(()))
            })?;
            marks.save(fs.as_ref(), &paths).map_err(|reason| TargetError::Inconsistent { group: name.to_owned(), reason })?;
            replicas.sync()?;
            log::info!(
                "group {name:?}: replayed {n} record(s), seq {}..={durable}, into the replicas in {:.1?}",
                state.applied_seq + 1,
                started.elapsed()
            );
            state.applied_seq = durable;
            write_state(fs.as_ref(), &paths.state(), &state).map_err(data_dir_err(&paths.state(), "write state"))?;
        }
        log::info!(
            "group {name:?}: loaded; journal durable through seq {durable}, recoverable from seq {} ({})",
            state.base_seq,
            format_rfc3339(state.base_time_ns)
        );
        Group::assemble(fs, paths, name, opts, state, (meta, journal, replicas))
    }

    /// Takes the group for one engine connection; refused while another is active.
    pub fn claim(self: &Arc<Self>, engine: &str) -> Result<ShipperClaim, String> {
        let mut s = lock(&self.shipper);
        if let Some(other) = s.as_ref() {
            return Err(format!("group {:?} is already being shipped by {other}", self.name));
        }
        *s = Some(engine.to_owned());
        Ok(ShipperClaim { group: Arc::clone(self) })
    }

    /// Checks an engine's hello against what is stored and returns the durable seq to resume
    /// after. New volumes are added; a volume whose size changed is refused. `on_journal_full`
    /// is the group's policy, which the engine's configuration holds.
    pub fn accept_hello(&self, engine: &str, volumes: &[Volume], on_journal_full: JournalFull) -> Result<Seq, String> {
        let mut inner = lock(&self.inner);
        if let Some(cause) = self.poisoned() {
            return Err(poisoned_message(&self.name, &cause));
        }
        if inner.on_journal_full != on_journal_full {
            log::info!("group {:?}: on_journal_full = {:?}", self.name, on_journal_full.as_str());
            if on_journal_full != JournalFull::TrimHistory && self.opts.journal_size.is_some() && self.opts.retention.is_none() {
                log::warn!(
                    "group {:?}: on_journal_full = {:?} keeps every point while target.retention is not set: once journal_size \
                     is reached this target takes nothing more for the group until journal_size is raised",
                    self.name,
                    on_journal_full.as_str()
                );
            }
            inner.on_journal_full = on_journal_full;
        }
        for v in volumes {
            if let Some(old) = inner.meta.volume(&v.name) {
                if old.size != v.size {
                    return Err(format!(
                        "group {:?}: volume {:?} is {} bytes here but {} bytes at the engine; a replicated volume cannot change size. \
                         Give it its old size again, or replicate it as a new volume (or a new group)",
                        self.name, v.name, old.size, v.size
                    ));
                }
            }
        }
        let mut meta = inner.meta.clone();
        if meta.engine != engine {
            log::warn!("group {:?}: was shipped by engine {}, now by {engine}", self.name, meta.engine);
            meta.engine = engine.to_owned();
        }
        let mut added = Vec::new();
        for v in volumes {
            match meta.volumes.iter_mut().find(|m| m.name == v.name) {
                Some(m) if m.vm != v.vm => {
                    log::info!("group {:?}: volume {:?} now belongs to vm {} (was {})", self.name, v.name, v.vm, m.vm);
                    m.vm = v.vm.clone();
                }
                Some(_) => {}
                None => {
                    meta.volumes.push(v.clone());
                    added.push(v.clone());
                }
            }
        }
        for m in &meta.volumes {
            if !volumes.iter().any(|v| v.name == m.name) {
                log::info!("group {:?}: the engine no longer lists volume {:?}; its history is kept", self.name, m.name);
            }
        }
        if meta != inner.meta {
            let res = (|| {
                let mut replicas = (*lock(&self.applier.shared().replicas).images).clone();
                for v in &added {
                    replicas.insert(Image::create(self.fs.as_ref(), &self.name, &self.paths.replica_dir(), v, true)?.with_direct_io(
                        self.fs.as_ref(),
                        &self.name,
                        self.opts.direct_io,
                    )?);
                    Image::create(self.fs.as_ref(), &self.name, &self.paths.base_dir(), v, false)?;
                    log::info!("group {:?}: added volume {:?} ({} bytes, vm {})", self.name, v.name, v.size, v.vm);
                }
                for dir in [self.paths.replica_dir(), self.paths.base_dir()] {
                    self.fs.sync_dir(&dir).map_err(data_dir_err(&dir, "sync directory"))?;
                }
                meta.store(self.fs.as_ref(), &self.paths.meta())?;
                Ok::<_, TargetError>(replicas)
            })();
            match res {
                Ok(replicas) => {
                    // A superset of the images before: batches queued meanwhile apply alike.
                    lock(&self.applier.shared().replicas).images = Arc::new(replicas);
                    inner.meta = meta;
                }
                Err(e) => {
                    let cause = error_chain(&e);
                    self.poison(cause.clone());
                    return Err(poisoned_message(&self.name, &cause));
                }
            }
        }
        Ok(inner.journal.durable_seq())
    }

    /// Journals a batch of `Records` payloads, commits them with one fdatasync and queues them
    /// for the applier (waiting for room in its queue); the receipt's `durable_seq` may be
    /// confirmed at once. A frame that breaks the protocol is refused whole; the frames before
    /// it are kept. Takes the buffers of `frames` (leaving it empty): they come back through
    /// [`Group::buffer`].
    pub fn receive(&self, frames: &mut Vec<Vec<u8>>) -> Receipt {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let old_durable = inner.journal.durable_seq();
        let shared = self.applier.shared();
        let refuse = |frames: &mut Vec<Vec<u8>>, durable_seq, error, full| {
            shared.recycle(frames.drain(..));
            Receipt { durable_seq, error, full }
        };
        if let Some(cause) = self.poisoned() {
            return refuse(frames, old_durable, Some(poisoned_message(&self.name, &cause)), None);
        }
        if let Some(full) = self.refuse_when_full(inner) {
            return refuse(frames, old_durable, None, Some(full));
        }
        let mut error = None;
        let mut taken = 0;
        let mut marks = Marks::default();
        for payload in frames.iter() {
            if let Err(why) = validate_frame(&self.name, &inner.meta, payload, inner.journal.next_seq(), inner.journal.last_time_ns()) {
                error = Some(why);
                break;
            }
            let next = inner.journal.next_seq();
            let res: Result<(), hindsight_consistency::journal::JournalError> = each_record(payload, |rec, raw| {
                if rec.header.seq >= next {
                    inner.journal.append_encoded(rec, raw)?;
                    marks.see(rec);
                }
                Ok(())
            });
            if let Err(e) = res {
                // Validation leaves only a poisoned journal to fail here.
                let cause = format!("journal append: {e}");
                self.poison(cause.clone());
                return refuse(frames, old_durable, Some(poisoned_message(&self.name, &cause)), None);
            }
            taken += 1;
        }
        if inner.journal.pending_bytes() == 0 {
            // Nothing new (resends only, or the first frame refused).
            return refuse(frames, old_durable, error, None);
        }
        let durable = match inner.journal.commit() {
            Ok(d) => d,
            Err(e) => {
                let cause = format!("journal commit: {}", error_chain(&e));
                self.poison(cause.clone());
                return refuse(frames, old_durable, Some(poisoned_message(&self.name, &cause)), None);
            }
        };
        // Indexed before the records are confirmed (a recovery may ask for them at once) and
        // before `applied_seq` passes them: a crash before this is repaired by the start-up
        // replay.
        if let Err(cause) = marks.save(self.fs.as_ref(), &self.paths) {
            self.poison(cause.clone());
            return refuse(frames, durable, Some(poisoned_message(&self.name, &cause)), None);
        }
        shared.recycle(frames.drain(taken..));
        let batch = Batch { frames: std::mem::take(frames), after: old_durable, through: durable };
        if let Err(cause) = self.applier.queue(batch) {
            // Committed (and confirmed with the error): start-up applies it.
            self.poison(cause.clone());
            return Receipt { durable_seq: durable, error: Some(poisoned_message(&self.name, &cause)), full: None };
        }
        Receipt { durable_seq: durable, error, full: None }
    }

    /// A buffer for the next frame to receive (one that a received frame used, if there is
    /// one: fresh memory is slow to touch the first time).
    pub fn buffer(&self) -> Vec<u8> {
        self.applier.shared().buffer()
    }

    /// With `block` or `pause_and_track`, a journal at `journal_size` takes nothing more
    /// until retention frees room: returns what to tell the engine. Logs when it starts and
    /// ends.
    fn refuse_when_full(&self, inner: &mut Inner) -> Option<JournalStateMsg> {
        let max = self.opts.journal_size.filter(|_| inner.on_journal_full != JournalFull::TrimHistory)?;
        let bytes = inner.journal.size_bytes();
        // Retention folds whole sealed segments only: with the active segment alone over the
        // size (one large commit), waiting would never free anything; it is taken, and the
        // next segment brings the journal back under the size once retention folds this one.
        if bytes < max || inner.journal.segments().count() < 2 {
            if let Some(since) = inner.full_since.take() {
                log::info!(
                    "group {:?}: the journal has room again ({} of {max} bytes) after {:.0?}; taking records",
                    self.name,
                    bytes,
                    since.elapsed()
                );
            }
            return None;
        }
        if inner.full_since.is_none() {
            inner.full_since = Some(Instant::now());
            log::warn!(
                "group {:?}: the journal is full ({bytes} of journal_size {max} bytes) and on_journal_full = {:?} keeps every point \
                 inside retention ({}): no more records are taken until the oldest ones age out of it (or journal_size is raised); \
                 the history kept is from {}",
                self.name,
                inner.on_journal_full.as_str(),
                self.opts.retention.map_or_else(|| "none set".to_string(), format_duration),
                format_rfc3339(self.oldest_ns.load(Ordering::Relaxed))
            );
        }
        Some(self.journal_state(true, false, bytes))
    }

    fn journal_state(&self, full: bool, trimmed: bool, journal_bytes: u64) -> JournalStateMsg {
        JournalStateMsg {
            full,
            trimmed,
            journal_bytes,
            journal_size: self.opts.journal_size.unwrap_or(0),
            first_time_ns: self.oldest_ns.load(Ordering::Relaxed),
            retention_s: self.opts.retention.map_or(0, |r| r.as_secs()),
        }
    }

    /// A trim of history inside retention that the engine has not been told of.
    pub fn take_notice(&self) -> Option<JournalStateMsg> {
        lock(&self.notice).take()
    }

    /// Runs `f` on the replicas and the last sequence number they hold, once every record
    /// committed before the call is applied: the replicas are held meanwhile, so they are
    /// exactly that prefix of the sequence (never part of a batch).
    pub fn with_replicas<T>(&self, f: impl FnOnce(&ImageSet, Seq) -> T) -> Result<T, String> {
        let durable = lock(&self.inner).journal.durable_seq();
        self.applier.shared().with_applied(durable, f)
    }

    /// Why the group stopped, if it did.
    fn poisoned(&self) -> Option<String> {
        self.applier.shared().poisoned()
    }

    /// The message for the engine if the group is stopped.
    pub fn stopped(&self) -> Option<String> {
        self.poisoned().map(|cause| poisoned_message(&self.name, &cause))
    }

    /// Sets what to call if the group is poisoned while its connection waits for frames (a
    /// replica write failing on the applier thread); cleared with `None`.
    pub fn on_poison(&self, f: Option<Box<dyn Fn() + Send>>) {
        self.applier.shared().on_poison(f);
    }

    fn poison(&self, cause: String) {
        self.applier.shared().poison(cause);
    }

    /// Periodic work: checkpoint the replicas when due, then apply retention. With
    /// `final_checkpoint` (at shutdown) the applier is stopped first (it finishes the batch in
    /// hand; the start-up replay applies those still queued) and the replicas are checkpointed
    /// at what it applied. Failures poison the group.
    pub fn maintain(&self, final_checkpoint: bool) {
        let mut p = lock(&self.persist);
        if final_checkpoint {
            self.applier.stop();
        }
        if self.poisoned().is_some() {
            return;
        }
        let applied_bytes = lock(&self.applier.shared().replicas).applied_bytes;
        let due = final_checkpoint
            || p.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
            || applied_bytes - p.checkpointed_bytes >= CHECKPOINT_BYTES;
        let res = if due { self.checkpoint(&mut p) } else { Ok(()) };
        let res = res.and_then(|()| if final_checkpoint { Ok(()) } else { self.retain(&mut p) });
        if let Err(e) = res {
            self.poison(error_chain(&e));
        }
    }

    /// Syncs the replicas and records how far they are applied.
    fn checkpoint(&self, p: &mut Persist) -> Result<(), TargetError> {
        let (applied, applied_bytes, replicas) = {
            let r = lock(&self.applier.shared().replicas);
            (r.applied_seq, r.applied_bytes, Arc::clone(&r.images))
        };
        p.last_checkpoint = Instant::now();
        p.checkpointed_bytes = applied_bytes;
        if applied == p.state.applied_seq {
            return Ok(());
        }
        // The sync runs without `replicas` held: the applier's writes racing with it are beyond
        // `applied` and are not claimed by the state written here.
        replicas.sync()?;
        let s = GroupState { applied_seq: applied, ..p.state };
        write_state(self.fs.as_ref(), &self.paths.state(), &s).map_err(data_dir_err(&self.paths.state(), "write state"))?;
        p.state = s;
        log::debug!("group {:?}: replicas checkpointed at seq {applied}", self.name);
        Ok(())
    }

    /// Folds the oldest journal segments into the base images while they are older than the
    /// retention time or the journal is larger than `journal_size`.
    fn retain(&self, p: &mut Persist) -> Result<(), TargetError> {
        loop {
            let (segs, volumes, last, policy, bytes) = {
                let inner = lock(&self.inner);
                let segs: Vec<(Seq, PathBuf)> = inner.journal.segments().map(|s| (s.first_seq, s.path.clone())).collect();
                let last = (inner.journal.durable_seq(), inner.journal.last_time_ns());
                (segs, inner.meta.volumes.clone(), last, inner.on_journal_full, inner.journal.size_bytes())
            };
            if segs.len() < 2 {
                return Ok(());
            }
            let (first, through) = (segs[0].0, segs[1].0 - 1);
            // Only `trim_history` folds points away for room; the other policies keep them
            // until they leave the retention window, and refuse records meanwhile.
            let over_size = policy == JournalFull::TrimHistory && self.opts.journal_size.is_some_and(|max| bytes > max);
            let too_old = match self.opts.retention {
                Some(keep) => {
                    let cutoff = now_ns().saturating_sub(u64::try_from(keep.as_nanos()).unwrap_or(u64::MAX));
                    self.first_time(p, segs[1].0)?.is_some_and(|t| t < cutoff)
                }
                None => false,
            };
            if !over_size && !too_old {
                return Ok(());
            }
            if first != p.state.base_seq + 1 {
                return Err(TargetError::Inconsistent {
                    group: self.name.clone(),
                    reason: format!(
                        "the oldest journal segment starts at seq {first}, but the base images are at seq {}",
                        p.state.base_seq
                    ),
                });
            }
            if p.state.applied_seq < through {
                self.checkpoint(p)?;
                if p.state.applied_seq < through {
                    return Ok(()); // not applied yet; next time
                }
            }
            let lock_path = self.paths.lock();
            let Some(_lock) = self.lock_for_retention()? else {
                log::debug!("group {:?}: recovery or history readers hold {}; retention tries again later", self.name, lock_path.display());
                return Ok(());
            };
            // The time of the new base point, before anything changes.
            let (_, base_time) =
                for_each_record(&self.fs, &self.name, &self.paths.journal(), first, through, |_| Ok(ControlFlow::Continue(())))?;
            let next = GroupState { applied_seq: p.state.applied_seq, base_seq: through, base_time_ns: base_time };
            write_state(self.fs.as_ref(), &self.paths.state_next(), &next).map_err(data_dir_err(&self.paths.state_next(), "write"))?;
            let base = ImageSet::open(self.fs.as_ref(), &self.name, &self.paths.base_dir(), &volumes)?;
            let mut n = 0u64;
            for_each_record(&self.fs, &self.name, &self.paths.journal(), first, through, |r| {
                base.apply(r)?;
                n += 1;
                Ok(ControlFlow::Continue(()))
            })?;
            base.sync()?;
            finish_roll(self.fs.as_ref(), &self.paths, &next)?;
            p.state = next;
            lock(&self.inner).journal.trim_through(through).map_err(self.journal_err("trim"))?;
            self.oldest_ns.store(base_time, Ordering::Relaxed);
            let window = window(through, base_time, last.0.max(through), last.1.max(base_time));
            if over_size && !too_old && self.opts.retention.is_some() {
                // History the retention promised is gone: never silently.
                let retention = self.opts.retention.map(format_duration).unwrap_or_default();
                log::warn!(
                    "group {:?}: the journal reached journal_size ({} bytes) and on_journal_full = \"trim_history\" folded seq \
                     {first}..={through} ({n} records), younger than the retention ({retention}), into the base images: \
                     history now covers {window} only; raise journal_size to keep the whole retention",
                    self.name,
                    self.opts.journal_size.unwrap_or(0)
                );
                let bytes = lock(&self.inner).journal.size_bytes();
                *lock(&self.notice) = Some(self.journal_state(false, true, bytes));
            } else {
                let why = if over_size { "journal_size" } else { "retention" };
                log::info!("group {:?}: folded seq {first}..={through} ({n} records) into the base images ({why}); recoverable window is now {window}", self.name);
            }
        }
    }

    /// Takes the group's lock exclusively. Readers hold it shared, possibly one after the
    /// other with short gaps; polling for a while finds a gap without blocking the maintenance
    /// of the other groups behind a long recovery.
    fn lock_for_retention(&self) -> Result<Option<FileLock>, TargetError> {
        let path = self.paths.lock();
        let started = Instant::now();
        loop {
            if let Some(l) = lock_file(&path, LockKind::Exclusive, false, true).map_err(data_dir_err(&path, "lock"))? {
                return Ok(Some(l));
            }
            if started.elapsed() >= RETENTION_LOCK_PATIENCE {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Time of the first record of the segment starting at `first_seq`, `None` if it has no
    /// record yet.
    fn first_time(&self, p: &mut Persist, first_seq: Seq) -> Result<Option<u64>, TargetError> {
        if let Some((s, t)) = p.first_time_cache {
            if s == first_seq {
                return Ok(Some(t));
            }
        }
        let mut r =
            JournalReader::open(Arc::clone(&self.fs), &self.paths.journal(), first_seq).map_err(self.journal_err("open a reader"))?;
        let t = r.next().map_err(self.journal_err("read"))?.filter(|rec| rec.header.seq == first_seq).map(|rec| rec.header.time_ns);
        if let Some(t) = t {
            p.first_time_cache = Some((first_seq, t));
        }
        Ok(t)
    }
}

/// Ends a roll of the base images: `state` takes the new base, `state.next` goes.
fn finish_roll(fs: &dyn Storage, paths: &GroupPaths, state: &GroupState) -> Result<(), TargetError> {
    write_state(fs, &paths.state(), state).map_err(data_dir_err(&paths.state(), "write state"))?;
    fs.remove_file(&paths.state_next()).map_err(data_dir_err(&paths.state_next(), "remove"))?;
    fs.sync_dir(&paths.dir).map_err(data_dir_err(&paths.dir, "sync directory"))
}

/// Reads `state` or `state.next`.
pub(crate) fn load_state(fs: &dyn Storage, group: &str, path: &std::path::Path) -> Result<Option<GroupState>, TargetError> {
    read_state(fs, path).map_err(|e| match e {
        StateReadError::Io(source) => TargetError::DataDir { path: path.to_owned(), step: "read state", source },
        StateReadError::Corrupt(reason) => TargetError::StateCorrupt { group: group.to_owned(), path: path.to_owned(), reason },
    })
}

/// The group's engine connection; released when dropped.
pub(crate) struct ShipperClaim {
    group: Arc<Group>,
}

impl Drop for ShipperClaim {
    fn drop(&mut self) {
        self.group.on_poison(None);
        *lock(&self.group.shipper) = None;
    }
}

pub(crate) fn poisoned_message(group: &str, cause: &str) -> String {
    TargetError::Poisoned { group: group.to_owned(), cause: cause.to_owned() }.to_string()
}

pub(crate) use hindsight_consistency::error_chain;

/// Checks a whole `Records` payload before anything of it is journaled: every record decodes,
/// names a volume of the group, lies inside it, the records are consecutive, and the first
/// one not yet held is exactly `next` (older ones are resends, skipped). Returns what is
/// wrong, for the log and the `Error` frame.
fn validate_frame(group: &str, meta: &GroupMeta, payload: &[u8], mut next: Seq, mut last_time: u64) -> Result<(), String> {
    if payload.is_empty() {
        return Err(format!("group {group:?}: a Records frame carries no record"));
    }
    let mut at = 0;
    let mut prev: Option<Seq> = None;
    while at < payload.len() {
        let (rec, used) = decode_record(&payload[at..]).map_err(|e| match e {
            DecodeError::Incomplete { .. } => format!("group {group:?}: the record at byte {at} of a Records frame is truncated"),
            e => format!("group {group:?}: the record at byte {at} of a Records frame is invalid ({e})"),
        })?;
        let h = rec.header;
        if h.kind == WriteKind::Bookmark {
            // A named point: no volume, but its body must be readable.
            BookmarkBody::decode(rec.data)
                .map_err(|e| format!("group {group:?}: bookmark {:?} at seq {} is invalid ({e})", rec.volume, h.seq))?;
        } else if h.kind == WriteKind::Point {
            if rec.data.len() != 8 {
                return Err(format!("group {group:?}: point {:?} at seq {} carries {} bytes, not 8", rec.volume, h.seq, rec.data.len()));
            }
        } else {
            let Some(vol) = meta.volume(rec.volume) else {
                return Err(format!(
                    "group {group:?}: seq {} is for volume {:?}, which the group does not have (volumes: {}); \
                     the engine must announce it in its hello",
                    h.seq,
                    rec.volume,
                    meta.volume_names().join(", ")
                ));
            };
            if !in_bounds(&rec, vol.size) {
                return Err(format!(
                    "group {group:?}: seq {} writes {} bytes at offset {}, past the end of volume {:?} ({} bytes)",
                    h.seq, h.length, h.offset, vol.name, vol.size
                ));
            }
        }
        if let Some(p) = prev {
            if h.seq != p + 1 {
                return Err(format!("group {group:?}: a Records frame holds seq {} after seq {p}; records must be consecutive", h.seq));
            }
        }
        prev = Some(h.seq);
        if h.seq > next {
            return Err(format!(
                "group {group:?}: gap in the stream: received seq {} but the target expects seq {next}; \
                 the engine must resend from seq {next}",
                h.seq
            ));
        }
        if h.seq == next {
            if h.time_ns < last_time {
                return Err(format!(
                    "group {group:?}: seq {} is stamped {}, before the previous record ({}); record times must never decrease",
                    h.seq,
                    format_rfc3339(h.time_ns),
                    format_rfc3339(last_time)
                ));
            }
            last_time = h.time_ns;
            next += 1;
        }
        // Below `next`: a resend of a record already held, skipped.
        at += used;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::faults::{Fault, FaultPlan, FaultyStorage, Op, Rule};
    use hindsight_consistency::record::encode_record;
    use hindsight_consistency::storage::StdStorage;
    use hindsight_consistency::{RecordHeader, WriteKind};
    use std::time::Duration;

    const SIZE: u64 = 256 << 10;

    fn us(x: u64) -> usize {
        usize::try_from(x).unwrap()
    }

    fn opts() -> GroupOptions {
        GroupOptions { segment_size: 1 << 20, retention: None, journal_size: None, direct_io: true }
    }

    /// Records 1..=n, each a 4 KiB write of its own pattern at an overlapping offset.
    fn records(n: u64) -> Vec<(RecordHeader, Vec<u8>)> {
        (1..=n)
            .map(|seq| {
                let h =
                    RecordHeader { seq, time_ns: 1_000 + seq, kind: WriteKind::Data, offset: (seq * 7919) % (SIZE - 4096), length: 4096 };
                (h, vec![u8::try_from(seq % 251).unwrap() + 1; 4096])
            })
            .collect()
    }

    fn frame(recs: &[(RecordHeader, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (h, d) in recs {
            encode_record(h, "v", d, &mut out);
        }
        out
    }

    fn model(recs: &[(RecordHeader, Vec<u8>)], upto: u64) -> Vec<u8> {
        let mut img = vec![0u8; us(SIZE)];
        for (h, d) in recs.iter().filter(|(h, _)| h.seq <= upto) {
            img[us(h.offset)..us(h.offset) + d.len()].copy_from_slice(d);
        }
        img
    }

    /// A blank image with only the given records written, in the given order.
    fn apply_some(recs: &[(RecordHeader, Vec<u8>)], seqs: &[u64]) -> Vec<u8> {
        let mut img = vec![0u8; us(SIZE)];
        for &s in seqs {
            let (h, d) = &recs[us(s) - 1];
            img[us(h.offset)..us(h.offset) + d.len()].copy_from_slice(d);
        }
        img
    }

    /// Waits for the applier to apply everything committed; the seq it reached.
    fn applied(g: &Group) -> Seq {
        g.with_replicas(|_, seq| seq).unwrap()
    }

    fn new_group(dir: &std::path::Path) -> (Arc<dyn Storage>, GroupPaths, Group) {
        let fs = StdStorage::shared();
        let paths = GroupPaths::new(dir, "g");
        let meta = GroupMeta::new("e".into(), vec![Volume { name: "v".into(), vm: "vm".into(), size: SIZE }]);
        let g = Group::create(Arc::clone(&fs), paths.clone(), "g", meta, opts()).unwrap();
        (fs, paths, g)
    }

    #[test]
    fn replicas_are_checkpointed_by_time_or_by_bytes_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let on_disk = || read_state(fs.as_ref(), &paths.state()).unwrap().unwrap().applied_seq;
        let recs = records(40);
        // Under the byte bound and inside the interval: nothing checkpointed yet.
        g.receive(&mut vec![frame(&recs[..4])]);
        g.with_replicas(|_, _| ()).unwrap();
        g.maintain(false);
        assert_eq!(on_disk(), 0);
        // Over the byte bound (36 records of 4 KiB): checkpointed at once, though the interval
        // has not passed.
        g.receive(&mut vec![frame(&recs[4..40])]);
        g.with_replicas(|_, _| ()).unwrap();
        g.maintain(false);
        assert_eq!(on_disk(), 40);
    }

    #[test]
    fn load_replays_what_the_replicas_lost_after_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let recs = records(30);
        let r = g.receive(&mut vec![frame(&recs[..15]), frame(&recs[15..])]);
        assert_eq!((r.durable_seq, r.error), (30, None));
        // No checkpoint ran, so the state still claims nothing; a crash may have kept any
        // subset of the replica's writes since it was created.
        drop(g);
        let replica = paths.replica_dir().join("v.img");
        std::fs::write(&replica, apply_some(&recs, &[21, 4, 9])).unwrap();
        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert!(std::fs::read(&replica).unwrap() == model(&recs, 30), "replica equals the model after replay");
        assert_eq!(read_state(fs.as_ref(), &paths.state()).unwrap().unwrap().applied_seq, 30);
        drop(g);
    }

    #[test]
    fn load_finishes_an_interrupted_roll_of_the_base_images() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let recs = records(30);
        assert_eq!(g.receive(&mut vec![frame(&recs)]).durable_seq, 30);
        g.maintain(true);
        drop(g);
        // Crash while rolling the base from 0 to 20: state.next written, the base images hold
        // a few of the records, some of them beyond 20.
        let next = GroupState { applied_seq: 30, base_seq: 20, base_time_ns: recs[19].0.time_ns };
        write_state(fs.as_ref(), &paths.state_next(), &next).unwrap();
        // a few records of the range made it to the base images, in any order.
        let base = paths.base_dir().join("v.img");
        std::fs::write(&base, apply_some(&recs, &[18, 3, 11])).unwrap();

        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert!(std::fs::read(&base).unwrap() == model(&recs, 20), "base is exact at the new point");
        assert_eq!(read_state(fs.as_ref(), &paths.state()).unwrap(), Some(next));
        assert!(!paths.state_next().exists());
        drop(g);
    }

    #[test]
    fn a_refused_frame_keeps_the_frames_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_fs, paths, g) = new_group(dir.path());
        let recs = records(10);
        let mut gap = recs[6..].to_vec();
        gap.remove(0);
        let r = g.receive(&mut vec![frame(&recs[..5]), frame(&gap)]);
        assert_eq!(r.durable_seq, 5);
        assert!(r.error.unwrap().contains("received seq 8 but the target expects seq 6"));
        assert_eq!(applied(&g), 5);
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 5));
    }

    /// Records 1..=n of 64 KiB each, stamped now.
    fn big_records(n: u64) -> Vec<(RecordHeader, Vec<u8>)> {
        let t0 = now_ns();
        (1..=n)
            .map(|seq| {
                let h =
                    RecordHeader { seq, time_ns: t0 + seq, kind: WriteKind::Data, offset: (seq * 4096) % (SIZE - 65536), length: 65536 };
                (h, vec![u8::try_from(seq % 251).unwrap() + 1; 65536])
            })
            .collect()
    }

    fn full_group(dir: &std::path::Path, policy: JournalFull) -> (GroupPaths, Group) {
        let paths = GroupPaths::new(dir, "g");
        let opts = GroupOptions {
            segment_size: 1 << 20,
            retention: Some(Duration::from_secs(3600)),
            journal_size: Some(2 << 20),
            direct_io: true,
        };
        let vols = [Volume { name: "v".into(), vm: "vm".into(), size: SIZE }];
        let g = Group::create(StdStorage::shared(), paths.clone(), "g", GroupMeta::new("e".into(), vols.to_vec()), opts).unwrap();
        assert_eq!(g.accept_hello("e", &vols, policy), Ok(0));
        (paths, g)
    }

    #[test]
    fn a_full_journal_that_keeps_history_refuses_records_and_folds_nothing() {
        for policy in [JournalFull::Block, JournalFull::PauseAndTrack] {
            let dir = tempfile::tempdir().unwrap();
            let (paths, g) = full_group(dir.path(), policy);
            let recs = big_records(80);
            let mut durable = 0;
            let mut refused = None;
            for chunk in recs.chunks(4) {
                let r = g.receive(&mut vec![frame(chunk)]);
                g.maintain(false);
                if r.full.is_some() {
                    assert_eq!(r.durable_seq, durable, "nothing of a refused batch is taken");
                    refused = r.full;
                    break;
                }
                assert_eq!(r.error, None);
                durable = r.durable_seq;
            }
            let full = refused.unwrap_or_else(|| panic!("{policy:?}: the journal never filled"));
            assert!(full.full && !full.trimmed && full.journal_bytes >= 2 << 20 && full.journal_size == 2 << 20, "{full:?}");
            assert_eq!(full.retention_s, 3600);
            // Every point inside the retention is kept: nothing was folded.
            g.maintain(false);
            assert_eq!(lock(&g.persist).state.base_seq, 0, "{policy:?}");
            assert!(g.receive(&mut vec![frame(&recs[us(durable)..us(durable) + 1])]).full.is_some(), "still full");
            assert_eq!(applied(&g), durable);
            assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, durable));
        }
    }

    #[test]
    fn trim_history_folds_points_inside_retention_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = full_group(dir.path(), JournalFull::TrimHistory);
        let recs = big_records(120);
        let mut notice = None;
        for chunk in recs.chunks(4) {
            let r = g.receive(&mut vec![frame(chunk)]);
            assert!(r.full.is_none() && r.error.is_none());
            g.maintain(false);
            notice = notice.or_else(|| g.take_notice());
        }
        assert_eq!(applied(&g), 120);
        let n = notice.expect("a trim inside retention is told to the engine");
        assert!(n.trimmed && !n.full && n.first_time_ns > recs[0].0.time_ns, "{n:?}");
        assert!(lock(&g.persist).state.base_seq > 0);
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 120));
    }

    /// A group on a file system that fails where its plan says.
    fn faulty_group(dir: &std::path::Path) -> (Arc<FaultPlan>, GroupPaths, Group) {
        let plan = Arc::new(FaultPlan::default());
        let fs: Arc<dyn Storage> = Arc::new(FaultyStorage::new(StdStorage::shared(), Arc::clone(&plan)));
        let paths = GroupPaths::new(dir, "g");
        let meta = GroupMeta::new("e".into(), vec![Volume { name: "v".into(), vm: "vm".into(), size: SIZE }]);
        let g = Group::create(Arc::clone(&fs), paths.clone(), "g", meta, opts()).unwrap();
        (plan, paths, g)
    }

    #[test]
    fn failed_commit_stops_the_group_without_retrying() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, paths, g) = faulty_group(dir.path());
        let recs = records(10);
        assert_eq!(g.receive(&mut vec![frame(&recs[..5])]).durable_seq, 5);
        assert_eq!(applied(&g), 5);

        plan.add(Rule::always("journal", Op::Sync, Fault::Eio));
        let r = g.receive(&mut vec![frame(&recs[5..])]);
        assert_eq!(r.durable_seq, 5);
        let msg = r.error.unwrap();
        assert!(msg.contains("group \"g\" is stopped after an I/O failure") && msg.contains("fdatasync"), "{msg}");

        // The disk "recovers", but the group does not try again: its page cache state is unknown.
        plan.clear();
        assert!(g.receive(&mut vec![frame(&recs[5..])]).error.unwrap().contains("stopped"));
        assert!(g
            .accept_hello("e", &[Volume { name: "v".into(), vm: "vm".into(), size: SIZE }], JournalFull::TrimHistory)
            .unwrap_err()
            .contains("restart"));
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 5), "nothing after the failure applied");
        drop(g);

        // After a restart the journal holds what reached the file: the failed batch was
        // written, only its sync failed, so it is there (and synced at load), and the replicas
        // are brought up to it. The engine never saw it confirmed and resumes after it.
        let g = Group::load(StdStorage::shared(), paths.clone(), "g", opts()).unwrap();
        assert_eq!(g.accept_hello("e", &[Volume { name: "v".into(), vm: "vm".into(), size: SIZE }], JournalFull::TrimHistory), Ok(10));
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 10));
    }

    /// The replica file of volume "v".
    fn replica(paths: &GroupPaths) -> Vec<u8> {
        std::fs::read(paths.replica_dir().join("v.img")).unwrap()
    }

    #[test]
    fn replicas_equal_the_model_once_the_applier_drains() {
        let dir = tempfile::tempdir().unwrap();
        let (_fs, paths, g) = new_group(dir.path());
        let recs = records(200);
        let mut at: usize = 0;
        for (i, n) in [2, 7, 30, 4, 57, 100].into_iter().enumerate() {
            // Some batches resend records already held, as after a reconnect.
            let from = if i % 2 == 1 { at.saturating_sub(3) } else { at };
            let r = g.receive(&mut vec![frame(&recs[from..at + n / 2]), frame(&recs[at + n / 2..at + n])]);
            at += n;
            assert_eq!((r.durable_seq, r.error), (u64::try_from(at).unwrap(), None));
        }
        assert_eq!(applied(&g), 200);
        assert!(replica(&paths) == model(&recs, 200));
    }

    #[test]
    fn readers_of_the_replicas_never_see_part_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (_fs, _paths, g) = new_group(dir.path());
        let recs = records(600);
        let models: Vec<Vec<u8>> = (0..=600).map(|n| model(&recs, n)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                for chunk in recs.chunks(20) {
                    assert_eq!(g.receive(&mut vec![frame(&chunk[..10]), frame(&chunk[10..])]).error, None);
                }
            });
            let mut seen = 0;
            while seen < 600 {
                let (seq, img) = g
                    .with_replicas(|set, seq| {
                        let mut img = vec![0u8; us(SIZE)];
                        set.image("v").unwrap().file.read_exact_at(&mut img, 0).unwrap();
                        (seq, img)
                    })
                    .unwrap();
                assert_eq!(seq % 20, 0, "whole batches only");
                assert!(img == models[us(seq)], "the replica is exactly at seq {seq}");
                assert!(seq >= seen);
                seen = seq;
            }
        });
    }

    #[test]
    fn a_failed_replica_write_poisons_the_group_and_wakes_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, paths, g) = faulty_group(dir.path());
        let (woken_tx, woken) = crossbeam_channel::bounded(1);
        g.on_poison(Some(Box::new(move || {
            let _ = woken_tx.try_send(());
        })));
        let recs = records(20);
        assert_eq!(g.receive(&mut vec![frame(&recs[..5])]).durable_seq, 5);
        assert_eq!(applied(&g), 5);

        plan.add(Rule::always("replica", Op::Write, Fault::Eio));
        // Durable, so confirmed; the applier fails after.
        let r = g.receive(&mut vec![frame(&recs[5..10])]);
        assert_eq!((r.durable_seq, r.error), (10, None));
        woken.recv_timeout(Duration::from_secs(10)).expect("the connection is woken");
        let msg = g.with_replicas(|_, seq| seq).unwrap_err();
        assert!(msg.contains("is stopped after an I/O failure") && msg.contains("seq 6"), "{msg}");
        assert_eq!(g.stopped(), Some(msg));
        plan.clear();
        let r = g.receive(&mut vec![frame(&recs[10..])]);
        assert_eq!(r.durable_seq, 10, "nothing more is taken");
        assert!(r.error.unwrap().contains("stopped"));
        g.maintain(true);
        drop(g);
        assert_eq!(read_state(StdStorage::shared().as_ref(), &paths.state()).unwrap().unwrap().applied_seq, 0, "no checkpoint");

        let g = Group::load(StdStorage::shared(), paths.clone(), "g", opts()).unwrap();
        assert!(replica(&paths) == model(&recs, 10), "start-up applies what the applier could not");
        drop(g);
    }

    #[test]
    fn shutdown_checkpoints_only_what_is_applied_and_load_replays_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let recs = records(40);
        assert_eq!(g.receive(&mut vec![frame(&recs[..10])]).durable_seq, 10);
        assert_eq!(applied(&g), 10);
        let shared = g.applier.shared();
        let held = lock(&shared.replicas);
        // The applier waits for the replicas: these are queued, confirmed, not applied.
        for chunk in recs[10..].chunks(10) {
            assert_eq!(g.receive(&mut vec![frame(chunk)]).error, None);
        }
        std::thread::scope(|s| {
            let stopping = s.spawn(|| g.maintain(true));
            while !shared.stopping() {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(held);
            stopping.join().unwrap();
        });
        // At most the batch in the applier's hand when it was stopped is applied.
        let at = read_state(fs.as_ref(), &paths.state()).unwrap().unwrap().applied_seq;
        assert!(at == 10 || at == 20, "checkpointed at {at}");
        assert!(replica(&paths) == model(&recs, at), "the replica holds exactly what is checkpointed");
        drop(g);

        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert!(replica(&paths) == model(&recs, 40), "start-up replays the batches that were queued");
        assert_eq!(read_state(fs.as_ref(), &paths.state()).unwrap().unwrap().applied_seq, 40);
        assert_eq!(applied(&g), 40);
    }
}
