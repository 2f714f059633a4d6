//! One consistency group inside the daemon: its journal, replicas, state and retention.
//!
//! The connection thread validates, journals and commits each batch of frames and confirms
//! it; the group's applier task ([`crate::applier`]) applies committed batches to the
//! replicas in commit order meanwhile.
//!
//! Locks, always taken in this order: `persist` (held by the maintenance thread while it
//! checkpoints or trims), then `inner` (held by the connection thread for one batch of frames:
//! validate, append, commit, queue for the applier), then the applier's `replicas` (held by
//! the applier for one batch, and by readers of the replicas), then its leaf locks.
//! `shipper` and `notice` are independent.
//!
//! - `open`: creating a group at its first hello, loading it at start-up (finishing an
//!   interrupted roll of the base images, replaying the journal into the replicas);
//! - `receive`: the engine connection's side: the claim, the hello, each batch of frames
//!   validated, journaled, committed and queued for the applier;
//! - `maintenance`: the maintenance thread's side: replica checkpoints and retention.

mod counters;
mod index;
mod maintenance;
mod open;
mod receive;
mod thin;
pub(crate) use receive::ShipperClaim;
#[cfg(test)]
mod testing;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hindsight_consistency::config::JournalFull;
use hindsight_consistency::journal::Journal;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::sync::lock;
use hindsight_consistency::wire::JournalStateMsg;
use hindsight_consistency::Seq;

pub(crate) use self::counters::{Counters, VolumeCounts};
use crate::applier::Applier;
use crate::error::{poisoned_message, ApplierError, TargetError};
use crate::image::ImageSet;
use crate::layout::GroupPaths;
use crate::meta::GroupMeta;
use crate::state::GroupState;
use hindsight_consistency::config::TierPlan;

/// The retention settings of the target, applied to every group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupOptions {
    pub segment_size: u64,
    pub retention: Option<Duration>,
    pub journal_size: Option<u64>,
    /// Direct I/O for the journal and large replica writes, where the file system allows it.
    pub direct_io: bool,
    /// Retention tiers, by group (none: one flat `retention` window).
    pub tiers: &'static TierPlan,
}

/// A group served by the daemon.
pub(crate) struct Group {
    pub name: String,
    paths: GroupPaths,
    fs: Arc<dyn Storage>,
    opts: GroupOptions,
    persist: Mutex<Persist>,
    inner: Mutex<Inner>,
    /// The engine connection that ships the group, if one does.
    shipper: Mutex<Option<receive::Shipping>>,
    /// Time of the oldest recoverable point (the base images'), for `JournalState`.
    oldest_ns: AtomicU64,
    /// A trim of history inside retention not yet told to the engine.
    notice: Mutex<Option<JournalStateMsg>>,
    /// Applies committed batches to the replicas; holds them and the poisoning.
    applier: Applier,
    /// What the metrics and the dashboard count (since start).
    pub counters: Counters,
    /// Set once a failover is asked for: why the group takes nothing more (docs/failover.md).
    fenced: Mutex<Option<String>>,
}

/// A group as the metrics endpoint and the dashboard show it.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupGauges {
    /// The newest record the journal holds.
    pub last_seq: Seq,
    /// The replicas hold every record up to here.
    pub applied_seq: Seq,
    pub journal_bytes: u64,
    pub journal_size: Option<u64>,
    /// Time of the oldest and the newest recoverable point (ns since the epoch).
    pub oldest_ns: u64,
    pub newest_ns: u64,
    pub engine_connected: bool,
    pub stopped: bool,
    /// The lag as the recovery site knows it ([`Counters::lag_ns`]).
    pub lag_ns: Option<u64>,
    /// Records and record bytes taken since start.
    pub received_records: u64,
    pub received_bytes: u64,
    /// Each volume, with its writes since start.
    pub volumes: Vec<(crate::model::Volume, VolumeCounts)>,
}

/// What the group's index files say of its window now: bookmarks, spans that are not
/// consistent points, running exports (read without the group's lock: each file is replaced
/// atomically).
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupMarks {
    pub bookmarks: Vec<crate::model::Bookmark>,
    pub spans: Vec<crate::spans::Span>,
    pub exports: Vec<crate::exports::ActiveExport>,
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
    /// Whether the index files of the sealed segments were checked since start-up (after
    /// that, only newly sealed segments get theirs).
    index_verified: bool,
    /// The export whose pin retention last reported waiting for (its pid).
    pinned_by: Option<u32>,
    /// Runs of sealed segments gathered as their records were committed, until their index
    /// files are written.
    gathered_runs: Vec<crate::point_index::Run>,
    /// Thinned history (retention tiers), oldest first; the journal holds what follows it.
    thinned: Vec<crate::thinning::segment::Found>,
}

/// What the connection thread works on.
struct Inner {
    meta: GroupMeta,
    journal: Journal,
    /// What to do when the journal is full (from the engine's hello).
    on_journal_full: JournalFull,
    /// Since when batches are refused because the journal is full.
    full_since: Option<Instant>,
    /// The extents of the records committed, for the index files of sealed segments.
    index: index::CommitIndex,
}

