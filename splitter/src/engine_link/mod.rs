//! The agent's one connection to the engine: the TLS handshake (or loopback plaintext, see
//! `hindsight_consistency::transport`), the hello, then pipelined writes and their
//! acknowledgements (docs/wire-protocol.md).
//!
//! ```text
//! agent → engine:  Write    { frame header | req_id | offset | length | disk | kind | flags | data }
//! engine → agent:  WriteAck { frame header | req_id | seq | status | reserved }
//! ```
//!
//! [`EngineLink::submit`] gives each write the next `req_id`, keeps it (data included) in the
//! pending map, and sends it as one frame under the writer mutex, on the connection's write
//! half. An ack-reader thread reads the read half: it takes each `WriteAck`, removes the write
//! from the pending map and runs its completion.
//!
//! A refusal of TLS (a certificate the engine does not accept, or an engine whose certificate
//! this agent does not accept) makes `connect` fail at once, like a refusal of the hello: the
//! files must be fixed. Once running, it is logged and retried like any lost connection.
//!
//! When the connection is lost, a supervisor thread reconnects with backoff (100 ms doubling
//! to 5 s) and redoes the hello. Until then new writes only join the pending map; once the
//! hello is accepted, every pending write is sent again in `req_id` order (its original
//! order) before the link takes new writes. If the engine stays unreachable longer than the
//! engine timeout, every pending write fails with EIO, new writes fail at once until the link
//! is back, and the volumes concerned are remembered as lacking writes on the replica: they
//! need a resync.
//!
//! Hash requests of an initial sync ([`EngineLink::request_hashes`]) go as control frames;
//! the ack reader hands each `HashReply` to the channel its request waits on. A lost
//! connection drops every waiting request (its channel closes): the resync asks again.
//!
//! The parts, each in its own module: `config` (what the link is set up with, and why that
//! fails), `outgoing` (a write and its `Write` frame), `state` (the connection's state, the
//! table of writes in flight, and the transitions between up, reconnecting and failed),
//! `connect` (one connection attempt, the first connection, the reconnection loop),
//! `supervisor` (the thread that owns the connection's life), `acks` (the ack reader) and
//! `control` (hash requests, quiesce and thaw, resync messages). Every module below this one
//! shares `state`; none uses this one.

mod acks;
mod config;
mod connect;
mod control;
mod dial;
mod outgoing;
mod state;
mod supervisor;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use hindsight_consistency::record::MAX_WRITE_LEN;
use hindsight_consistency::sync::lock;
use hindsight_consistency::wire::{encode_message, AgentHello, FrameType, HashReply, ResyncDoneMsg, ResyncProgressMsg, PROTOCOL_VERSION};
use log::{info, warn};

use crate::block::BlockError;

pub use config::{LinkConfig, LinkError, ENGINE_TIMEOUT};
pub use connect::{FIRST_BACKOFF, MAX_BACKOFF};
pub use outgoing::WriteBody;
pub use state::LinkDone;

use connect::first_connection;
use dial::Dialer;
use outgoing::{encode_write, encode_write_head, Outgoing, SEND_IN_PLACE};
use state::{Inner, Pending, State, Writer, HELD_MAX};
use supervisor::supervise;

/// What the engine tells the link about its disks (docs/ha.md, "Takeover").
pub trait LinkEvents: Send + Sync {
    /// The target holds every record of the group of disk number `disk` through `seq`.
    fn target_confirmed(&self, disk: u16, seq: u64);
    /// The engine took the group of disk number `disk` over: the disk resyncs whatever it
    /// still has marked.
    fn resync_whole(&self, disk: u16);
}

/// The agent's connection to the engine, shared by all its disks. Dropping it closes the
/// connection and fails every write still pending with ESHUTDOWN.
pub struct EngineLink {
    inner: Arc<Inner>,
    /// Dropped with the link, which wakes the supervisor out of its backoff sleep.
    _close: Sender<()>,
}

