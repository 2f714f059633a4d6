//! What a group does when a journal is full (`on_journal_full`, docs/failure-handling.md).
//!
//! The engine's journal holds what the target has not confirmed; it is full at the group's
//! `journal_size`. The target's journal holds the history; it says when it is full, or when it
//! trimmed history inside retention, with `JournalState` frames. From both, the journal
//! thread learns before each batch what to do with the writes it takes:
//!
//! - **take** them (nothing is full);
//! - **hold** them (`block`, the engine's journal is full): the thread takes nothing until
//!   the target confirms and segments are trimmed; the guests' writes wait;
//! - **refuse** them (the group is *paused*: `pause_and_track`, or `trim_history`, whose
//!   history is at the target, when the engine's own journal is full): each write is answered
//!   with ENOSPC without being journaled, and the agents keep it locally, mark it dirty and
//!   resync it once the group takes writes again. A pause ends when the engine's journal is
//!   down to three quarters of `journal_size` and the target takes records again.
//!
//! Every change is logged once, and `hindsight status` shows the state in words.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hindsight_consistency::config::JournalFull;
use hindsight_consistency::record::Seq;
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::{format_duration, format_rfc3339, now_ns};
use hindsight_consistency::wire::JournalStateMsg;

/// What the journal task does with the next writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Journal them.
    Take,
    /// Leave them queued until there is room.
    Hold,
    /// Answer them with ENOSPC: the agents track them.
    Refuse,
}

/// The last `JournalState` of the target.
#[derive(Debug, Clone)]
struct TargetJournal {
    msg: JournalStateMsg,
    /// When it came (ns since the epoch).
    at_ns: u64,
    /// A full state ends once the target confirms past this.
    confirmed: Seq,
}

#[derive(Debug, Default)]
struct State {
    /// Since when the engine's journal is full (`block`: writes held).
    holding_since: Option<Instant>,
    /// Since when the group is paused, and why.
    paused: Option<(Instant, String)>,
    target: Option<TargetJournal>,
}

