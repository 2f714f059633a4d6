//! The agent's resync: re-sends the regions its disks' dirty maps say the replica may lack,
//! whenever the engine is reachable, and tells the engine when a disk's resync is complete
//! (which ends the stretch the recovery site marks as not consistent).
//!
//! One thread for the agent. Every half second it cleans the maps (idle regions are unmarked
//! on disk) and, with the link up, resyncs what needs it, in batches, logging progress
//! (regions, MB/s, what is left).
//!
//! A disk the agent has never served here (no dirty map yet), or whose map is damaged, has
//! every region marked *to be compared*: the compare sweep asks the target, through the
//! engine, for the replica's hash of each region (`HashRequest`, 64 regions a request, a few
//! requests in flight), hashes its own copy, unmarks the regions that are equal and sends the
//! others as resync data. docs/consistency.md says why that is exact. A sweep whose answers
//! are unavailable (the target away) waits and asks again; it never sends everything instead.
//!
//! Before the disks are served, [`initial_sync`] runs the sweeps of every new disk at once, on
//! the caller's thread, under one deadline for them all; the resync thread goes on with those
//! not done.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use hindsight_consistency::region_hash::MAX_HASH_REGIONS;
use hindsight_consistency::storage::{drop_cached, may_hold_data};
use hindsight_consistency::wire::{HashReply, HashStatus, ResyncProgressMsg};
use log::{info, warn};

use crate::dirty::DirtyMap;
use crate::engine_link::EngineLink;
use crate::replicated::ReplicatedDisk;

/// Regions resynced between progress lines and link checks.
const BATCH: usize = 64;
const TICK: Duration = Duration::from_millis(500);
/// While the engine has paused a disk's group, how often one region is tried.
const PAUSE_PROBE: Duration = Duration::from_secs(2);
/// Regions one hash request names.
const HASH_BATCH: usize = 64;
/// A region that differs is compared again in pieces of `1 << PIECE_SHIFT` bytes (64 KiB), and
/// only the pieces that differ are sent.
const PIECE_SHIFT: u8 = 16;
/// Hash requests in flight during a sweep (the target hashes one while this side hashes the
/// one before).
const HASH_WINDOW: usize = 4;
/// Longest wait for one answer (the engine answers every request within 30 s).
const HASH_REPLY_WAIT: Duration = Duration::from_secs(40);
/// Pause before asking again after an unavailable answer; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long the sweeps of the new disks run, all at once, before the disks are served (the
/// rest runs in the background): a small or blank disk is compared before the guest's first
/// write, so it needs no resync at all. One deadline for every disk, however many there are,
/// so that an agent serves every disk within two seconds of its start.
pub const STARTUP_SWEEP: Duration = Duration::from_millis(1500);
/// How long the start-up sweeps wait for a target that is not connected yet.
const STARTUP_PATIENCE: Duration = Duration::from_secs(1);
/// Pause before a start-up sweep tries again while the link or the target is not there yet.
const STARTUP_RETRY: Duration = Duration::from_millis(100);

/// A compare sweep of one disk, across the passes of the resync thread.
#[derive(Debug)]
pub struct Sweep {
    /// Regions to compare when the sweep started.
    total: u64,
    /// Compared so far.
    compared: u64,
    /// Found different.
    differ: u64,
    /// Of those, sent and acknowledged.
    sent: u64,
    /// Bytes of them sent: the pieces of 64 KiB that differed.
    sent_bytes: u64,
    /// Time spent comparing (waits for an unavailable target excluded).
    busy: Duration,
    /// When to ask again after an unavailable answer.
    retry_at: Option<Instant>,
    retry_pause: Duration,
    /// The wait was logged (once per wait).
    waiting_logged: bool,
}

impl Sweep {
    fn new(total: u64) -> Sweep {
        Sweep {
            total,
            compared: 0,
            differ: 0,
            sent: 0,
            sent_bytes: 0,
            busy: Duration::ZERO,
            retry_at: None,
            retry_pause: RETRY_FIRST,
            waiting_logged: false,
        }
    }

    /// Compared bytes per second so far.
    fn rate(&self, region: u64) -> u64 {
        let millis = u64::try_from(self.busy.as_millis()).unwrap_or(u64::MAX).max(1);
        self.compared.saturating_mul(region).saturating_mul(1000) / millis
    }