impl Inner {
    fn new(meta: GroupMeta, journal: Journal) -> Inner {
        Inner { meta, journal, on_journal_full: JournalFull::TrimHistory, full_since: None, index: index::CommitIndex::default() }
    }
}

impl Group {
    fn journal_err(&self, step: &'static str) -> impl FnOnce(hindsight_consistency::journal::JournalError) -> TargetError + '_ {
        move |source| TargetError::Journal { group: self.name.clone(), step, source }
    }
    /// A buffer for the next frame to receive (one that a received frame used, if there is
    /// one: fresh memory is slow to touch the first time).
    pub fn buffer(&self) -> Vec<u8> {
        self.applier.shared().buffer()
    }

    /// Gives back the journal's buffers kept for the next commits (the group's engine has sent
    /// nothing for a while).
    pub fn release_memory(&self) {
        let mut inner = lock(&self.inner);
        inner.journal.release_memory();
        inner.index.release_memory();
    }
    /// A trim of history inside retention that the engine has not been told of.
    pub fn take_notice(&self) -> Option<JournalStateMsg> {
        lock(&self.notice).take()
    }
    /// Runs `f` on the replicas and the last sequence number they hold, once every record
    /// committed before the call is applied: the replicas are held meanwhile, so they are
    /// exactly that prefix of the sequence (never part of a batch).
    pub fn with_replicas<T>(&self, f: impl FnOnce(&ImageSet, Seq) -> T) -> Result<T, ApplierError> {
        let durable = lock(&self.inner).journal.durable_seq();
        self.applier.shared().with_applied(durable, f)
    }

    /// What the metrics endpoint shows of the group now.
    pub fn gauges(&self) -> GroupGauges {
        let (last_seq, last_time_ns, journal_bytes, meta_volumes) = {
            let inner = lock(&self.inner);
            (inner.journal.durable_seq(), inner.journal.last_time_ns(), inner.journal.size_bytes(), inner.meta.volumes.clone())
        };
        let oldest_ns = self.oldest_ns.load(std::sync::atomic::Ordering::Relaxed);
        let engine_connected = lock(&self.shipper).is_some();
        let (received_records, received_bytes) = self.counters.taken();
        let counts = self.counters.volumes();
        GroupGauges {
            last_seq,
            applied_seq: lock(&self.applier.shared().replicas).applied_seq,
            journal_bytes,
            journal_size: self.opts.journal_size,
            oldest_ns,
            newest_ns: last_time_ns.max(oldest_ns),
            engine_connected,
            stopped: self.poisoned().is_some(),
            lag_ns: self.counters.lag_ns(engine_connected),
            received_records,
            received_bytes,
            volumes: meta_volumes
                .into_iter()
                .map(|v| {
                    let c = counts.get(&v.name).copied().unwrap_or_default();
                    (v, c)
                })
                .collect(),
        }
    }

    /// The bookmarks, spans and exports of the window that starts at `oldest_ns`. A file
    /// that cannot be read counts as empty here (history and recover report it).
    pub fn marks(&self, oldest_ns: u64) -> GroupMarks {
        let fs = self.fs.as_ref();
        GroupMarks {
            bookmarks: crate::bookmarks::load(fs, &self.paths.bookmarks())
                .unwrap_or_default()
                .into_iter()
                .filter(|b| b.time_ns > oldest_ns)
                .collect(),
            spans: crate::spans::load(fs, &self.paths.spans())
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.to_time_ns.is_none_or(|t| t > oldest_ns))
                .collect(),
            exports: crate::exports::active(fs, &self.paths.exports_dir()),
        }
    }

    /// The group's paths.
    pub fn paths(&self) -> &GroupPaths {
        &self.paths
    }

    /// Takes nothing more from any engine from now on (a failover was asked for): the next
    /// batch and every later hello are refused with `why`, and the connection is woken so that
    /// an idle one ends too.
    pub fn fence(&self, why: String) {
        *lock(&self.fenced) = Some(why);
        self.applier.shared().wake_connection();
    }

    /// Why the group refuses its engine, if it does: fenced by a failover, or stopped.
    pub fn refusal(&self) -> Option<String> {
        lock(&self.fenced).clone().or_else(|| self.stopped())
    }

    fn fenced(&self) -> Option<String> {
        lock(&self.fenced).clone()
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
    /// replica write failing on the applier task); cleared with `None`.
    pub fn on_poison(&self, f: Option<Box<dyn Fn() + Send>>) {
        self.applier.shared().on_poison(f);
    }

    fn poison(&self, cause: String) {
        self.applier.shared().poison(cause);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hindsight_consistency::faults::{Fault, Op, Rule};
    use hindsight_consistency::storage::StdStorage;

    use super::testing::*;
    use super::*;
    use crate::state::read_state;

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
        let msg = g.with_replicas(|_, seq| seq).unwrap_err().to_string();
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
}
