//! Control frames on the link, besides writes: the hash requests of an initial sync and
//! their replies, the engine's quiesce and thaw, and the resync messages, all sent after
//! the writes submitted before them.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use hindsight_consistency::sync::lock;
use hindsight_consistency::wire::{encode_message, write_frame, FrameType, HashReply, HashRequest, QuiesceMsg, QuiescedMsg, ThawMsg};
use log::warn;

use super::state::{Inner, State};

impl Inner {
    /// Quiesces on its own thread (freezing waits for the file systems to flush through this
    /// very agent, so the ack reader must go on) and answers the engine.
    pub(super) fn quiesce(self: &Arc<Inner>, q: QuiesceMsg) {
        let id = q.id;
        let reply = move |ok: bool, message: String| encode_message(&QuiescedMsg { id, ok, message });
        let Some(quiescer) = self.quiescer.clone() else {
            self.send_control(FrameType::Quiesced, &reply(false, "this agent has no quiesce configuration".into()));
            return;
        };
        let me = Arc::clone(self);
        let _ = std::thread::Builder::new().name("quiesce".into()).spawn(move || {
            let res = quiescer.freeze(q.id, Duration::from_millis(q.timeout_ms));
            let msg = match res {
                Ok(()) => reply(true, String::new()),
                Err(e) => {
                    warn!("quiesce {} failed: {e}", q.id);
                    reply(false, e.to_string())
                }
            };
            me.send_control(FrameType::Quiesced, &msg);
        });
    }

    /// Ends quiesce `t.id` on its own thread (a thaw may run a script).
    pub(super) fn thaw(&self, t: ThawMsg) {
        if let Some(q) = self.quiescer.clone() {
            let _ = std::thread::Builder::new().name("thaw".into()).spawn(move || q.thaw(t.id));
        }
    }

    /// Hands a hash reply to the request waiting for it (none if the connection it was asked
    /// on was lost meanwhile).
    pub(super) fn hash_reply(&self, r: HashReply) {
        if let Some(tx) = lock(&self.hash_waits).remove(&r.id) {
            let _ = tx.send(r);
        }
    }

    /// Sends a hash request; see [`EngineLink::request_hashes`](super::EngineLink::request_hashes).
    pub(super) fn request_hashes(&self, disk: u16, region_shift: u8, regions: Vec<u64>) -> Option<Receiver<HashReply>> {
        let id = self.next_hash_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.hash_waits).insert(id, tx);
        let msg = encode_message(&HashRequest { id, disk, region_shift, regions });
        if self.send_control(FrameType::HashRequest, &msg) {
            Some(rx)
        } else {
            lock(&self.hash_waits).remove(&id);
            None
        }
    }

    /// Sends a control frame if the link is up (dropped otherwise: the engine's wait for it
    /// times out). True if it went out.
    pub(super) fn send_control(&self, ftype: FrameType, payload: &[u8]) -> bool {
        let mut guard = lock(&self.writer);
        let w = &mut *guard;
        // The writes held so far go first: a control frame (a resync's end, a bookmark's
        // reply) must follow every write submitted before it.
        self.send_held_locked(w);
        if let State::Up(stream) = &mut w.state {
            let mut frame = Vec::new();
            match write_frame(stream, ftype, payload, &mut frame) {
                Ok(()) => return true,
                Err(e) => warn!("sending {ftype:?} to the engine failed: {e}"),
            }
        }
        false
    }
}