    fn progress(&self, disk: u16, region: u64) -> ResyncProgressMsg {
        ResyncProgressMsg {
            disk,
            done: self.sent,
            total: self.differ,
            bytes_per_s: self.rate(region),
            compare_total: self.total,
            compared: self.compared,
            differ: self.differ,
        }
    }
}

/// How one run of a sweep ended.
#[derive(Debug)]
enum SweepEnd {
    /// Every region is compared.
    Done,
    /// The time given ran out.
    TimeUp,
    /// The link went down.
    LinkDown,
    /// The target cannot answer now: why.
    Unavailable(String),
}

/// Starts the resync thread over the disks that track; `sweeps` are the compare sweeps begun
/// before the disks were served.
pub fn spawn(disks: Vec<Arc<ReplicatedDisk>>, link: Arc<EngineLink>, sweeps: HashMap<u16, Sweep>) -> std::io::Result<()> {
    let mut sweeps = sweeps;
    std::thread::Builder::new().name("resync".into()).spawn(move || loop {
        run_once(&disks, &link, &mut sweeps);
        std::thread::sleep(TICK);
    })?;
    Ok(())
}

/// The initial sync of the disks the agent has never served here: marks every region of each
/// to be compared with the replica, then (before the disks are served) compares them all at
/// once until their sweeps are done or [`STARTUP_SWEEP`] has passed, whichever comes first.
/// Returns the sweeps not done, by disk number, for the resync thread to go on with.
pub fn initial_sync(disks: &[Arc<ReplicatedDisk>], link: &EngineLink) -> HashMap<u16, Sweep> {
    let mut starting = Vec::with_capacity(disks.len());
    for d in disks {
        let Some(map) = d.dirty_map() else { continue };
        if let Err(e) = map.mark_all_for_compare() {
            warn!("volume {}: initial sync: cannot mark the dirty map {}: {e}", d.volume(), map.path().display());
        }
        d.set_resyncing(true);
        info!(
            "volume {}: initial sync: {} region(s) of {} MiB will be compared with the replica; only those that differ are sent",
            d.volume(),
            map.regions(),
            map.region_size() >> 20
        );
        let sweep = Sweep::new(map.needing_compare().len() as u64);
        starting.push(Starting { d, map, sweep, run: None, retry_at: None, ended: false });
    }
    startup_sweeps(&mut starting, link);
    starting.into_iter().filter(|s| !s.map.needing_compare().is_empty()).map(|s| (s.d.disk_number(), s.sweep)).collect()
}

/// One new disk during the start-up sweeps.
struct Starting<'a> {
    d: &'a ReplicatedDisk,
    map: &'a DirtyMap,
    sweep: Sweep,
    /// Its sweep, while one runs.
    run: Option<SweepRun<'a>>,
    /// When to try again: the link or the target was not there yet.
    retry_at: Option<Instant>,
    /// Nothing more before the disk is served.
    ended: bool,
}