impl EngineLink {
    /// Connects to the engine and exchanges the hello, retrying for up to
    /// `config.connect_wait` while the engine is not up. A refusal by the engine (its
    /// configuration does not match this agent's) is returned at once.
    pub fn connect(config: LinkConfig) -> Result<EngineLink, LinkError> {
        if config.disks.len() > usize::from(u16::MAX) {
            return Err(LinkError::TooManyDisks(config.disks.len()));
        }
        let volumes: Vec<String> = config.disks.iter().map(|d| d.volume.clone()).collect();
        let hello = encode_message(&AgentHello { protocol: PROTOCOL_VERSION, vm: config.vm.clone(), disks: config.disks.clone() });
        let engines = std::iter::once(config.engine.clone()).chain(config.more_engines.iter().cloned()).collect();
        let dialer = Dialer::new(engines, config.server_name.clone(), config.fixed_server_name);
        let (stream, state) = match first_connection(&config, &dialer, &hello) {
            Ok(conn) => {
                info!("engine link to {} up ({}); replicating volumes {}", dialer.target().0, conn.peer(), volumes.join(", "));
                let (reader, writer) = conn.split();
                (Some(reader), State::Up(writer))
            }
            Err(e @ (LinkError::Unreachable { .. } | LinkError::Handshake { .. })) if config.start_offline => {
                warn!(
                    "{}; starting without it and retrying: writes wait up to {:?} for it, then fail",
                    hindsight_consistency::error_chain(&e),
                    config.engine_timeout
                );
                (None, State::Reconnecting { since: Instant::now() })
            }
            Err(e) => return Err(e),
        };
        let inner = Arc::new(Inner {
            engine: dialer.describe(),
            security: config.security,
            dialer,
            frames_read: std::sync::atomic::AtomicU64::new(0),
            events: std::sync::OnceLock::new(),
            hello,
            volumes,
            engine_timeout: config.engine_timeout,
            writer: Mutex::new(Writer {
                // Acks that come before the supervisor's reader starts wait in the socket.
                state,
                next_req: 1,
                scratch: Vec::new(),
                held: Vec::new(),
            }),
            pending: Mutex::new(BTreeMap::new()),
            diverged: Mutex::new(BTreeSet::new()),
            paused: Mutex::new(BTreeMap::new()),
            quiescer: config.quiescer,
            hash_waits: Mutex::new(std::collections::HashMap::new()),
            next_hash_id: std::sync::atomic::AtomicU64::new(1),
        });
        let (close, closed) = crossbeam_channel::bounded(0);
        let supervised = Arc::clone(&inner);
        thread::Builder::new()
            .name("engine-link".to_string())
            .spawn(move || supervise(&supervised, stream, &closed))
            .map_err(LinkError::Spawn)?;
        Ok(EngineLink { inner, _close: close })
    }

    /// Sends one write of disk number `disk` to the engine; `done` runs once the engine has
    /// acknowledged it (in cdp mode: it is durable in the engine's journal) or the write has
    /// failed. `done` may run on this thread before `submit` returns.
    pub fn submit(&self, disk: u16, offset: u64, body: WriteBody, done: LinkDone) {
        self.submit_inner(disk, offset, body, done, false);
    }

    /// Like [`EngineLink::submit`], but the frame may wait for the next writes to go with
    /// them in one send, until [`EngineLink::send_held`] or a plain submit or control frame.
    /// The caller has more writes ready and calls `send_held` before it waits for anything.
    pub fn submit_held(&self, disk: u16, offset: u64, body: WriteBody, done: LinkDone) {
        self.submit_inner(disk, offset, body, done, true);
    }

    /// Sends the frames held by [`EngineLink::submit_held`].
    pub fn send_held(&self) {
        let mut guard = lock(&self.inner.writer);
        self.inner.send_held_locked(&mut guard);
    }

