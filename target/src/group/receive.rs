//! The engine connection's side of a group: claiming it, checking the hello, and taking each
//! batch of `Records` frames (validated whole, journaled, committed with one fdatasync and
//! queued for the applier), or refusing it while the journal is full.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::config::JournalFull;
use hindsight_consistency::error_chain;
use hindsight_consistency::record::{decode_record, DecodeError};
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::{format_duration, format_rfc3339};
use hindsight_consistency::wire::JournalStateMsg;
use hindsight_consistency::{BookmarkBody, Seq, WriteKind};

use super::counters::Tally;
use super::{Group, Inner};
use crate::applier::Batch;
use crate::error::{data_dir_err, poisoned_message, AcceptHelloError, ClaimError, FrameRefused, TargetError};
use crate::image::{in_bounds, Image};
use crate::marks::Marks;
use crate::meta::GroupMeta;
use crate::model::Volume;
use crate::records::each_record;

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

impl Group {
    /// Takes the group for one engine connection; refused while another is active, unless
    /// this one carries a larger ownership token (docs/ha.md, "Fencing"): then the other is
    /// closed (`close` of its claim) and this one waits for it to end. `close` ends this
    /// connection's reading in turn.
    pub fn claim(self: &Arc<Self>, engine: &str, owner: u64, close: Box<dyn Fn() + Send>) -> Result<ShipperClaim, ClaimError> {
        let started = Instant::now();
        let mut s = lock(&self.shipper);
        let mut closed = false;
        while let Some(other) = s.as_ref() {
            if other.owner > owner {
                return Err(ClaimError::Superseded(AcceptHelloError::Superseded {
                    group: self.name.clone(),
                    engine: owner,
                    target: other.owner,
                }));
            }
            if other.owner == owner || started.elapsed() >= DISPLACE_WAIT {
                return Err(ClaimError::AlreadyShipped { group: self.name.clone(), engine: other.engine.clone() });
            }
            if !closed {
                log::warn!(
                    "group {:?}: engine {engine} owns the group now (token {owner}); closing the connection of {} (token {})",
                    self.name,
                    other.engine,
                    other.owner
                );
                (other.close)();
                closed = true;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(10));
            s = lock(&self.shipper);
        }
        *s = Some(Shipping { engine: engine.to_owned(), owner, close });
        self.counters.engine(true);
        Ok(ShipperClaim { group: Arc::clone(self), owner })
    }

