//! One consistency group: its sequencer and journal, run by one thread.
//!
//! Writes of every agent of the group arrive on one channel. The journal thread takes what is
//! queued, gives each write the next sequence number in arrival order and a timestamp,
//! appends the batch to the journal and commits it with one fdatasync (group commit), and only
//! then acknowledges each write to its agent. A write sent after another was acknowledged is
//! therefore always queued after it and gets a later number: every prefix of the sequence is a
//! crash-consistent image of all the group's volumes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hindsight_consistency::config::{GroupConfig, ReplicationMode};
use hindsight_consistency::journal::{Journal, JournalError};
use hindsight_consistency::record::{RecordHeader, Seq, WriteKind};
pub use hindsight_consistency::record::{INTERVAL_POINT_NAME, RESYNC_POINT_NAME};
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::now_ns;
use hindsight_consistency::wire::WriteAck;

use crate::acks::{send_acks, Acks};
use crate::error::GroupError;
use crate::journal_watch::{Action, JournalWatch};
use crate::policy::Policy;
use crate::resync::{ResyncOutcome, Resyncs};

/// How often a journal thread holding writes (`block`) looks for room.
const HOLD_WAKE: Duration = Duration::from_millis(20);
/// Most bytes put into one commit.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How often an idle journal thread wakes to trim confirmed segments and check for shutdown.
const IDLE_WAKE: Duration = Duration::from_millis(200);

/// One write on its way into the journal.
pub struct WriteRequest {
    /// Agent's id for the write.
    pub req_id: u64,
    /// Volume name.
    pub volume: Arc<str>,
    /// What it does.
    pub kind: WriteKind,
    /// Byte offset.
    pub offset: u64,
    /// Bytes covered.
    pub length: u32,
    /// The frame payload holding the data at `data_at..` (moved, not copied, from the socket
    /// buffer).
    pub payload: Vec<u8>,
    /// Where the data starts in `payload`.
    pub data_at: usize,
    /// Where the acknowledgement goes.
    pub ack: Sender<Acks>,
}

/// What a group's journal thread takes from its channel.
pub enum GroupItem {
    /// A guest write.
    Write(WriteRequest),
    /// A bookmark to place.
    Bookmark(BookmarkPlacement),
    /// An agent re-sent every dirty region of these volumes of the group.
    ResyncDone(ResyncDone),
    /// Answered with the durable sequence number once everything queued before it is
    /// committed (a hash request's `through_seq`).
    Barrier(Barrier),
}

/// Passes the durable sequence number that covers everything queued before it, once; if the
/// group drops it uncommitted (stopped, shutting down), passes why instead.
pub struct Barrier(Option<BarrierThen>);

/// What a barrier runs: the durable sequence number, or why there is none.
type BarrierThen = Box<dyn FnOnce(Result<Seq, GroupError>) + Send>;

impl Barrier {
    /// A barrier that runs `then`.
    pub fn new(then: impl FnOnce(Result<Seq, GroupError>) + Send + 'static) -> Barrier {
        Barrier(Some(Box::new(then)))
    }

    fn pass(mut self, durable: Seq) {
        if let Some(then) = self.0.take() {
            then(Ok(durable));
        }
    }
}

impl Drop for Barrier {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then(Err(GroupError::Stopped));
        }
    }
}

/// The end of the resync of some volumes of a group, on its way to the journal thread behind
/// every resync write of the same agent connection.
pub struct ResyncDone {
    /// The volumes whose resync completed.
    pub volumes: Vec<Arc<str>>,
}

/// A bookmark on its way into a group's journal.
pub struct BookmarkPlacement {
    /// The bookmark's name.
    pub name: String,
    /// Its record data (an encoded [`hindsight_consistency::BookmarkBody`]).
    pub body: Vec<u8>,
    /// Counted down by every group of the request once its bookmark is durable; the journal
    /// thread takes nothing numbered after its bookmark until it reaches zero.
    pub latch: Arc<Latch>,
    /// Where the group's bookmark sequence number and time (or an error) go.
    pub reply: Sender<Result<(Seq, u64), GroupError>>,
}

impl BookmarkPlacement {
    /// Answers the request, then waits for the other groups of it: nothing after the bookmark
    /// is numbered before every group has placed (or failed to place) its own.
    fn answer(self, result: Result<(Seq, u64), GroupError>, group: &str) {
        let _ = self.reply.send(result);
        self.latch.arrive_and_wait(group);
    }
}

/// A countdown the groups of one bookmark request wait on together.
pub struct Latch {
    left: Mutex<usize>,
    zero: Condvar,
}

/// How long a group waits for the other groups of a bookmark request.
const LATCH_WAIT: Duration = Duration::from_secs(10);

