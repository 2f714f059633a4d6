//! A group's journal task, run a round at a time by the engine's journal pool
//! (`hindsight_consistency::tasks`): each round places a due interval point, takes what is
//! queued, numbers and timestamps the writes, appends them (with a bookmark or resync point
//! that ends the batch), commits with one fdatasync, and only then acknowledges. Whoever
//! queues an item wakes the task; with nothing queued it wakes itself for its periodic checks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use hindsight_consistency::config::ReplicationMode;
use hindsight_consistency::journal::{Journal, JournalError};
use hindsight_consistency::record::{RecordHeader, Seq, WriteKind, INTERVAL_POINT_NAME, RESYNC_POINT_NAME};
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{Next, Task};
use hindsight_consistency::time::now_ns;
use hindsight_consistency::wire::WriteAck;

use super::items::{Barrier, BookmarkPlacement, GroupItem, ResyncDone, WriteRequest};
use super::room::Room;
use super::shared::GroupShared;
use crate::acks::send_acks;
use crate::error::GroupError;
use crate::journal_watch::Action;
use crate::resync::{ResyncOutcome, Resyncs};

/// How often a journal task holding writes (`block`) looks for room.
const HOLD_WAKE: Duration = Duration::from_millis(20);
/// Most bytes put into one commit.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How soon an idle journal task first wakes to run the policy's checks and trim confirmed
/// segments; each idle round that finds nothing to do doubles it, up to [`IDLE_WAKE_MAX`].
const IDLE_WAKE: Duration = Duration::from_millis(200);
/// The longest an idle journal task sleeps (the granularity of `sync_timeout` and the RPO
/// alert while nothing is written).
const IDLE_WAKE_MAX: Duration = Duration::from_secs(1);

/// The async interval being filled: when it started and its first sequence number.
struct OpenInterval {
    since: Instant,
    first: Seq,
}

/// A group's journal task, for the pool.
pub(super) struct JournalTask(Mutex<Sequencer>);

impl JournalTask {
    pub(super) fn new(journal: Journal, rx: (Receiver<GroupItem>, Arc<Room>), shared: Arc<GroupShared>, interval: Duration) -> JournalTask {
        JournalTask(Mutex::new(Sequencer::new(journal, rx, shared, interval)))
    }
}

impl Task for JournalTask {
    fn run(&self) -> Next {
        // The pool runs one round at a time: the lock is never contended.
        let mut s = lock(&self.0);
        let next = s.round();
        if next == Next::Done {
            // Senders learn that the group takes nothing more, as from a closed channel.
            s.room.close();
        }
        next
    }
}

/// Whether the journal task goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    On,
    Stop,
}

/// What a batch took from the channel besides its writes (those are in
/// [`Sequencer::batch`]).
struct Taken {
    /// The bookmark that ended the batch.
    bookmark: Option<BookmarkPlacement>,
    /// The end of a resync that ended the batch.
    resync_done: Option<ResyncDone>,
    /// Barriers queued among the writes.
    barriers: Vec<Barrier>,
}

/// The sequence numbers a batch's records got in the journal.
struct Appended {
    /// One per write of the batch, in order.
    seqs: Vec<Seq>,
    /// The bookmark record's.
    bookmark_seq: Option<Seq>,
    /// The resync point's.
    resync_point: Option<Seq>,
}

/// A committed batch whose acknowledgements the policy delays (regulation): nothing more is
/// taken until they go.
struct Regulated {
    taken: Taken,
    appended: Appended,
    durable: Seq,
    bytes: u64,
    now: u64,
    until: Instant,
}

/// The state the journal task keeps from one round to the next.
struct Sequencer {
    journal: Journal,
    rx: Receiver<GroupItem>,
    /// The room of what `rx` holds, given back as items are taken.
    room: Arc<Room>,
    shared: Arc<GroupShared>,
    /// The async interval.
    interval: Duration,
    /// The writes of the batch being journaled (kept for its capacity).
    batch: Vec<WriteRequest>,
    /// The time of the last record: times never decrease along the sequence.
    last_time: u64,
    /// The last sequence number appended: numbers strictly increase.
    last_seq: Seq,
    /// Confirmed sequence number the journal was last trimmed to.
    trimmed_through: Seq,
    resyncs: Resyncs,
    open: Option<OpenInterval>,
    /// The committed batch whose acknowledgements wait for the regulation delay.
    regulated: Option<Regulated>,
    /// How long the task sleeps when it is next idle.
    idle_wake: Duration,
    /// The journal's buffers were given back since the last batch.
    released: bool,
    /// The last batch was refused because this engine does not own the group (said once).
    not_owner: bool,
}

