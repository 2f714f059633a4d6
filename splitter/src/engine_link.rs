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

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::quiesce::Quiescer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hindsight_consistency::record::MAX_WRITE_LEN;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{is_refusal_io, Connection, ReadHalf, Role, Security, WriteHalf};
use hindsight_consistency::wire::frame::{encode_header_parts, whole_frame_buffered};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, AgentHello, AgentWelcome, DiskHello, ErrorMessage, FrameError, FrameType,
    HashReply, HashRequest, QuiesceMsg, QuiescedMsg, ResyncDoneMsg, ResyncProgressMsg, ThawMsg, WriteAck, WriteMsg, PROTOCOL_VERSION,
};
use hindsight_consistency::{Seq, WriteKind};
use log::{debug, error, info, warn};
use thiserror::Error;

use crate::block::{self, BlockError};

/// How long the engine may stay unreachable before pending and new writes fail with EIO.
/// (An `agent.toml` key in a later version.)
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(30);

/// First pause between reconnection attempts; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long one TCP connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the engine may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link needs to know to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Engine address, `host:port`.
    pub engine: String,
    /// How the link is protected (TLS, or plaintext on loopback).
    pub security: Security,
    /// The name the engine's certificate must be valid for.
    pub server_name: String,
    /// This VM's name, sent in the hello.
    pub vm: String,
    /// The disks, in disk-number order.
    pub disks: Vec<DiskHello>,
    /// How long [`EngineLink::connect`] keeps trying while the engine is not up yet.
    pub connect_wait: Duration,
    /// How long the engine may stay unreachable before writes fail (normally
    /// [`ENGINE_TIMEOUT`]).
    pub engine_timeout: Duration,
    /// Answers the engine's quiesce requests (`None`: every request is refused).
    pub quiescer: Option<Arc<Quiescer>>,
    /// When the engine is still unreachable after `connect_wait`: start anyway, as if the
    /// connection had just been lost (writes wait up to `engine_timeout`, then fail, while
    /// the link keeps trying), instead of failing. A refusal still fails. Used when the guest
    /// depends on the agent's kernel devices, which must come up (or be recovered) even while
    /// the engine is away.
    pub start_offline: bool,
}

/// Why the link could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The engine did not accept a connection within the wait.
    #[error("cannot reach the engine at {engine} (tried for {waited:.1?}); start the engine, or fix `engine` in the [agent] section")]
    Unreachable {
        /// The address tried.
        engine: String,
        /// How long it was tried.
        waited: Duration,
        /// The last failure.
        #[source]
        source: io::Error,
    },
    /// The connection was made but the hello exchange failed.
    #[error("hello exchange with the engine at {engine} failed")]
    Handshake {
        /// The address.
        engine: String,
        /// What went wrong.
        #[source]
        source: FrameError,
    },
    /// TLS could not be set up: a certificate was refused, by the engine or by this agent.
    #[error("TLS with the engine at {engine} failed: {reason}; check [tls] in agent.toml (docs/security.md)")]
    Tls {
        /// The address.
        engine: String,
        /// Why.
        reason: String,
    },
    /// The engine refused this agent (its configuration does not match).
    #[error("the engine at {engine} refused this agent: {message}")]
    Refused {
        /// The address.
        engine: String,
        /// The engine's explanation.
        message: String,
    },
    /// More disks than a `Write` can number.
    #[error("{0} disks configured; at most 65535 can be served")]
    TooManyDisks(usize),
    /// The supervisor thread could not be started.
    #[error("cannot start the engine link thread")]
    Spawn(#[source] io::Error),
}

/// What one write carries to the engine. The data is shared so that it can stay in the
/// pending map, for re-sending after a reconnection, while the local write uses it.
#[derive(Debug, Clone)]
pub enum WriteBody {
    /// These bytes.
    Data(Arc<Vec<u8>>),
    /// This many bytes read back as zeroes.
    Zeroes(u32),
    /// This many bytes are discarded.
    Trim(u32),
    /// These bytes, re-sent from the local disk by a resync (not in the guest's order).
    Resync(Arc<Vec<u8>>),
}

