//! The link's shared state: where the connection stands ([`State`]), the writer half with
//! its held frames, the table of writes in flight ([`Pending`]), and the transitions between
//! up, reconnecting and failed (losing a connection, bringing a fresh one up, expiring).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{Security, WriteHalf};
use hindsight_consistency::wire::HashReply;
use hindsight_consistency::Seq;
use log::{error, info, warn};

use super::outgoing::{encode_write, Outgoing};
use crate::block::BlockError;
use crate::quiesce::Quiescer;

/// Runs once when the engine has answered a write: its group sequence number, or why it
/// failed.
pub type LinkDone = Box<dyn FnOnce(Result<Seq, BlockError>) + Send + 'static>;

/// A write the engine has not acknowledged yet.
pub(super) struct Pending {
    pub(super) write: Outgoing,
    pub(super) done: LinkDone,
}

/// Where the connection stands; changes only under the writer mutex.
pub(super) enum State {
    /// Connected: writes are sent at once.
    Up(WriteHalf),
    /// Lost at `since`: writes wait in the pending map for the reconnection.
    Reconnecting { since: Instant },
    /// Unreachable for longer than the engine timeout: writes fail at once.
    Failed,
    /// The owner dropped the link.
    Closed,
}

/// The writer half and what is sent on it; under the writer mutex.
pub(super) struct Writer {
    pub(super) state: State,
    pub(super) next_req: u64,
    /// The frame being sent, reused from one write to the next.
    pub(super) scratch: Vec<u8>,
    /// Frames of writes submitted held, not yet on the wire (in submission order).
    pub(super) held: Vec<u8>,
}

/// Held frames are sent once they reach this size, whatever follows.
pub(super) const HELD_MAX: usize = 256 << 10;

/// Everything the link's threads share.
pub(super) struct Inner {
    /// The engines, for messages.
    pub(super) engine: String,
    pub(super) security: Security,
    /// Which engine is dialed next.
    pub(super) dialer: super::dial::Dialer,
    /// Frames read from the engine so far (the supervisor's watch sees a hung engine by it).
    pub(super) frames_read: std::sync::atomic::AtomicU64,
    /// Where the target's confirmations and the takeover resyncs go (the disks).
    pub(super) events: std::sync::OnceLock<Arc<dyn super::LinkEvents>>,
    pub(super) hello: Vec<u8>,
    pub(super) volumes: Vec<String>,
    pub(super) engine_timeout: Duration,
    /// Lock order: `writer`, then `pending`. The ack reader takes only `pending`, so acks
    /// keep flowing while a sender is blocked on a full socket.
    pub(super) writer: Mutex<Writer>,
    pub(super) pending: Mutex<BTreeMap<u64, Pending>>,
    /// Disk numbers whose replica lacks writes that failed or were refused by the engine.
    pub(super) diverged: Mutex<BTreeSet<u16>>,
    /// Disk numbers whose group the engine paused (a full journal), and when it last
    /// refused one of their writes.
    pub(super) paused: Mutex<BTreeMap<u16, Instant>>,
    pub(super) quiescer: Option<Arc<Quiescer>>,
    /// Hash requests waiting for their reply, by id.
    pub(super) hash_waits: Mutex<std::collections::HashMap<u64, Sender<HashReply>>>,
    pub(super) next_hash_id: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// Writes the held frames, if the link is up. On failure the link is lost, and the
    /// writes are sent again from the pending map with the others.
    pub(super) fn send_held_locked(&self, w: &mut Writer) {
        if w.held.is_empty() {
            return;
        }
        if let State::Up(stream) = &mut w.state {
            if let Err(e) = stream.write_all(&w.held) {
                self.lose(&mut w.state, &format!("sending a write failed: {e}"));
            }
        }
        w.held.clear();
    }

    /// Marks the connection lost (if it was up) and closes its socket, which ends the ack
    /// reader. The pending writes stay, to be sent again.
    pub(super) fn lose(&self, state: &mut State, reason: &str) {
        if let State::Up(stream) = &*state {
            stream.shutdown();
            warn!(
                "engine link to {} lost: {reason}; reconnecting, {} write(s) in flight will be sent again",
                self.engine,
                lock(&self.pending).len()
            );
            *state = State::Reconnecting { since: Instant::now() };
            // Their replies would come on the lost connection: the requesters ask again.
            lock(&self.hash_waits).clear();
        }
    }

