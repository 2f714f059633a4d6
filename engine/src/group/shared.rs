//! What a group's shipper and status requests share with its journal task: the durable and
//! confirmed sequence numbers, the poisoned and stopping flags, the policy, the link's counts and
//! the journal watch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use hindsight_consistency::config::GroupConfig;
use hindsight_consistency::record::Seq;
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::Waker;

use crate::journal_watch::JournalWatch;
use crate::policy::Policy;

/// A journal restart asked for: the next seq, the volumes whose takeover resync it opens
/// (none for a sync group), and where its outcome goes.
pub(super) type RestartRequest = (Seq, Vec<String>, crossbeam_channel::Sender<Result<(), String>>);

/// An agent session told how far the target holds the group (docs/ha.md, "Takeover").
struct Watcher {
    out: crate::acks::AckTo,
    /// The session's disk numbers of the group.
    disks: Vec<u16>,
    /// The confirmed seq last told.
    told: Seq,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watcher(disks {:?}, told {})", self.disks, self.told)
    }
}

/// How often, at most, sessions are told of the target's confirmations while writes flow.
const CONFIRM_NOTICE_EVERY: Duration = Duration::from_millis(20);

/// What the shipper and the status of a group share with its journal task.
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
    /// Set to stop the group's tasks.
    pub stopping: AtomicBool,
    /// Runs the group's shipper task: woken at each commit.
    pub shipper: OnceLock<Waker>,
    /// Mode, held sync acknowledgements, lag and RPO.
    pub policy: Policy,
    /// What the link to the target carries.
    pub link: LinkStats,
    /// What each volume's agents wrote.
    pub writes: WriteStats,
    /// What a full journal does to the group.
    pub journal: JournalWatch,
    /// Set after the bookmark of a planned failover: the group numbers no more writes.
    pub handed_over: AtomicBool,
    /// Why the target last refused the group (a failover there), `""` once it accepts it.
    pub target_refused: Mutex<String>,
    /// Whether this engine owns the group (always, without `[cluster]`).
    pub ownership: crate::cluster::ownership::Ownership,
    /// A journal restart asked for by the shipper of a new claim: the next seq and where the
    /// outcome goes ([`GroupShared::restart_journal`]).
    restart: Mutex<Option<RestartRequest>>,
    /// The agent sessions of the group, told of the target's confirmations.
    watchers: Mutex<Vec<Watcher>>,
    /// When they were last told.
    last_notice: Mutex<Option<std::time::Instant>>,
    /// Volumes of a takeover resync not yet done (docs/ha.md, "Takeover"): their agents resync
    /// whatever they still have marked.
    takeover: Mutex<std::collections::BTreeSet<String>>,
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

/// The writes journaled for each volume since the engine started (for the metrics).
#[derive(Debug, Default)]
pub struct WriteStats {
    volumes: Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

impl WriteStats {
    /// Adds a batch's writes: (volume, writes, bytes covered).
    pub(crate) fn add(&self, batch: &[(&str, u64, u64)]) {
        let mut volumes = lock(&self.volumes);
        for &(volume, writes, bytes) in batch {
            let v = match volumes.get_mut(volume) {
                Some(v) => v,
                None => volumes.entry(volume.to_owned()).or_default(),
            };
            v.0 += writes;
            v.1 += bytes;
        }
    }

