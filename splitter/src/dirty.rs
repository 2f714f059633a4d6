//! The dirty map: which regions of a disk may differ from the replica, kept on disk so that a
//! crash or a power loss never loses the knowledge (docs/failure-handling.md).
//!
//! Activity-log style: a region (1 MiB by default) is marked *on disk* (`fdatasync`) before the
//! first write to it is sent anywhere, and stays marked while it is being written; once no
//! write is in flight in it and none came for [`CLEAN_AFTER`], a background pass clears it
//! lazily: at once when the whole disk is quiet, else only beyond a hot set of
//! [`HOT_REGIONS`], least recently written first. A region whose write the engine did not take (the engine away past its timeout,
//! or refusing) stays marked and *needs a resync*. After a crash every region the file says
//! is marked needs a resync: a write may have reached the local disk and not the engine.
//!
//! An initial sync (no map yet) and a damaged map mark every region *to be compared*: the
//! resync first compares each with the replica's hash and sends only those that differ
//! (`crate::resync`). The file says so in its flags while any region is still to be compared,
//! so that a restart compares again instead of re-sending everything.
//!
//! File layout (little-endian, rewritten in place; a torn file fails its checksum and then
//! counts as every region dirty, to be compared; a missing or empty file is a new map, and a
//! new map is not written until its first change):
//!
//! ```text
//!   0  | magic "HSDM" | version u8 = 1 | region_shift u8 | flags u16         |
//!   8  | disk size u64                                                     |
//!  16  | bitmap, ceil(regions / 8) bytes, bit r of byte r/8 = region r      |
//!      | crc32c u32 of everything before it                                 |
//! ```
//!
//! `{ "HSDM" | version | region_shift | flags | size | bitmap | crc32c }`; flags bit 0
//! ([`FLAG_COMPARE`]): the marked regions are to be compared before they are sent; other bits 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hindsight_consistency::storage::{OpenMode, Storage, StorageFile};
use hindsight_consistency::sync::lock;
use log::{info, warn};

/// Regions are 2^20 bytes by default.
pub const DEFAULT_REGION_SHIFT: u8 = 20;
/// A region with nothing in flight is cleared after this long without writes to it, once
/// the whole disk has had none for as long, or while more than [`HOT_REGIONS`] are marked.
pub const CLEAN_AFTER: Duration = Duration::from_secs(2);
/// While a disk is being written, this many regions (1 GiB of 1 MiB regions) stay marked
/// after their writes, the least recently written cleared beyond it: random writes over a hot
/// set that fits pay the map's sync once, not again each time a region is idle for a moment.
/// After a crash the agent compares at most these and the regions in flight.
pub const HOT_REGIONS: usize = 1024;
/// A write that marks a clean region and goes on from a sequential stream (at least a
/// region's worth of writes, each beginning where the one before ended) also marks this many
/// regions after its own, in the same sync: a stream of 1 MiB writes then
/// syncs the map once per 8 MiB instead of before every write. Marking more is always safe
/// (a marked region only costs a compare or a re-send after a crash); the regions it does
/// not reach are cleared after [`CLEAN_AFTER`] like any other.
pub const MARK_AHEAD: u64 = 7;

/// Flags bit 0: the marked regions are to be compared with the replica before being sent.
pub const FLAG_COMPARE: u16 = 1;

const MAGIC: &[u8; 4] = b"HSDM";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 16;

struct State {
    /// Marks (what the file says once `persisted` reaches `generation`).
    marked: Vec<u8>,
    /// Bumped by every change of `marked`.
    generation: u64,
    /// The generation the file holds.
    persisted: u64,
    /// A thread is writing the file.
    persisting: bool,
    /// Writes in flight per region.
    in_flight: HashMap<u64, u32>,
    /// Regions that must be re-sent.
    resync: Vec<u8>,
    /// Regions to compare with the replica's hash before re-sending (a subset of `resync`).
    compare: Vec<u8>,
    /// When each marked region was last written.
    touched: HashMap<u64, Instant>,
    /// Nothing was ever written to the file (a new map): it reads as fresh, which compares
    /// every region, whatever the marks in memory are.
    blank: bool,
    /// When the disk was last written.
    last_write: Option<Instant>,
    /// Where the last write begun ended, and how many bytes the writes that ran on up to it
    /// without a gap hold: a write that goes on from a region's worth of them marks ahead.
    stream_end: u64,
    stream_len: u64,
    /// Per marked region, the largest sequence number the engine gave a write to it that the
    /// target has not confirmed yet: such a region stays marked (docs/ha.md, "Takeover").
    unconfirmed: HashMap<u64, u64>,
    /// The target holds every record of the disk's group through this sequence number.
    confirmed: u64,
}

