//! The point-in-time index (docs/point-index.md): for every journal record that changes a
//! volume, an [`Extent`] saying which bytes it wrote, with which sequence number, and where
//! its data lies in the segment file, so that the image of a volume at any point is resolved
//! range by range without replaying the journal.
//!
//! Core types: a [`Run`] holds the extents of one journal segment, sorted so that the versions
//! of a range are found by binary search; [`file`](mod@file) encodes a sealed segment's run as its index
//! file and checks one read back; [`resolve`] paints a range from the runs at a point, newest
//! version first, leaving what no run holds to the base image.

pub mod build;
pub mod file;
pub mod resolve;
pub mod store;

use hindsight_consistency::{Seq, WriteKind};

/// Bytes of one encoded extent.
pub const EXTENT_LEN: usize = 32;

/// One record's change to one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the volume the record covers.
    pub offset: u64,
    pub seq: Seq,
    /// Position of the record's data in its segment file (0 for zeroes and trims).
    pub data_pos: u64,
    pub length: u32,
    /// The volume's number in the run's volume table.
    pub volume: u16,
    /// Data, Zeroes, Trim or Resync.
    pub kind: WriteKind,
}

impl Extent {
    /// One past the last byte covered.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }

    /// True if the range reads back as zeroes rather than from the segment.
    pub fn reads_zero(&self) -> bool {
        matches!(self.kind, WriteKind::Zeroes | WriteKind::Trim)
    }

    pub(crate) fn key(&self) -> (u16, u64, std::cmp::Reverse<Seq>) {
        (self.volume, self.offset, std::cmp::Reverse(self.seq))
    }
}

/// The extents of one journal segment (records `first_seq ..= last_seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// Bytes of the segment file the run was built from (0 for the active segment).
    pub segment_len: u64,
    /// Times of the first and last records (0 until set).
    pub first_time_ns: u64,
    pub last_time_ns: u64,
    /// Volume names, by number.
    pub volumes: Vec<String>,
    /// Sorted by volume, then offset, then newest first.
    extents: Vec<Extent>,
    /// Longest extent: how far before a range an overlapping extent can start.
    max_length: u32,
}

impl Run {
    /// A run of these extents, sorted here.
    pub fn new(first_seq: Seq, last_seq: Seq, segment_len: u64, volumes: Vec<String>, mut extents: Vec<Extent>) -> Run {
        extents.sort_unstable_by_key(Extent::key);
        let max_length = extents.iter().map(|e| e.length).max().unwrap_or(0);
        debug_assert!(extents.iter().all(|e| usize::from(e.volume) < volumes.len()), "an extent names no volume of its run");
        debug_assert!(extents.iter().all(|e| (first_seq..=last_seq).contains(&e.seq)), "an extent outside its run's records");
        Run { first_seq, last_seq, segment_len, first_time_ns: 0, last_time_ns: 0, volumes, extents, max_length }
    }

    /// The extents, sorted.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The longest extent's length.
    pub fn max_length(&self) -> u32 {
        self.max_length
    }

    /// The number of `name` in this run's volume table.
    pub fn volume_number(&self, name: &str) -> Option<u16> {
        self.volumes.iter().position(|v| v == name).and_then(|i| u16::try_from(i).ok())
    }

    /// The extents of volume `volume` that overlap `[from, to)` and are at or before `point`,
    /// leaving out each one that a newer one starting at the same offset hides within the
    /// range.
    pub fn candidates(&self, volume: u16, from: u64, to: u64, point: Seq) -> Vec<Extent> {
        let mut out = Vec::new();
        if from >= to || point < self.first_seq {
            return out;
        }
        let lowest = from.saturating_sub(u64::from(self.max_length));
        let lo = self.extents.partition_point(|e| (e.volume, e.offset) < (volume, lowest));
        let hi = self.extents.partition_point(|e| (e.volume, e.offset) < (volume, to));
        let mut i = lo;
        while i < hi {
            let offset = self.extents[i].offset;
            let group_end = i + self.extents[i..hi].partition_point(|e| e.offset == offset);
            // Newest first within the group: skip what is after the point.
            let mut j = i + self.extents[i..group_end].partition_point(|e| e.seq > point);
            let mut covered = offset.max(from);
            while j < group_end && covered < to {
                let e = self.extents[j];
                if e.end() > covered {
                    out.push(e);
                    covered = e.end();
                }
                j += 1;
            }
            i = group_end;
        }
        out.retain(|e| e.end() > from);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn data(volume: u16, offset: u64, length: u32, seq: Seq) -> Extent {
        Extent { offset, seq, data_pos: seq * 100_000, length, volume, kind: WriteKind::Data }
    }

    #[test]
    fn candidates_are_the_overlapping_versions_at_or_before_the_point() {
        let run = Run::new(
            10,
            15,
            0,
            vec!["a".into(), "b".into()],
            vec![data(0, 0, 4096, 10), data(0, 4096, 4096, 11), data(0, 0, 4096, 12), data(1, 0, 8192, 13), data(0, 0, 8192, 14)],
        );
        let seqs = |v, from, to, point| run.candidates(v, from, to, point).iter().map(|e| e.seq).collect::<Vec<_>>();
        // At 12, offset 0 holds 12 (10 is hidden by it) and 4096 holds 11.
        assert_eq!(seqs(0, 0, 8192, 12), vec![12, 11]);
        // At 14, the 8 KiB write at 0 hides everything starting at 0.
        assert_eq!(seqs(0, 0, 4096, 15), vec![14]);
        // Before the run, nothing.
        assert!(seqs(0, 0, 8192, 9).is_empty());
        // Another volume's extents never show.
        assert_eq!(seqs(1, 0, 4096, 15), vec![13]);
        // A range that starts inside an extent finds it.
        assert_eq!(seqs(0, 6000, 7000, 11), vec![11]);
    }

    #[test]
    fn an_older_longer_version_at_the_same_offset_stays_a_candidate() {
        let run = Run::new(1, 2, 0, vec!["a".into()], vec![data(0, 0, 8192, 1), data(0, 0, 4096, 2)]);
        let seqs: Vec<Seq> = run.candidates(0, 0, 8192, 2).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 1]);
    }
}
