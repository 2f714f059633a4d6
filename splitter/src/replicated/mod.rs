//! The replicating block device: every write goes to the engine and to the local disk, and
//! completes once both hold it.
//!
//! A write is sent to the engine first, then applied to the local disk (`pwrite` for data, a
//! punched hole or written zeroes for write-zeroes and trim, `fdatasync` when FUA is set). A
//! small `Join` counts the parts down; whichever part finishes last runs the front end's
//! completion, exactly once, failing it if any part failed. Reads and flushes touch only the
//! local disk: the engine's acknowledgement already means the write is durable there (cdp
//! mode).
//!
//! The parts: `local` holds the local disk (opening it, the ranges under way, applying a
//! write, the writer threads every disk shares) and `join` counts a request's parts down.
//! This module is the write path itself, and with it the disk's side of a resync (hashing and
//! re-sending regions, ending the resync): those read the local disk under the same range
//! holds and resync gate as the guest's writes, and their correctness is the ordering between
//! the two, so they stay next to each other.

mod join;
mod local;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hindsight_consistency::record::MAX_WRITE_LEN;
use hindsight_consistency::region_hash::{region_hash, zero_hash, RegionHash};
use log::{error, info, warn};

use crate::block::{BlockDevice, BlockError, Completion, WriteKind, WriteOp};
use crate::dirty::DirtyMap;
use crate::engine_link::{EngineLink, WriteBody};

pub use local::{DiskError, LocalDisk};

use join::Join;
use local::{Local, LocalBody, LocalJob, Ranges, Writers};

/// A local disk whose every write is also sent to the engine, as disk number `disk` of the
/// link.
pub struct ReplicatedDisk {
    local: Arc<Local>,
    link: Arc<EngineLink>,
    disk: u16,
    /// The writer threads every disk shares, for large local writes.
    writers: &'static Writers,
    /// Dirty tracking, when configured.
    tracking: Option<Tracking>,
    /// The replica lacks writes of this disk (a cut, a crash, the initial sync): until the
    /// resync is complete every write is sent as resync data (kind 7), so that the recovery
    /// site counts nothing from here to the resync point as consistent.
    resyncing: Arc<std::sync::atomic::AtomicBool>,
    /// Resync data went to the engine since the last resync point was asked for.
    sent_resync: std::sync::atomic::AtomicBool,
    /// Held (shared) by a guest write from reading `resyncing` until it is on the link, and
    /// (exclusive) by the end of a resync: no write decided as resync data can reach the
    /// engine after the request for the resync point.
    resync_gate: std::sync::RwLock<()>,
    /// Guest writes taken (writes, zeroes and trims) and the bytes they cover, since start.
    writes: std::sync::atomic::AtomicU64,
    written_bytes: std::sync::atomic::AtomicU64,
}

/// How a disk tracks what the replica lacks.
pub struct Tracking {
    /// The disk's dirty map.
    pub map: Arc<DirtyMap>,
    /// When the engine does not take a write: complete it for the guest anyway (the local
    /// disk holds it) and mark its regions for a resync (`on_engine_loss = "track"`), or fail
    /// it with the engine's error (`"fail"`).
    pub keep_serving: bool,
}

/// Regions of a resync sent before waiting for the oldest one's acknowledgement.
const RESYNC_WINDOW: usize = 16;

