//! Async deltas: which writes of an interval a later write of the same interval covers
//! completely, so the shipper can send them as superseded records (header only) instead of
//! their data (docs/journal-format.md, "Async deltas").
//!
//! The shipper scans the journal from where the target is to the next interval point or
//! bookmark, noting each record's range ([`DeltaScan`]); then, newest first, a write whose
//! whole range is already covered by newer writes of its volume is left out. Resync records
//! (kind 7) cover older writes like any write but are never left out themselves: the target
//! learns from them that a resync began, and no image is consistent until its resync point.

use std::collections::{BTreeMap, HashSet};

use hindsight_consistency::journal::{JournalError, JournalReader};
use hindsight_consistency::{Seq, WriteKind};

/// One record of the interval, as far as coverage goes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: Seq,
    volume: u16,
    offset: u64,
    end: u64,
    /// A resync record: shipped whole even when covered.
    keep: bool,
}

/// Disjoint byte ranges of one volume, merged.
#[derive(Debug, Default)]
struct RangeSet {
    /// start → end (exclusive), non-overlapping, non-adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges.range(..=start).next_back().is_some_and(|(_, &e)| e >= end)
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Swallow every range that starts inside the new one.
        let inside: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }
}

/// The journal scanned ahead of the shipper, up to the next point.
pub struct DeltaScan {
    reader: JournalReader,
    entries: Vec<Entry>,
    volumes: Vec<String>,
}

/// A delta ready to ship: every record through `point`, with `superseded` left out.
pub struct Delta {
    /// The interval point (or bookmark) that ends it.
    pub point: Seq,
    /// Writes covered by later writes of the interval.
    pub superseded: HashSet<Seq>,
    /// Records in the delta.
    pub records: usize,
}

impl DeltaScan {
    /// Starts scanning at `reader`'s position (the first record the target lacks).
    pub fn new(reader: JournalReader) -> DeltaScan {
        DeltaScan { reader, entries: Vec::new(), volumes: Vec::new() }
    }

    /// Where the scan starts over if it is dropped: the next record it would read.
    pub fn next_seq(&self) -> Seq {
        self.reader.next_seq()
    }

    /// Reads on, up to `durable`; returns the delta once an interval point or a bookmark is
    /// reached (the scan is then spent), or `None` if none is durable yet.
    pub fn advance(&mut self, durable: Seq) -> Result<Option<Delta>, JournalError> {
        while let Some((rec, _)) = self.reader.next_raw_upto(durable)? {
            let h = rec.header;
            match h.kind {
                WriteKind::Point | WriteKind::Bookmark => {
                    let superseded = superseded(&self.entries);
                    let records = self.entries.len() + 1;
                    self.entries.clear();
                    return Ok(Some(Delta { point: h.seq, superseded, records }));
                }
                k if k.changes_volume() => {
                    let volume = match self.volumes.iter().position(|v| v == rec.volume) {
                        Some(i) => i,
                        None => {
                            self.volumes.push(rec.volume.to_owned());
                            self.volumes.len() - 1
                        }
                    };
                    let volume = u16::try_from(volume).unwrap_or(u16::MAX);
                    let end = h.offset + u64::from(h.length);
                    self.entries.push(Entry { seq: h.seq, volume, offset: h.offset, end, keep: h.kind == WriteKind::Resync });
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The writes a later write of the same volume covers completely.
fn superseded(entries: &[Entry]) -> HashSet<Seq> {
    let mut covered: BTreeMap<u16, RangeSet> = BTreeMap::new();
    let mut out = HashSet::new();
    for e in entries.iter().rev() {
        let set = covered.entry(e.volume).or_default();
        if set.covers(e.offset, e.end) {
            if !e.keep {
                out.insert(e.seq);
            }
        } else {
            set.insert(e.offset, e.end);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: Seq, volume: u16, offset: u64, len: u64) -> Entry {
        Entry { seq, volume, offset, end: offset + len, keep: false }
    }

    #[test]
    fn only_wholly_covered_writes_are_left_out() {
        let entries = [
            e(1, 0, 0, 4096),     // covered by 4
            e(2, 0, 8192, 4096),  // 8192..9000 is written by no newer write: kept
            e(3, 1, 0, 4096),     // other volume: kept
            e(4, 0, 0, 8192),     // newest on 0..4096 and 6144..8192
            e(5, 0, 10240, 4096), // covered by 8 and 7 together
            e(6, 0, 4096, 2048),  // inside 4, but newer: kept
            e(7, 0, 12288, 2048), // 12288..14336, partly past 8
            e(8, 0, 9000, 5000),  // 9000..14000, the newest
        ];
        let mut got: Vec<Seq> = superseded(&entries).into_iter().collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 5]);

        let entries = [e(1, 0, 0, 4096), e(2, 0, 4096, 4096), e(3, 0, 0, 8192), e(4, 0, 0, 4096)];
        let mut got: Vec<Seq> = superseded(&entries).into_iter().collect();
        got.sort_unstable();
        // 3 covers 1 and 2; 4 is newest; 3 itself is only half covered by 4.
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn resync_records_cover_older_writes_but_are_never_left_out() {
        let resync = |seq, offset, len| Entry { keep: true, ..e(seq, 0, offset, len) };
        let entries = [e(1, 0, 0, 4096), resync(2, 0, 8192), resync(3, 8192, 4096), e(4, 0, 0, 16384)];
        let mut got: Vec<Seq> = superseded(&entries).into_iter().collect();
        got.sort_unstable();
        // 4 covers 1, 2 and 3; 2 also covers 1; the resync records 2 and 3 are kept.
        assert_eq!(got, vec![1]);
    }

    #[test]
    fn ranges_merge() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert!(!r.covers(15, 35));
        r.insert(20, 30);
        assert!(r.covers(10, 40) && r.covers(12, 13) && !r.covers(9, 11) && !r.covers(39, 41));
        r.insert(0, 100);
        assert_eq!(r.ranges.len(), 1);
        assert!(r.covers(0, 100));
    }
}
