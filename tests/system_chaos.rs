//! kill -9 under load: one writer keeps writing random 4 KiB blocks while the agent, the
//! engine and the target are killed at random moments and restarted, 26 kills per test. Then
//! everything catches up and the test checks:
//!
//! - sync: whenever the source site (agent and engine together) is lost, the target already
//!   holds every write acknowledged to the writer;
//! - every point that history calls consistent recovers to a prefix of the write order (the
//!   writes not acknowledged, those in flight at a kill, may or may not be in it), and equals
//!   the target's own journal applied up to it;
//! - the target's guest records are the writes in the order they were issued, and every
//!   acknowledged write is one of them or was re-sent later by a resync of its region;
//! - every resync span has a cause (a kill since the previous resync ended) and ends once the
//!   agent's resync is complete, and once everything has caught up the newest point is
//!   consistent;
//! - the replica finally equals the source disk byte for byte.
//!
//! Besides, a killed agent of a sync group whose write waits for an absent target is taken
//! back at once when it restarts.
//!
//! The writer is a single qemu-io that waits for each reply before it sends the next write, so
//! the issue order is the acknowledgement order. A write that fails (its agent died; in sync
//! mode, the engine stayed away past `engine_timeout`) is recorded as in flight, and the writer
//! starts a new session once the agent is back.
//!
//! The seed is printed; `HS_CHAOS_SEED=<seed>` repeats the kill schedule and the data (the
//! timing of the processes is not repeatable).

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use hindsight_consistency::record::RESYNC_POINT_NAME;
use hindsight_consistency::WriteKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOLUME_SIZE: u64 = 4 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: usize = (VOLUME_SIZE / BLOCK) as usize;
/// Kills per test; the file's two tests make 52.
const KILLS: usize = 26;
/// How many consistent points each test recovers and checks.
const POINTS: usize = 10;
/// How long the writer waits for one reply before it counts the write as failed.
const WRITE_WAIT: Duration = Duration::from_secs(30);

fn chaos_rng(test: &str) -> StdRng {
    let seed: u64 = std::env::var("HS_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{test}: seed {seed} (HS_CHAOS_SEED={seed} repeats this schedule)");
    StdRng::seed_from_u64(seed)
}