/// Compares the new disks before they are served, every disk's sweep with its requests in
/// flight at the same time (each answer takes one round trip through the engine, which would
/// add up disk after disk), until every sweep ends or [`STARTUP_SWEEP`] has passed. A sweep
/// whose link or target is not there yet tries again until [`STARTUP_PATIENCE`] has passed
/// (the engine may have just started). What is still in flight at the deadline is dropped: its
/// regions stay to be compared, and the resync thread asks again.
fn startup_sweeps(starting: &mut [Starting<'_>], link: &EngineLink) {
    let started = Instant::now();
    let deadline = started + STARTUP_SWEEP;
    loop {
        let now = Instant::now();
        if now >= deadline {
            for s in starting.iter_mut().filter(|s| !s.ended) {
                s.run = None;
                s.end(link, SweepEnd::TimeUp, started);
            }
            return;
        }
        for s in starting.iter_mut().filter(|s| !s.ended) {
            if s.run.is_none() {
                if s.retry_at.is_some_and(|t| now < t) {
                    continue;
                }
                s.retry_at = None;
                match SweepRun::start(s.d, s.map) {
                    Some(run) => s.run = Some(run),
                    None => {
                        s.end(link, SweepEnd::Done, started);
                        continue;
                    }
                }
            }
            let run = s.run.as_mut().expect("started above");
            let end = match run.ask(link, Some(deadline)) {
                Err(end) => end,
                Ok(()) if run.front().is_none() => run.idle_end(),
                Ok(()) => continue,
            };
            s.run = None;
            s.end(link, end, started);
        }
        let next_retry = starting.iter().filter(|s| !s.ended).filter_map(|s| s.retry_at).min();
        // Until the first answer, the deadline, or the next retry.
        let wake = next_retry.map_or(deadline, |t| t.min(deadline));
        let answer = {
            let mut select = crossbeam_channel::Select::new();
            let mut owners = Vec::new();
            for (i, s) in starting.iter().enumerate() {
                if let Some(rx) = s.run.as_ref().and_then(SweepRun::front) {
                    select.recv(rx);
                    owners.push(i);
                }
            }
            if owners.is_empty() && next_retry.is_none() {
                return;
            }
            match select.select_deadline(wake) {
                Ok(op) => {
                    let i = owners[op.index()];
                    let rx = starting[i].run.as_ref().and_then(SweepRun::front).expect("selected");
                    Some((i, op.recv(rx).map_err(|_| RecvTimeoutError::Disconnected)))
                }
                Err(_) => None,
            }
        };
        if let Some((i, reply)) = answer {
            let s = &mut starting[i];
            let run = s.run.as_mut().expect("it had a request in flight");
            if let Err(end) = run.answered(link, &mut s.sweep, reply) {
                s.run = None;
                s.end(link, end, started);
            }
        }
    }
}

impl Starting<'_> {
    /// The disk's sweep ended as `end`: done, on in the background, or tried again soon while
    /// the link or the target may still come.
    fn end(&mut self, link: &EngineLink, end: SweepEnd, started: Instant) {
        let patient = started.elapsed() < STARTUP_PATIENCE;
        match end {
            SweepEnd::Done => finish_sweep(self.d, self.map, link, &self.sweep),
            SweepEnd::TimeUp => info!("volume {}: initial sync goes on in the background while the disk is served", self.d.volume()),
            SweepEnd::LinkDown | SweepEnd::Unavailable(_) if patient => {
                self.retry_at = Some(Instant::now() + STARTUP_RETRY);
                return;
            }
            SweepEnd::LinkDown => {}
            SweepEnd::Unavailable(why) => note_unavailable(self.d, self.map, link, &mut self.sweep, &why),
        }
        self.ended = true;
    }
}

/// One pass: clean the maps, then compare and resync what needs it while the link is up.
fn run_once(disks: &[Arc<ReplicatedDisk>], link: &EngineLink, sweeps: &mut HashMap<u16, Sweep>) {
    for d in disks {
        let Some(map) = d.dirty_map() else { continue };
        if let Err(e) = map.clean() {
            warn!("volume {}: cleaning the dirty map {}: {e}", d.volume(), map.path().display());
        }
        let compare = map.needing_compare();
        if !compare.is_empty() {
            // Nothing is re-sent unread while regions wait to be compared: they would be sent
            // whether they differ or not.
            let sweep = sweeps.entry(d.disk_number()).or_insert_with(|| Sweep::new(compare.len() as u64));
            if !link.is_connected() || sweep.retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            match run_sweep(d, map, link, sweep, None) {
                SweepEnd::Done => {
                    finish_sweep(d, map, link, sweep);
                    sweeps.remove(&d.disk_number());
                }
                SweepEnd::Unavailable(why) => note_unavailable(d, map, link, sweep, &why),
                SweepEnd::LinkDown | SweepEnd::TimeUp => {}
            }
            continue;
        }
        let mut todo = map.needing_resync();
        if todo.is_empty() && d.resyncing() && link.is_connected() {
            // Every region is back: writes go as plain data again, and, if resync data went
            // out, the engine places the resync point after the last of it.
            info!("volume {}: every dirty region is back at the engine; the resync ends", d.volume());
            d.finish_resync(|| link.resync_done(&[d.disk_number()]));
            continue;
        }
        if todo.is_empty() || !link.is_connected() {
            continue;
        }
        if let Some(since) = link.paused_since(d.disk_number()) {
            // The engine paused the group (a full journal): one region now and then finds out
            // when it takes writes again, without reading the whole backlog each time.
            if since.elapsed() < PAUSE_PROBE {
                continue;
            }
            d.resync(&todo[..1]);
            if link.paused_since(d.disk_number()).is_some() {
                continue;
            }
            todo = map.needing_resync();
            if todo.is_empty() {
                continue; // the next pass ends the resync
            }
        }
        resend(d, map, link, &todo);
    }
}

