//! Shipping a group's journal to its target, in order, and learning what the target holds.
//!
//! Each group's shipper is a task of the engine's ship pool, woken when the group's journal
//! commits (and every [`IDLE_WAIT`] for its checks). It connects, says hello, learns the
//! target's durable sequence number and resumes right after it, reading the engine's own
//! journal (never past what is durable here: the target must never hold a write the engine
//! could lose). Each round sends at most one frame (or one async delta), so a busy group
//! delays another by one frame at most. The target's confirmations are read by a task of the
//! link pool ([`crate::confirms`]), woken when they arrive; the journal task deletes
//! segments once they are confirmed. Connecting blocks a pool thread for at most
//! `CONNECT_TIMEOUT` plus the handshake, and only one group at a time tries a target that has
//! just failed to answer ([`ConnectGate`]): an unreachable target never ties up the threads
//! that ship to the others. Between frames it also sends the group's hash requests
//! ([`crate::hashes`]) once it has shipped their prefix; the confirmation reader passes the
//! answers back.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hindsight_consistency::config::ReplicationMode;
use hindsight_consistency::journal::{JournalReader, Tail};
use hindsight_consistency::record::{encode_record, RecordHeader};
use hindsight_consistency::storage::Storage;
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{Next, Task};
use hindsight_consistency::transport::{Connection, Role, Security, WriteHalf};
use hindsight_consistency::wire::frame::{frame_header, FRAME_HEADER_LEN};
use hindsight_consistency::wire::{
    compress_records, decode_message, encode_message, read_frame, write_frame, ErrorMessage, FrameType, TargetHello, TargetWelcome,
    VolumeInfo, LZ4, PROTOCOL_VERSION,
};
use hindsight_consistency::{Seq, WriteKind};

use crate::confirms::ReaderEnd;
use crate::delta::{Delta, DeltaScan};
use crate::error::ShipError;
use crate::group::{GroupHandle, LinkStats};
use crate::hashes::HashBroker;
use crate::limiter::{Limiter, Paced};