    /// Passes the disks a welcome asked to resync whole on to them (kept by the dialer until
    /// the disks are there).
    pub(super) fn takeover_resyncs(&self) {
        if let Some(events) = self.events.get() {
            for disk in self.dialer.take_resync() {
                events.resync_whole(disk);
            }
        }
    }

    /// The engine has sent nothing for `silent` while writes wait (a hung process or host
    /// keeps its connection open): the connection is shut, which ends its ack reader, and the
    /// next engine of the site is dialed first.
    pub(super) fn hung(&self, silent: Duration) {
        let w = lock(&self.writer);
        if let State::Up(stream) = &w.state {
            warn!(
                "engine {} has answered nothing for {silent:.1?} while {} write(s) wait: taken as hung; reconnecting",
                self.dialer.target().0,
                lock(&self.pending).len()
            );
            self.dialer.failed(&self.dialer.target().0);
            stream.shutdown();
        }
    }

    /// On a fresh connection: sends every pending write again in its original order, then
    /// lets new writes through.
    pub(super) fn go_up(&self, mut stream: WriteHalf) {
        let mut w = lock(&self.writer);
        let w = &mut *w;
        if matches!(w.state, State::Closed) {
            stream.shutdown();
            return;
        }
        // Later writes cannot be submitted while the writer mutex is held, so this is every
        // write that must go before them.
        // Held frames were for the lost connection; they are in the pending map.
        w.held.clear();
        let resend: Vec<(u64, Outgoing)> = lock(&self.pending).iter().map(|(&req_id, p)| (req_id, p.write.clone())).collect();
        if matches!(w.state, State::Failed) {
            error!(
                "engine link to {} is back; the replica still lacks the writes that failed while it was down: volume(s) {} need a resync",
                self.engine,
                self.diverged_list()
            );
        } else if !resend.is_empty() {
            info!("engine link to {} is back; sending the {} write(s) waiting for it, in their original order", self.engine, resend.len());
        }
        for (req_id, p) in &resend {
            w.scratch.clear();
            encode_write(&mut w.scratch, *req_id, p);
            if let Err(e) = stream.write_all(&w.scratch) {
                warn!("engine {}: sending writes again failed: {e}", self.engine);
                // The ack reader ends and the supervisor reconnects; the state stays down.
                stream.shutdown();
                return;
            }
        }
        w.state = State::Up(stream);
    }

    /// If the link has been down for the engine timeout, fails every pending write and turns
    /// to failing new writes at once. Returns when that will happen, if it has not yet.
    pub(super) fn expire(&self) -> Option<Instant> {
        let mut w = lock(&self.writer);
        let State::Reconnecting { since } = w.state else {
            return None;
        };
        let deadline = since + self.engine_timeout;
        if Instant::now() < deadline {
            return Some(deadline);
        }
        w.state = State::Failed;
        let failed = std::mem::take(&mut *lock(&self.pending));
        drop(w);
        let lacking: BTreeSet<u16> = failed.values().map(|p| p.write.disk).collect();
        lock(&self.diverged).extend(&lacking);
        let names: Vec<&str> = lacking.iter().map(|&d| self.volumes[usize::from(d)].as_str()).collect();
        error!(
            "engine {} unreachable for {:?}: failing {} pending write(s), and every new write with EIO until it is back; \
             the replica now lacks writes, so volume(s) {} (and any whose writes fail from now on) will need a resync",
            self.engine,
            self.engine_timeout,
            failed.len(),
            if names.is_empty() { "(none yet)".to_string() } else { names.join(", ") }
        );
        for p in failed.into_values() {
            (p.done)(Err(BlockError::Io));
        }
        None
    }

    fn diverged_list(&self) -> String {
        let names: Vec<String> = lock(&self.diverged).iter().map(|&d| self.volumes[usize::from(d)].clone()).collect();
        if names.is_empty() {
            "(none)".to_string()
        } else {
            names.join(", ")
        }
    }
}