/// Re-sends `todo` (regions not to be compared) in batches, with progress.
fn resend(d: &ReplicatedDisk, map: &DirtyMap, link: &EngineLink, todo: &[u64]) {
    let total = todo.len();
    let bytes_per_region = map.region_size();
    info!("volume {}: resync of {total} region(s) ({} MiB) starts", d.volume(), (total as u64 * bytes_per_region) >> 20);
    let started = Instant::now();
    let mut sent = 0usize;
    let progress = |done: u64, bytes_per_s: u64| ResyncProgressMsg {
        disk: d.disk_number(),
        done,
        total: total as u64,
        bytes_per_s,
        compare_total: 0,
        compared: 0,
        differ: 0,
    };
    link.resync_progress(&progress(0, 0));
    for batch in todo.chunks(BATCH) {
        if !link.is_connected() || link.paused_since(d.disk_number()).is_some() {
            break;
        }
        sent += d.resync(batch).len();
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = sent as f64 * bytes_per_region as f64 / secs;
        let left = total - sent.min(total);
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        link.resync_progress(&progress(sent as u64, sent as u64 * bytes_per_region * 1000 / millis));
        info!(
            "volume {}: resync {:.0}% ({sent}/{total} regions, {:.1} MB/s, about {:.0}s left)",
            d.volume(),
            sent as f64 * 100.0 / total as f64,
            rate / 1e6,
            left as f64 * bytes_per_region as f64 / rate.max(1.0)
        );
    }
    if map.needing_resync().is_empty() {
        info!(
            "volume {}: resync sent in {:.1?}: the engine holds every dirty region; the target has a consistent point again once \
             it has them and the engine's resync point after them",
            d.volume(),
            started.elapsed()
        );
        d.finish_resync(|| link.resync_done(&[d.disk_number()]));
    }
}

/// Logs (once per wait) that the sweep waits for the target, and when it asks again; tells the
/// engine where the sweep stands, so that its status shows the initial sync waiting.
fn note_unavailable(d: &ReplicatedDisk, map: &DirtyMap, link: &EngineLink, sweep: &mut Sweep, why: &str) {
    link.resync_progress(&sweep.progress(d.disk_number(), map.region_size()));
    if !sweep.waiting_logged {
        warn!(
            "initial sync of {} waits for the target to compare chunk hashes ({why}); {} region(s) stay marked and the guest is served meanwhile",
            d.volume(),
            sweep.total - sweep.compared
        );
        sweep.waiting_logged = true;
    }
    sweep.retry_at = Some(Instant::now() + sweep.retry_pause);
    sweep.retry_pause = (sweep.retry_pause * 2).min(RETRY_MAX);
}

/// Every region is compared: the differing ones are sent (or left to the plain resync if a
/// send failed), and if nothing is left the resync ends.
fn finish_sweep(d: &ReplicatedDisk, map: &DirtyMap, link: &EngineLink, sweep: &Sweep) {
    info!(
        "volume {}: initial sync compared {} region(s) in {:.1?} ({:.1} MB/s): {} equal, {} differ, {} sent ({} bytes: the pieces of \
         64 KiB that differ)",
        d.volume(),
        sweep.compared,
        sweep.busy,
        sweep.rate(map.region_size()) as f64 / 1e6,
        sweep.compared - sweep.differ,
        sweep.differ,
        sweep.sent,
        sweep.sent_bytes
    );
    // With nothing sent and no guest write meanwhile there is no resync to end.
    if map.needing_resync().is_empty() && link.is_connected() && d.finish_resync(|| link.resync_done(&[d.disk_number()])) {
        info!(
            "volume {}: resync sent: the engine holds every region that differed; the target has a consistent point again once \
             it has them and the engine's resync point after them",
            d.volume()
        );
    }
}