/// A group's journal-full policy and state, shared by its journal task, its shipper and
/// status requests.
#[derive(Debug)]
pub struct JournalWatch {
    group: String,
    policy: JournalFull,
    max: Option<u64>,
    /// Bytes in the engine's journal, as of the journal task's last look.
    bytes: AtomicU64,
    state: Mutex<State>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl JournalWatch {
    /// The watch of `group`, whose engine journal may hold `max` bytes.
    pub fn new(group: &str, policy: JournalFull, max: Option<u64>) -> JournalWatch {
        JournalWatch { group: group.to_owned(), policy, max, bytes: AtomicU64::new(0), state: Mutex::new(State::default()) }
    }

    /// The policy.
    pub fn policy(&self) -> JournalFull {
        self.policy
    }

    /// The engine journal's size limit.
    pub fn max(&self) -> Option<u64> {
        self.max
    }

    /// Bytes in the engine's journal.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// True while the group is paused.
    pub fn paused(&self) -> bool {
        lock(&self.state).paused.is_some()
    }

    /// Called by the journal task before each batch with the journal's size: what to do
    /// with the writes it takes next.
    pub fn update(&self, bytes: u64) -> Action {
        self.bytes.store(bytes, Ordering::Relaxed);
        let engine_full = self.max.is_some_and(|m| bytes >= m);
        let mut st = lock(&self.state);
        let target_full = st.target.as_ref().is_some_and(|t| t.msg.full);
        match self.policy {
            JournalFull::Block => {
                match (engine_full, st.holding_since) {
                    (true, None) => {
                        log::warn!(
                            "group {}: the engine's journal is full ({} of journal_size {}) and on_journal_full = \"block\": \
                             the guests' writes wait until the target confirms more{}",
                            self.group,
                            mib(bytes),
                            mib(self.max.unwrap_or(0)),
                            if target_full { " (the target's journal is full too: it waits for its retention to free room)" } else { "" }
                        );
                        st.holding_since = Some(Instant::now());
                    }
                    (false, Some(since)) => {
                        log::info!(
                            "group {}: the engine's journal has room again ({}); writes held for {:.1?} go on",
                            self.group,
                            mib(bytes),
                            since.elapsed()
                        );
                        st.holding_since = None;
                    }
                    _ => {}
                }
                if engine_full {
                    Action::Hold
                } else {
                    Action::Take
                }
            }
            JournalFull::PauseAndTrack | JournalFull::TrimHistory => {
                let target_blocks = self.policy == JournalFull::PauseAndTrack && target_full;
                let room = self.max.is_none_or(|m| bytes <= m / 4 * 3);
                match &st.paused {
                    None if engine_full || target_blocks => {
                        let why = if engine_full {
                            format!("the engine's journal is full ({} of journal_size {})", mib(bytes), mib(self.max.unwrap_or(0)))
                        } else {
                            "the target's journal is full and keeps every point inside its retention".to_string()
                        };
                        log::warn!(
                            "group {}: paused: {why} (on_journal_full = {:?}). Writes are not journaled: the agents keep \
                             serving the guests, track what they write and resync it when the group takes writes again; \
                             the target keeps every point up to the pause",
                            self.group,
                            self.policy.as_str()
                        );
                        st.paused = Some((Instant::now(), why));
                    }
                    Some((since, _)) if room && !target_blocks => {
                        log::info!(
                            "group {}: the journals have room again (engine {}); taking writes after a pause of {:.1?}; the agents \
                             resync what they tracked (not consistent at the target until the resync point)",
                            self.group,
                            mib(bytes),
                            since.elapsed()
                        );
                        st.paused = None;
                    }
                    _ => {}
                }
                if st.paused.is_some() {
                    Action::Refuse
                } else {
                    Action::Take
                }
            }
        }
    }

    /// The target sent `JournalState`; `confirmed` is what it had confirmed then.
    pub fn target_state(&self, msg: JournalStateMsg, confirmed: Seq) {
        let mut st = lock(&self.state);
        let was_full = st.target.as_ref().is_some_and(|t| t.msg.full);
        if msg.full && !was_full {
            log::warn!(
                "group {}: the target's journal is full ({} of its journal_size {}) and on_journal_full = {:?} keeps every \
                 point inside its retention ({}s, the oldest from {}): it takes nothing more until they age out; {}",
                self.group,
                mib(msg.journal_bytes),
                mib(msg.journal_size),
                self.policy.as_str(),
                msg.retention_s,
                format_rfc3339(msg.first_time_ns),
                match self.policy {
                    JournalFull::Block => "the engine's journal keeps the writes meanwhile",
                    _ => "the group pauses",
                }
            );
        } else if msg.trimmed {
            log::warn!(
                "group {}: the target's journal reached its journal_size ({}) and trimmed history inside its retention ({}s): \
                 the oldest point it can recover is now {}",
                self.group,
                mib(msg.journal_size),
                msg.retention_s,
                format_rfc3339(msg.first_time_ns)
            );
        }
        st.target = Some(TargetJournal { msg, at_ns: now_ns(), confirmed });
    }

    /// The target confirmed through `seq`: a full state of the target ends when it takes
    /// records again.
    pub fn target_confirmed(&self, seq: Seq) {
        let mut st = lock(&self.state);
        if st.target.as_ref().is_some_and(|t| t.msg.full && seq > t.confirmed) {
            log::info!("group {}: the target's journal takes records again", self.group);
            st.target = None;
        }
    }

    /// The state in words for `hindsight status` (empty when nothing is full or trimmed).
    pub fn describe(&self) -> String {
        let st = lock(&self.state);
        let mut parts = Vec::new();
        if let Some(since) = st.holding_since {
            parts.push(format!(
                "engine journal full: guest writes held for {} (block)",
                format_duration(since.elapsed().max(std::time::Duration::from_secs(1)))
            ));
        }
        if let Some((since, why)) = &st.paused {
            parts.push(format!(
                "paused for {}: {why}; agents track writes and resync them when room returns",
                format_duration(since.elapsed().max(std::time::Duration::from_secs(1)))
            ));
        }
        if let Some(t) = &st.target {
            let m = &t.msg;
            if m.full {
                parts.push(format!(
                    "target journal full ({} of {}), keeping its retention of {}s: it takes records again as the oldest age out",
                    mib(m.journal_bytes),
                    mib(m.journal_size),
                    m.retention_s
                ));
            } else if m.trimmed {
                parts.push(format!(
                    "target trimmed history inside its retention of {}s at {} (journal_size {}): oldest point now {}",
                    m.retention_s,
                    format_rfc3339(t.at_ns),
                    mib(m.journal_size),
                    format_rfc3339(m.first_time_ns)
                ));
            }
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_msg() -> JournalStateMsg {
        JournalStateMsg { full: true, trimmed: false, journal_bytes: 3 << 20, journal_size: 2 << 20, first_time_ns: 1, retention_s: 60 }
    }

    #[test]
    fn block_holds_while_the_engine_journal_is_full() {
        let w = JournalWatch::new("g", JournalFull::Block, Some(4 << 20));
        assert_eq!(w.update(1 << 20), Action::Take);
        assert_eq!(w.update(4 << 20), Action::Hold);
        assert!(w.describe().contains("guest writes held"), "{}", w.describe());
        // A full target alone does not hold: the engine's journal takes the writes.
        w.target_state(full_msg(), 10);
        assert_eq!(w.update((4 << 20) - 1), Action::Take);
        assert!(!w.paused() && w.describe().contains("target journal full"));
        w.target_confirmed(11);
        assert_eq!(w.describe(), "");
    }

    #[test]
    fn pause_and_track_pauses_for_either_journal_and_resumes_with_room() {
        let w = JournalWatch::new("g", JournalFull::PauseAndTrack, Some(4 << 20));
        assert_eq!(w.update(4 << 20), Action::Refuse);
        assert!(w.paused());
        // Hysteresis: it takes writes again below three quarters.
        assert_eq!(w.update((3 << 20) + 1), Action::Refuse);
        assert_eq!(w.update(3 << 20), Action::Take);
        w.target_state(full_msg(), 10);
        assert_eq!(w.update(0), Action::Refuse);
        assert!(w.describe().contains("paused") && w.describe().contains("target journal full"), "{}", w.describe());
        w.target_confirmed(10);
        assert_eq!(w.update(0), Action::Refuse, "confirming nothing new is not taking records");
        w.target_confirmed(12);
        assert_eq!(w.update(0), Action::Take);
    }

    #[test]
    fn trim_history_pauses_only_for_the_engine_journal() {
        let w = JournalWatch::new("g", JournalFull::TrimHistory, None);
        w.target_state(full_msg(), 1);
        assert_eq!(w.update(u64::MAX), Action::Take, "no journal_size: never full here");
        let w = JournalWatch::new("g", JournalFull::TrimHistory, Some(4 << 20));
        assert_eq!(w.update(5 << 20), Action::Refuse);
        let trimmed = JournalStateMsg { full: false, trimmed: true, ..full_msg() };
        w.target_state(trimmed, 5);
        assert!(w.describe().contains("target trimmed history"), "{}", w.describe());
    }
}