impl WriteBody {
    /// The record kind on the wire.
    pub fn kind(&self) -> WriteKind {
        match self {
            WriteBody::Data(_) => WriteKind::Data,
            WriteBody::Zeroes(_) => WriteKind::Zeroes,
            WriteBody::Trim(_) => WriteKind::Trim,
            WriteBody::Resync(_) => WriteKind::Resync,
        }
    }

    /// Bytes of the volume covered (`None` when too many for one write).
    fn length(&self) -> Option<u32> {
        match self {
            WriteBody::Data(d) | WriteBody::Resync(d) => u32::try_from(d.len()).ok(),
            WriteBody::Zeroes(len) | WriteBody::Trim(len) => Some(*len),
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            WriteBody::Data(d) | WriteBody::Resync(d) => d,
            WriteBody::Zeroes(_) | WriteBody::Trim(_) => &[],
        }
    }
}

/// Runs once when the engine has answered a write: its group sequence number, or why it
/// failed.
pub type LinkDone = Box<dyn FnOnce(Result<Seq, BlockError>) + Send + 'static>;

/// One write as it goes on the wire; kept until acknowledged, to be sent again after a
/// reconnection.
#[derive(Clone)]
struct Outgoing {
    disk: u16,
    offset: u64,
    length: u32,
    body: WriteBody,
}

/// A write the engine has not acknowledged yet.
struct Pending {
    write: Outgoing,
    done: LinkDone,
}

/// Where the connection stands; changes only under the writer mutex.
enum State {
    /// Connected: writes are sent at once.
    Up(WriteHalf),
    /// Lost at `since`: writes wait in the pending map for the reconnection.
    Reconnecting { since: Instant },
    /// Unreachable for longer than the engine timeout: writes fail at once.
    Failed,
    /// The owner dropped the link.
    Closed,
}

struct Writer {
    state: State,
    next_req: u64,
    /// The frame being sent, reused from one write to the next.
    scratch: Vec<u8>,
    /// Frames of writes submitted held, not yet on the wire (in submission order).
    held: Vec<u8>,
}

/// Held frames are sent once they reach this size, whatever follows.
const HELD_MAX: usize = 256 << 10;