/// Sends what differs of regions a sweep found different: each is compared again in pieces of
/// 64 KiB (the replica's hashes of them, at a later prefix of the sequence), and only the pieces
/// that differ go, as resync data. A piece equal here is equal at that prefix, and every later
/// write to it is replicated as usual, so the replica ends equal to the disk (docs/consistency.md).
/// A region whose pieces cannot be compared (the target away, a short answer) goes whole.
/// Returns the regions acknowledged and the bytes sent.
fn send_differing(
    d: &ReplicatedDisk,
    map: &DirtyMap,
    link: &EngineLink,
    file: Option<&File>,
    differ: &[u64],
    buf: &mut Vec<u8>,
) -> (u64, u64) {
    let piece = 1u64 << PIECE_SHIFT;
    let (mut regions, mut bytes) = (0u64, 0u64);
    let mut whole = Vec::new();
    let pieces_of = |r: u64| {
        let (start, end) = map.range(r);
        start / piece..end.div_ceil(piece)
    };
    // The pieces of as many regions as one request may name, asked for together.
    let per_request = (MAX_HASH_REGIONS / pieces_of(0).count().max(1)).max(1);
    for chunk in differ.chunks(per_request) {
        let asked: Vec<u64> = chunk.iter().flat_map(|&r| pieces_of(r)).collect();
        let reply = match link.request_hashes(d.disk_number(), PIECE_SHIFT, asked.clone()) {
            None => Err("the engine link is down".to_owned()),
            Some(rx) => rx.recv_timeout(HASH_REPLY_WAIT).map_err(|_| format!("no answer within {HASH_REPLY_WAIT:?}")),
        };
        let theirs = match reply {
            Ok(rep) if rep.status == HashStatus::Ok && rep.hashes.len() == asked.len() => rep.hashes,
            other => {
                let why = match other {
                    Ok(rep) if rep.status == HashStatus::Ok => format!("{} hashes for {} pieces", rep.hashes.len(), asked.len()),
                    Ok(rep) => rep.message,
                    Err(why) => why,
                };
                warn!("volume {}: the pieces of region(s) {chunk:?} cannot be compared ({why}): they are sent whole", d.volume());
                whole.extend_from_slice(chunk);
                continue;
            }
        };
        let mut at = 0;
        for &r in chunk {
            let (start, end) = map.range(r);
            let mut send = Vec::new();
            for p in pieces_of(r) {
                let (from, to) = (p * piece, ((p + 1) * piece).min(end));
                let is_hole = |s: u64, e: u64| file.is_some_and(|f| !may_hold_data(f, s, e));
                if !d.hash_range(from, to, buf, is_hole).is_ok_and(|mine| mine == theirs[at]) {
                    send.push((from, to));
                }
                at += 1;
            }
            if let Some(f) = file {
                drop_cached(f, start, end - start);
            }
            if d.resync_pieces(r, &send) {
                regions += 1;
                bytes += send.iter().map(|(from, to)| to - from).sum::<u64>();
            }
        }
    }
    for r in d.resync(&whole) {
        regions += 1;
        let (start, end) = map.range(r);
        bytes += end - start;
    }
    (regions, bytes)
}

/// Compares the regions still to be compared, batch by batch, until done, the deadline, the
/// link lost, or an unavailable answer. Differing regions of a batch are sent before the next
/// batch is compared.
fn run_sweep(d: &ReplicatedDisk, map: &DirtyMap, link: &EngineLink, sweep: &mut Sweep, deadline: Option<Instant>) -> SweepEnd {
    let Some(mut run) = SweepRun::start(d, map) else { return SweepEnd::Done };
    loop {
        if let Err(end) = run.ask(link, deadline) {
            return end;
        }
        let Some(rx) = run.front() else { return run.idle_end() };
        let reply = rx.recv_timeout(HASH_REPLY_WAIT);
        if let Err(end) = run.answered(link, sweep, reply) {
            return end;
        }
    }
}

/// One run of a disk's compare sweep: the regions to compare when it began, the hash requests
/// in flight (up to [`HASH_WINDOW`]), and the answers taken in the order asked.
struct SweepRun<'a> {
    d: &'a ReplicatedDisk,
    map: &'a DirtyMap,
    todo: Vec<u64>,
    /// Regions of `todo` asked for so far.
    asked: usize,
    /// The requests in flight, oldest first: the part of `todo` each names, and its answer.
    waiting: VecDeque<(Range<usize>, Receiver<HashReply>)>,
    /// The disk, opened again to find its holes and drop what was read from the page cache.
    file: Option<File>,
    buf: Vec<u8>,
    /// Since when time counts as spent comparing.
    since: Instant,
    last_line: Instant,
}

