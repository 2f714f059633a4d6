//! A group's replication policy at run time: its mode (and the mode in force when a sync
//! group has degraded), the acknowledgements sync mode holds back until the target confirms,
//! the lag to the target, and the RPO watch.
//!
//! - **cdp**: the journal task acknowledges a write once the engine's journal holds it.
//! - **sync**: after the engine's commit, acknowledgements are *held* here, in sequence
//!   order, and released by the shipper's confirmation reader once the target's journal holds
//!   them. If the target is away or slow (`on_sync_loss`): `block` keeps the guest waiting up
//!   to `sync_timeout`, then degrades; `degrade` degrades at once when the connection is lost,
//!   or after `sync_timeout`. Degrading releases every held acknowledgement (each is durable in
//!   the engine's journal: the cdp promise) and runs as cdp until the target has confirmed
//!   everything, then returns to sync.
//!
//! The lag is kept per commit (last sequence number, bytes so far, engine time), trimmed as the
//! target confirms, so status can say how many records, bytes and seconds the target lacks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hindsight_consistency::config::{GroupConfig, ReplicationMode, SyncLoss};
use hindsight_consistency::record::Seq;
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::now_ns;
use hindsight_consistency::wire::WriteAck;

use crate::acks::{send_acks, AckTo};

/// Longest pause put before one commit's acknowledgements when regulating.
const MAX_REGULATION_DELAY: Duration = Duration::from_secs(1);
/// The shortest span over which the rate the target confirms at is measured.
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Pause when regulating before the link's rate is known.
const FIRST_REGULATION_DELAY: Duration = Duration::from_millis(100);

/// One acknowledgement held until the target confirms its write.
struct Held {
    seq: Seq,
    since: Instant,
    to: AckTo,
    ack: WriteAck,
}

/// Mode and watch state.
#[derive(Debug)]
struct State {
    mode: ReplicationMode,
    effective: ReplicationMode,
    reason: String,
    on_sync_loss: SyncLoss,
    sync_timeout: Duration,
    rpo: Option<Duration>,
    regulate: bool,
    rpo_alert: bool,
    regulating: bool,
}

/// Commits the target has not confirmed yet.
#[derive(Debug, Default)]
struct LagBook {
    /// (last sequence number of the commit, data bytes committed so far, engine time).
    commits: VecDeque<(Seq, u64, u64)>,
    committed_bytes: u64,
    confirmed_bytes: u64,
    committed_seq: Seq,
    confirmed_seq: Seq,
    /// Engine time of the newest commit the target confirmed (0: none since start).
    confirmed_time_ns: u64,
    /// Bytes per second the target confirms (moving average), 0 until measured.
    rate: f64,
    /// When the last confirmation that moved the bytes came, and the bytes confirmed then.
    last_confirm: Option<(Instant, u64)>,
}

/// The lag of the target behind the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Records not yet confirmed.
    pub writes: u64,
    /// Data bytes not yet confirmed.
    pub bytes: u64,
    /// Age of the oldest unconfirmed record.
    pub age: Duration,
    /// Engine time of the newest write the target confirmed (0: none since the engine
    /// started).
    pub confirmed_time_ns: u64,
}

/// What status shows of the policy.
#[derive(Debug, Clone)]
pub struct PolicyStatus {
    pub mode: ReplicationMode,
    pub effective: ReplicationMode,
    pub reason: String,
    pub on_sync_loss: SyncLoss,
    pub rpo: Option<Duration>,
    pub rpo_ok: bool,
    pub regulating: bool,
    pub target_connected: bool,
}

/// A group's policy, shared by its journal task, its shipper and status requests.
#[derive(Debug)]
pub struct Policy {
    group: String,
    state: Mutex<State>,
    held: Mutex<VecDeque<Held>>,
    lag: Mutex<LagBook>,
    connected: AtomicBool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held(seq {})", self.seq)
    }
}