/// The dirty map of one disk.
pub struct DirtyMap {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    shift: u8,
    regions: u64,
    size: u64,
    state: Mutex<State>,
    /// Signalled when a write of the file finishes.
    written: std::sync::Condvar,
}

fn bit(map: &[u8], r: u64) -> bool {
    map[usize::try_from(r / 8).expect("region index fits")] & (1 << (r % 8)) != 0
}

fn set(map: &mut [u8], r: u64, on: bool) {
    let byte = &mut map[usize::try_from(r / 8).expect("region index fits")];
    if on {
        *byte |= 1 << (r % 8);
    } else {
        *byte &= !(1 << (r % 8));
    }
}

impl DirtyMap {
    /// Opens (or creates) the map of a disk of `size` bytes. Regions marked in an existing
    /// map need a resync (the agent stopped with writes that may not have reached the
    /// engine). A new map (`fresh` = true in the result) means the agent has never served this
    /// disk here: the caller decides what the initial sync is.
    ///
    /// Only a damaged map is written (and synced) here. A valid one already says what it
    /// should; a new one stays empty until its first change, and an empty file reads as fresh
    /// again, so an agent that stops before then starts over with the same initial sync.
    pub fn open(fs: &dyn Storage, path: &Path, size: u64) -> std::io::Result<(DirtyMap, bool)> {
        let shift = DEFAULT_REGION_SHIFT;
        let regions = size.div_ceil(1 << shift);
        let bytes = usize::try_from(regions.div_ceil(8)).map_err(|_| std::io::Error::other("disk too large for a dirty map"))?;
        let exists = fs.exists(path);
        if let Some(dir) = path.parent() {
            fs.create_dir_all(dir)?;
        }
        let file = fs.open(path, OpenMode::Create)?;
        let mut marked = vec![0u8; bytes];
        let mut compare = vec![0u8; bytes];
        let mut fresh = !exists;
        let mut valid = false;
        if exists {
            let len = usize::try_from(file.len()?).unwrap_or(usize::MAX);
            let mut buf = vec![0u8; len.min(HEADER_LEN + bytes + 4)];
            file.read_exact_at(&mut buf, 0)?;
            match decode(&buf, shift, size, bytes) {
                Some((m, flags)) => {
                    valid = true;
                    if flags & FLAG_COMPARE != 0 {
                        compare.clone_from(&m);
                    }
                    marked = m;
                }
                None if len == 0 => fresh = true,
                None => {
                    warn!(
                        "{}: the dirty map is damaged or for another disk size; every region will be compared with the replica and resynced if it differs",
                        path.display()
                    );
                    marked.fill(0xff);
                    compare.fill(0xff);
                }
            }
        }
        let map = DirtyMap {
            file,
            path: path.to_owned(),
            shift,
            regions,
            size,
            state: Mutex::new(State {
                resync: marked.clone(),
                compare,
                marked,
                generation: 0,
                persisted: 0,
                persisting: false,
                in_flight: HashMap::new(),
                touched: HashMap::new(),
                blank: fresh,
                last_write: None,
                stream_end: 0,
                stream_len: 0,
                unconfirmed: HashMap::new(),
                confirmed: 0,
            }),
            written: std::sync::Condvar::new(),
        };
        {
            let mut st = lock(&map.state);
            if !fresh && !valid {
                st.blank = false;
                map.persist(&st.marked, any(&st.compare))?;
            }
            let n = (0..regions).filter(|&r| bit(&st.resync, r)).count();
            let compare = (0..regions).filter(|&r| bit(&st.compare, r)).count();
            if compare > 0 && exists {
                info!(
                    "{}: {compare} region(s) are to be compared with the replica (an initial sync not finished, or a damaged map)",
                    path.display()
                );
            } else if n > 0 {
                info!("{}: {n} region(s) were dirty when the agent stopped; they will be resynced", path.display());
            }
        }
        Ok((map, fresh))
    }

    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        1 << self.shift
    }

    /// Region size as a power of two.
    pub fn region_shift(&self) -> u8 {
        self.shift
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The byte range of region `r`.
    pub fn range(&self, r: u64) -> (u64, u64) {
        let start = r << self.shift;
        (start, (start + self.region_size()).min(self.size))
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        (offset >> self.shift)..=((offset + len.max(1) - 1) >> self.shift)
    }

    fn persist(&self, marked: &[u8], compare: bool) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER_LEN + marked.len() + 4);
        buf.extend_from_slice(MAGIC);
        buf.push(VERSION);
        buf.push(self.shift);
        buf.extend_from_slice(&(if compare { FLAG_COMPARE } else { 0 }).to_le_bytes());
        buf.extend_from_slice(&self.size.to_le_bytes());
        buf.extend_from_slice(marked);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&buf, 0)?;
        self.file.sync_data()
    }

    /// Before a write of `len` bytes at `offset` is sent: marks its regions on disk (when a
    /// region was clean: the file is written and synced, one sync shared by every write that
    /// marked a region meanwhile, with no lock held during it; a sequential stream marks
    /// [`MARK_AHEAD`] more) and counts the write in flight.
    pub fn begin(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.begin_at(offset, len, Instant::now())
    }

    fn begin_at(&self, offset: u64, len: u64, now: Instant) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        let mut newly = false;
        let span = self.span(offset, len);
        let last = *span.end();
        st.last_write = Some(now);
        // A stream: this write follows, without a gap, a run of at least a region of writes.
        let streaming = offset == st.stream_end && st.stream_len >= self.region_size();
        st.stream_len = if offset == st.stream_end { st.stream_len + len } else { len };
        st.stream_end = offset + len;
        for r in span {
            *st.in_flight.entry(r).or_insert(0) += 1;
            st.touched.insert(r, now);
            if !bit(&st.marked, r) {
                set(&mut st.marked, r, true);
                newly = true;
            }
        }
        if !newly {
            return Ok(());
        }
        if streaming {
            // A stream going on into clean regions: mark the next ones in the same sync.
            for r in (last + 1..=last + MARK_AHEAD).take_while(|&r| r < self.regions) {
                if !bit(&st.marked, r) {
                    set(&mut st.marked, r, true);
                    st.touched.insert(r, now);
                }
            }
        }
        st.generation += 1;
        let mine = st.generation;
        self.sync_through(st, mine)
    }

    /// Returns once the file holds generation `mine` of the marks: writes it (this thread) or
    /// waits for the thread writing it.
    fn sync_through<'a>(&'a self, mut st: MutexGuard<'a, State>, mine: u64) -> std::io::Result<()> {
        loop {
            if st.persisted >= mine {
                return Ok(());
            }
            if st.persisting {
                st = self.written.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.persisting = true;
            st.blank = false;
            let (marks, compare, generation) = (st.marked.clone(), any(&st.compare), st.generation);
            drop(st);
            let res = self.persist(&marks, compare);
            st = lock(&self.state);
            st.persisting = false;
            if res.is_ok() {
                st.persisted = st.persisted.max(generation);
            }
            self.written.notify_all();
            res?;
        }
    }

    /// After the write has finished: `replicated` says whether the engine took it (as `seq`,
    /// 0 if unknown); if not, its regions need a resync. A region the engine took stays
    /// marked until the target holds `seq` ([`DirtyMap::target_confirmed`]).
    pub fn end(&self, offset: u64, len: u64, replicated: bool, seq: u64) {
        let mut st = lock(&self.state);
        for r in self.span(offset, len) {
            if replicated && seq > st.confirmed {
                let s = st.unconfirmed.entry(r).or_insert(0);
                *s = (*s).max(seq);
            }
            if let Some(n) = st.in_flight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    st.in_flight.remove(&r);
                }
            }
            if !replicated {
                set(&mut st.resync, r, true);
            }
        }
    }

    /// The target holds every record of the disk's group through `seq`: regions whose writes
    /// it all holds may be cleared.
    pub fn target_confirmed(&self, seq: u64) {
        let mut st = lock(&self.state);
        if seq > st.confirmed {
            st.confirmed = seq;
            st.unconfirmed.retain(|_, s| *s > seq);
        }
    }

    /// The group was taken over by an engine that may lack writes the last one acknowledged
    /// (docs/ha.md, "Takeover"): every region still marked needs a resync, and what the last
    /// engine numbered means nothing to the new one. Returns how many.
    pub fn resync_marked(&self) -> usize {
        let mut st = lock(&self.state);
        let marked: Vec<u64> = (0..self.regions).filter(|&r| bit(&st.marked, r)).collect();
        for &r in &marked {
            set(&mut st.resync, r, true);
        }
        st.unconfirmed.clear();
        st.confirmed = 0;
        marked.len()
    }

    /// Regions that need a resync, lowest first.
    pub fn needing_resync(&self) -> Vec<u64> {
        let st = lock(&self.state);
        (0..self.regions).filter(|&r| bit(&st.resync, r)).collect()
    }

    /// Marks every region as needing a resync after a compare with the replica (the initial
    /// sync of a disk the agent has never served here), on disk. A map whose file was never
    /// written is not synced for it: that file already reads as fresh, to be compared whole,
    /// and the first write of the file holds every mark (one sync less per new disk at start).
    pub fn mark_all_for_compare(&self) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        for r in 0..self.regions {
            set(&mut st.marked, r, true);
            set(&mut st.resync, r, true);
            set(&mut st.compare, r, true);
        }
        st.generation += 1;
        if st.blank {
            return Ok(());
        }
        let mine = st.generation;
        self.sync_through(st, mine)
    }

    /// Regions still to be compared with the replica, lowest first.
    pub fn needing_compare(&self) -> Vec<u64> {
        let st = lock(&self.state);
        (0..self.regions).filter(|&r| bit(&st.compare, r)).collect()
    }

    /// Region `r` was compared with the replica: if `equal`, it needs no resync any more (it
    /// is cleared from the file by the next [`DirtyMap::clean`] when idle); if not, it stays
    /// to be re-sent. The file's compare flag goes with the last region compared.
    pub fn compared(&self, r: u64, equal: bool) {
        let mut st = lock(&self.state);
        set(&mut st.compare, r, false);
        if equal {
            set(&mut st.resync, r, false);
        }
    }

    /// A resync of region `r` was acknowledged by the engine: it no longer needs one (it is
    /// cleared from the file by the next [`DirtyMap::clean`] when idle).
    pub fn resynced(&self, r: u64) {
        set(&mut lock(&self.state).resync, r, false);
    }

    /// Clears, in the file, regions with nothing in flight, no resync pending and no write for
    /// [`CLEAN_AFTER`]: all of them once the disk has had no write for as long (and those not
    /// written since the map was opened at any time), else only the least recently written
    /// beyond [`HOT_REGIONS`] marked. Returns how many were cleared.
    pub fn clean(&self) -> std::io::Result<usize> {
        self.clean_at(Instant::now())
    }

    fn clean_at(&self, now: Instant) -> std::io::Result<usize> {
        let mut st = lock(&self.state);
        let quiet = st.last_write.is_none_or(|t| now.duration_since(t) >= CLEAN_AFTER);
        let mut marked = 0usize;
        let mut idle = Vec::new();
        for r in 0..self.regions {
            if !bit(&st.marked, r) {
                continue;
            }
            marked += 1;
            if bit(&st.resync, r) || st.in_flight.contains_key(&r) || st.unconfirmed.contains_key(&r) {
                continue;
            }
            match st.touched.get(&r) {
                None => idle.push((None, r)),
                Some(t) if now.duration_since(*t) >= CLEAN_AFTER => idle.push((Some(*t), r)),
                Some(_) => {}
            }
        }
        if !quiet {
            // Not written since the map was opened: none of the hot set, cleared as always.
            let untouched = idle.iter().filter(|(t, _)| t.is_none()).count();
            idle.sort_unstable();
            let over = marked.saturating_sub(HOT_REGIONS).max(untouched);
            idle.truncate(over);
        }
        for &(_, r) in &idle {
            set(&mut st.marked, r, false);
            st.touched.remove(&r);
        }
        let cleared = idle.len();
        if cleared > 0 {
            st.generation += 1;
            let mine = st.generation;
            self.sync_through(st, mine)?;
        }
        Ok(cleared)
    }

    #[cfg(test)]
    fn generation_persisted(&self) -> u64 {
        lock(&self.state).persisted
    }

    /// Where the map is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn any(map: &[u8]) -> bool {
    map.iter().any(|&b| b != 0)
}