impl<'a> SweepRun<'a> {
    /// A run over the regions still to be compared; `None` if there is none.
    fn start(d: &'a ReplicatedDisk, map: &'a DirtyMap) -> Option<SweepRun<'a>> {
        let todo = map.needing_compare();
        if todo.is_empty() {
            return None;
        }
        // Holes of a sparse file hash as zeroes without reading; what is read is dropped from
        // the page cache afterwards (a sweep must not leave the disk's cache full of it).
        let file = File::open(d.local_path()).ok();
        let now = Instant::now();
        Some(SweepRun { d, map, todo, asked: 0, waiting: VecDeque::new(), file, buf: Vec::new(), since: now, last_line: now })
    }

    /// Asks for the next batches, up to [`HASH_WINDOW`] requests in flight, unless `deadline`
    /// has passed.
    fn ask(&mut self, link: &EngineLink, deadline: Option<Instant>) -> Result<(), SweepEnd> {
        while self.waiting.len() < HASH_WINDOW && self.asked < self.todo.len() && deadline.is_none_or(|t| Instant::now() < t) {
            let batch = self.asked..(self.asked + HASH_BATCH).min(self.todo.len());
            match link.request_hashes(self.d.disk_number(), self.map.region_shift(), self.todo[batch.clone()].to_vec()) {
                Some(rx) => {
                    self.asked = batch.end;
                    self.waiting.push_back((batch, rx));
                }
                None => return Err(SweepEnd::LinkDown),
            }
        }
        Ok(())
    }

    /// Where the answer to the oldest request in flight comes, if one is.
    fn front(&self) -> Option<&Receiver<HashReply>> {
        self.waiting.front().map(|(_, rx)| rx)
    }

    /// How the run ends with nothing in flight: done, or the deadline came first.
    fn idle_end(&self) -> SweepEnd {
        if self.asked == self.todo.len() {
            SweepEnd::Done
        } else {
            SweepEnd::TimeUp
        }
    }

    /// Takes the answer to the oldest request: unmarks the regions equal to the replica's,
    /// sends what differs of the others, and counts them in `sweep`.
    fn answered(&mut self, link: &EngineLink, sweep: &mut Sweep, reply: Result<HashReply, RecvTimeoutError>) -> Result<(), SweepEnd> {
        let (d, map) = (self.d, self.map);
        let (batch, _) = self.waiting.pop_front().expect("an answer to a request in flight");
        let batch = &self.todo[batch];
        let reply = match reply {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => return Err(SweepEnd::Unavailable(format!("no answer within {HASH_REPLY_WAIT:?}"))),
            Err(RecvTimeoutError::Disconnected) => return Err(SweepEnd::LinkDown),
        };
        if reply.status != HashStatus::Ok {
            return Err(SweepEnd::Unavailable(reply.message));
        }
        if reply.hashes.len() != batch.len() {
            return Err(SweepEnd::Unavailable(format!("{} hashes for {} regions", reply.hashes.len(), batch.len())));
        }
        let file = self.file.as_ref();
        let mut differ = Vec::new();
        for (&r, theirs) in batch.iter().zip(&reply.hashes) {
            let (start, end) = map.range(r);
            let is_hole = |s: u64, e: u64| file.is_some_and(|f| !may_hold_data(f, s, e));
            let equal = match d.hash_range(start, end, &mut self.buf, is_hole) {
                Ok(mine) => mine == *theirs,
                Err(e) => {
                    warn!("volume {}: reading region {r} to compare it failed: {e}; it will be sent", d.volume());
                    false
                }
            };
            // A region that differs is read again, in pieces, right after: its pages stay until
            // then (send_differing drops them).
            if let (Some(f), true) = (file, equal) {
                drop_cached(f, start, end - start);
            }
            map.compared(r, equal);
            if !equal {
                differ.push(r);
            }
        }
        sweep.compared += batch.len() as u64;
        sweep.differ += differ.len() as u64;
        if !differ.is_empty() {
            let (regions, bytes) = send_differing(d, map, link, file, &differ, &mut self.buf);
            sweep.sent += regions;
            sweep.sent_bytes += bytes;
        }
        let now = Instant::now();
        sweep.busy += now - self.since;
        self.since = now;
        // Answered: a later wait is a new one.
        sweep.waiting_logged = false;
        sweep.retry_pause = RETRY_FIRST;
        sweep.retry_at = None;
        let region = map.region_size();
        link.resync_progress(&sweep.progress(d.disk_number(), region));
        let last = self.asked == self.todo.len() && self.waiting.is_empty();
        if self.last_line.elapsed() >= Duration::from_secs(1) || last {
            self.last_line = now;
            let rate = sweep.rate(region);
            let left = (sweep.total.saturating_sub(sweep.compared)).saturating_mul(region);
            info!(
                "initial sync of {}: compare {:.0}% ({}/{} regions, {} differ and were sent, {:.1} MB/s, about {}s left)",
                d.volume(),
                sweep.compared as f64 * 100.0 / sweep.total.max(1) as f64,
                sweep.compared,
                sweep.total,
                sweep.sent,
                rate as f64 / 1e6,
                left.checked_div(rate).unwrap_or(0)
            );
        }
        Ok(())
    }
}