/// The newest commits of a group's journal kept in memory for its shipper, which then never
/// reads back from the disk what it ships while it keeps up (32 ms of writes at 1 GB/s).
pub const SHIP_FROM_MEMORY: usize = 32 << 20;
/// Records are packed into frames of about this size.
const FRAME_TARGET_BYTES: usize = 1 << 20;
/// How long a small batch waits for more records before it is sent.
const SHIP_GATHER: Duration = Duration::from_millis(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a frame that did not shrink, the next ones are first tried on a sample this long.
const COMPRESSION_SAMPLE: usize = 64 << 10;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a shipper needs.
pub struct Shipper {
    /// The group.
    pub group: GroupHandle,
    /// Its journal directory.
    pub journal_dir: PathBuf,
    /// The journal's newest commits in memory.
    pub tail: Arc<Tail>,
    /// File system.
    pub fs: Arc<dyn Storage>,
    /// Engine name for the target's logs.
    pub engine_name: String,
    /// How the link to the target is protected.
    pub security: Security,
    /// The bandwidth limit of the link to this group's target, shared with the other groups
    /// shipping there.
    pub limiter: Option<Arc<Limiter>>,
    /// The group's hash requests, sent on this shipper's connection.
    pub hashes: Arc<HashBroker>,
    /// Connection attempts to this group's target, shared with the other groups shipping there.
    pub gate: Arc<ConnectGate>,
}

/// Connection attempts to one target, shared by the groups shipping there. While the target
/// answers, every group connects at once; after an attempt failed, the others wait out that
/// attempt's backoff, then one group tries (a probe) while the others wait for its outcome.
#[derive(Default)]
pub struct ConnectGate(Mutex<GateState>);

#[derive(Default)]
struct GateState {
    /// After a failed attempt, the others wait until then.
    failed_until: Option<Instant>,
    /// A group is trying again after a failure.
    probing: bool,
}

impl ConnectGate {
    /// May this group try now? If not, when to look again.
    fn enter(&self) -> Result<(), Instant> {
        let mut g = lock(&self.0);
        let now = Instant::now();
        let Some(until) = g.failed_until else { return Ok(()) };
        if until > now {
            return Err(until);
        }
        if g.probing {
            return Err(now + BACKOFF_MIN);
        }
        g.probing = true;
        Ok(())
    }

    /// The attempt is over: on failure, the other groups wait `backoff` before they try.
    fn leave(&self, ok: bool, backoff: Duration) {
        let mut g = lock(&self.0);
        g.probing = false;
        g.failed_until = if ok { None } else { Some(Instant::now() + backoff) };
    }
}

/// A group's shipper as a task: between connections it waits out its backoff; connected, each
/// round ships what the journal holds.
pub struct ShipTask(Mutex<Shipping>);

struct Shipping {
    s: Shipper,
    link: Option<Box<Link>>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The last problem logged, said once and not every retry.
    last_problem: String,
}

/// One connection to the target and what is being shipped on it.
struct Link {
    w: WriteHalf,
    reader: JournalReader,
    end: Arc<ReaderEnd>,
    out: Out,
    /// The frame being filled (kept across rounds while a small batch gathers).
    frame: Vec<u8>,
    /// Until when a small frame waits for more commits.
    gather_until: Option<Instant>,
    /// Async: the journal scanned ahead to the next interval point.
    scan: Option<DeltaScan>,
    /// The last confirmation seen, and since when.
    confirmed: (Seq, Instant),
    /// When a frame was last sent.
    sent_at: Instant,
    /// The ownership token the hello carried.
    token: u64,
}

/// What a connected round leads to.
enum Step {
    /// More to ship now.
    Again,
    /// Nothing now: look again then (or when the journal commits).
    Wait(Instant),
    /// The group stops.
    Stopped,
}

impl ShipTask {
    pub fn new(s: Shipper) -> ShipTask {
        ShipTask(Mutex::new(Shipping { s, link: None, retry_at: None, backoff: BACKOFF_MIN, last_problem: String::new() }))
    }
}

impl Task for ShipTask {
    fn run(&self) -> Next {
        lock(&self.0).round()
    }
}

impl Shipping {
    fn round(&mut self) -> Next {
        let stopping = self.s.group.shared.stopping.load(Ordering::Relaxed);
        let Some(link) = self.link.as_mut() else {
            if stopping {
                return Next::Done;
            }
            if self.s.group.shared.ownership.token().is_none() {
                // Another engine owns the group: a claim wakes this task.
                return Next::At(Instant::now() + NOT_OWNER_WAIT);
            }
            return self.connect();
        };
        let step = self.s.step(link);
        match step {
            Ok(Step::Again) => Next::Again,
            Ok(Step::Wait(at)) => Next::At(at),
            Ok(Step::Stopped) => {
                self.close(None);
                Next::Done
            }
            Err(problem) => {
                self.close(Some(problem));
                self.retry()
            }
        }
    }

    /// Connects, unless the backoff or the target's gate says to wait.
    fn connect(&mut self) -> Next {
        let now = Instant::now();
        if let Some(at) = self.retry_at.filter(|&at| at > now) {
            return Next::At(at);
        }
        if let Err(at) = self.s.gate.enter() {
            return Next::At(at);
        }
        let opened = self.s.open();
        self.s.gate.leave(opened.is_ok(), self.backoff);
        match opened {
            Ok(link) => {
                self.link = Some(Box::new(link));
                self.retry_at = None;
                self.backoff = BACKOFF_MIN;
                Next::Again
            }
            Err(problem) => {
                self.note(&problem);
                self.retry()
            }
        }
    }

    /// Waits the backoff before the next attempt, and doubles it.
    fn retry(&mut self) -> Next {
        let at = Instant::now() + self.backoff;
        self.retry_at = Some(at);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Next::At(at)
    }

    fn note(&mut self, problem: &ShipError) {
        let problem = problem.to_string();
        if problem != self.last_problem {
            let g = &self.s.group.config;
            log::warn!("group {}: shipping to {}: {problem}; retrying", g.name, g.target);
            self.last_problem = problem;
        }
    }

    /// Ends the connection: the reader is waited for, the group shows the target gone.
    fn close(&mut self, problem: Option<ShipError>) {
        let Some(link) = self.link.take() else { return };
        let cfg = &self.s.group.config;
        let shared = &self.s.group.shared;
        log::debug!("group {}: shipping ended; {} bytes of records were read from memory", cfg.name, link.reader.bytes_from_memory());
        link.w.shutdown();
        link.end.wait();
        self.s.hashes.disconnected();
        if matches!(problem, Some(ShipError::NotOwner)) {
            shared.policy.target_left();
        } else {
            shared.policy.target_connected(false);
        }
        if link.end.target_full.load(Ordering::Acquire) {
            // Said once by the journal watch; the same words each retry keep the log quiet.
            self.note(&ShipError::TargetFull);
        } else if let Some(p) = problem {
            self.note(&p);
        }
    }
}

/// How often a shipper of a group this engine does not own looks again (a claim wakes it).
const NOT_OWNER_WAIT: Duration = Duration::from_secs(1);

/// How long a new claim waits for the journal task to start the journal again.
const RESTART_WAIT: Duration = Duration::from_secs(30);

/// After how long with nothing shipped a connection gives its frame buffers back.
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// How long an idle shipper waits for new records; shorter while hash requests wait.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// A target that confirms nothing for this long while shipped records wait, or takes no bytes
/// for this long, is taken as gone (a hung process or host keeps its connection open): the
/// connection is closed, the group shows the target disconnected, and shipping resumes from
/// what the target confirmed once it answers again.
const CONFIRM_SILENCE: Duration = Duration::from_secs(15);
const IDLE_WAIT_HASHING: Duration = Duration::from_millis(2);

impl Shipper {
    /// Connects and runs the TLS handshake: the target's certificate must be valid for the
    /// group's `target_server_name` and name a target.
    fn connect(&self) -> Result<Connection, ShipError> {
        let cfg = &self.group.config;
        let target = &cfg.target;
        let addrs = target.to_socket_addrs().map_err(|source| ShipError::Resolve { target: target.clone(), source })?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return self
                        .security
                        .connect(s, &cfg.target_server_name, Role::Target)
                        .map_err(|source| ShipError::Handshake { source });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(source) => ShipError::Connect { source },
            None => ShipError::NoAddress,
        })
    }

    /// Opens a connection: handshake, hello, welcome, and the reader of its confirmations.
    fn open(&self) -> Result<Link, ShipError> {
        let cfg = &self.group.config;
        let token = self.group.shared.ownership.token().ok_or(ShipError::NotOwner)?;
        let (mut r, mut w) = self.connect()?.split();
        let mut scratch = Vec::new();
        let hello = TargetHello {
            protocol: PROTOCOL_VERSION,
            engine: self.engine_name.clone(),
            group: cfg.name.clone(),
            volumes: cfg.volumes.iter().map(|v| VolumeInfo { name: v.name.clone(), vm: v.vm.clone(), size: v.size }).collect(),
            compression: if cfg.compression.offer_lz4(&cfg.target) { vec![LZ4.to_string()] } else { Vec::new() },
            on_journal_full: cfg.on_journal_full.as_str().to_owned(),
            epoch: cfg.epoch,
            owner: token,
        };
        write_frame(&mut w, FrameType::TargetHello, &encode_message(&hello), &mut scratch)
            .map_err(|source| ShipError::SendHello { source })?;
        let mut payload = Vec::new();
        let read_welcome = |source| ShipError::ReadWelcome { source };
        let welcome: TargetWelcome = match read_frame(&mut r, &mut payload).map_err(read_welcome)? {
            FrameType::TargetWelcome => decode_message("TargetWelcome", &payload).map_err(read_welcome)?,
            FrameType::Error => {
                let m: ErrorMessage = decode_message("Error", &payload).map_err(read_welcome)?;
                *lock(&self.group.shared.target_refused) = m.message.clone();
                return Err(ShipError::Refused { message: m.message });
            }
            other => return Err(ShipError::UnexpectedFrame { got: other }),
        };
        let shared = &self.group.shared;
        lock(&shared.target_refused).clear();
        if shared.ownership.claimed() == Some(token) {
            // A new claim (docs/ha.md, "Takeover"): the target fenced the previous owner on this
            // hello; the journal continues the target's sequence, then agents may attach.
            let next = welcome.durable_seq + 1;
            let group = self.group.clone();
            // A cdp or async owner before this one may have acknowledged writes the target
            // lacks: every volume resyncs what its agent still has marked.
            let resync = if cfg.mode == ReplicationMode::Sync { Vec::new() } else { cfg.volumes.iter().map(|v| v.name.clone()).collect() };
            shared.restart_journal(next, resync, move || group.wake(), RESTART_WAIT).map_err(|why| ShipError::Restart { why })?;
            if !shared.ownership.serve(token) {
                return Err(ShipError::NotOwner);
            }
            log::info!("group {}: owned by this engine (token {token}); taking writes from seq {next} on", cfg.name);
        }
        let durable_here = shared.durable();
        if welcome.durable_seq > durable_here {
            let msg = ShipError::TargetAhead { target_seq: welcome.durable_seq, durable: durable_here };
            log::error!("group {}: {msg}", cfg.name);
            return Err(msg);
        }
        let from = welcome.durable_seq + 1;
        let reader = JournalReader::open(self.fs.clone(), &self.journal_dir, from)
            .map_err(|source| ShipError::NotRetained { from, source })?
            .with_tail(Arc::clone(&self.tail));
        // Connected first: a target that holds everything the journal does brings a degraded
        // sync group back to sync before its next write (a new claim always does).
        shared.policy.target_connected(true);
        shared.confirm(welcome.durable_seq);
        let compress = welcome.compression == LZ4;
        shared.link.set_compression(if compress { LZ4 } else { "" });
        log::info!(
            "group {}: shipping to {} from seq {from} (engine durable seq {durable_here}){}",
            cfg.name,
            cfg.target,
            if compress { ", lz4" } else { "" }
        );

        self.hashes.connected();
        let end = match crate::confirms::start(r, Arc::clone(shared), Arc::clone(&self.hashes), &cfg.name) {
            Ok(end) => end,
            Err(source) => {
                w.shutdown();
                self.hashes.disconnected();
                shared.policy.target_connected(false);
                return Err(ShipError::SpawnReader { source });
            }
        };

        if let Err(e) = w.set_write_timeout(Some(CONFIRM_SILENCE)) {
            log::warn!("group {}: cannot bound the socket's writes: {e}", cfg.name);
        }
        let out = Out {
            compress,
            scratch: Vec::new(),
            packed: Vec::new(),
            last_incompressible: false,
            shipped: reader.next_seq().saturating_sub(1),
        };
        let confirmed = (shared.confirmed.load(Ordering::Acquire), Instant::now());
        Ok(Link { w, reader, end, out, frame: Vec::new(), gather_until: None, scan: None, confirmed, sent_at: Instant::now(), token })
    }

    /// One round on a connection: at most one frame, or one async delta.
    fn step(&self, l: &mut Link) -> Result<Step, ShipError> {
        let shared = &self.group.shared;
        if l.end.broken.load(Ordering::Acquire) {
            return Err(ShipError::TargetClosed);
        }
        if shared.ownership.token() != Some(l.token) {
            return Err(ShipError::NotOwner);
        }
        let now = Instant::now();
        let now_confirmed = shared.confirmed.load(Ordering::Acquire);
        if now_confirmed != l.confirmed.0 || l.out.shipped <= now_confirmed {
            l.confirmed = (now_confirmed, now);
        } else if l.confirmed.1.elapsed() >= CONFIRM_SILENCE {
            return Err(ShipError::TargetSilent { waited: CONFIRM_SILENCE, waiting: l.out.shipped - now_confirmed });
        }
        if shared.stopping.load(Ordering::Relaxed) {
            return Ok(Step::Stopped);
        }
        if l.frame.is_empty() {
            // Every record read so far is sent (a frame gathering for SHIP_GATHER is not):
            // hash requests of that prefix may go, behind those records.
            self.send_hash_requests(l.reader.next_seq() - 1, &mut l.w)?;
        }
        let durable = shared.durable();
        if shared.policy.effective() == ReplicationMode::Async {
            if l.frame.is_empty() {
                let s = match &mut l.scan {
                    Some(s) => s,
                    None => l.scan.insert(DeltaScan::new(
                        JournalReader::open(self.fs.clone(), &self.journal_dir, l.reader.next_seq())
                            .map_err(|source| ShipError::ReadJournal { source })?,
                    )),
                };
                return match s.advance(durable).map_err(|source| ShipError::ReadJournal { source })? {
                    Some(delta) => {
                        l.scan = None;
                        self.ship_delta(&mut l.reader, &delta, &mut l.frame, &mut l.out, &mut l.w)?;
                        Ok(Step::Again)
                    }
                    None => Ok(Step::Wait(now + self.idle_wait())),
                };
            }
            // A frame gathered before the group turned async goes first.
        } else {
            // Not (or no longer) async: everything goes as it is, from where the target is.
            l.scan = None;
        }
        while l.frame.len() < FRAME_TARGET_BYTES {
            match l.reader.next_raw_upto(durable).map_err(|source| ShipError::ReadJournal { source })? {
                Some((rec, raw)) => {
                    l.out.ships(rec.header.seq);
                    l.frame.extend_from_slice(raw);
                }
                None => break,
            }
        }
        if l.frame.is_empty() {
            if l.reader.next_seq() <= durable {
                // Durable but not readable yet: a segment is being created right now.
                return Ok(Step::Wait(now + Duration::from_millis(1)));
            }
            if l.sent_at.elapsed() >= RELEASE_AFTER && l.frame.capacity() > 0 {
                // Nothing shipped for a while: the frame buffers go until the next commit.
                l.frame = Vec::new();
                l.out.scratch = Vec::new();
                l.out.packed = Vec::new();
                l.w.release();
            }
            return Ok(Step::Wait(now + self.idle_wait()));
        }
        // Sync writes wait for the target: ship them at once. A small batch otherwise waits
        // up to SHIP_GATHER for the next group commits to join it (the journal's commits wake
        // the task), so that the target commits (one fdatasync each) a few hundred times a
        // second at most instead of once per engine commit. This adds at most SHIP_GATHER to
        // the lag.
        if l.frame.len() < FRAME_TARGET_BYTES / 4 && shared.policy.effective() != ReplicationMode::Sync {
            let until = *l.gather_until.get_or_insert(now + SHIP_GATHER);
            if now < until {
                return Ok(Step::Wait(until));
            }
        }
        l.gather_until = None;
        l.out.send(&mut l.w, self.limiter.as_deref(), &l.frame, &shared.link)?;
        l.frame.clear();
        l.sent_at = now;
        Ok(Step::Again)
    }

    /// Sends the hash requests whose prefix is shipped, and answers those waiting too long.
    fn send_hash_requests(&self, shipped_through: u64, w: &mut WriteHalf) -> Result<(), ShipError> {
        self.hashes.expire();
        let mut scratch = Vec::new();
        for req in self.hashes.take_ready(shipped_through) {
            write_frame(w, FrameType::TargetHashRequest, &encode_message(&req), &mut scratch)
                .map_err(|source| ShipError::Send { source })?;
        }
        Ok(())
    }

    fn idle_wait(&self) -> Duration {
        if self.hashes.busy() {
            IDLE_WAIT_HASHING
        } else {
            IDLE_WAIT
        }
    }

    /// Ships one async delta: every record through its point, the superseded writes as headers
    /// without data.
    fn ship_delta(
        &self,
        reader: &mut JournalReader,
        delta: &Delta,
        frame: &mut Vec<u8>,
        out: &mut Out,
        w: &mut WriteHalf,
    ) -> Result<(), ShipError> {
        let shared = &self.group.shared;
        frame.clear();
        while reader.next_seq() <= delta.point {
            let Some((rec, raw)) = reader.next_raw_upto(delta.point).map_err(|source| ShipError::ReadJournal { source })? else {
                // Durable but not readable yet (a segment being created).
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            out.ships(rec.header.seq);
            if delta.superseded.contains(&rec.header.seq) {
                let h = RecordHeader { kind: WriteKind::Superseded, ..rec.header };
                encode_record(&h, rec.volume, &[], frame);
            } else {
                frame.extend_from_slice(raw);
            }
            if frame.len() >= FRAME_TARGET_BYTES {
                out.send(w, self.limiter.as_deref(), frame, &shared.link)?;
                frame.clear();
            }
        }
        if !frame.is_empty() {
            out.send(w, self.limiter.as_deref(), frame, &shared.link)?;
            frame.clear();
        }
        log::debug!(
            "group {}: shipped the delta through seq {} ({} records, {} superseded)",
            self.group.config.name,
            delta.point,
            delta.records,
            delta.superseded.len()
        );
        Ok(())
    }
}