impl Latch {
    /// A latch for `n` groups.
    pub fn new(n: usize) -> Latch {
        Latch { left: Mutex::new(n), zero: Condvar::new() }
    }

    /// Counts one group down and waits (bounded) for the others.
    fn arrive_and_wait(&self, group: &str) {
        let mut left = lock(&self.left);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.zero.notify_all();
            return;
        }
        let (left, timeout) = self.zero.wait_timeout_while(left, LATCH_WAIT, |l| *l > 0).unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() {
            log::warn!("group {group}: {} other group(s) did not place their bookmark within {LATCH_WAIT:?}; going on", *left);
        }
    }
}

/// What the shipper and the status of a group share with its journal thread.
#[derive(Debug)]
pub struct GroupShared {
    /// Group name.
    pub name: String,
    /// Everything up to here is durable in the engine's journal.
    durable: Mutex<Seq>,
    durable_changed: Condvar,
    /// Everything up to here is durable at the target.
    pub confirmed: AtomicU64,
    /// Set when the journal failed: the group takes no more writes.
    pub poisoned: AtomicBool,
    /// Set to stop the group's threads.
    pub stopping: AtomicBool,
    /// Mode, held sync acknowledgements, lag and RPO.
    pub policy: Policy,
    /// What the link to the target carries.
    pub link: LinkStats,
    /// What a full journal does to the group.
    pub journal: JournalWatch,
}

/// Bytes shipped to the target: the records, and what went on the wire for them.
#[derive(Debug, Default)]
pub struct LinkStats {
    compression: Mutex<&'static str>,
    /// Record bytes shipped.
    pub records: AtomicU64,
    /// Frame bytes sent for them (after compression).
    pub wire: AtomicU64,
}

impl LinkStats {
    pub(crate) fn set_compression(&self, name: &'static str) {
        *lock(&self.compression) = name;
    }

    /// The compression of the current (or last) connection, `""` for none.
    pub fn compression(&self) -> &'static str {
        *lock(&self.compression)
    }

    pub(crate) fn count(&self, records: usize, wire: usize) {
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.wire.fetch_add(wire as u64, Ordering::Relaxed);
    }
}

impl GroupShared {
    fn new(config: &GroupConfig, durable: Seq, last_time_ns: u64) -> GroupShared {
        GroupShared {
            name: config.name.clone(),
            durable: Mutex::new(durable),
            durable_changed: Condvar::new(),
            confirmed: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            policy: Policy::new(config, durable, last_time_ns),
            link: LinkStats::default(),
            journal: JournalWatch::new(&config.name, config.on_journal_full, config.journal_size),
        }
    }

    /// The target confirmed everything through `seq`: trims what the lag counts, releases the
    /// sync acknowledgements it covers.
    pub fn confirm(&self, seq: Seq) {
        self.confirmed.fetch_max(seq, Ordering::AcqRel);
        self.policy.confirmed(seq, self.durable());
        self.journal.target_confirmed(seq);
    }

    /// The last durable sequence number.
    pub fn durable(&self) -> Seq {
        *lock(&self.durable)
    }

    /// Waits until the durable sequence number exceeds `seen`, or `timeout` passes.
    pub fn wait_durable_after(&self, seen: Seq, timeout: Duration) -> Seq {
        let g = lock(&self.durable);
        let (g, _) = self.durable_changed.wait_timeout_while(g, timeout, |d| *d <= seen).unwrap_or_else(PoisonError::into_inner);
        *g
    }

    fn publish_durable(&self, seq: Seq) {
        {
            let mut durable = lock(&self.durable);
            debug_assert!(seq >= *durable, "group {}: the durable seq went back from {} to {seq}", self.name, *durable);
            *durable = seq;
        }
        self.durable_changed.notify_all();
    }
}

/// A running group: the sender into its journal thread and the shared state.
#[derive(Clone)]
pub struct GroupHandle {
    /// The configuration.
    pub config: Arc<GroupConfig>,
    /// Shared state.
    pub shared: Arc<GroupShared>,
    /// Into the journal thread.
    pub tx: Sender<GroupItem>,
}

/// Starts the journal thread of a group over an opened journal.
pub fn start(config: GroupConfig, journal: Journal) -> std::io::Result<(GroupHandle, std::thread::JoinHandle<()>)> {
    let shared = Arc::new(GroupShared::new(&config, journal.durable_seq(), journal.last_time_ns()));
    // Bounded: a stalled disk pushes back on the agents instead of growing memory.
    let (tx, rx) = crossbeam_channel::bounded(4096);
    let s = shared.clone();
    let interval = config.interval;
    let join =
        std::thread::Builder::new().name(format!("journal-{}", config.name)).spawn(move || journal_loop(journal, rx, s, interval))?;
    Ok((GroupHandle { config: Arc::new(config), shared, tx }, join))
}