impl ReplicatedDisk {
    /// A replicating device over `local`, sending its writes on `link` as disk number `disk`;
    /// the first one starts the writer threads, which every disk shares.
    pub fn new(local: LocalDisk, link: Arc<EngineLink>, disk: u16, volume: String) -> Self {
        let local = Arc::new(Local { disk: local, volume, in_flight: Ranges::default() });
        let writers = Writers::shared();
        ReplicatedDisk {
            local,
            link,
            disk,
            writers,
            tracking: None,
            resyncing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            sent_resync: std::sync::atomic::AtomicBool::new(false),
            resync_gate: std::sync::RwLock::new(()),
            writes: std::sync::atomic::AtomicU64::new(0),
            written_bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// As [`ReplicatedDisk::new`], with dirty tracking.
    pub fn with_tracking(local: LocalDisk, link: Arc<EngineLink>, disk: u16, volume: String, tracking: Tracking) -> Self {
        let mut d = Self::new(local, link, disk, volume);
        d.resyncing.store(!tracking.map.needing_resync().is_empty(), Ordering::Release);
        d.tracking = Some(tracking);
        d
    }

    /// Whether writes go as resync data (the replica lacks some of this disk's writes).
    pub fn resyncing(&self) -> bool {
        self.resyncing.load(Ordering::Acquire)
    }

    /// Marks the disk as lacking writes at the replica (an initial sync is due), or no longer.
    pub fn set_resyncing(&self, on: bool) {
        self.resyncing.store(on, Ordering::Release);
    }

    /// The target holds every record of the disk's group through `seq`: the dirty map may
    /// clear regions whose writes it all holds.
    pub fn target_confirmed(&self, seq: u64) {
        if let Some(t) = &self.tracking {
            t.map.target_confirmed(seq);
        }
    }

    /// The engine took the disk's group over from one that may have acknowledged writes the
    /// target lacks (docs/ha.md, "Takeover"): every region still marked is resynced, guest
    /// writes go as resync data meanwhile, and the resync ends with `ResyncDone` even if no
    /// region was marked (the engine's resync point waits for every volume of the group).
    pub fn resync_whole(&self) {
        let Some(t) = &self.tracking else {
            warn!(
                "volume {}: its group was taken over by another engine, which may lack writes the last one acknowledged; this \
                 disk has no dirty map (dirty_map = \"none\"), so they cannot be resynced",
                self.local.volume
            );
            return;
        };
        let n = t.map.resync_marked();
        self.resyncing.store(true, Ordering::Release);
        self.sent_resync.store(true, Ordering::Release);
        info!(
            "volume {}: its group was taken over by another engine: the {n} region(s) still marked (writes the target may lack) are resynced",
            self.local.volume
        );
    }

    /// Ends the resync: writes go as plain data from now on. If resync data went out since
    /// the last time, runs `ask_point` (which asks the engine for the resync point) before any
    /// later write can reach the link, and returns true.
    pub fn finish_resync(&self, ask_point: impl FnOnce()) -> bool {
        let _gate = self.resync_gate.write().unwrap_or_else(|e| e.into_inner());
        self.resyncing.store(false, Ordering::Release);
        let sent = self.sent_resync.swap(false, Ordering::AcqRel);
        if sent {
            ask_point();
        }
        sent
    }

    /// The dirty map, when tracking.
    pub fn dirty_map(&self) -> Option<&Arc<DirtyMap>> {
        self.tracking.as_ref().map(|t| &t.map)
    }

    /// The disk number on the link.
    pub fn disk_number(&self) -> u16 {
        self.disk
    }

    /// Guest writes taken since start, and the bytes they cover (for the metrics).
    pub fn written(&self) -> (u64, u64) {
        (self.writes.load(Ordering::Relaxed), self.written_bytes.load(Ordering::Relaxed))
    }

    /// Reads region `r` of the local disk.
    pub fn read_region(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.local.disk.file.read_exact_at(buf, offset)
    }

    /// The hash of bytes `start..end` of the local disk as they are at one instant with no
    /// write of the range in flight (the range is held like a write's while it is read, so
    /// every write of it either reached the local disk before or is numbered after).
    /// `is_hole(start, end)` says whether the range is a hole, hashed as zeroes without
    /// reading; `buf` is reused between calls.
    pub fn hash_range(
        &self,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
        is_hole: impl FnOnce(u64, u64) -> bool,
    ) -> std::io::Result<RegionHash> {
        let len = usize::try_from(end - start).map_err(|_| std::io::Error::other("range too large"))?;
        {
            let _held = self.local.in_flight.clear(start, end);
            if is_hole(start, end) {
                return Ok(zero_hash(len));
            }
            buf.resize(len, 0);
            self.local.disk.file.read_exact_at(&mut buf[..len], start)?;
        }
        // Hashed without the range held: the bytes are already those of the instant read.
        Ok(region_hash(&buf[..len]))
    }

    /// The local disk's path.
    pub fn local_path(&self) -> &Path {
        &self.local.disk.path
    }

    /// Re-sends the given regions from the local disk as resync writes, up to
    /// `RESYNC_WINDOW` at a time. Each region's range is held like a write's while it is read
    /// and sent, so a guest write to it is numbered after the resync of its old bytes. Returns
    /// the regions the engine acknowledged (those are no longer dirty).
    pub fn resync(&self, regions: &[u64]) -> Vec<u64> {
        let Some(t) = &self.tracking else { return Vec::new() };
        // Each resync write's outcome: its sequence number, or `None` if it failed.
        type Acked = crossbeam_channel::Receiver<Option<u64>>;
        let mut waiting: std::collections::VecDeque<(u64, Acked)> = std::collections::VecDeque::new();
        let mut done = Vec::new();
        let settle = |(r, rx): (u64, Acked), done: &mut Vec<u64>| {
            let (start, end) = t.map.range(r);
            let seq = rx.recv().unwrap_or(None);
            let ok = seq.is_some();
            t.map.end(start, end - start, ok, seq.unwrap_or(0));
            if ok {
                t.map.resynced(r);
                done.push(r);
            }
        };
        for &r in regions {
            let (start, end) = t.map.range(r);
            let len = end - start;
            let mut data = vec![0u8; usize::try_from(len).expect("a region fits in memory")];
            {
                let _held = self.local.in_flight.clear(start, end);
                if let Err(e) = self.local.disk.file.read_exact_at(&mut data, start) {
                    error!("volume {}: reading region {r} for its resync failed: {e}", self.local.volume);
                    continue;
                }
                if t.map.begin(start, len).is_err() {
                    continue;
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.sent_resync.store(true, Ordering::Release);
                // Sent with the range held (the lock): no guest write to it can be numbered
                // before this resync.
                self.link.submit(
                    self.disk,
                    start,
                    WriteBody::Resync(Arc::new(data)),
                    Box::new(move |r| {
                        let _ = tx.send(r.ok());
                    }),
                );
                waiting.push_back((r, rx));
            }
            if waiting.len() >= RESYNC_WINDOW {
                settle(waiting.pop_front().expect("not empty"), &mut done);
            }
        }
        while let Some(w) = waiting.pop_front() {
            settle(w, &mut done);
        }
        done
    }

    /// Re-sends the given pieces (`[start, end)` byte ranges) of region `r` as resync writes,
    /// the rest of the region being equal to the replica's: the region's range is held while
    /// they are read and sent, as [`ReplicatedDisk::resync`] holds it. With no piece, the
    /// region needs nothing more. True once the engine acknowledged them all (the region is no
    /// longer dirty).
    pub fn resync_pieces(&self, r: u64, pieces: &[(u64, u64)]) -> bool {
        let Some(t) = &self.tracking else { return false };
        if pieces.is_empty() {
            t.map.resynced(r);
            return true;
        }
        let (start, end) = t.map.range(r);
        let mut waiting = Vec::with_capacity(pieces.len());
        let mut read_ok = true;
        {
            let _held = self.local.in_flight.clear(start, end);
            if t.map.begin(start, end - start).is_err() {
                return false;
            }
            for &(from, to) in pieces {
                let mut data = vec![0u8; usize::try_from(to - from).expect("a piece fits in memory")];
                if let Err(e) = self.local.disk.file.read_exact_at(&mut data, from) {
                    error!("volume {}: reading bytes {from}..{to} for the resync of region {r} failed: {e}", self.local.volume);
                    read_ok = false;
                    break;
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.sent_resync.store(true, Ordering::Release);
                self.link.submit(
                    self.disk,
                    from,
                    WriteBody::Resync(Arc::new(data)),
                    Box::new(move |res| {
                        let _ = tx.send(res.ok());
                    }),
                );
                waiting.push(rx);
            }
        }
        // Every acknowledgement is waited for, whatever the first said.
        let (mut acked, mut seq) = (true, 0);
        for rx in waiting {
            match rx.recv().unwrap_or(None) {
                Some(s) => seq = seq.max(s),
                None => acked = false,
            }
        }
        let ok = read_ok && acked;
        t.map.end(start, end - start, ok, seq);
        if ok {
            t.map.resynced(r);
        }
        ok
    }

    pub fn volume(&self) -> &str {
        &self.local.volume
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.local.disk.size => Ok(()),
            _ => Err(BlockError::Invalid),
        }
    }

    /// Sends one write to the engine; its acknowledgement finishes one count of `join`. With
    /// dirty tracking that keeps serving, an engine failure completes the part anyway and
    /// notes that the write was not replicated.
    fn send(&self, offset: u64, body: WriteBody, join: &Arc<Join>, hold: bool) {
        let j = Arc::clone(join);
        let keep_serving = self.tracking.as_ref().is_some_and(|t| t.keep_serving);
        let done = Box::new(move |r: Result<_, BlockError>| match r {
            Err(_) if keep_serving => {
                j.unreplicated.store(true, Ordering::Release);
                j.finish(Ok(()));
            }
            r => {
                if let Ok(seq) = r {
                    j.seq.fetch_max(seq, Ordering::AcqRel);
                }
                j.finish(r.map(|_seq| ()))
            }
        });
        if hold {
            self.link.submit_held(self.disk, offset, body, done);
        } else {
            self.link.submit(self.disk, offset, body, done);
        }
    }

    /// Sends a write-zeroes or trim of `len` bytes as writes of at most `MAX_WRITE_LEN`
    /// bytes each (the front end accepts longer ones than a `Write` may carry).
    fn send_split(&self, mut offset: u64, mut len: u32, body: fn(u32) -> WriteBody, join: &Arc<Join>) {
        while len > 0 {
            let part = len.min(MAX_WRITE_LEN);
            self.send(offset, body(part), join, false);
            offset += u64::from(part);
            len -= part;
        }
    }
}

impl ReplicatedDisk {
    /// Sends `len` bytes of zeroes at `offset` as resync data, in writes of at most
    /// `MAX_WRITE_LEN` bytes (one zero buffer shared by every part).
    fn send_zero_data(&self, mut offset: u64, mut len: u32, join: &Arc<Join>) {
        let zeroes = Arc::new(vec![0u8; len.min(MAX_WRITE_LEN) as usize]);
        while len > 0 {
            let part = len.min(MAX_WRITE_LEN);
            let data = if part as usize == zeroes.len() { Arc::clone(&zeroes) } else { Arc::new(vec![0u8; part as usize]) };
            self.send(offset, WriteBody::Resync(data), join, false);
            offset += u64::from(part);
            len -= part;
        }
    }
}

/// Number of engine writes a request becomes.
fn parts(len: u64) -> u32 {
    u32::try_from(len.div_ceil(u64::from(MAX_WRITE_LEN))).unwrap_or(u32::MAX)
}

impl BlockDevice for ReplicatedDisk {
    fn size(&self) -> u64 {
        self.local.disk.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        self.local.disk.file.read_exact_at(buf, offset).map_err(|e| {
            error!(
                "volume {}: reading {} bytes at offset {} of {} failed: {e}",
                self.local.volume,
                buf.len(),
                offset,
                self.local.disk.path.display()
            );
            BlockError::from_io(&e)
        })
    }

    fn submit(&self, op: WriteOp, done: Completion) {
        self.submit_op(op, done, false);
    }

    fn submit_held(&self, op: WriteOp, done: Completion) {
        self.submit_op(op, done, true);
    }

    fn send_held(&self) {
        self.link.send_held();
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.flush_local()
    }
}

impl ReplicatedDisk {
    /// A write, write-zeroes or trim; with `hold`, its frame to the engine may wait for the
    /// next ones (see [`BlockDevice::submit_held`]).
    fn submit_op(&self, op: WriteOp, done: Completion, hold: bool) {
        let WriteOp { offset, kind, fua } = op;
        let len = kind.len();
        if let Err(e) = self.check(offset, len) {
            return done(Err(e));
        }
        if len == 0 {
            return done(Ok(()));
        }
        if len > u64::from(MAX_WRITE_LEN) && matches!(kind, WriteKind::Data(_)) {
            return done(Err(BlockError::Overflow));
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.written_bytes.fetch_add(len, Ordering::Relaxed);
        // With tracking, the regions are marked on disk before the write goes anywhere, and
        // unmarked (or left for a resync) when it has finished.
        let done: Completion = match &self.tracking {
            Some(t) => {
                if let Err(e) = t.map.begin(offset, len) {
                    error!("volume {}: cannot mark the dirty map {}: {e}; the write is refused", self.local.volume, t.map.path().display());
                    return done(Err(BlockError::Io));
                }
                let map = Arc::clone(&t.map);
                let unreplicated = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let acked_seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let (flag, seq) = (Arc::clone(&unreplicated), Arc::clone(&acked_seq));
                let resyncing = Arc::clone(&self.resyncing);
                let join_done = done;
                let wrapped: Completion = Box::new(move |r: Result<(), BlockError>| {
                    let replicated = r.is_ok() && !flag.load(Ordering::Acquire);
                    if !replicated {
                        resyncing.store(true, Ordering::Release);
                    }
                    map.end(offset, len, replicated, seq.load(Ordering::Acquire));
                    join_done(r);
                });
                return self.submit_parts(WriteOp { offset, kind, fua }, len, wrapped, Some((unreplicated, acked_seq)), hold);
            }
            None => done,
        };
        self.submit_parts(WriteOp { offset, kind, fua }, len, done, None, hold);
    }

    /// Sends the engine's parts and applies the local one; `done` runs once all are done.
    fn submit_parts(
        &self,
        op: WriteOp,
        len: u64,
        done: Completion,
        tracked: Option<(Arc<std::sync::atomic::AtomicBool>, Arc<std::sync::atomic::AtomicU64>)>,
        hold: bool,
    ) {
        let WriteOp { offset, kind, fua } = op;
        // The engine's parts, then the local one.
        let mut join = Join::new(parts(len) + 1, done);
        if let Some((flag, seq)) = tracked {
            join.unreplicated = flag;
            join.seq = seq;
        }
        let join = Arc::new(join);
        let end = offset + len;
        let body = {
            let mut in_flight = self.local.in_flight.clear(offset, end);
            in_flight.ranges.push((offset, end));
            // Sent while the range is held: the engine numbers overlapping writes in the
            // order they are applied locally.
            // Held until the write is on the link (see `finish_resync`).
            let _gate = self.resync_gate.read().unwrap_or_else(|e| e.into_inner());
            let resyncing = self.resyncing();
            match kind {
                WriteKind::Data(data) => {
                    let data = Arc::new(data);
                    let body = if resyncing {
                        self.sent_resync.store(true, Ordering::Release);
                        WriteBody::Resync(Arc::clone(&data))
                    } else {
                        WriteBody::Data(Arc::clone(&data))
                    };
                    self.send(offset, body, &join, hold);
                    LocalBody::Data(data)
                }
                // While resyncing, zeroing goes as resync data too (zeroes), so that it is
                // inside the resync like every other write.
                WriteKind::Zeroes { len } | WriteKind::Trim { len } if resyncing => {
                    self.sent_resync.store(true, Ordering::Release);
                    self.send_zero_data(offset, len, &join);
                    LocalBody::Zeroes(u64::from(len))
                }
                WriteKind::Zeroes { len } => {
                    self.send_split(offset, len, WriteBody::Zeroes, &join);
                    LocalBody::Zeroes(u64::from(len))
                }
                WriteKind::Trim { len } => {
                    self.send_split(offset, len, WriteBody::Trim, &join);
                    LocalBody::Zeroes(u64::from(len))
                }
            }
        };
        let job = LocalJob { offset, body, fua, join };
        self.writers.apply(&self.local, job, len);
    }
}

impl ReplicatedDisk {
    fn flush_local(&self) -> Result<(), BlockError> {
        self.local.disk.file.sync_data().map_err(|e| {
            error!("volume {}: flushing {} failed: {e}", self.local.volume, self.local.disk.path.display());
            BlockError::from_io(&e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_zeroing_splits_into_engine_sized_parts() {
        assert_eq!(parts(1), 1);
        assert_eq!(parts(u64::from(MAX_WRITE_LEN)), 1);
        assert_eq!(parts(u64::from(MAX_WRITE_LEN) + 1), 2);
        assert_eq!(parts(u64::from(u32::MAX)), 128);
    }
}