/// The bitmap and the flags of a valid file for this disk, or `None`.
fn decode(buf: &[u8], shift: u8, size: u64, bytes: usize) -> Option<(Vec<u8>, u16)> {
    if buf.len() != HEADER_LEN + bytes + 4 || &buf[..4] != MAGIC || buf[4] != VERSION || buf[5] != shift {
        return None;
    }
    let flags = u16::from_le_bytes([buf[6], buf[7]]);
    if u64::from_le_bytes(buf[8..16].try_into().ok()?) != size {
        return None;
    }
    let (body, crc) = buf.split_at(HEADER_LEN + bytes);
    (crc32c::crc32c(body) == u32::from_le_bytes(crc.try_into().ok()?)).then(|| (body[HEADER_LEN..].to_vec(), flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    const MIB: u64 = 1 << 20;

    #[test]
    fn marks_survive_a_restart_and_clean_only_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 10 * MIB).unwrap();
        assert!(fresh);
        m.begin(3 * MIB + 10, 2 * MIB).unwrap(); // regions 3, 4, 5
        assert!(m.needing_resync().is_empty());
        drop(m);
        // "Crash" with the write in flight: the regions need a resync.
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 10 * MIB).unwrap();
        assert!(!fresh);
        assert_eq!(m.needing_resync(), vec![3, 4, 5]);
        for r in [3, 4, 5] {
            m.resynced(r);
        }
        // A write the engine did not take.
        m.begin(0, 4096).unwrap();
        m.end(0, 4096, false, 0);
        m.begin(8 * MIB, 4096).unwrap();
        m.end(8 * MIB, 4096, true, 0);
        assert_eq!(m.needing_resync(), vec![0]);
        // Region 8 was just written: kept until idle.
        let cleared = m.clean().unwrap();
        assert!(cleared >= 3, "resynced regions are cleared: {cleared}");
        drop(m);
        let (m, _) = DirtyMap::open(&StdStorage, &path, 10 * MIB).unwrap();
        assert_eq!(m.needing_resync(), vec![0, 8]);
    }

    #[test]
    fn a_sequential_stream_marks_regions_ahead_in_one_sync_and_other_writes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let (m, _) = DirtyMap::open(&StdStorage, &path, 20 * MIB).unwrap();
        m.begin(12 * MIB, 4096).unwrap(); // a lone write: region 12 only
        m.begin(0, MIB).unwrap(); // region 0: nothing marked before it
        m.begin(MIB, MIB).unwrap(); // region 1 after the marked 0: a stream, 2..=8 marked too
        let on_disk = m.generation_persisted();
        for r in 2..=8 {
            m.begin(r * MIB, MIB).unwrap();
        }
        assert_eq!(m.generation_persisted(), on_disk, "the stream's next regions needed no sync");
        m.begin(19 * MIB, MIB).unwrap(); // region 19, not where the stream ended: alone again
        m.begin(14 * MIB, 4096).unwrap(); // small writes in neighbouring regions are no stream
        m.begin(15 * MIB, 4096).unwrap();
        drop(m);
        let (m, _) = DirtyMap::open(&StdStorage, &path, 20 * MIB).unwrap();
        let expected: Vec<u64> = (0..=8).chain([12, 14, 15, 19]).collect();
        assert_eq!(m.needing_resync(), expected);
    }

    #[test]
    fn a_disk_being_written_keeps_its_hot_regions_marked_and_a_quiet_one_clears_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let regions = HOT_REGIONS as u64 + 10;
        let (m, _) = DirtyMap::open(&StdStorage, &path, regions * MIB).unwrap();
        let write = |r: u64, at: Instant| {
            m.begin_at(r * MIB, 4096, at).unwrap();
            m.end(r * MIB, 4096, true, 0);
        };
        // Every other region (so that no stream marks ahead), then the others 3 s later.
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(3);
        (0..regions).step_by(2).for_each(|r| write(r, t0));
        (3..regions).step_by(2).for_each(|r| write(r, t1));
        m.begin_at(MIB, 4096, t1).unwrap(); // region 1 stays in flight
        let ms = Duration::from_millis(1);
        assert_eq!(m.clean_at(t1 + ms).unwrap(), 10, "while the disk is written, only the oldest idle beyond the hot set go");
        assert_eq!(m.clean_at(t1 + 1000 * ms).unwrap(), 0, "idle regions within the hot set stay marked");
        assert_eq!(m.clean_at(t1 + CLEAN_AFTER).unwrap(), HOT_REGIONS - 1, "a quiet disk clears every idle region");
        drop(m);
        let (m, _) = DirtyMap::open(&StdStorage, &path, regions * MIB).unwrap();
        assert_eq!(m.needing_resync(), vec![1], "the region in flight was never cleared");
    }

    #[test]
    fn a_damaged_map_means_everything_is_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let (m, _) = DirtyMap::open(&StdStorage, &path, 4 * MIB).unwrap();
        m.begin(0, 4096).unwrap();
        drop(m);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[16] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (m, _) = DirtyMap::open(&StdStorage, &path, 4 * MIB).unwrap();
        assert_eq!(m.needing_resync(), vec![0, 1, 2, 3]);
        // ... and compared with the replica before anything is re-sent.
        assert_eq!(m.needing_compare(), vec![0, 1, 2, 3]);
        // Another disk size: the same.
        let (m, _) = DirtyMap::open(&StdStorage, &path, 2 * MIB).unwrap();
        assert_eq!(m.needing_resync(), vec![0, 1]);
    }

    #[test]
    fn new_map_stays_unwritten_until_its_first_change_and_reads_fresh_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 4 * MIB).unwrap();
        assert!(fresh);
        m.mark_all_for_compare().unwrap();
        // A guest write to a region already marked changes nothing the file must hold.
        m.begin(MIB, 4096).unwrap();
        m.end(MIB, 4096, true, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "nothing is written before the first change");
        drop(m);
        // Stopped (or crashed) before then: the map is fresh again, compared whole again.
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 4 * MIB).unwrap();
        assert!(fresh);
        m.mark_all_for_compare().unwrap();
        m.compared(0, true);
        assert_eq!(m.clean().unwrap(), 1);
        drop(m);
        // The first write holds every mark still standing, to be compared.
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 4 * MIB).unwrap();
        assert!(!fresh);
        assert_eq!(m.needing_compare(), vec![1, 2, 3]);
    }

    #[test]
    fn initial_sync_compares_every_region_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.map");
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 4 * MIB + 5).unwrap();
        assert!(fresh);
        m.mark_all_for_compare().unwrap();
        assert_eq!(m.needing_compare(), vec![0, 1, 2, 3, 4]);
        assert_eq!(m.needing_resync(), vec![0, 1, 2, 3, 4]);
        m.compared(0, true);
        m.compared(1, false);
        assert_eq!(m.needing_compare(), vec![2, 3, 4]);
        assert_eq!(m.needing_resync(), vec![1, 2, 3, 4], "an equal region is done, a differing one waits to be sent");
        m.clean().unwrap();
        drop(m);
        // Stopped halfway: the rest is compared again, not re-sent blindly.
        let (m, fresh) = DirtyMap::open(&StdStorage, &path, 4 * MIB + 5).unwrap();
        assert!(!fresh);
        assert_eq!(m.needing_compare(), vec![1, 2, 3, 4]);
        for r in 1..5 {
            m.compared(r, r != 3);
        }
        m.resynced(3);
        assert!(m.needing_compare().is_empty() && m.needing_resync().is_empty());
        assert_eq!(m.clean().unwrap(), 4);
        drop(m);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 0, "the compare flag is cleared with the last region");
        let (m, _) = DirtyMap::open(&StdStorage, &path, 4 * MIB + 5).unwrap();
        assert!(m.needing_compare().is_empty() && m.needing_resync().is_empty());
    }
}