impl Policy {
    /// The policy of a group whose journal ends at `durable` (written at `last_time_ns`).
    pub fn new(config: &GroupConfig, durable: Seq, last_time_ns: u64) -> Policy {
        let mut lag = LagBook { committed_seq: durable, ..LagBook::default() };
        if durable > 0 {
            // Until the target says what it holds, assume it lacks the journal's tail.
            lag.commits.push_back((durable, 0, last_time_ns));
        }
        Policy {
            group: config.name.clone(),
            state: Mutex::new(State {
                mode: config.mode,
                effective: config.mode,
                reason: String::new(),
                on_sync_loss: config.on_sync_loss,
                sync_timeout: config.sync_timeout,
                rpo: config.rpo,
                regulate: config.regulate,
                rpo_alert: false,
                regulating: false,
            }),
            held: Mutex::new(VecDeque::new()),
            lag: Mutex::new(lag),
            connected: AtomicBool::new(false),
        }
    }

    /// The mode in force.
    pub fn effective(&self) -> ReplicationMode {
        lock(&self.state).effective
    }

    /// After a commit whose last record is `last_seq`, with `bytes` of data, at `time_ns`:
    /// records it for the lag, then sends the acknowledgements (cdp) or holds them until the
    /// target confirms (sync).
    ///
    /// The target may confirm the commit before this runs (the shipper sends it as soon as
    /// it is durable), so what the target holds is read under the locks [`Policy::confirmed`]
    /// updates it under, never before them: a confirmation read earlier could be older than
    /// one that then found nothing held to release, and the acknowledgements would wait for
    /// the next confirmation (a whole write later, or `sync_timeout` if none comes).
    pub fn committed(&self, acks: Vec<(AckTo, WriteAck)>, last_seq: Seq, bytes: u64, time_ns: u64) {
        {
            let mut lag = lock(&self.lag);
            lag.committed_bytes += bytes;
            lag.committed_seq = lag.committed_seq.max(last_seq);
            let total = lag.committed_bytes;
            if last_seq > lag.confirmed_seq {
                lag.commits.push_back((last_seq, total, time_ns));
            } else {
                lag.confirmed_bytes = total;
                lag.confirmed_time_ns = time_ns;
            }
        }
        if self.effective() != ReplicationMode::Sync {
            send_acks(acks);
            return;
        }
        let now = Instant::now();
        let mut held = lock(&self.held);
        held.extend(acks.into_iter().map(|(to, ack)| Held { seq: ack.seq, since: now, to, ack }));
        // `confirmed` records the seq in the lag book before it takes `held` to release: read
        // under `held`, the seq is at least that of every confirmation whose release has
        // already run (lock order: `held`, then `lag`; `confirmed` never holds both).
        let confirmed = lock(&self.lag).confirmed_seq;
        release_through(&mut held, confirmed);
    }

    /// The target confirmed everything through `seq`; the engine holds through `durable`.
    pub fn confirmed(&self, seq: Seq, durable: Seq) {
        {
            let mut lag = lock(&self.lag);
            lag.confirmed_seq = lag.confirmed_seq.max(seq);
            while lag.commits.front().is_some_and(|&(s, _, _)| s <= seq) {
                let (_, total, time_ns) = lag.commits.pop_front().expect("front exists");
                lag.confirmed_bytes = total;
                lag.confirmed_time_ns = time_ns;
            }
            let now = Instant::now();
            match lag.last_confirm {
                // Over at least RATE_WINDOW: confirmations read one right after the other
                // (a burst after a pause) would otherwise count as a link far faster than it is.
                Some((at, bytes)) if lag.confirmed_bytes > bytes && now.duration_since(at) >= RATE_WINDOW => {
                    let secs = now.duration_since(at).as_secs_f64();
                    let rate = (lag.confirmed_bytes - bytes) as f64 / secs;
                    lag.rate = if lag.rate == 0.0 { rate } else { 0.7 * lag.rate + 0.3 * rate };
                    lag.last_confirm = Some((now, lag.confirmed_bytes));
                }
                Some(_) => {}
                None => lag.last_confirm = Some((now, lag.confirmed_bytes)),
            }
        }
        release_through(&mut lock(&self.held), seq);
        let mut st = lock(&self.state);
        if st.mode == ReplicationMode::Sync
            && st.effective != ReplicationMode::Sync
            && seq >= durable
            && self.connected.load(Ordering::Acquire)
        {
            st.effective = ReplicationMode::Sync;
            st.reason = format!("back to sync: the target caught up at seq {seq}");
            log::info!("group {}: {}", self.group, st.reason);
        }
    }