/// The async interval being filled: when it started and its first sequence number.
struct OpenInterval {
    since: Instant,
    first: Seq,
}

/// The journal thread: each round places a due interval point, then takes a batch, numbers,
/// appends and commits it, and answers everything in it.
fn journal_loop(journal: Journal, rx: Receiver<GroupItem>, shared: Arc<GroupShared>, interval: Duration) {
    let mut t = JournalThread::new(journal, rx, shared, interval);
    loop {
        t.interval_point();
        let action = t.shared.journal.update(t.journal.size_bytes());
        if action == Action::Hold {
            if t.hold() == Run::Stop {
                return;
            }
            continue;
        }
        let first = match t.wait() {
            Woken::Item(first) => first,
            Woken::Idle => continue,
            Woken::Stop => return,
        };
        t.open_interval();
        let mut taken = t.take_batch(first);
        if action == Action::Refuse {
            t.refuse(&mut taken);
            if taken.resync_done.is_none() {
                continue;
            }
        }
        if t.shared.poisoned.load(Ordering::Relaxed) {
            t.fail(taken);
            continue;
        }
        let now = t.stamp();
        match t.append(&taken, now).and_then(|appended| Ok((appended, t.journal.commit()?))) {
            Ok((appended, durable)) => t.acknowledge(taken, appended, durable, now),
            Err(e) => t.poison(taken, e),
        }
    }
}

/// Whether the journal thread goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    On,
    Stop,
}

/// What the journal thread woke up to.
enum Woken {
    /// The first item of a batch.
    Item(GroupItem),
    /// Nothing queued: the idle wake.
    Idle,
    /// The group stops (shutting down, or every sender gone).
    Stop,
}

/// What a batch took from the channel besides its writes (those are in
/// [`JournalThread::batch`]).
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

/// The state the journal thread keeps from one batch to the next.
struct JournalThread {
    journal: Journal,
    rx: Receiver<GroupItem>,
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
}

impl JournalThread {
    /// The thread's state over an opened journal.
    fn new(journal: Journal, rx: Receiver<GroupItem>, shared: Arc<GroupShared>, interval: Duration) -> JournalThread {
        let last_time = journal.last_time_ns();
        let last_seq = journal.durable_seq();
        // A journal tail written before a restart gets its interval point too.
        let open = (journal.durable_seq() > 0).then(|| OpenInterval { since: Instant::now(), first: journal.durable_seq() });
        JournalThread {
            journal,
            rx,
            shared,
            interval,
            batch: Vec::with_capacity(256),
            last_time,
            last_seq,
            trimmed_through: 0,
            resyncs: Resyncs::default(),
            open,
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

    /// `block` with a full journal: takes nothing for a while, until the target confirms and
    /// segments go.
    fn hold(&mut self) -> Run {
        std::thread::sleep(HOLD_WAKE);
        self.housekeeping()
    }

    /// Waits (at most [`IDLE_WAKE`]) for the first item of the next batch, then does the
    /// housekeeping.
    fn wait(&mut self) -> Woken {
        let first = match self.rx.recv_timeout(IDLE_WAKE) {
            Ok(w) => Some(w),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Woken::Stop,
        };
        if self.housekeeping() == Run::Stop {
            return Woken::Stop;
        }
        first.map_or(Woken::Idle, Woken::Item)
    }

    /// Between batches: stops if the group is stopping, else runs the policy's periodic checks
    /// and deletes the segments the target confirmed.
    fn housekeeping(&mut self) -> Run {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Run::Stop;
        }
        self.shared.policy.tick();
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
        }
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

    /// The batch is durable through `durable`: passes the barriers, publishes `durable`,
    /// regulates, acknowledges the writes (or holds them, sync) and answers the bookmark.
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
            std::thread::sleep(delay);
        }
        let acks = self
            .batch
            .drain(..)
            .zip(appended.seqs)
            .map(|(w, seq)| (w.ack, WriteAck { req_id: w.req_id, seq, status: WriteAck::OK }))
            .collect();
        shared.policy.committed(acks, durable, bytes, now, shared.confirmed.load(Ordering::Acquire));
        if let (Some(b), Some(seq)) = (taken.bookmark.take(), appended.bookmark_seq) {
            log::info!("group {}: bookmark {:?} placed at seq {seq}", shared.name, b.name);
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

/// What the journal thread promises of a record it is about to append after `last_seq`
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
        match journal.trim_through(confirmed) {
            Ok(n) if n > 0 => log::debug!("group {}: removed {n} journal segments confirmed by the target", shared.name),
            Ok(_) => {}
            Err(e) => log::warn!("group {}: cannot trim the journal: {e}", shared.name),
        }
        *trimmed_through = confirmed;
    }
}