/// Sends frames of records: compressed when negotiated and worth it, paced by the bandwidth
/// limit, counted.
struct Out {
    compress: bool,
    scratch: Vec<u8>,
    packed: Vec<u8>,
    last_incompressible: bool,
    /// The last record put into a frame: records go out in sequence order.
    shipped: Seq,
}

impl Out {
    /// Notes that record `seq` goes into the next frame (checked in debug builds: each record
    /// shipped is numbered after the one before).
    fn ships(&mut self, seq: Seq) {
        debug_assert!(seq > self.shipped, "shipping seq {seq} after seq {}", self.shipped);
        self.shipped = seq;
    }

    fn send(&mut self, w: &mut WriteHalf, limiter: Option<&Limiter>, frame: &[u8], link: &LinkStats) -> Result<(), ShipError> {
        // After a frame that did not shrink, a frame is first tried on a sample, so a stream of
        // incompressible data costs a few percent of the compressor's work, and compressible
        // data is not missed.
        let worth_trying = self.compress
            && (!self.last_incompressible || compress_records(&frame[..frame.len().min(COMPRESSION_SAMPLE)], &mut self.packed));
        let (ftype, payload) = if worth_trying && compress_records(frame, &mut self.packed) {
            self.last_incompressible = false;
            (FrameType::RecordsLz4, &self.packed[..])
        } else {
            self.last_incompressible = self.compress;
            (FrameType::Records, frame)
        };
        if limiter.is_some() {
            let mut paced = Paced { inner: w, limiter };
            write_frame(&mut paced, ftype, payload, &mut self.scratch).map_err(|source| ShipError::Send { source })?;
            paced.flush().map_err(|source| ShipError::Flush { source })?;
        } else {
            let head = frame_header(ftype, payload).map_err(|source| ShipError::Send { source })?;
            w.send_two(&head, payload, &mut self.scratch).map_err(|source| ShipError::Send { source })?;
        }
        link.count(frame.len(), payload.len() + FRAME_HEADER_LEN);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_lets_every_group_connect_while_the_target_answers() {
        let gate = ConnectGate::default();
        assert!(gate.enter().is_ok());
        assert!(gate.enter().is_ok(), "a second group connects at the same time");
        gate.leave(true, BACKOFF_MIN);
        gate.leave(true, BACKOFF_MIN);
        assert!(gate.enter().is_ok());
    }

    #[test]
    fn gate_after_a_failure_holds_the_others_then_lets_one_probe() {
        let gate = ConnectGate::default();
        assert!(gate.enter().is_ok());
        gate.leave(false, Duration::from_millis(30));
        let until = gate.enter().expect_err("the others wait out the failed attempt's backoff");
        assert!(until > Instant::now());
        std::thread::sleep(Duration::from_millis(40));
        assert!(gate.enter().is_ok(), "one group probes once the backoff is over");
        assert!(gate.enter().is_err(), "the others wait for the probe's outcome");
        gate.leave(true, BACKOFF_MIN);
        assert!(gate.enter().is_ok(), "the target answers again: everyone connects");
        assert!(gate.enter().is_ok());
    }
}