    /// The journal started again after `seq`, the target's durable seq, for a new claim of the
    /// group (docs/ha.md, "Takeover"): what an earlier ownership committed and had not had
    /// confirmed is no lag (the target holds everything through `seq`), and sync
    /// acknowledgements still held for it fail (their sessions are gone; their agents send
    /// those writes again), so that neither the lag, the RPO alert nor sync_timeout sees them.
    pub fn restarted(&self, seq: Seq) {
        {
            let mut lag = lock(&self.lag);
            lag.commits.clear();
            lag.committed_seq = seq;
            lag.confirmed_seq = seq;
            lag.confirmed_bytes = lag.committed_bytes;
        }
        let stale: Vec<Held> = lock(&self.held).drain(..).collect();
        send_acks(stale.into_iter().map(|h| (h.to, WriteAck { status: WriteAck::EIO, seq: 0, ..h.ack })));
    }

    /// The shipper's connection ended because this engine no longer owns the group (docs/ha.md):
    /// not a loss of the target, so nothing degrades; the next owner's claim starts afresh.
    pub fn target_left(&self) {
        self.connected.store(false, Ordering::Release);
    }

    /// The shipper's connection to the target came up or went down.
    pub fn target_connected(&self, up: bool) {
        let was = self.connected.swap(up, Ordering::AcqRel);
        if was && !up {
            let mut st = lock(&self.state);
            if st.effective == ReplicationMode::Sync && st.on_sync_loss == SyncLoss::Degrade {
                self.degrade(&mut st, "the connection to the target was lost (on_sync_loss = \"degrade\")".to_string());
            }
        }
    }

    /// Periodic checks (the journal task calls this at least every few hundred ms): a sync
    /// write held past `sync_timeout` degrades the group; the RPO alert turns on or off.
    pub fn tick(&self) {
        let oldest = lock(&self.held).front().map(|h| h.since.elapsed());
        let lag = self.lag();
        let mut st = lock(&self.state);
        if let Some(waited) = oldest {
            if st.effective == ReplicationMode::Sync && waited > st.sync_timeout {
                let why = format!(
                    "the target did not confirm a write within sync_timeout ({:?}, on_sync_loss = \"{}\")",
                    st.sync_timeout,
                    st.on_sync_loss.as_str()
                );
                self.degrade(&mut st, why);
            }
        }
        if let Some(rpo) = st.rpo {
            let over = lag.age > rpo;
            if over && !st.rpo_alert {
                log::warn!(
                    "group {}: RPO {rpo:?} exceeded: the target lags {:.1}s ({} records, {} bytes)",
                    self.group,
                    lag.age.as_secs_f64(),
                    lag.writes,
                    lag.bytes
                );
            } else if !over && st.rpo_alert {
                log::info!("group {}: RPO {rpo:?} holds again (lag {:.1}s)", self.group, lag.age.as_secs_f64());
            }
            st.rpo_alert = over;
        }
        // Regulation is decided per commit; once the writes stop, no commit would say that the
        // target has caught up.
        if st.regulating {
            let (behind, _) = self.behind();
            let still = self.regulates(&st, behind);
            self.set_regulating(&mut st, still, behind);
        }
    }

    /// Switches to cdp and releases every held acknowledgement. Called with the state locked.
    fn degrade(&self, st: &mut State, why: String) {
        st.effective = ReplicationMode::Cdp;
        st.reason = format!("degraded to cdp: {why}");
        log::warn!(
            "group {}: {}; writes are acknowledged once the engine holds them until the target has caught up",
            self.group,
            st.reason
        );
        release_through(&mut lock(&self.held), Seq::MAX);
    }

    /// Sets the mode on the running group. Returns the previous mode.
    pub fn set_mode(&self, mode: ReplicationMode) -> ReplicationMode {
        let mut st = lock(&self.state);
        let previous = st.mode;
        st.mode = mode;
        st.effective = mode;
        st.reason = format!("set to {} by an operator (was {})", mode.as_str(), previous.as_str());
        log::info!("group {}: mode {}", self.group, st.reason);
        if mode != ReplicationMode::Sync {
            release_through(&mut lock(&self.held), Seq::MAX);
        }
        previous
    }

