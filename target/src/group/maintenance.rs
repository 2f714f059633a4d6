//! The maintenance thread's side of a group: replica checkpoints (sync, then `state`),
//! retention, which folds the oldest journal segments into the base images under the group's
//! exclusive lock, and the point-in-time index files of sealed segments.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::config::JournalFull;
use hindsight_consistency::error_chain;
use hindsight_consistency::journal::JournalReader;
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::{format_duration, now_ns};
use hindsight_consistency::Seq;

use super::open::finish_roll;
use super::{Group, Persist};
use crate::error::{data_dir_err, window, TargetError};
use crate::image::ImageSet;
use crate::lock::{lock_file, FileLock, LockKind};
use crate::point_index::store::{write_sealed, Segment};
use crate::records::for_each_record;
use crate::state::{write_state, GroupState};

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

impl Group {
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
        let tiers = self.opts.tiers.of(&self.name);
        let res = res.and_then(|()| match () {
            () if final_checkpoint => Ok(()),
            () if tiers.is_empty() => self.retain(&mut p),
            () => self.thin(&mut p, tiers, now_ns()),
        });
        if let Err(e) = res {
            self.poison(error_chain(&e));
            return;
        }
        if !final_checkpoint {
            self.index_sealed(&mut p);
        }
    }

    /// Writes the index file of each sealed segment that has none (at the first round, of
    /// each that has none that checks out). The index only speeds up reads of points; a
    /// failure here is logged and tried again next round, and readers index such a segment
    /// themselves meanwhile.
    fn index_sealed(&self, p: &mut Persist) {
        let (segments, volumes) = {
            let mut inner = lock(&self.inner);
            p.gathered_runs.extend(inner.index.take_sealed());
            let segs: Vec<Segment> = inner.journal.segments().map(|s| Segment { first_seq: s.first_seq, path: s.path.clone() }).collect();
            (segs, inner.meta.volume_names())
        };
        let (journal, index) = (self.paths.journal(), self.paths.index_dir());
        match write_sealed(&self.fs, &journal, &index, &volumes, &segments, &mut p.gathered_runs, !p.index_verified) {
            Ok(n) => {
                if n > 0 {
                    log::debug!("group {:?}: indexed {n} sealed journal segment(s)", self.name);
                }
                p.index_verified = true;
            }
            Err(e) => log::warn!("group {:?}: cannot write the point-in-time index: {}", self.name, error_chain(&e)),
        }
    }

    /// Syncs the replicas and records how far they are applied.
    pub(super) fn checkpoint(&self, p: &mut Persist) -> Result<(), TargetError> {
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
                self.report_pin(p, &lock_path);
                return Ok(());
            };
            if let Some(pid) = p.pinned_by.take() {
                log::info!("group {:?}: the export (pid {pid}) that pinned the history has stopped; retention goes on", self.name);
            }
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

    /// Retention could not take the group's lock: says so once per export that holds it
    /// (other readers, `recover` and `history`, hold it only for a while).
    pub(super) fn report_pin(&self, p: &mut Persist, lock_path: &std::path::Path) {
        let exports = crate::exports::active(self.fs.as_ref(), &self.paths.exports_dir());
        match exports.first() {
            Some(e) if p.pinned_by != Some(e.pid) => {
                log::info!(
                    "group {:?}: retention waits: seq {} is exported on {} (pid {}) and pinned; nothing is folded into the \
                     base images until the export stops (the journal grows meanwhile)",
                    self.name,
                    e.seq,
                    e.listen,
                    e.pid
                );
                p.pinned_by = Some(e.pid);
            }
            Some(_) => {}
            None => {
                log::debug!("group {:?}: recovery or history readers hold {}; retention tries again later", self.name, lock_path.display())
            }
        }
    }

    /// Takes the group's lock exclusively. Readers hold it shared, possibly one after the
    /// other with short gaps; polling for a while finds a gap without blocking the maintenance
    /// of the other groups behind a long recovery.
    pub(super) fn lock_for_retention(&self) -> Result<Option<FileLock>, TargetError> {
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
    pub(super) fn first_time(&self, p: &mut Persist, first_seq: Seq) -> Result<Option<u64>, TargetError> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use hindsight_consistency::config::JournalFull;
    use hindsight_consistency::sync::lock;

    use super::super::testing::*;
    use super::super::Group;
    use crate::state::read_state;

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

    #[test]
    fn index_files_written_from_the_commits_equal_those_built_from_the_segments() {
        use crate::point_index::build::build_runs;
        use crate::point_index::file::encode;
        use crate::point_index::store::index_path;
        use hindsight_consistency::journal::list_segments;
        use hindsight_consistency::WriteKind;

        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let mut recs = big_records(160);
        for (h, d) in recs.iter_mut().filter(|(h, _)| h.seq % 5 == 0) {
            (h.kind, *d) = (WriteKind::Zeroes, Vec::new());
        }
        for chunk in recs[..50].chunks(3) {
            g.receive(&mut vec![frame(chunk)]);
            g.maintain(false);
        }
        // A restart in the middle of a segment: that one's run is built from the file.
        drop(g);
        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        for chunk in recs[50..].chunks(5) {
            g.receive(&mut vec![frame(chunk)]);
        }
        let segs = list_segments(fs.as_ref(), &paths.journal()).unwrap();
        assert!(segs.len() >= 6, "{} segments", segs.len());
        let volumes = vec!["v".to_string()];
        let built = |first: u64, last: u64| build_runs(&fs, &paths.journal(), &volumes, first, last).unwrap().pop().unwrap();
        // Every segment sealed since the restart but the one it cut was gathered in memory.
        let gathered = lock(&g.inner).index.take_sealed();
        assert!(gathered.len() >= 3, "{} runs gathered", gathered.len());
        for run in &gathered {
            let next = segs.iter().position(|s| s.0 == run.first_seq).unwrap() + 1;
            assert_eq!(run, &built(run.first_seq, segs[next].0 - 1), "a gathered run differs from the one built from its segment");
        }
        lock(&g.persist).gathered_runs.extend(gathered);
        g.maintain(false);
        for pair in segs.windows(2) {
            let ((first, path), last) = (&pair[0], pair[1].0 - 1);
            let mut run = built(*first, last);
            run.segment_len = std::fs::metadata(path).unwrap().len();
            let file = std::fs::read(index_path(&paths.index_dir(), *first)).unwrap();
            assert!(file == encode(&run), "index file of segment {first} differs from the one built from the segment");
        }
        assert!(lock(&g.persist).gathered_runs.is_empty(), "every gathered run was written");
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