fn hash(data: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// One write the writer issued, in issue order.
#[derive(Clone)]
struct Issued {
    off: u64,
    data: Vec<u8>,
    /// The reply came: the write is acknowledged. False for a write in flight when its session
    /// failed, which may or may not have taken effect, and for the one waiting for its reply.
    acked: bool,
    /// The writer has its outcome (acknowledged or failed).
    done: bool,
}

/// What the writer thread and the killing loop share.
struct Shared {
    writes: Mutex<Vec<Issued>>,
    stop: AtomicBool,
    /// False while the agent is down: the writer does not start a new session then.
    agent_up: AtomicBool,
    /// Writes that failed so far.
    failures: AtomicUsize,
    /// Writes that got no reply within `WRITE_WAIT` (every process is back within about 3 s).
    stalls: AtomicUsize,
}

impl Shared {
    fn snapshot(&self) -> Vec<Issued> {
        self.writes.lock().unwrap().clone()
    }

    fn acked(&self) -> usize {
        self.writes.lock().unwrap().iter().filter(|w| w.acked).count()
    }

    /// The writes once the last one has its outcome (the writer is between two writes).
    fn settled_snapshot(&self, wait: Duration) -> Vec<Issued> {
        let start = Instant::now();
        loop {
            {
                let w = self.writes.lock().unwrap();
                if w.last().is_none_or(|l| l.done) {
                    return w.clone();
                }
            }
            assert!(start.elapsed() < wait, "the write in flight got no outcome within {wait:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes random blocks one at a time until told to stop; a failed write ends the session and
/// a new one starts once the agent is up.
fn spawn_writer(what: &'static str, uri: String, src: PathBuf, seed: u64, shared: Arc<Shared>) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut session: Option<QemuIoSession> = None;
        while !shared.stop.load(Ordering::SeqCst) {
            if session.is_none() {
                let start = Instant::now();
                while !shared.agent_up.load(Ordering::SeqCst) {
                    if start.elapsed() > Duration::from_secs(90) {
                        return Err("the agent was not restarted within 90 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                session = Some(QemuIoSession::start(&uri));
            }
            let off = rng.gen_range(0..VOLUME_SIZE / BLOCK) * BLOCK;
            let data = random_bytes(&mut rng, BLOCK as usize);
            std::fs::write(&src, &data).unwrap();
            shared.writes.lock().unwrap().push(Issued { off, data, acked: false, done: false });
            let sent = Instant::now();
            let result = session.as_mut().unwrap().try_write_file(&src, off, BLOCK, WRITE_WAIT);
            {
                let mut writes = shared.writes.lock().unwrap();
                let last = writes.last_mut().unwrap();
                last.acked = result.is_ok();
                last.done = true;
            }
            if let Err(e) = result {
                let n = shared.failures.fetch_add(1, Ordering::SeqCst) + 1;
                if sent.elapsed() >= WRITE_WAIT {
                    shared.stalls.fetch_add(1, Ordering::SeqCst);
                }
                eprintln!("{what}: write #{} failed ({n} so far): {e}", shared.writes.lock().unwrap().len() - 1);
                session = None;
                // A write the agent refuses at once (the engine away, sync) fails again at once.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if let Some(s) = session {
            s.finish();
        }
        Ok(())
    })
}

/// A target journal record of the volume.
struct Rec {
    seq: u64,
    /// Engine receive time, ns since the Unix epoch.
    time_ns: u64,
    kind: WriteKind,
    off: u64,
    len: u64,
    data: Vec<u8>,
    /// A resync point (a point record the engine places when an agent's resync is complete).
    resync_point: bool,
}

impl Rec {
    /// A write of the guest in its order (a resync re-sends what is on the local disk; it is
    /// not one).
    fn is_guest_write(&self) -> bool {
        matches!(self.kind, WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim | WriteKind::Superseded)
    }

    fn apply(&self, img: &mut [u8]) {
        let (o, l) = (self.off as usize, self.len as usize);
        match self.kind {
            WriteKind::Data | WriteKind::Resync => img[o..o + l].copy_from_slice(&self.data),
            WriteKind::Zeroes | WriteKind::Trim => img[o..o + l].fill(0),
            _ => {}
        }
    }
}

/// Every record of the target's journal: (seq, kind) of all, offset, length and data of the
/// volume's.
fn target_journal(c: &Cluster) -> Vec<Rec> {
    let dir = c.path("target").join("groups").join(&c.group).join("journal");
    let fs = hindsight_consistency::storage::StdStorage::shared();
    let Ok(mut reader) = hindsight_consistency::journal::JournalReader::open(fs, &dir, 1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some(rec) = reader.next().unwrap() {
        let h = rec.header;
        let ours = rec.volume == "data" && (h.kind.changes_volume() || h.kind == WriteKind::Superseded);
        out.push(Rec {
            seq: h.seq,
            time_ns: h.time_ns,
            kind: h.kind,
            off: if ours { h.offset } else { 0 },
            len: if ours { u64::from(h.length) } else { 0 },
            data: if ours { rec.data.to_vec() } else { Vec::new() },
            resync_point: h.kind == WriteKind::Point && rec.volume == RESYNC_POINT_NAME,
        });
    }
    out
}

/// The volume after every record up to `seq`.
fn journal_image(recs: &[Rec], seq: u64) -> Vec<u8> {
    let mut img = vec![0u8; VOLUME_SIZE as usize];
    for r in recs.iter().take_while(|r| r.seq <= seq) {
        r.apply(&mut img);
    }
    img
}

/// Each n in `range` for which `img` is the volume after the first n issued writes, each
/// write not acknowledged among them either applied or not (per block: a block holds its last
/// acknowledged write, or one of the unacknowledged writes to it after that one).
fn prefix_matches(writes: &[Issued], img: &[u8], range: RangeInclusive<usize>) -> Vec<usize> {
    let got: Vec<u64> = img.chunks(BLOCK as usize).map(hash).collect();
    let zero = hash(&vec![0u8; BLOCK as usize]);
    let mut allowed: Vec<Vec<u64>> = vec![vec![zero]; BLOCKS];
    let mut wrong = got.iter().filter(|&&h| h != zero).count();
    let mut out = Vec::new();
    for n in 0..=writes.len() {
        if wrong == 0 && range.contains(&n) {
            out.push(n);
        }
        let Some(w) = writes.get(n) else { break };
        let b = (w.off / BLOCK) as usize;
        let was_ok = allowed[b].contains(&got[b]);
        if w.acked {
            allowed[b] = vec![hash(&w.data)];
        } else {
            allowed[b].push(hash(&w.data));
        }
        match (was_ok, allowed[b].contains(&got[b])) {
            (true, false) => wrong += 1,
            (false, true) => wrong -= 1,
            _ => {}
        }
    }
    out
}

/// Maps each guest record to the issued write it carries and checks the order: issue order
/// along the sequence (the same write twice only when it was re-sent to a restarted engine),
/// and every acknowledged write either among them or re-sent afterwards by a resync of its
/// region. Returns (seq, index in `writes`) of each guest record.
fn check_journal_order(writes: &[Issued], recs: &[Rec]) -> Result<Vec<(u64, usize)>, String> {
    let mut index: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        assert!(index.insert((w.off, hash(&w.data)), i).is_none(), "two issued writes are equal");
    }
    let mut mapped: Vec<(u64, usize)> = Vec::new();
    for r in recs.iter().filter(|r| r.is_guest_write()) {
        if r.kind != WriteKind::Data {
            return Err(format!("seq {}: a {:?} record, but the writer only writes data", r.seq, r.kind));
        }
        let Some(&i) = index.get(&(r.off, hash(&r.data))) else {
            return Err(format!("seq {}: a data record at offset {} that no issued write carries", r.seq, r.off));
        };
        if let Some(&(prev_seq, prev)) = mapped.last() {
            if i < prev {
                return Err(format!("seq {}: write #{i} recorded after write #{prev} (seq {prev_seq}), which was issued after it", r.seq));
            }
        }
        mapped.push((r.seq, i));
    }
    // An acknowledged write that is not a guest record reached the target as resync data:
    // its region was re-sent after the guest record before it.
    let mut present = vec![false; writes.len()];
    for &(_, i) in &mapped {
        present[i] = true;
    }
    let mut last_seq_before = 0;
    let mut m = mapped.iter().peekable();
    for (i, w) in writes.iter().enumerate() {
        while let Some(&&(seq, j)) = m.peek() {
            if j >= i {
                break;
            }
            last_seq_before = seq;
            m.next();
        }
        if w.acked && !present[i] {
            let resent = recs
                .iter()
                .any(|r| r.kind == WriteKind::Resync && r.seq > last_seq_before && r.off <= w.off && w.off + BLOCK <= r.off + r.len);
            if !resent {
                return Err(format!(
                    "acknowledged write #{i} (offset {}) is neither a guest record nor re-sent by a resync after seq {last_seq_before}",
                    w.off
                ));
            }
        }
    }
    Ok(mapped)
}

/// The source site's history as the target tells it.
struct History {
    last_seq: u64,
    last_consistent_seq: u64,
    spans: Vec<(u64, Option<u64>, String)>,
}

fn history(c: &Cluster) -> History {
    let h = c.history();
    let spans = h["inconsistent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["from"].as_u64().unwrap(), s["to"].as_u64(), s["kind"].as_str().unwrap_or("delta").to_owned()))
        .collect();
    History { last_seq: h["last_seq"].as_u64().unwrap(), last_consistent_seq: h["last_consistent_seq"].as_u64().unwrap(), spans }
}

impl History {
    fn consistent(&self, seq: u64) -> bool {
        !self.spans.iter().any(|&(from, to, _)| seq >= from && to.is_none_or(|t| seq < t))
    }
}

/// The engine's status of the group (`Null` if the engine does not answer).
fn engine_status(c: &Cluster) -> serde_json::Value {
    let (ok, out, _) =
        run_timeout(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(c.engine_toml()), Duration::from_secs(30));
    let v: serde_json::Value = if ok { serde_json::from_str(&out).unwrap_or_default() } else { serde_json::Value::Null };
    v["groups"][0].clone()
}

fn engine_lag(c: &Cluster) -> Option<u64> {
    engine_status(c)["lag_writes"].as_u64()
}

/// True when the agent's dirty map of the volume has no region marked.
fn map_clean(c: &Cluster) -> bool {
    let mut path = c.disk("data").into_os_string();
    path.push(".hsmap");
    let bytes = std::fs::read(&path).unwrap_or_default();
    bytes.len() > 20 && bytes[16..bytes.len() - 4].iter().all(|&b| b == 0)
}

/// Waits until nothing is left to do: the agent's map is clean (every region confirmed, every
/// resync done), the target holds everything the engine holds, and the newest point is
/// consistent; several times in a row.
fn wait_caught_up(c: &Cluster) {
    let start = Instant::now();
    let mut good = 0;
    // Since when the agent and the engine have had nothing left to send while the target's
    // newest point was still not consistent.
    let mut idle_open: Option<Instant> = None;
    loop {
        let h = history(c);
        let lag = engine_lag(c);
        let clean = map_clean(c);
        let idle = clean && lag == Some(0);
        if idle && h.last_consistent_seq == h.last_seq {
            good += 1;
            if good >= 3 {
                return;
            }
        } else {
            good = 0;
        }
        if idle && h.last_consistent_seq != h.last_seq {
            let since = *idle_open.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                let tail: Vec<String> = target_journal(c)
                    .iter()
                    .filter(|r| r.seq > h.last_consistent_seq.saturating_sub(2))
                    .map(|r| format!("seq {} {:?} offset {} length {}", r.seq, r.kind, r.off, r.len))
                    .collect();
                panic!(
                    "the newest consistent point stays at seq {} of {} although the agent has nothing left to resync and \
                     the engine's lag is 0: a resync span never ends, so the acknowledged writes after it are in no \
                     consistent point (spans {:?}; the records from just before it: {tail:?})",
                    h.last_consistent_seq, h.last_seq, h.spans
                );
            }
        } else {
            idle_open = None;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            // The values of this sample: read again, the map may have been cleaned meanwhile.
            "never caught up: map clean {clean}, engine lag {lag:?}, target last seq {}, last consistent {}, spans {:?}",
            h.last_seq,
            h.last_consistent_seq,
            h.spans
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn describe(recs: &[&Rec]) -> Vec<String> {
    recs.iter().map(|r| format!("seq {} {:?} offset {} length {}", r.seq, r.kind, r.off, r.len)).collect()
}

/// Checks what starts and fills each resync span against the kills (their times, ns since the
/// Unix epoch, with the victim):
///
/// - a resync starts only after something left the replica short: an agent or an engine
///   was killed since the previous resync ended. A span that opens right after a resync point
///   with no kill in between is resync data the agent sent after asking for that point (a
///   guest write it sent as resync data while it finished its resync), and nothing ends it
///   until some later resync: every point up to then is lost;
/// - while an agent resyncs, it sends every guest write as resync data; once it sends them as
///   plain data its resync is complete and it has asked for the resync point. So resync data
///   after a guest record in one span means the point was asked for and never placed, unless
///   the agent died before it could ask. (A guest write just before the point is harmless.)
fn check_resync_spans(recs: &[Rec], h: &History, kills: &[(u64, Victim)]) -> Result<(), String> {
    // A record sent before a kill may be timed a little after it (records are timed when the
    // engine numbers them). Far less than a resync takes after the kill that causes it.
    const SLACK_NS: u64 = 50_000_000;
    let killed_between = |from_ns: u64, to_ns: u64, agent_only: bool| {
        kills.iter().any(|&(t, v)| t + SLACK_NS >= from_ns && t <= to_ns && (v != Victim::Target) && (!agent_only || v != Victim::Engine))
    };
    for &(from, to, ref kind) in &h.spans {
        if kind != "resync" {
            continue;
        }
        let inside: Vec<&Rec> = recs.iter().filter(|r| r.seq >= from && to.is_none_or(|t| r.seq < t)).collect();
        let Some(first) = inside.first() else { continue };
        if let Some(point) = recs.iter().rev().find(|r| r.seq < from && r.resync_point) {
            if !killed_between(point.time_ns, first.time_ns, false) {
                return Err(format!(
                    "resync span {from}..{to:?} opens {} µs after the resync point at seq {} with no agent or engine killed in \
                     between: resync data sent after the agent asked for the point; the span starts with {:?}",
                    first.time_ns.saturating_sub(point.time_ns) / 1000,
                    point.seq,
                    describe(&inside[..inside.len().min(4)])
                ));
            }
        }
        let Some(guest) = inside.iter().position(|r| r.is_guest_write()) else { continue };
        if let Some(late) = inside[guest..].iter().find(|r| r.kind == WriteKind::Resync) {
            if !killed_between(inside[guest].time_ns, late.time_ns, true) {
                return Err(format!(
                    "resync span {from}..{to:?}: resync data at seq {} after guest record seq {} with no agent killed in between \
                     ({} records in the span): the agent finished its resync but no resync point ended the span; it \
                     starts with {:?}",
                    late.seq,
                    inside[guest].seq,
                    inside.len(),
                    describe(&inside[..inside.len().min(4)])
                ));
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Agent,
    Engine,
    Target,
    /// Agent and engine together: the source site is lost.
    Site,
}

struct Chaos {
    c: Cluster,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<Result<(), String>>>,
    rng: StdRng,
    kills: usize,
    by_victim: HashMap<&'static str, usize>,
    sync: bool,
    site_checks: usize,
    /// Sync checks of the target while the writer goes on.
    live_checks: usize,
    /// Agent restarts the engine refused at first.
    agent_retries: usize,
    /// When each kill happened (ns since the Unix epoch), and what it killed (a site kill is
    /// an agent and an engine kill).
    kill_times: Vec<(u64, Victim)>,
    test: &'static str,
    started: Instant,
}

impl Chaos {
    fn new(test: &'static str, sync: bool) -> Chaos {
        let mut rng = chaos_rng(test);
        // Small segments: the journals roll, and the engine's reuses trimmed segment files,
        // many times a run, so kills land during rolls and in reused files too.
        let mut c = Cluster::prepare(&[Vol::new("vm1", "data", VOLUME_SIZE)], "segment_size = \"1MiB\"", "");
        c.engine_extra = "segment_size = \"1MiB\"".into();
        if sync {
            // RPO 0 against the engine too: a write the engine does not take fails rather than
            // complete from the local disk alone (failure-handling.md).
            c.agent_extra = "engine_timeout = \"2s\"\non_engine_loss = \"fail\"".into();
            c.group_extra = "mode = \"sync\"\non_sync_loss = \"block\"\nsync_timeout = \"120s\"".into();
        } else {
            c.agent_extra = "engine_timeout = \"2s\"\non_engine_loss = \"track\"".into();
        }
        c.launch();
        c.start_agents();
        let shared = Arc::new(Shared {
            writes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            agent_up: AtomicBool::new(true),
            failures: AtomicUsize::new(0),
            stalls: AtomicUsize::new(0),
        });
        let writer = spawn_writer(test, c.uri("data"), c.path("chaos-block.bin"), rng.gen(), shared.clone());
        Chaos {
            c,
            shared,
            writer: Some(writer),
            rng,
            kills: 0,
            by_victim: HashMap::new(),
            sync,
            site_checks: 0,
            live_checks: 0,
            agent_retries: 0,
            kill_times: Vec::new(),
            test,
            started: Instant::now(),
        }
    }

    fn wait_acked(&self, n: usize) {
        let start = Instant::now();
        while self.shared.acked() < n {
            assert!(start.elapsed() < Duration::from_secs(60), "the writer got only {} writes acknowledged", self.shared.acked());
            self.check_writer();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_writer(&self) {
        if self.writer.as_ref().is_some_and(JoinHandle::is_finished) {
            panic!("the writer stopped while the test ran");
        }
    }

    fn count(&mut self, what: &'static str, n: usize) {
        self.kills += n;
        *self.by_victim.entry(what).or_default() += 1;
    }

    fn kill_agent(&mut self) {
        self.shared.agent_up.store(false, Ordering::SeqCst);
        self.c.kill_agent("vm1");
    }

    /// Starts the agent again; the engine may refuse it for a moment while it still holds the
    /// killed agent's attachment, and then it is started again.
    fn start_agent(&mut self) {
        let started = Instant::now();
        let starts = self.c.start_agent_retrying("vm1", Duration::from_secs(60));
        if starts > 1 {
            self.agent_retries += 1;
            let refusal = self.c.log("agent-vm1").lines().rev().find(|l| l.contains("refused")).unwrap_or_default().to_owned();
            eprintln!(
                "{}: the agent needed {starts} starts ({:?}): {refusal}; engine status now: {}",
                self.test,
                started.elapsed(),
                engine_status(&self.c)
            );
        }
        self.shared.agent_up.store(true, Ordering::SeqCst);
    }

    /// One random kill and restart.
    fn round(&mut self) {
        std::thread::sleep(Duration::from_millis(self.rng.gen_range(50..400)));
        self.check_writer();
        let victim = match self.rng.gen_range(0..if self.sync && self.kills + 2 <= KILLS { 4 } else { 3 }) {
            0 => Victim::Agent,
            1 => Victim::Engine,
            2 => Victim::Target,
            _ => Victim::Site,
        };
        let down = Duration::from_millis(self.rng.gen_range(0..300));
        // Now and then the engine stays away past engine_timeout: the agent tracks (cdp) or
        // fails (sync) the writes meanwhile and resyncs when it is back.
        let long = victim == Victim::Engine && self.rng.gen_ratio(1, 5);
        let down = if long { Duration::from_millis(self.rng.gen_range(2200..3000)) } else { down };
        let acked = self.shared.acked();
        eprintln!(
            "{} at {:.3}s: kill {}: {victim:?}, down {down:?} ({acked} writes acknowledged)",
            self.test,
            self.started.elapsed().as_secs_f64(),
            self.kills + 1
        );
        self.kill_times.push((hindsight_consistency::time::now_ns(), victim));
        match victim {
            Victim::Agent => {
                self.kill_agent();
                std::thread::sleep(down);
                self.start_agent();
                self.count("agent", 1);
            }
            Victim::Engine => {
                self.c.kill_engine();
                std::thread::sleep(down);
                self.c.start_engine();
                self.count("engine", 1);
            }
            Victim::Target => {
                self.c.kill_target();
                std::thread::sleep(down);
                self.c.start_target();
                self.count("target", 1);
            }
            Victim::Site => {
                self.shared.agent_up.store(false, Ordering::SeqCst);
                self.c.kill_engine();
                self.c.kill_agent("vm1");
                // Once the write in flight has failed, no write is acknowledged until the site
                // is back.
                let writes = self.shared.settled_snapshot(WRITE_WAIT * 2);
                self.assert_target_holds_every_acked_write(&writes);
                std::thread::sleep(down);
                self.c.start_engine();
                self.start_agent();
                self.count("site", 2);
            }
        }
        if self.sync {
            self.assert_target_holds_acked_writes_so_far();
        }
    }

    /// Sync, with the writer going on: every write acknowledged before the target's journal
    /// is read is in it. The journal applied in full is the volume after n of the writes
    /// issued by the time it was read, for an n that takes in every write that had its outcome
    /// before.
    fn assert_target_holds_acked_writes_so_far(&mut self) {
        let before = self.shared.snapshot();
        let decided = before.iter().take_while(|w| w.done).count();
        let recs = target_journal(&self.c);
        let after = self.shared.snapshot();
        let last = recs.last().map_or(0, |r| r.seq);
        let img = journal_image(&recs, last);
        let m = prefix_matches(&after, &img, decided..=after.len());
        assert!(
            !m.is_empty(),
            "sync: the target (last seq {last}) lacks acknowledged writes: {decided} writes had their outcome, {} of them \
             acknowledged, before its journal was read; its content matches after these counts of writes: {:?}",
            before.iter().filter(|w| w.acked).count(),
            prefix_matches(&after, &img, 0..=after.len())
        );
        self.live_checks += 1;
    }

    /// With the source site gone, the target holds every acknowledged write: its journal,
    /// applied in full, is the volume after every issued write (those not acknowledged may or
    /// may not be in it), and so is the latest point if it is consistent.
    fn assert_target_holds_every_acked_write(&mut self, writes: &[Issued]) {
        let recs = target_journal(&self.c);
        let last = recs.last().map_or(0, |r| r.seq);
        let img = journal_image(&recs, last);
        let m = prefix_matches(writes, &img, writes.len()..=writes.len());
        let near = prefix_matches(writes, &img, 0..=writes.len());
        assert!(
            !m.is_empty(),
            "sync: with the source site lost, the target (last seq {last}) lacks acknowledged writes: {} issued, {} acknowledged; \
             the target's content matches after these counts of writes: {near:?}",
            writes.len(),
            writes.iter().filter(|w| w.acked).count()
        );
        let h = history(&self.c);
        if h.last_consistent_seq == h.last_seq && h.last_seq == last {
            let latest = self.c.recover("data", &["--latest"]);
            assert!(latest == img, "sync: --latest differs from the target's journal: {}", first_difference(&latest, &img));
        }
        self.site_checks += 1;
    }

    /// Stops the writer, lets everything catch up and checks the replica, the journal's order
    /// and random consistent points.
    fn finish(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.writer.take().unwrap().join().unwrap().unwrap_or_else(|e| panic!("writer: {e}"));
        let writes = self.shared.snapshot();
        let acked = writes.iter().filter(|w| w.acked).count();
        let started = Instant::now();
        wait_caught_up(&self.c);
        eprintln!(
            "{} kills ({:?}), {} agent restart(s) refused at first; {} writes issued, {acked} acknowledged, {} failed; \
             {} source-site checks, {} live checks; caught up in {:?}",
            self.kills,
            self.by_victim,
            self.agent_retries,
            writes.len(),
            self.shared.failures.load(Ordering::SeqCst),
            self.site_checks,
            self.live_checks,
            started.elapsed()
        );
        let c = &self.c;

        // The replica equals the source, and the source is every issued write in order.
        let latest = c.recover("data", &["--latest"]);
        let source = std::fs::read(c.disk("data")).unwrap();
        assert!(latest == source, "the replica differs from the source disk after catching up: {}", first_difference(&latest, &source));
        let all = writes.len();
        assert!(
            !prefix_matches(&writes, &latest, all..=all).is_empty(),
            "the replica is not the volume after every acknowledged write (near: {:?})",
            prefix_matches(&writes, &latest, 0..=all)
        );
        let in_flight: Vec<usize> = (0..all).filter(|&i| !writes[i].acked).collect();
        let applied = in_flight
            .iter()
            .filter(|&&i| {
                let w = &writes[i];
                latest[w.off as usize..(w.off + BLOCK) as usize] == w.data[..]
            })
            .count();
        eprintln!("{} writes were in flight at a failure; {applied} of them are visible in the final image", in_flight.len());

        // The target's records are in issue order.
        let recs = target_journal(c);
        let mapped = check_journal_order(&writes, &recs).unwrap_or_else(|e| panic!("the target's records: {e}"));
        let resyncs = recs.iter().filter(|r| r.kind == WriteKind::Resync).count();
        let resent = mapped.windows(2).filter(|p| p[0].1 == p[1].1).count();
        let h = history(c);
        eprintln!(
            "target: last seq {}, {} guest records ({resent} of them a write sent again to a restarted engine), \
             {resyncs} resync records, inconsistent spans {:?}",
            h.last_seq,
            mapped.len(),
            h.spans
        );
        assert_eq!(h.last_seq, recs.last().map_or(0, |r| r.seq), "history and the journal disagree on the last seq");
        let final_img = journal_image(&recs, h.last_seq);
        assert!(final_img == latest, "--latest differs from the journal applied in full: {}", first_difference(&final_img, &latest));

        // Consistent points: each equals the journal applied up to it and is a prefix of the
        // issue order, bounded by the guest records around it. Random ones, the newest, and the
        // edges of a few spans (the last point before one, the resync point that ends it).
        let consistent: Vec<u64> = recs.iter().map(|r| r.seq).filter(|&s| h.consistent(s)).collect();
        assert!(!consistent.is_empty(), "no consistent point at all");
        let mut points: Vec<u64> = (0..POINTS).map(|_| consistent[self.rng.gen_range(0..consistent.len())]).collect();
        points.push(h.last_consistent_seq);
        for &(from, to, _) in &h.spans {
            if self.rng.gen_ratio(1, 2) {
                points.extend([from - 1, to.unwrap_or(0)].into_iter().filter(|&s| s > 0 && h.consistent(s)));
            }
        }
        points.sort_unstable();
        points.dedup();
        for k in points {
            let got = c.recover("data", &["--seq", &k.to_string()]);
            let want = journal_image(&recs, k);
            assert!(got == want, "seq {k}: the recovered image differs from the journal up to it: {}", first_difference(&got, &want));
            let lo = mapped.iter().take_while(|(s, _)| *s <= k).map(|&(_, i)| i + 1).max().unwrap_or(0);
            let hi = mapped.iter().filter(|(s, i)| *s > k && *i >= lo).map(|&(_, i)| i).min().unwrap_or(all);
            let m = prefix_matches(&writes, &got, lo..=hi);
            assert!(
                !m.is_empty(),
                "seq {k} (consistent per history) is not a prefix of the write order: expected after {lo}..={hi} writes, \
                 matches after {:?}",
                prefix_matches(&writes, &got, 0..=all)
            );
            eprintln!("seq {k}: the volume after {m:?} of {all} writes");
        }
        // No span holds more than the kills explain.
        if let Err(e) = check_resync_spans(&recs, &h, &self.kill_times) {
            panic!("{e}");
        }
        let stalls = self.shared.stalls.load(Ordering::SeqCst);
        assert_eq!(stalls, 0, "{stalls} write(s) got no reply within {WRITE_WAIT:?} although every process was back within seconds");
    }
}

fn run(test: &'static str, sync: bool) {
    let started = Instant::now();
    let mut chaos = Chaos::new(test, sync);
    chaos.wait_acked(20);
    chaos.c.wait_target_seq(1);
    while chaos.kills < KILLS {
        chaos.round();
    }
    chaos.finish();
    eprintln!("{test}: done in {:?}", started.elapsed());
}

#[test]
fn cdp_random_kills_keep_every_consistent_point_a_prefix_and_the_replica_equal() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    run("cdp", false);
}

#[test]
fn sync_random_kills_lose_no_acknowledged_write() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    run("sync", true);
}

/// The checks themselves, on made-up data: they accept a write in flight either way and
/// reject a lost acknowledged write, a write present without an earlier one, and records out
/// of issue order.
#[test]
fn checker_rejects_lost_and_reordered_writes() {
    let block = |b: u64, byte: u8, acked: bool| Issued { off: b * BLOCK, data: vec![byte; BLOCK as usize], acked, done: true };
    let writes = vec![block(0, 1, true), block(1, 2, false), block(0, 3, true), block(2, 4, true)];
    let image = |blocks: &[(u64, u8)]| {
        let mut img = vec![0u8; VOLUME_SIZE as usize];
        for &(b, byte) in blocks {
            img[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(byte);
        }
        img
    };
    let all = writes.len();
    // The write in flight (block 1) may be there or not.
    assert_eq!(prefix_matches(&writes, &image(&[(0, 3), (1, 2), (2, 4)]), all..=all), vec![all]);
    assert_eq!(prefix_matches(&writes, &image(&[(0, 3), (2, 4)]), all..=all), vec![all]);
    // The acknowledged overwrite of block 0 is lost.
    assert!(prefix_matches(&writes, &image(&[(0, 1), (2, 4)]), 0..=all).is_empty());
    // The last write is missing: a prefix, but a shorter one.
    assert_eq!(prefix_matches(&writes, &image(&[(0, 3)]), 0..=all), vec![3]);
    // A later write without the first one: no prefix at all.
    assert!(prefix_matches(&writes, &image(&[(2, 4)]), 0..=all).is_empty());

    let rec = |seq: u64, w: &Issued, kind: WriteKind| Rec {
        seq,
        time_ns: seq * 1_000_000,
        kind,
        off: w.off,
        len: BLOCK,
        data: w.data.clone(),
        resync_point: false,
    };
    let in_order = [rec(1, &writes[0], WriteKind::Data), rec(2, &writes[2], WriteKind::Data), rec(3, &writes[3], WriteKind::Data)];
    assert_eq!(check_journal_order(&writes, &in_order), Ok(vec![(1, 0), (2, 2), (3, 3)]));
    // An acknowledged write may arrive by a resync of its region instead.
    let resynced = [rec(1, &writes[0], WriteKind::Data), rec(2, &writes[2], WriteKind::Resync), rec(3, &writes[3], WriteKind::Data)];
    assert_eq!(check_journal_order(&writes, &resynced), Ok(vec![(1, 0), (3, 3)]));
    let swapped = [rec(1, &writes[2], WriteKind::Data), rec(2, &writes[0], WriteKind::Data), rec(3, &writes[3], WriteKind::Data)];
    assert!(check_journal_order(&writes, &swapped).is_err());
    let lost = [rec(1, &writes[0], WriteKind::Data), rec(2, &writes[3], WriteKind::Data)];
    assert!(check_journal_order(&writes, &lost).is_err());

    // Resync spans (seq n at n ms): a resync point at 2, a span from 3 to the point at 6.
    let point = |seq: u64| Rec {
        kind: WriteKind::Point,
        off: 0,
        len: 0,
        data: Vec::new(),
        resync_point: true,
        ..rec(seq, &writes[0], WriteKind::Data)
    };
    let spans = |from: u64| History { last_seq: 6, last_consistent_seq: 6, spans: vec![(from, Some(6), "resync".to_owned())] };
    let ms = |n: u64| n * 1_000_000;
    let killed_at = |n: u64, v: Victim| vec![(ms(n), v)];
    // Opened right after the point with nothing killed: resync data sent after asking for it.
    let stray = [
        point(2),
        rec(3, &writes[0], WriteKind::Resync),
        rec(4, &writes[2], WriteKind::Data),
        rec(5, &writes[3], WriteKind::Resync),
        point(6),
    ];
    assert!(check_resync_spans(&stray, &spans(3), &[]).is_err());
    // A resync once the agent was killed and started again.
    let restarted = [
        point(2),
        rec(3, &writes[0], WriteKind::Resync),
        rec(4, &writes[2], WriteKind::Resync),
        rec(5, &writes[3], WriteKind::Data),
        point(6),
    ];
    assert_eq!(check_resync_spans(&restarted, &spans(3), &killed_at(2, Victim::Agent)), Ok(()));
    // Resync data after a guest record: the point was asked for and never came...
    assert!(check_resync_spans(&stray, &spans(3), &killed_at(2, Victim::Engine)).is_err());
    // ... unless the agent died before it could ask.
    assert_eq!(check_resync_spans(&stray, &spans(3), &[(ms(2), Victim::Engine), (ms(4), Victim::Agent)]), Ok(()));
}

/// A sync group whose target is away holds the acknowledgement of the agent's write; the agent
/// is killed meanwhile. Its write is numbered and durable at the engine, so nothing is gained
/// by keeping the dead agent's volumes attached: the engine must take the restarted agent at
/// once, and must not burn a core for the dead session while the acknowledgement waits.
#[test]
fn sync_agent_killed_while_its_write_waits_for_the_target_is_taken_back_at_once() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", VOLUME_SIZE)], "", "");
    c.group_extra = "mode = \"sync\"\non_sync_loss = \"block\"\nsync_timeout = \"120s\"".into();
    c.launch();
    c.start_agents();
    let src = c.path("block.bin");
    std::fs::write(&src, random_bytes(&mut rand::thread_rng(), BLOCK as usize)).unwrap();
    let mut first = QemuIoSession::start(&c.uri("data"));
    first.write_file(&src, 0, BLOCK);
    first.finish();
    c.kill_target();
    // This write waits for the target (block), and the agent dies under it.
    let (uri, src2) = (c.uri("data"), src.clone());
    let writer = std::thread::spawn(move || QemuIoSession::start(&uri).try_write_file(&src2, BLOCK, BLOCK, Duration::from_secs(60)));
    let start = Instant::now();
    while engine_status(&c)["durable_seq"].as_u64() < Some(2) {
        assert!(start.elapsed() < Duration::from_secs(10), "the second write never reached the engine");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill_agent("vm1");
    assert!(writer.join().unwrap().is_err(), "a sync write was acknowledged with the target away");
    let engine = c.pid("engine").unwrap();
    let before = cpu_ticks(engine);
    let killed = Instant::now();
    let attached = loop {
        let attached = engine_status(&c)["attached"].clone();
        if attached.as_array().is_some_and(Vec::is_empty) || killed.elapsed() > Duration::from_secs(3) {
            break attached;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed()));
    let spent = cpu_ticks(engine) - before;
    eprintln!("3 s after the agent was killed: attached {attached}, the engine used {spent} clock ticks of CPU");
    assert_eq!(attached, serde_json::json!([]), "3 s after the agent was killed the engine still has its volume attached");
    assert!(spent < 100, "the engine used {spent} clock ticks of CPU in 3 s with nothing to do but a dead agent's held acknowledgement");
    assert_eq!(c.start_agent_retrying("vm1", Duration::from_secs(15)), 1, "the engine refused the restarted agent");
    c.start_target();
    c.wait_shipped();
}