    /// The target's lag.
    pub fn lag(&self) -> Lag {
        let lag = lock(&self.lag);
        Lag {
            writes: lag.committed_seq.saturating_sub(lag.confirmed_seq),
            bytes: lag.committed_bytes.saturating_sub(lag.confirmed_bytes),
            age: lag.commits.front().map_or(Duration::ZERO, |&(_, _, t)| Duration::from_nanos(now_ns().saturating_sub(t))),
            confirmed_time_ns: lag.confirmed_time_ns,
        }
    }

    /// How long to hold the acknowledgements of a commit of `bytes` so that the lag stays
    /// inside the RPO. The lag is the larger of the age of the oldest unconfirmed record and
    /// the time the link needs for the backlog at the rate the target confirms. Below half the
    /// RPO nothing is held; above it each commit waits for the link to carry it (up to 3× its
    /// time as the lag nears and passes the RPO), so the guest writes no faster than the link
    /// drains. Only while the target is connected (a slower guest cannot bring a disconnected
    /// target closer).
    pub fn regulation_delay(&self, bytes: u64) -> Duration {
        let (behind, rate) = self.behind();
        let mut st = lock(&self.state);
        let delay = if !self.regulates(&st, behind) {
            Duration::ZERO
        } else if let Some(rpo) = st.rpo {
            let over = ((behind - rpo / 2).as_secs_f64() / (rpo / 2).as_secs_f64()).min(2.0);
            if rate > 0.0 {
                Duration::from_secs_f64(bytes as f64 / rate * (1.0 + over)).min(MAX_REGULATION_DELAY)
            } else {
                FIRST_REGULATION_DELAY
            }
        } else {
            Duration::ZERO
        };
        self.set_regulating(&mut st, !delay.is_zero(), behind);
        delay
    }

    /// How far the target is behind (the larger of the oldest unconfirmed record's age and the
    /// time the link needs for the backlog), and the rate it confirms at (0 until measured).
    fn behind(&self) -> (Duration, f64) {
        let lag = self.lag();
        let rate = lock(&self.lag).rate;
        let backlog = if rate > 0.0 { Duration::from_secs_f64(lag.bytes as f64 / rate) } else { Duration::ZERO };
        (lag.age.max(backlog), rate)
    }

    /// Whether acknowledgements must be slowed with the target `behind`: past half the RPO,
    /// with regulation on and the target connected.
    fn regulates(&self, st: &State, behind: Duration) -> bool {
        st.rpo.is_some_and(|rpo| st.regulate && self.connected.load(Ordering::Acquire) && behind > rpo / 2)
    }

    /// Records whether acknowledgements are being slowed, and logs each change.
    fn set_regulating(&self, st: &mut State, regulating: bool, behind: Duration) {
        if st.regulating == regulating {
            return;
        }
        st.regulating = regulating;
        if regulating {
            log::warn!(
                "group {}: the target lags {:.1}s: slowing acknowledgements to stay inside the RPO",
                self.group,
                behind.as_secs_f64()
            );
        } else {
            log::info!("group {}: no longer slowing acknowledgements", self.group);
        }
    }

    /// The state for status.
    pub fn status(&self) -> PolicyStatus {
        let st = lock(&self.state);
        PolicyStatus {
            mode: st.mode,
            effective: st.effective,
            reason: st.reason.clone(),
            on_sync_loss: st.on_sync_loss,
            rpo: st.rpo,
            rpo_ok: !st.rpo_alert,
            regulating: st.regulating,
            target_connected: self.connected.load(Ordering::Acquire),
        }
    }
}