    /// Checks an engine's hello against what is stored and returns the durable seq to resume
    /// after. New volumes are added; a volume whose size changed is refused. `on_journal_full`
    /// is the group's policy, which the engine's configuration holds.
    pub fn accept_hello(
        &self,
        engine: &str,
        volumes: &[Volume],
        on_journal_full: JournalFull,
        (epoch, owner): (u64, u64),
    ) -> Result<Seq, AcceptHelloError> {
        let mut inner = lock(&self.inner);
        if let Some(why) = self.fenced() {
            return Err(AcceptHelloError::Fenced { why });
        }
        if let Some(cause) = self.poisoned() {
            return Err(AcceptHelloError::Poisoned { group: self.name.clone(), cause });
        }
        if epoch != inner.meta.epoch {
            return Err(AcceptHelloError::Epoch { group: self.name.clone(), engine: epoch, target: inner.meta.epoch });
        }
        if owner < inner.meta.owner {
            return Err(AcceptHelloError::Superseded { group: self.name.clone(), engine: owner, target: inner.meta.owner });
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
                    return Err(AcceptHelloError::VolumeResized {
                        group: self.name.clone(),
                        volume: v.name.clone(),
                        stored: old.size,
                        offered: v.size,
                    });
                }
            }
        }
        let mut meta = inner.meta.clone();
        if owner > meta.owner {
            // Stored (below) before the welcome: from here on a smaller token is refused, also
            // after a restart.
            log::info!("group {:?}: engine {engine} owns the group from token {owner} on (was {})", self.name, meta.owner);
            meta.owner = owner;
        }
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
                        &self.fs,
                        &self.name,
                        self.opts.direct_io,
                    ));
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
                    return Err(AcceptHelloError::Poisoned { group: self.name.clone(), cause });
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
    #[cfg(test)]
    pub fn receive(&self, frames: &mut Vec<Vec<u8>>) -> Receipt {
        self.receive_owned(0, frames)
    }

    /// [`Group::receive`] for a connection whose hello carried ownership token `owner`: a
    /// batch is refused whole once a newer owner's hello was accepted (docs/ha.md, "Fencing").
    pub fn receive_owned(&self, owner: u64, frames: &mut Vec<Vec<u8>>) -> Receipt {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let old_durable = inner.journal.durable_seq();
        let shared = self.applier.shared();
        let refuse = |frames: &mut Vec<Vec<u8>>, durable_seq, error, full| {
            shared.recycle(frames.drain(..));
            Receipt { durable_seq, error, full }
        };
        if let Some(why) = self.fenced() {
            return refuse(frames, old_durable, Some(why), None);
        }
        if owner < inner.meta.owner {
            let why = AcceptHelloError::Superseded { group: self.name.clone(), engine: owner, target: inner.meta.owner };
            return refuse(frames, old_durable, Some(why.to_string()), None);
        }
        if let Some(cause) = self.poisoned() {
            return refuse(frames, old_durable, Some(poisoned_message(&self.name, &cause)), None);
        }
        if let Some(full) = self.refuse_when_full(inner) {
            return refuse(frames, old_durable, None, Some(full));
        }
        let mut error = None;
        let mut taken = 0;
        let mut marks = Marks::default();
        let mut tally = Tally::default();
        let volumes = inner.meta.volume_names();
        for payload in frames.iter() {
            if let Err(why) = validate_frame(&self.name, &inner.meta, payload, inner.journal.next_seq(), inner.journal.last_time_ns()) {
                error = Some(why.to_string());
                break;
            }
            let next = inner.journal.next_seq();
            let res: Result<(), hindsight_consistency::journal::JournalError> = each_record(payload, |rec, raw| {
                if rec.header.seq >= next {
                    inner.index.appended(rec, &volumes, inner.journal.pending_bytes());
                    inner.journal.append_encoded(rec, raw)?;
                    marks.see(rec);
                    tally.see(rec);
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
        let committed = inner.journal.commit();
        inner.index.committed(committed.as_ref().ok().and(inner.journal.last_commit()), &volumes);
        let durable = match committed {
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
        if let Err(e) = marks.save(self.fs.as_ref(), &self.paths) {
            let cause = e.to_string();
            self.poison(cause.clone());
            return refuse(frames, durable, Some(poisoned_message(&self.name, &cause)), None);
        }
        self.counters.add(tally);
        shared.recycle(frames.drain(taken..));
        let batch = Batch { frames: std::mem::take(frames), after: old_durable, through: durable };
        if let Err(e) = self.applier.queue(batch) {
            // Committed (and confirmed with the error): start-up applies it.
            let cause = e.to_string();
            self.poison(cause.clone());
            return Receipt { durable_seq: durable, error: Some(poisoned_message(&self.name, &cause)), full: None };
        }
        Receipt { durable_seq: durable, error, full: None }
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

    pub(super) fn journal_state(&self, full: bool, trimmed: bool, journal_bytes: u64) -> JournalStateMsg {
        JournalStateMsg {
            full,
            trimmed,
            journal_bytes,
            journal_size: self.opts.journal_size.unwrap_or(0),
            first_time_ns: self.oldest_ns.load(Ordering::Relaxed),
            retention_s: self.opts.retention.map_or(0, |r| r.as_secs()),
        }
    }
}

/// The group's engine connection; released when dropped.
/// How long a connection with a newer ownership token waits for the older one to end.
const DISPLACE_WAIT: Duration = Duration::from_secs(5);

/// The engine connection shipping a group.
pub(crate) struct Shipping {
    engine: String,
    owner: u64,
    /// Ends the connection's reading (a newer owner displaces it).
    close: Box<dyn Fn() + Send>,
}

pub(crate) struct ShipperClaim {
    group: Arc<Group>,
    /// The ownership token of the connection's hello.
    pub owner: u64,
}

impl Drop for ShipperClaim {
    fn drop(&mut self) {
        self.group.on_poison(None);
        *lock(&self.group.shipper) = None;
        self.group.counters.engine(false);
    }
}

/// Checks a whole `Records` payload before anything of it is journaled: every record decodes,
/// names a volume of the group, lies inside it, the records are consecutive, and the first
/// one not yet held is exactly `next` (older ones are resends, skipped). Returns what is
/// wrong, for the log and the `Error` frame.
fn validate_frame(group: &str, meta: &GroupMeta, payload: &[u8], mut next: Seq, mut last_time: u64) -> Result<(), FrameRefused> {
    if payload.is_empty() {
        return Err(FrameRefused::Empty { group: group.to_owned() });
    }
    let mut at = 0;
    let mut prev: Option<Seq> = None;
    while at < payload.len() {
        let (rec, used) = decode_record(&payload[at..]).map_err(|e| match e {
            DecodeError::Incomplete { .. } => FrameRefused::Truncated { group: group.to_owned(), at },
            source => FrameRefused::Invalid { group: group.to_owned(), at, source },
        })?;
        let h = rec.header;
        if h.kind == WriteKind::Bookmark {
            // A named point: no volume, but its body must be readable.
            BookmarkBody::decode(rec.data).map_err(|source| FrameRefused::Bookmark {
                group: group.to_owned(),
                name: rec.volume.to_owned(),
                seq: h.seq,
                source,
            })?;
        } else if h.kind == WriteKind::Point {
            if rec.data.len() != 8 {
                return Err(FrameRefused::Point { group: group.to_owned(), name: rec.volume.to_owned(), seq: h.seq, len: rec.data.len() });
            }
        } else {
            let Some(vol) = meta.volume(rec.volume) else {
                return Err(FrameRefused::UnknownVolume {
                    group: group.to_owned(),
                    seq: h.seq,
                    volume: rec.volume.to_owned(),
                    volumes: meta.volume_names(),
                });
            };
            if !in_bounds(&rec, vol.size) {
                return Err(FrameRefused::PastEnd {
                    group: group.to_owned(),
                    seq: h.seq,
                    length: h.length,
                    offset: h.offset,
                    volume: vol.name.clone(),
                    size: vol.size,
                });
            }
        }
        if let Some(p) = prev {
            if h.seq != p + 1 {
                return Err(FrameRefused::NotConsecutive { group: group.to_owned(), seq: h.seq, prev: p });
            }
        }
        prev = Some(h.seq);
        if h.seq > next {
            return Err(FrameRefused::Gap { group: group.to_owned(), seq: h.seq, next });
        }
        if h.seq == next {
            if h.time_ns < last_time {
                return Err(FrameRefused::TimeBackwards {
                    group: group.to_owned(),
                    seq: h.seq,
                    time_ns: h.time_ns,
                    last_time_ns: last_time,
                });
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
    use hindsight_consistency::faults::{Fault, Op, Rule};
    use hindsight_consistency::storage::StdStorage;

    use super::super::testing::*;
    use super::*;

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
            .accept_hello("e", &[Volume { name: "v".into(), vm: "vm".into(), size: SIZE }], JournalFull::TrimHistory, (0, 0))
            .unwrap_err()
            .to_string()
            .contains("restart"));
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 5), "nothing after the failure applied");
        drop(g);

        // After a restart the journal holds what reached the file: the failed batch was
        // written, only its sync failed, so it is there (and synced at load), and the replicas
        // are brought up to it. The engine never saw it confirmed and resumes after it.
        let g = Group::load(StdStorage::shared(), paths.clone(), "g", opts()).unwrap();
        assert_eq!(
            g.accept_hello("e", &[Volume { name: "v".into(), vm: "vm".into(), size: SIZE }], JournalFull::TrimHistory, (0, 0)),
            Ok(10)
        );
        assert!(std::fs::read(paths.replica_dir().join("v.img")).unwrap() == model(&recs, 10));
    }

    #[test]
    fn a_batch_of_an_older_owner_is_refused_whole_once_a_newer_one_said_hello() {
        let dir = tempfile::tempdir().unwrap();
        let (_fs, paths, g) = new_group(dir.path());
        let vols = [Volume { name: "v".into(), vm: "vm".into(), size: SIZE }];
        let recs = records(10);
        assert_eq!(g.accept_hello("a", &vols, JournalFull::TrimHistory, (0, 3)), Ok(0));
        assert_eq!(g.receive_owned(3, &mut vec![frame(&recs[..4])]).durable_seq, 4);
        // Engine b's hello (token 5) arrives while a's connection is still open.
        assert_eq!(g.accept_hello("b", &vols, JournalFull::TrimHistory, (0, 5)), Ok(4));
        let r = g.receive_owned(3, &mut vec![frame(&recs[4..])]);
        assert_eq!(r.durable_seq, 4);
        assert!(r.error.unwrap().contains("token 3"));
        assert_eq!(g.receive_owned(5, &mut vec![frame(&recs[4..])]).durable_seq, 10);
        assert_eq!(crate::meta::GroupMeta::load(&StdStorage, "g", &paths.meta()).unwrap().owner, 5, "stored before the welcome");
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
}