    fn submit_inner(&self, disk: u16, offset: u64, body: WriteBody, done: LinkDone, hold: bool) {
        let length = match body.length() {
            Some(len) if len > 0 && len <= MAX_WRITE_LEN && usize::from(disk) < self.inner.volumes.len() => len,
            _ => return done(Err(BlockError::Invalid)),
        };
        let inner = &*self.inner;
        let mut guard = lock(&inner.writer);
        let w = &mut *guard;
        let failure = match &w.state {
            State::Closed => BlockError::Shutdown,
            State::Failed => {
                lock(&inner.diverged).insert(disk);
                BlockError::Io
            }
            State::Reconnecting { .. } | State::Up(_) => {
                let req_id = w.next_req;
                w.next_req += 1;
                let write = Outgoing { disk, offset, length, body };
                let up = matches!(w.state, State::Up(_));
                let in_place = up && write.body.data().len() >= SEND_IN_PLACE;
                if in_place {
                    encode_write_head(&mut w.held, req_id, &write);
                } else if up {
                    encode_write(&mut w.held, req_id, &write);
                }
                // In the map before it is on the wire, so that its ack finds it. While the
                // link is down it waits there, to be sent by `go_up`.
                let data = in_place.then(|| write.body.clone());
                lock(&inner.pending).insert(req_id, Pending { write, done });
                if let Some(data) = data {
                    // The head (after any frames held before it), then the data itself.
                    inner.send_held_locked(w);
                    if let State::Up(stream) = &mut w.state {
                        if let Err(e) = stream.write_all(data.data()) {
                            inner.lose(&mut w.state, &format!("sending a write failed: {e}"));
                        }
                    }
                } else if up && (!hold || w.held.len() >= HELD_MAX) {
                    inner.send_held_locked(w);
                }
                return;
            }
        };
        drop(guard);
        done(Err(failure));
    }

    /// Sets where the target's confirmations and the takeover resyncs go (once, when the disks
    /// exist); a resync asked for by the first welcome is passed on now.
    pub fn set_events(&self, events: Arc<dyn LinkEvents>) {
        let _ = self.inner.events.set(events);
        self.inner.takeover_resyncs();
    }

    /// The engine's address.
    pub fn engine(&self) -> &str {
        &self.inner.engine
    }

    /// True while connected and taking writes.
    pub fn is_connected(&self) -> bool {
        matches!(lock(&self.inner.writer).state, State::Up(_))
    }

    /// Writes sent or waiting to be sent, not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// Tells the engine that every dirty region of `disks` has been re-sent and acknowledged
    /// (the end of their resync). Dropped if the link is down: the next resync ends with it.
    pub fn resync_done(&self, disks: &[u16]) {
        let msg = encode_message(&ResyncDoneMsg { disks: disks.to_vec() });
        self.inner.send_control(FrameType::ResyncDone, &msg);
    }

    /// Tells the engine how far the resync of a disk has come (for its status).
    pub fn resync_progress(&self, progress: &ResyncProgressMsg) {
        self.inner.send_control(FrameType::ResyncProgress, &encode_message(progress));
    }

    /// Asks for the replica's hashes of `regions` (of `1 << region_shift` bytes) of disk number
    /// `disk`. The reply comes on the returned channel, which closes without one if the link
    /// is lost meanwhile; `None` when the link is down now.
    pub fn request_hashes(&self, disk: u16, region_shift: u8, regions: Vec<u64>) -> Option<Receiver<HashReply>> {
        self.inner.request_hashes(disk, region_shift, regions)
    }

    /// When the engine last refused a write of disk number `disk` because its group is
    /// paused (a full journal); `None` once it takes that disk's writes again.
    pub fn paused_since(&self, disk: u16) -> Option<Instant> {
        lock(&self.inner.paused).get(&disk).copied()
    }

    /// Volumes whose replica lacks writes (failed while the engine was unreachable, or
    /// refused by it) and so need a resync.
    pub fn diverged_volumes(&self) -> Vec<String> {
        lock(&self.inner.diverged).iter().map(|&d| self.inner.volumes[usize::from(d)].clone()).collect()
    }
}

impl Drop for EngineLink {
    fn drop(&mut self) {
        let mut w = lock(&self.inner.writer);
        if let State::Up(stream) = &w.state {
            // Ends the ack reader; the supervisor then sees the link closed.
            stream.shutdown();
        }
        w.state = State::Closed;
    }
}