impl Sequencer {
    /// The task's state over an opened journal.
    fn new(journal: Journal, (rx, room): (Receiver<GroupItem>, Arc<Room>), shared: Arc<GroupShared>, interval: Duration) -> Sequencer {
        let last_time = journal.last_time_ns();
        let last_seq = journal.durable_seq();
        // A journal tail written before a restart gets its interval point too.
        let open = (journal.durable_seq() > 0).then(|| OpenInterval { since: Instant::now(), first: journal.durable_seq() });
        Sequencer {
            journal,
            rx,
            room,
            shared,
            interval,
            // Grown by the first commits, given back when idle.
            batch: Vec::new(),
            last_time,
            last_seq,
            trimmed_through: 0,
            resyncs: Resyncs::default(),
            open,
            regulated: None,
            idle_wake: IDLE_WAKE,
            released: false,
            not_owner: false,
        }
    }

    /// In async mode, places the interval point once the open interval is `interval` old;
    /// in any other mode, forgets the open interval. A failure poisons the group.
    fn interval_point(&mut self) {
        let shared = &self.shared;
        if shared.policy.effective() == ReplicationMode::Async {
            if let Some(o) = self.open.as_ref().filter(|o| o.since.elapsed() >= self.interval) {
                if shared.poisoned.load(Ordering::Relaxed) {
                    self.open = None;
                } else {
                    let first = o.first;
                    self.last_time = now_ns().max(self.last_time);
                    debug_assert!(self.last_time >= self.journal.last_time_ns(), "group {}: time went back", shared.name);
                    match place_point(&mut self.journal, first, self.last_time) {
                        Ok((seq, durable)) => {
                            debug_assert!(seq > self.last_seq, "group {}: seq {seq} after seq {}", shared.name, self.last_seq);
                            self.last_seq = seq;
                            shared.publish_durable(durable);
                            log::debug!("group {}: interval point at seq {seq} (interval from seq {first})", shared.name);
                            self.open = None;
                        }
                        Err(e) => {
                            log::error!(
                                "group {}: the journal failed placing an interval point and the group is stopped: {e}",
                                shared.name
                            );
                            shared.poisoned.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        } else {
            self.open = None;
        }
    }

    /// One round: releases regulated acknowledgements once due, places a due interval point,
    /// then takes a batch, numbers, appends and commits it, and answers everything in it.
    fn round(&mut self) -> Next {
        if let Some((next, resync, done)) = self.shared.take_restart() {
            let _ = done.send(self.restart(next, &resync));
        }
        if let Some(r) = self.regulated.take() {
            if Instant::now() < r.until {
                let until = r.until;
                self.regulated = Some(r);
                return Next::At(until);
            }
            self.release(r.taken, r.appended, r.durable, r.bytes, r.now);
        }
        self.interval_point();
        let action = self.shared.journal.update(self.journal.size_bytes());
        if action == Action::Hold || self.shared.handed_over.load(Ordering::Relaxed) || self.shared.ownership.draining() {
            // `block` with a full journal: takes nothing for a while, until the target
            // confirms and segments go.
            return match self.housekeeping() {
                Run::Stop => Next::Done,
                Run::On => Next::At(Instant::now() + HOLD_WAKE),
            };
        }
        let first = match self.rx.try_recv() {
            Ok(item) => {
                self.room.give(1);
                item
            }
            Err(TryRecvError::Empty) => return self.idle(),
            Err(TryRecvError::Disconnected) => return Next::Done,
        };
        if self.housekeeping() == Run::Stop {
            return Next::Done;
        }
        self.idle_wake = IDLE_WAKE;
        self.released = false;
        self.open_interval();
        let mut taken = self.take_batch(first);
        self.takeover_kinds();
        if action == Action::Refuse {
            self.refuse(&mut taken);
            if taken.resync_done.is_none() {
                return Next::Again;
            }
        }
        if self.shared.poisoned.load(Ordering::Relaxed) {
            self.fail(taken);
            return Next::Again;
        }
        if !self.shared.ownership.may_ack() {
            // The lease is not valid by this engine's clock (docs/ha.md, "Fencing"): nothing is
            // numbered; the agents track these writes and resync them to the owner.
            if !self.not_owner {
                log::warn!(
                    "group {}: refusing {} write(s) with EIO: this engine does not own the group now (or its lease was not \
                     renewed in time)",
                    self.shared.name,
                    self.batch.len()
                );
                self.not_owner = true;
            }
            fail_all(&mut self.batch);
            if let Some(b) = taken.bookmark {
                b.answer(Err(GroupError::NotOwner { group: self.shared.name.clone() }), &self.shared.name);
            }
            return Next::Again;
        }
        self.not_owner = false;
        let now = self.stamp();
        match self.append(&taken, now).and_then(|appended| Ok((appended, self.journal.commit()?))) {
            Ok((appended, durable)) => self.acknowledge(taken, appended, durable, now),
            Err(e) => self.poison(taken, e),
        }
        // Behind the other groups' rounds: a busy group delays another by one batch at most.
        Next::Again
    }

    /// Starts the journal again at `next` for a new claim of the group (docs/ha.md,
    /// "Takeover"): nothing is queued (agents attach only once it is done).
    fn restart(&mut self, next: Seq, resync: &[String]) -> Result<(), String> {
        // Whatever is still queued came from sessions of an earlier ownership, long closed:
        // none of it may be numbered now (its agents sent it again to the owner of the time).
        while let Ok(item) = self.rx.try_recv() {
            self.room.give(1);
            match item {
                GroupItem::Write(w) => self.batch.push(w),
                GroupItem::Bookmark(b) => b.answer(Err(GroupError::NotOwner { group: self.shared.name.clone() }), &self.shared.name),
                GroupItem::ResyncDone(_) | GroupItem::Barrier(_) => {}
            }
        }
        fail_all(&mut self.batch);
        let shared = &self.shared;
        let (first, last) = (self.journal.first_seq(), self.journal.durable_seq());
        self.journal.restart_at(next).map_err(|e| format!("group {}: starting the journal again at seq {next}: {e}", shared.name))?;
        if last >= first {
            log::info!(
                "group {}: the journal starts again at seq {next}, after what the target holds (seq {first}..={last} of an earlier \
                 ownership are dropped: the target holds what of them it confirmed)",
                shared.name
            );
        }
        self.last_seq = next - 1;
        self.trimmed_through = next - 1;
        self.open = None;
        shared.restarted(next);
        if !resync.is_empty() {
            // Until every volume's agent has resynced what it still has marked, its writes are
            // journaled as resync data (the first of them opens a resync span at the target)
            // and the resync point waits for all of them (docs/ha.md, "Takeover").
            self.resyncs.expect(resync.iter().map(|v| std::sync::Arc::from(v.as_str())));
            shared.takeover_started(resync);
            log::info!(
                "group {}: taken over after seq {}: every volume's writes go as resync data until its agent has resynced what \
                 it still has marked; no point after seq {} is consistent before then",
                shared.name,
                next - 1,
                next - 1
            );
        }
        Ok(())
    }

    /// During a takeover's resync (docs/ha.md, "Takeover"), a data write of a volume whose agent
    /// has not resynced yet is journaled as resync data, inside the resync span; a write of
    /// zeroes or a trim of one (it carries no data to resync with) is refused, and its agent
    /// resyncs the region.
    fn takeover_kinds(&mut self) {
        let shared = &self.shared;
        if !shared.takeover_any() {
            return;
        }
        let mut refused = Vec::new();
        let mut kept = Vec::with_capacity(self.batch.len());
        for mut w in self.batch.drain(..) {
            if shared.takeover_pending(&w.volume) {
                match w.kind {
                    WriteKind::Data => w.kind = WriteKind::Resync,
                    WriteKind::Resync => {}
                    _ => {
                        refused.push(w);
                        continue;
                    }
                }
            }
            kept.push(w);
        }
        self.batch = kept;
        fail_all(&mut refused);
    }

    /// Nothing queued: the periodic checks, then sleep until the next ones (longer each time
    /// nothing happens), or until the open interval is due.
    fn idle(&mut self) -> Next {
        let trimmed = self.trimmed_through;
        if self.housekeeping() == Run::Stop {
            return Next::Done;
        }
        let wake = self.idle_wake;
        self.idle_wake = if self.trimmed_through == trimmed { (wake * 2).min(IDLE_WAKE_MAX) } else { IDLE_WAKE };
        if wake == IDLE_WAKE_MAX && self.idle_wake == IDLE_WAKE_MAX && !self.released {
            // Idle for a few seconds: the buffers kept for the next commits go.
            self.journal.release_memory();
            self.batch = Vec::new();
            self.released = true;
        }
        let mut at = Instant::now() + wake;
        if let Some(o) = &self.open {
            if self.shared.policy.effective() == ReplicationMode::Async {
                at = at.min(o.since + self.interval);
            }
        }
        Next::At(at)
    }

    /// Between batches: stops if the group is stopping, else runs the policy's periodic checks
    /// and deletes the segments the target confirmed.
    fn housekeeping(&mut self) -> Run {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Run::Stop;
        }
        self.shared.policy.tick();
        // The last of a burst of confirmations reaches the agents too.
        self.shared.notify_confirmed(false);
        trim_confirmed(&mut self.journal, &self.shared, &mut self.trimmed_through);
        Run::On
    }

    /// In async mode, opens an interval at the next sequence number if none is open.
    fn open_interval(&mut self) {
        if self.open.is_none() && self.shared.policy.effective() == ReplicationMode::Async {
            self.open = Some(OpenInterval { since: Instant::now(), first: self.journal.next_seq() });
        }
    }

    /// Takes `first` and whatever is queued behind it, up to [`MAX_BATCH_BYTES`] of writes.
    /// A batch ends at a bookmark (nothing after it is taken before every group of the
    /// request has placed its own) or at the end of a resync (its point follows the batch).
    fn take_batch(&mut self, first: GroupItem) -> Taken {
        let mut taken = Taken { bookmark: None, resync_done: None, barriers: Vec::new() };
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                GroupItem::Write(w) => {
                    bytes += w.length as usize;
                    self.batch.push(w);
                }
                GroupItem::Bookmark(b) => {
                    taken.bookmark = Some(b);
                    break;
                }
                GroupItem::ResyncDone(r) => {
                    taken.resync_done = Some(r);
                    break;
                }
                GroupItem::Barrier(b) => taken.barriers.push(b),
            }
            if bytes < MAX_BATCH_BYTES {
                next = self.rx.try_recv().ok();
                if next.is_some() {
                    self.room.give(1);
                }
            }
        }
        taken
    }

    /// Paused: the agents track these writes and resync them later. Nothing queued is
    /// journaled, so the durable sequence number covers what came before a barrier. A
    /// resync's end is left in `taken`: its point still goes in.
    fn refuse(&mut self, taken: &mut Taken) {
        refuse_all(&mut self.batch, WriteAck::ENOSPC);
        for b in taken.barriers.drain(..) {
            b.pass(self.journal.durable_seq());
        }
        if let Some(b) = taken.bookmark.take() {
            b.answer(Err(GroupError::Paused { group: self.shared.name.clone() }), &self.shared.name);
        }
    }

    /// Poisoned: fails everything taken (barriers say why when they drop).
    fn fail(&mut self, taken: Taken) {
        let shared = &self.shared;
        fail_all(&mut self.batch);
        if let Some(b) = taken.bookmark {
            b.answer(Err(GroupError::Poisoned { group: shared.name.clone() }), &shared.name);
        }
        if let Some(r) = taken.resync_done {
            log::warn!(
                "group {}: resync of volume(s) {} complete, but the group is stopped after a journal failure: no resync point",
                shared.name,
                join_names(&r.volumes)
            );
        }
    }

    /// The batch's timestamp. Times never decrease along the sequence, even if the clock
    /// steps back, so that "every write received at or before T" is always a prefix.
    fn stamp(&mut self) -> u64 {
        let now = now_ns().max(self.last_time);
        self.last_time = now;
        now
    }

    /// Numbers the batch's writes and appends them, then the bookmark and the resync point if
    /// one is due, all at `now`. Stops at the first failure.
    fn append(&mut self, taken: &Taken, now: u64) -> Result<Appended, JournalError> {
        let journal = &mut self.journal;
        let mut seqs = Vec::with_capacity(self.batch.len());
        let mut per_volume: Vec<(&str, u64, u64)> = Vec::new();
        for w in &self.batch {
            let seq = journal.next_seq();
            let h = RecordHeader { seq, time_ns: now, kind: w.kind, offset: w.offset, length: w.length };
            check_order(journal, self.last_seq, &h, &self.shared.name);
            journal.append(&h, &w.volume, &w.payload[w.data_at..])?;
            self.last_seq = seq;
            if w.kind == WriteKind::Resync {
                self.resyncs.record(&w.volume, seq);
            }
            seqs.push(seq);
            match per_volume.iter_mut().find(|(v, _, _)| *v == &*w.volume) {
                Some(v) => (v.1, v.2) = (v.1 + 1, v.2 + u64::from(w.length)),
                None => per_volume.push((&w.volume, 1, u64::from(w.length))),
            }
        }
        self.shared.writes.add(&per_volume);
        let mut bookmark_seq = None;
        if let Some(b) = &taken.bookmark {
            let seq = journal.next_seq();
            let h = RecordHeader {
                seq,
                time_ns: now,
                kind: WriteKind::Bookmark,
                offset: 0,
                length: u32::try_from(b.body.len()).unwrap_or(u32::MAX),
            };
            check_order(journal, self.last_seq, &h, &self.shared.name);
            journal.append(&h, &b.name, &b.body)?;
            self.last_seq = seq;
            bookmark_seq = Some(seq);
        }
        // The resync point follows every resync write the agent sent before `ResyncDone`:
        // they came earlier on the same connection, so they are in this batch or an earlier one.
        let mut resync_point = None;
        if let Some(r) = &taken.resync_done {
            self.shared.takeover_done(&r.volumes);
            match self.resyncs.done(&r.volumes) {
                ResyncOutcome::Point { first } => {
                    let seq = journal.next_seq();
                    let h = RecordHeader { seq, time_ns: now, kind: WriteKind::Point, offset: 0, length: 8 };
                    check_order(journal, self.last_seq, &h, &self.shared.name);
                    journal.append(&h, RESYNC_POINT_NAME, &first.to_le_bytes())?;
                    self.last_seq = seq;
                    resync_point = Some(seq);
                }
                ResyncOutcome::Waiting { others } => log::info!(
                    "group {}: resync of volume(s) {} complete; the resync point waits for volume(s) {} still resyncing",
                    self.shared.name,
                    join_names(&r.volumes),
                    join_names(&others)
                ),
            }
        }
        Ok(Appended { seqs, bookmark_seq, resync_point })
    }

    /// The batch is durable through `durable`: passes the barriers, publishes `durable`, and
    /// acknowledges the writes (or holds them, sync) and answers the bookmark, at once or,
    /// when the policy regulates, after its delay.
    fn acknowledge(&mut self, mut taken: Taken, appended: Appended, durable: Seq, now: u64) {
        let shared = &self.shared;
        // Before the shipper can see `durable`, so that a hash request is queued when
        // it looks.
        for b in taken.barriers.drain(..) {
            b.pass(durable);
        }
        shared.publish_durable(durable);
        let bytes = self.batch.iter().filter(|w| w.kind.carries_data()).map(|w| u64::from(w.length)).sum();
        let delay = shared.policy.regulation_delay(bytes);
        if !delay.is_zero() {
            self.regulated = Some(Regulated { taken, appended, durable, bytes, now, until: Instant::now() + delay });
            return;
        }
        self.release(taken, appended, durable, bytes, now);
    }

    /// Acknowledges the writes of a committed batch (or holds them, sync) and answers its
    /// bookmark.
    fn release(&mut self, mut taken: Taken, appended: Appended, durable: Seq, bytes: u64, now: u64) {
        let shared = &self.shared;
        // The lease ran out while the batch was committed: no acknowledgement (the fence).
        let status = if shared.ownership.may_ack() { WriteAck::OK } else { WriteAck::EIO };
        let acks = self.batch.drain(..).zip(appended.seqs).map(|(w, seq)| (w.ack, WriteAck { req_id: w.req_id, seq, status })).collect();
        shared.policy.committed(acks, durable, bytes, now);
        if let (Some(b), Some(seq)) = (taken.bookmark.take(), appended.bookmark_seq) {
            log::info!("group {}: bookmark {:?} placed at seq {seq}", shared.name, b.name);
            if b.hold {
                // Before the answer: whoever hears of the bookmark may count on nothing after it.
                shared.handed_over.store(true, Ordering::Relaxed);
                log::warn!(
                    "group {}: handed over after bookmark {:?} (seq {seq}) for a planned failover: no more writes are numbered or \
                     acknowledged; they wait until the engine is restarted",
                    shared.name,
                    b.name
                );
            }
            // A bookmark ends an async interval as a point does.
            self.open = None;
            b.answer(Ok((seq, now)), &shared.name);
        }
        if let (Some(r), Some(seq)) = (taken.resync_done.take(), appended.resync_point) {
            log::info!("group {}: resync of volume(s) {} complete at seq {seq}", shared.name, join_names(&r.volumes));
            // The shipper ends an async delta at any point.
            self.open = None;
        }
    }

    /// The journal failed: the group is poisoned and everything taken fails (barriers say
    /// why when they drop).
    fn poison(&mut self, mut taken: Taken, e: JournalError) {
        let shared = &self.shared;
        log::error!(
            "group {}: the journal failed and the group is stopped: {e}. Writes are refused until the cause is fixed and the engine restarted",
            shared.name
        );
        shared.poisoned.store(true, Ordering::Relaxed);
        fail_all(&mut self.batch);
        if let Some(b) = taken.bookmark.take() {
            b.answer(Err(GroupError::Journal { group: shared.name.clone(), source: e }), &shared.name);
        }
    }
}

/// What the journal task promises of a record it is about to append after `last_seq`
/// (checked in debug builds): its number follows every earlier record's, and its time is not
/// before theirs, so that the records received at or before any time are a prefix.
fn check_order(journal: &Journal, last_seq: Seq, h: &RecordHeader, group: &str) {
    debug_assert!(h.seq > last_seq, "group {group}: seq {} numbered after seq {last_seq}", h.seq);
    debug_assert!(
        h.time_ns >= journal.last_time_ns(),
        "group {group}: seq {} at time {} is before the last record's time {}",
        h.seq,
        h.time_ns,
        journal.last_time_ns()
    );
}

/// Appends and commits an interval point record; returns its sequence number and the new
/// durable sequence number.
fn place_point(journal: &mut Journal, first: Seq, time_ns: u64) -> Result<(Seq, Seq), JournalError> {
    let seq = journal.next_seq();
    let h = RecordHeader { seq, time_ns, kind: WriteKind::Point, offset: 0, length: 8 };
    journal.append(&h, INTERVAL_POINT_NAME, &first.to_le_bytes())?;
    Ok((seq, journal.commit()?))
}

fn join_names(names: &[Arc<str>]) -> String {
    names.iter().map(|n| &**n).collect::<Vec<_>>().join(", ")
}

fn fail_all(batch: &mut Vec<WriteRequest>) {
    refuse_all(batch, WriteAck::EIO);
}

fn refuse_all(batch: &mut Vec<WriteRequest>, status: u32) {
    send_acks(batch.drain(..).map(|w| (w.ack, WriteAck { req_id: w.req_id, seq: 0, status })));
}

/// Deletes the journal segments the target has confirmed.
fn trim_confirmed(journal: &mut Journal, shared: &GroupShared, trimmed_through: &mut Seq) {
    let confirmed = shared.confirmed.load(Ordering::Acquire);
    if confirmed > *trimmed_through {
        trim(journal, shared, confirmed);
        *trimmed_through = confirmed;
    }
    // Everything confirmed, and still over the size at which a paused group takes writes
    // again: the active segment alone holds it there (written with a larger segment_size, or
    // before a restart with a smaller journal_size), and nothing appended will ever roll it.
    // Seal it, so that it can go.
    let over = shared.journal.max().is_some_and(|max| journal.size_bytes() > max / 4 * 3);
    if over && confirmed >= journal.durable_seq() {
        match journal.seal_active() {
            Ok(true) => {
                log::info!(
                    "group {}: the target holds everything in the engine's journal, whose active segment alone keeps it \
                     over 3/4 of journal_size: sealing it to remove it",
                    shared.name
                );
                trim(journal, shared, confirmed);
            }
            Ok(false) => {}
            Err(e) => log::warn!("group {}: cannot seal the journal's active segment: {e}", shared.name),
        }
    }
}

fn trim(journal: &mut Journal, shared: &GroupShared, confirmed: Seq) {
    match journal.trim_through(confirmed) {
        Ok(n) if n > 0 => log::debug!("group {}: removed {n} journal segments confirmed by the target", shared.name),
        Ok(_) => {}
        Err(e) => log::warn!("group {}: cannot trim the journal: {e}", shared.name),
    }
}