struct Inner {
    engine: String,
    security: Security,
    server_name: String,
    hello: Vec<u8>,
    volumes: Vec<String>,
    engine_timeout: Duration,
    /// Lock order: `writer`, then `pending`. The ack reader takes only `pending`, so acks
    /// keep flowing while a sender is blocked on a full socket.
    writer: Mutex<Writer>,
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// Disk numbers whose replica lacks writes that failed or were refused by the engine.
    diverged: Mutex<BTreeSet<u16>>,
    /// Disk numbers whose group the engine paused (a full journal), and when it last
    /// refused one of their writes.
    paused: Mutex<BTreeMap<u16, Instant>>,
    quiescer: Option<Arc<Quiescer>>,
    /// Hash requests waiting for their reply, by id.
    hash_waits: Mutex<std::collections::HashMap<u64, Sender<HashReply>>>,
    next_hash_id: std::sync::atomic::AtomicU64,
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
        let (stream, state) = match first_connection(&config, &hello) {
            Ok(conn) => {
                info!("engine link to {} up ({}); replicating volumes {}", config.engine, conn.peer(), volumes.join(", "));
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
            engine: config.engine,
            security: config.security,
            server_name: config.server_name,
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
        let id = self.inner.next_hash_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.inner.hash_waits).insert(id, tx);
        let msg = encode_message(&HashRequest { id, disk, region_shift, regions });
        if self.inner.send_control(FrameType::HashRequest, &msg) {
            Some(rx)
        } else {
            lock(&self.inner.hash_waits).remove(&id);
            None
        }
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

/// Connects at start, retrying with backoff for up to `config.connect_wait`; a refusal by
/// the engine is returned at once.
fn first_connection(config: &LinkConfig, hello: &[u8]) -> Result<Connection, LinkError> {
    let engine = config.engine.clone();
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = String::new();
    let to = Destination { engine: &config.engine, security: &config.security, server_name: &config.server_name };
    loop {
        let failure = match hello_exchange(&to, hello, config.engine_timeout) {
            Ok(stream) => return Ok(stream),
            Err(Attempt::Refused(message)) => return Err(LinkError::Refused { engine, message }),
            Err(Attempt::Tls(reason)) => return Err(LinkError::Tls { engine, reason }),
            Err(failure) => failure,
        };
        let waited = started.elapsed();
        if waited >= config.connect_wait {
            return Err(match failure {
                Attempt::Connect(source) => LinkError::Unreachable { engine, waited, source },
                Attempt::Hello(source) => LinkError::Handshake { engine, source },
                Attempt::Refused(message) => LinkError::Refused { engine, message },
                Attempt::Tls(reason) => LinkError::Tls { engine, reason },
            });
        }
        let failure = failure.to_string();
        if failure != last_failure {
            info!("engine {engine} not ready ({failure}); retrying for up to {:?}", config.connect_wait);
            last_failure = failure;
        }
        thread::sleep(backoff.min(config.connect_wait - waited));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why one connection attempt failed.
#[derive(Debug)]
enum Attempt {
    Connect(io::Error),
    Hello(FrameError),
    Refused(String),
    /// A certificate was refused (by either side): retrying cannot help.
    Tls(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Connect(e) => write!(f, "connecting: {e}"),
            Attempt::Hello(e) => write!(f, "hello: {e}"),
            Attempt::Refused(m) => write!(f, "refused: {m}"),
            Attempt::Tls(m) => write!(f, "TLS: {m}"),
        }
    }
}

/// Where the link goes and how.
struct Destination<'a> {
    engine: &'a str,
    security: &'a Security,
    server_name: &'a str,
}

/// Connects, runs the TLS handshake, sends the hello and waits for the welcome.
fn hello_exchange(to: &Destination<'_>, hello: &[u8], write_timeout: Duration) -> Result<Connection, Attempt> {
    let engine = to.engine;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    let mut stream = None;
    for addr in engine.to_socket_addrs().map_err(Attempt::Connect)? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream: TcpStream = stream.ok_or(Attempt::Connect(last))?;
    let io_err = |e: io::Error| if is_refusal_io(&e) { Attempt::Tls(e.to_string()) } else { Attempt::Hello(FrameError::Io(e)) };
    // Writes are small and latency-bound; do not let Nagle hold them back.
    stream.set_nodelay(true).map_err(io_err)?;
    let mut stream = to.security.connect(stream, to.server_name, Role::Engine).map_err(|e| {
        if e.is_refusal() {
            Attempt::Tls(e.to_string())
        } else {
            Attempt::Hello(FrameError::Io(io::Error::other(e.to_string())))
        }
    })?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(io_err)?;
    write_frame(&mut stream, FrameType::AgentHello, hello, &mut Vec::new()).map_err(io_err)?;
    let mut payload = Vec::new();
    let frame = read_frame(&mut stream, &mut payload).map_err(|e| match e {
        FrameError::Io(e) => io_err(e),
        other => Attempt::Hello(other),
    })?;
    match frame {
        FrameType::AgentWelcome => {
            let welcome: AgentWelcome = decode_message("AgentWelcome", &payload).map_err(Attempt::Hello)?;
            debug!("engine {engine} ({}) speaks protocol {}", welcome.engine, welcome.protocol);
        }
        FrameType::Error => {
            let e: ErrorMessage = decode_message("Error", &payload).map_err(Attempt::Hello)?;
            return Err(Attempt::Refused(e.message));
        }
        got => return Err(Attempt::Hello(FrameError::Unexpected { got, expected: "AgentWelcome or Error" })),
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    // An engine that stops reading holds the writer mutex at most this long before the
    // connection counts as lost.
    stream.set_write_timeout(Some(write_timeout)).map_err(io_err)?;
    Ok(stream)
}

/// Appends the whole `Write` frame of `p` to `out`.
fn encode_write(out: &mut Vec<u8>, req_id: u64, p: &Outgoing) {
    encode_write_head(out, req_id, p);
    out.extend_from_slice(p.body.data());
}

/// Appends the `Write` frame of `p` up to its data (which follows it on the wire).
fn encode_write_head(out: &mut Vec<u8>, req_id: u64, p: &Outgoing) {
    let msg = WriteMsg { req_id, offset: p.offset, length: p.length, disk: p.disk, kind: p.body.kind() }.encode_header();
    out.extend_from_slice(&encode_header_parts(FrameType::Write, &[&msg, p.body.data()]));
    out.extend_from_slice(&msg);
}

/// Writes of at least this many bytes go on the wire from their own buffer, after their
/// frame's head, instead of being copied into the frames held for sending.
const SEND_IN_PLACE: usize = 64 << 10;

/// Owns the connection's life: runs an ack reader per connection, and reconnects when it
/// ends, until the link is dropped. `reader` reads the first connection, which is up already.
fn supervise(inner: &Arc<Inner>, first: Option<ReadHalf>, closed: &Receiver<()>) {
    // A new connection, to bring up once its ack reader runs.
    let mut fresh: Option<WriteHalf> = None;
    let mut reader = match first {
        Some(stream) => stream,
        None => match next_connection(inner, closed) {
            Some((reader, stream)) => {
                fresh = Some(stream);
                reader
            }
            None => return finish(inner),
        },
    };
    loop {
        let for_acks = Arc::clone(inner);
        let acks = thread::Builder::new().name("engine-acks".to_string()).spawn(move || read_acks(&for_acks, reader));
        let reason = match acks {
            Ok(acks) => {
                if let Some(stream) = fresh.take() {
                    // Acks are read while the pending writes go out again, so a long resend
                    // cannot fill both directions of the socket and stall.
                    inner.go_up(stream);
                }
                acks.join().unwrap_or_else(|_| FrameError::Peer("the ack reader panicked".into())).to_string()
            }
            Err(e) => {
                // Closed before reconnecting: the engine keeps the volumes attached while it
                // is open.
                drop(fresh.take());
                format!("cannot start the ack reader: {e}")
            }
        };
        {
            let mut w = lock(&inner.writer);
            if matches!(w.state, State::Closed) {
                break;
            }
            inner.lose(&mut w.state, &reason);
        }
        let Some((r, stream)) = next_connection(inner, closed) else { break };
        reader = r;
        fresh = Some(stream);
    }
    finish(inner);
}

/// Reconnects; returns the reader half and the writer half to bring up, or `None` once the
/// link is closed.
fn next_connection(inner: &Inner, closed: &Receiver<()>) -> Option<(ReadHalf, WriteHalf)> {
    reconnect(inner, closed).map(Connection::split)
}

/// The link is closed: fails every write still waiting.
fn finish(inner: &Inner) {
    let left = std::mem::take(&mut *lock(&inner.pending));
    if !left.is_empty() {
        warn!("engine link to {} closed with {} write(s) unacknowledged", inner.engine, left.len());
    }
    for p in left.into_values() {
        (p.done)(Err(BlockError::Shutdown));
    }
}

/// Reads acknowledgements until the connection ends; returns why it ended.
fn read_acks(inner: &Arc<Inner>, stream: ReadHalf) -> FrameError {
    let mut payload = Vec::new();
    // Acknowledgements arrive in batches: one read takes many of them, and the guests'
    // replies to a batch go out together (one send per client connection) under a cork,
    // dropped before this thread waits for more.
    let mut stream = std::io::BufReader::with_capacity(64 << 10, stream);
    let mut cork: Option<block::Cork> = None;
    loop {
        if !whole_frame_buffered(stream.buffer()) {
            cork = None;
        }
        let ack = match read_frame(&mut stream, &mut payload) {
            Ok(FrameType::WriteAck) => match WriteAck::decode(&payload) {
                Ok(ack) => ack,
                Err(e) => return e,
            },
            Ok(FrameType::Error) => {
                return match decode_message::<ErrorMessage>("Error", &payload) {
                    Ok(e) => FrameError::Peer(e.message),
                    Err(e) => e,
                }
            }
            Ok(FrameType::Quiesce) => {
                match decode_message::<QuiesceMsg>("Quiesce", &payload) {
                    Ok(q) => inner.quiesce(q),
                    Err(e) => return e,
                }
                continue;
            }
            Ok(FrameType::HashReply) => {
                match decode_message::<HashReply>("HashReply", &payload) {
                    Ok(r) => {
                        if let Some(tx) = lock(&inner.hash_waits).remove(&r.id) {
                            let _ = tx.send(r);
                        }
                    }
                    Err(e) => return e,
                }
                continue;
            }
            Ok(FrameType::Thaw) => {
                match decode_message::<ThawMsg>("Thaw", &payload) {
                    Ok(t) => {
                        if let Some(q) = inner.quiescer.clone() {
                            let _ = std::thread::Builder::new().name("thaw".into()).spawn(move || q.thaw(t.id));
                        }
                    }
                    Err(e) => return e,
                }
                continue;
            }
            Ok(got) => return FrameError::Unexpected { got, expected: "WriteAck" },
            Err(e) => return e,
        };
        cork.get_or_insert_with(block::cork);
        inner.complete(ack);
    }
}

impl Inner {
    /// Quiesces on its own thread (freezing waits for the file systems to flush through this
    /// very agent, so the ack reader must go on) and answers the engine.
    fn quiesce(self: &Arc<Inner>, q: QuiesceMsg) {
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
                    reply(false, e)
                }
            };
            me.send_control(FrameType::Quiesced, &msg);
        });
    }

    /// Sends a control frame if the link is up (dropped otherwise: the engine's wait for it
    /// times out). True if it went out.
    /// Writes the held frames, if the link is up. On failure the link is lost, and the
    /// writes are sent again from the pending map with the others.
    fn send_held_locked(&self, w: &mut Writer) {
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

    fn send_control(&self, ftype: FrameType, payload: &[u8]) -> bool {
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

/// Tries to reconnect, with backoff, until it succeeds or the link is dropped (`None`).
/// Fails the pending writes once the engine has been unreachable for the engine timeout.
fn reconnect(inner: &Inner, closed: &Receiver<()>) -> Option<Connection> {
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = String::new();
    loop {
        let pause = match inner.expire() {
            Some(deadline) => backoff.min(deadline.saturating_duration_since(Instant::now())),
            None => backoff,
        };
        match closed.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
        }
        let to = Destination { engine: &inner.engine, security: &inner.security, server_name: &inner.server_name };
        match hello_exchange(&to, &inner.hello, inner.engine_timeout) {
            Ok(stream) => return Some(stream),
            Err(failure) => {
                let failure = failure.to_string();
                if failure != last_failure {
                    warn!("engine {} still unreachable: {failure}", inner.engine);
                    last_failure = failure;
                }
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl Inner {
    /// Marks the connection lost (if it was up) and closes its socket, which ends the ack
    /// reader. The pending writes stay, to be sent again.
    fn lose(&self, state: &mut State, reason: &str) {
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

    /// On a fresh connection: sends every pending write again in its original order, then
    /// lets new writes through.
    fn go_up(&self, mut stream: WriteHalf) {
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

    /// Runs the completion of an acknowledged write.
    fn complete(&self, ack: WriteAck) {
        let Some(p) = lock(&self.pending).remove(&ack.req_id) else {
            warn!("engine {} acknowledged unknown write {}; ignored", self.engine, ack.req_id);
            return;
        };
        let w = &p.write;
        if ack.status == WriteAck::OK {
            if lock(&self.paused).remove(&w.disk).is_some() {
                info!("engine {} takes the writes of volume {} again", self.engine, self.volumes[usize::from(w.disk)]);
            }
            return (p.done)(Ok(ack.seq));
        }
        lock(&self.diverged).insert(w.disk);
        if ack.status == WriteAck::ENOSPC {
            // The group is paused: said once, not for every write.
            if lock(&self.paused).insert(w.disk, Instant::now()).is_none() {
                warn!(
                    "engine {} paused the group of volume {} (a journal is full): its writes are kept on the local disk and \
                     tracked for a resync (or fail, with on_engine_loss = \"fail\")",
                    self.engine,
                    self.volumes[usize::from(w.disk)]
                );
            }
            return (p.done)(Err(BlockError::Io));
        }
        error!(
            "engine {} failed the write to volume {} at offset {} ({} bytes, {}): errno {}",
            self.engine,
            self.volumes[usize::from(w.disk)],
            w.offset,
            w.length,
            w.body.kind().as_str(),
            ack.status
        );
        (p.done)(Err(BlockError::Io));
    }

    /// If the link has been down for the engine timeout, fails every pending write and turns
    /// to failing new writes at once. Returns when that will happen, if it has not yet.
    fn expire(&self) -> Option<Instant> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::wire::frame::FRAME_HEADER_LEN;

    #[test]
    fn a_write_sent_in_place_is_the_same_frame_on_the_wire() {
        let data: Vec<u8> = (0..SEND_IN_PLACE + 3).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let p = Outgoing { disk: 1, offset: 1 << 20, length: u32::try_from(data.len()).unwrap(), body: WriteBody::Data(Arc::new(data)) };
        let mut joined = Vec::new();
        encode_write(&mut joined, 9, &p);
        let mut split = Vec::new();
        encode_write_head(&mut split, 9, &p);
        split.extend_from_slice(p.body.data());
        assert_eq!(split, joined);
    }

    #[test]
    fn write_frame_decodes_back() {
        let p = Outgoing { disk: 3, offset: 8192, length: 5, body: WriteBody::Data(Arc::new(b"hello".to_vec())) };
        let mut scratch = Vec::new();
        encode_write(&mut scratch, 42, &p);
        let mut payload = Vec::new();
        let ftype = read_frame(&mut &scratch[..], &mut payload).unwrap();
        assert_eq!(ftype, FrameType::Write);
        let (msg, data) = WriteMsg::decode(&payload).unwrap();
        assert_eq!(msg, WriteMsg { req_id: 42, offset: 8192, length: 5, disk: 3, kind: WriteKind::Data });
        assert_eq!(data, b"hello");
    }

    #[test]
    fn zeroes_frame_carries_no_data() {
        let p = Outgoing { disk: 0, offset: 0, length: 1 << 20, body: WriteBody::Trim(1 << 20) };
        let mut scratch = Vec::new();
        encode_write(&mut scratch, 7, &p);
        assert_eq!(scratch.len(), FRAME_HEADER_LEN + 24);
        let mut payload = Vec::new();
        read_frame(&mut &scratch[..], &mut payload).unwrap();
        let (msg, data) = WriteMsg::decode(&payload).unwrap();
        assert_eq!((msg.kind, msg.length, data.len()), (WriteKind::Trim, 1 << 20, 0));
    }

    #[test]
    fn held_frames_follow_each_other_in_order() {
        let mut held = Vec::new();
        for (req_id, byte) in [(1u64, b'a'), (2, b'b'), (3, b'c')] {
            let p = Outgoing { disk: 0, offset: req_id * 4096, length: 3, body: WriteBody::Data(Arc::new(vec![byte; 3])) };
            encode_write(&mut held, req_id, &p);
        }
        let mut stream = &held[..];
        let mut payload = Vec::new();
        for (req_id, byte) in [(1u64, b'a'), (2, b'b'), (3, b'c')] {
            assert_eq!(read_frame(&mut stream, &mut payload).unwrap(), FrameType::Write);
            let (msg, data) = WriteMsg::decode(&payload).unwrap();
            assert_eq!((msg.req_id, msg.offset, data), (req_id, req_id * 4096, &[byte; 3][..]));
        }
        assert!(stream.is_empty());
    }
}