    /// Writes and bytes of a volume so far.
    pub fn of(&self, volume: &str) -> (u64, u64) {
        lock(&self.volumes).get(volume).copied().unwrap_or_default()
    }
}

impl GroupShared {
    pub(super) fn new(config: &GroupConfig, durable: Seq, last_time_ns: u64) -> GroupShared {
        GroupShared {
            name: config.name.clone(),
            durable: Mutex::new(durable),
            durable_changed: Condvar::new(),
            confirmed: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            shipper: OnceLock::new(),
            policy: Policy::new(config, durable, last_time_ns),
            link: LinkStats::default(),
            writes: WriteStats::default(),
            journal: JournalWatch::new(&config.name, config.on_journal_full, config.journal_size),
            handed_over: AtomicBool::new(false),
            target_refused: Mutex::new(String::new()),
            ownership: crate::cluster::ownership::Ownership::default(),
            restart: Mutex::new(None),
            watchers: Mutex::new(Vec::new()),
            last_notice: Mutex::new(None),
            takeover: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// The target confirmed everything through `seq`: trims what the lag counts, releases the
    /// sync acknowledgements it covers.
    pub fn confirm(&self, seq: Seq) {
        self.confirmed.fetch_max(seq, Ordering::AcqRel);
        self.policy.confirmed(seq, self.durable());
        self.journal.target_confirmed(seq);
        self.notify_confirmed(false);
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

    pub(super) fn publish_durable(&self, seq: Seq) {
        {
            let mut durable = lock(&self.durable);
            debug_assert!(seq >= *durable, "group {}: the durable seq went back from {} to {seq}", self.name, *durable);
            *durable = seq;
        }
        self.durable_changed.notify_all();
        self.wake_shipper();
    }

    /// Asks the journal task (woken by `wake`) to start the journal again at `next`, and waits
    /// up to `timeout` for it: a claimed group continues the target's sequence (docs/ha.md,
    /// "Takeover"). The group takes no writes meanwhile (it is not serving).
    pub fn restart_journal(&self, next: Seq, resync: Vec<String>, wake: impl FnOnce(), timeout: Duration) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *lock(&self.restart) = Some((next, resync, tx));
        wake();
        rx.recv_timeout(timeout).unwrap_or_else(|_| Err(format!("the journal task did not start the journal again within {timeout:?}")))
    }

    /// The restart asked for, if any (taken by the journal task).
    pub(super) fn take_restart(&self) -> Option<RestartRequest> {
        lock(&self.restart).take()
    }

    /// After a journal restart at `next`: everything before it counts as durable here and
    /// confirmed at the target (the target holds it).
    pub(super) fn restarted(&self, next: Seq) {
        *lock(&self.durable) = next - 1;
        self.confirmed.store(next - 1, Ordering::Release);
        self.policy.restarted(next - 1);
        self.durable_changed.notify_all();
    }

    /// An agent session with `disks` (its disk numbers of this group) is told of the target's
    /// confirmations from now on.
    pub fn watch(&self, out: crate::acks::AckTo, disks: Vec<u16>) {
        lock(&self.watchers).push(Watcher { out, disks, told: 0 });
        self.notify_confirmed(true);
    }

    /// Tells the sessions how far the target holds the group, at most every
    /// [`CONFIRM_NOTICE_EVERY`] unless `now`; sessions that have gone are forgotten.
    pub fn notify_confirmed(&self, now: bool) {
        {
            let mut last = lock(&self.last_notice);
            if !now && last.is_some_and(|t| t.elapsed() < CONFIRM_NOTICE_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let seq = self.confirmed.load(Ordering::Acquire);
        lock(&self.watchers).retain_mut(|w| {
            if seq <= w.told {
                return true;
            }
            w.told = seq;
            let msg = hindsight_consistency::wire::TargetConfirmedMsg { disks: w.disks.clone(), seq };
            w.out.frame(hindsight_consistency::wire::FrameType::TargetConfirmed, hindsight_consistency::wire::encode_message(&msg))
        });
    }

    /// Whether `volume`'s takeover resync is not done.
    pub fn takeover_pending(&self, volume: &str) -> bool {
        lock(&self.takeover).contains(volume)
    }

    /// Whether any volume's takeover resync is not done.
    pub fn takeover_any(&self) -> bool {
        !lock(&self.takeover).is_empty()
    }

    pub(super) fn takeover_started(&self, volumes: &[String]) {
        lock(&self.takeover).extend(volumes.iter().cloned());
    }

    pub(super) fn takeover_done(&self, volumes: &[std::sync::Arc<str>]) {
        let mut t = lock(&self.takeover);
        for v in volumes {
            t.remove(&**v);
        }
    }

    /// Wakes the group's shipper task (set once it is started).
    pub fn wake_shipper(&self) {
        if let Some(w) = self.shipper.get() {
            w.wake();
        }
    }
}