/// Sends every held acknowledgement through `seq`, in order.
fn release_through(held: &mut VecDeque<Held>, seq: Seq) {
    let through = held.partition_point(|h| h.seq <= seq);
    send_acks(held.drain(..through).map(|h| (h.to, h.ack)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acks::testing::{next_acks, outbox};
    use hindsight_consistency::config::EngineConfig;

    fn sync_group() -> GroupConfig {
        let text = "[engine]\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"/nonexistent\"\n[tls]\ninsecure_plaintext = true\n\
                    [[group]]\nname = \"erp\"\nmode = \"sync\"\ntarget = \"127.0.0.1:7500\"\n\
                    [[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"1MiB\"\n";
        EngineConfig::from_str(std::path::Path::new("engine.toml"), text).unwrap().groups.remove(0)
    }

    fn ack(seq: Seq) -> WriteAck {
        WriteAck { req_id: seq, seq, status: WriteAck::OK }
    }

    #[test]
    fn sync_ack_committed_after_its_confirmation_is_released_at_once() {
        let p = Policy::new(&sync_group(), 0, 0);
        let (tx, rx) = outbox();
        p.committed(vec![(tx.clone(), ack(1))], 1, 4096, 1);
        p.confirmed(1, 1);
        assert_eq!(next_acks(&rx).unwrap(), vec![ack(1)]);
        // The shipper sends a commit once it is durable: the target's confirmation of seq 2
        // can arrive before the journal task hands the commit's acknowledgements over.
        p.confirmed(2, 2);
        p.committed(vec![(tx, ack(2))], 2, 4096, 2);
        assert_eq!(next_acks(&rx), Some(vec![ack(2)]), "the acknowledgement waits for a confirmation that already came");
        assert_eq!(
            p.lag(),
            Lag { writes: 0, bytes: 0, age: Duration::ZERO, confirmed_time_ns: 2 },
            "a commit confirmed before it was counted still lags"
        );
    }

    #[test]
    fn a_journal_started_again_leaves_no_lag_and_fails_the_sync_acks_it_held() {
        let p = Policy::new(&sync_group(), 0, 0);
        p.target_connected(true);
        let (tx, rx) = outbox();
        // An earlier ownership committed seq 1..=5 and the target confirmed only 3.
        p.committed(vec![(tx.clone(), ack(4)), (tx, ack(5))], 5, 8192, 1);
        p.confirmed(3, 5);
        assert_eq!(p.lag().writes, 2);
        // A new claim starts the journal after the target's seq 3.
        p.restarted(3);
        let failed = next_acks(&rx).unwrap();
        assert!(failed.iter().all(|a| a.status == WriteAck::EIO) && failed.len() == 2, "{failed:?}");
        assert_eq!(p.lag(), Lag { writes: 0, bytes: 0, age: Duration::ZERO, confirmed_time_ns: 0 });
        std::thread::sleep(Duration::from_millis(5));
        p.tick();
        assert_eq!(p.effective(), ReplicationMode::Sync, "nothing held to time out");
    }

    #[test]
    fn regulation_ends_once_the_target_catches_up_without_further_writes() {
        let mut config = sync_group();
        config.rpo = Some(Duration::from_secs(2));
        config.regulate = true;
        let p = Policy::new(&config, 0, 0);
        p.target_connected(true);
        let (tx, _rx) = outbox();
        // A commit written 10 s ago that the target has not confirmed: far past half the RPO.
        let long_ago = now_ns() - 10_000_000_000;
        p.committed(vec![(tx, ack(1))], 1, 1 << 20, long_ago);
        assert!(!p.regulation_delay(1 << 20).is_zero());
        assert!(p.status().regulating);
        p.confirmed(1, 1);
        p.tick();
        assert!(!p.status().regulating, "still regulating with nothing left to ship");
    }

    #[test]
    fn sync_ack_waits_for_its_confirmation() {
        let p = Policy::new(&sync_group(), 0, 0);
        let (tx, rx) = outbox();
        p.committed(vec![(tx.clone(), ack(1)), (tx, ack(2))], 2, 8192, 1);
        assert!(next_acks(&rx).is_none(), "held until the target confirms");
        p.confirmed(1, 2);
        assert_eq!(next_acks(&rx).unwrap(), vec![ack(1)]);
        assert_eq!(p.lag().writes, 1);
        p.confirmed(2, 2);
        assert_eq!(next_acks(&rx).unwrap(), vec![ack(2)]);
        assert_eq!(p.lag().writes, 0);
    }
}
