//! The table of a thinned segment, `thin/<first_seq>.hsm.<generation>` (docs/retention-tiers.md,
//! "Thinned segment table"): the points it can serve and the live extents of its data file,
//! each with the CRC-32C of its data.
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSTHIN01"                                                  |
//!    8  | version (u32) = 1                 | volume_count (u16)| reserved  |
//!   16  | first_seq (u64)                                                   |
//!   24  | last_seq (u64)                                                    |
//!   32  | generation (u64)                                                  |
//!   40  | data_len (u64)                                                    |
//!   48  | first_time_ns (u64): time of the segment's first record           |
//!   56  | last_time_ns (u64): time of its last record                       |
//!   64  | point_count (u32)                 | extent_count (u32)            |
//!   72  | max_length (u32)                  | reserved (u32) = 0            |
//!   80  | volume table | points (24 bytes each) | extents (40 bytes each)    |
//!       | crc32c (u32) of every byte before it                              |
//! ```
//!
//! A decoder checks the size against the counts and the checksum before it uses anything, and
//! never allocates from an unchecked count.

use hindsight_consistency::Seq;
use thiserror::Error;

use crate::point_index::file::{get_extent, get_volumes, put_extent, put_volumes, u16_at, u32_at, u64_at, IndexFileError};
use crate::point_index::{Extent, Run, EXTENT_LEN};

/// The file's first eight bytes.
pub const MAGIC: &[u8; 8] = b"HSTHIN01";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// Data of a data extent starts at a multiple of this in the data file.
pub const DATA_ALIGN: u64 = 4096;
const HEADER_LEN: usize = 80;
const POINT_LEN: usize = 24;
const TABLE_EXTENT_LEN: usize = EXTENT_LEN + 8;

/// Why a point is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    /// A tier keeps it.
    Tier,
    /// A bookmark.
    Bookmark,
    /// An export or a test failover serves it.
    Pinned,
}

/// A point a thinned segment can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePoint {
    pub seq: Seq,
    pub time_ns: u64,
    /// The finest tier that keeps it.
    pub tier: u8,
    pub kind: PointKind,
}

/// A thinned segment's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinTable {
    /// The extents, sorted as in an index run; `segment_len` is the data file's length, the
    /// times those of the segment's first and last records.
    pub run: Run,
    /// The CRC-32C of each extent's data, in the order of `run.extents()` (0 for zeroes).
    pub crcs: Vec<u32>,
    /// Ascending by sequence number.
    pub points: Vec<TablePoint>,
    pub generation: u64,
}

/// Why bytes are not a valid table.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableError {
    #[error("not a thinned segment table (bad magic)")]
    Magic,
    #[error("thinned segment table version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("point {0} is not valid: {1}")]
    Point(u32, &'static str),
    #[error("extent {0} is not valid: {1}")]
    Extent(u32, &'static str),
    #[error("{0}")]
    Layout(#[from] IndexFileError),
}

impl ThinTable {
    /// A table of `extents` (each with its data's CRC), any order.
    pub fn new(
        first_seq: Seq,
        last_seq: Seq,
        data_len: u64,
        volumes: Vec<String>,
        mut extents: Vec<(Extent, u32)>,
        points: Vec<TablePoint>,
        generation: u64,
    ) -> ThinTable {
        extents.sort_unstable_by_key(|(e, _)| e.key());
        let crcs = extents.iter().map(|(_, c)| *c).collect();
        let run = Run::new(first_seq, last_seq, data_len, volumes, extents.into_iter().map(|(e, _)| e).collect());
        debug_assert!(points.windows(2).all(|w| w[0].seq < w[1].seq));
        ThinTable { run, crcs, points, generation }
    }

    /// The point at or before `seq` and the one after it, for a message that names them.
    pub fn nearest(&self, seq: Seq) -> (Option<&TablePoint>, Option<&TablePoint>) {
        let i = self.points.partition_point(|p| p.seq <= seq);
        (i.checked_sub(1).map(|j| &self.points[j]), self.points.get(i))
    }

    /// Bytes of its encoding.
    pub fn encoded_len(&self) -> u64 {
        let names: usize = self.run.volumes.iter().map(|v| 1 + v.len()).sum();
        (HEADER_LEN + names + POINT_LEN * self.points.len() + TABLE_EXTENT_LEN * self.run.extents().len() + 4) as u64
    }

    /// Encodes the table.
    pub fn encode(&self) -> Vec<u8> {
        let run = &self.run;
        let extents = run.extents();
        let mut out =
            Vec::with_capacity(HEADER_LEN + 65 * run.volumes.len() + POINT_LEN * self.points.len() + TABLE_EXTENT_LEN * extents.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&u16::try_from(run.volumes.len()).expect("fewer than 65536 volumes").to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        for v in [run.first_seq, run.last_seq, self.generation, run.segment_len, run.first_time_ns, run.last_time_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&u32::try_from(self.points.len()).expect("fewer than 2^32 points").to_le_bytes());
        out.extend_from_slice(&u32::try_from(extents.len()).expect("fewer than 2^32 extents").to_le_bytes());
        out.extend_from_slice(&run.max_length().to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        put_volumes(&mut out, &run.volumes);
        for p in &self.points {
            out.extend_from_slice(&p.seq.to_le_bytes());
            out.extend_from_slice(&p.time_ns.to_le_bytes());
            out.push(p.tier);
            out.push(match p.kind {
                PointKind::Tier => 0,
                PointKind::Bookmark => 1,
                PointKind::Pinned => 2,
            });
            out.extend_from_slice(&[0; 6]);
        }
        for (e, crc) in extents.iter().zip(&self.crcs) {
            put_extent(&mut out, e);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a table, checking everything the reading rule asks (whether it is the table of
    /// a given segment is the caller's: it compares `first_seq` with the file's name).
    pub fn decode(b: &[u8]) -> Result<ThinTable, TableError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(IndexFileError::Short(b.len()).into());
        }
        if &b[..8] != MAGIC {
            return Err(TableError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(TableError::Version(version));
        }
        let body = b.len() - 4;
        if crc32c::crc32c(&b[..body]) != u32_at(b, body) {
            return Err(IndexFileError::Checksum.into());
        }
        let (first_seq, last_seq, generation, data_len) = (u64_at(b, 16), u64_at(b, 24), u64_at(b, 32), u64_at(b, 40));
        let (first_time_ns, last_time_ns) = (u64_at(b, 48), u64_at(b, 56));
        let (point_count, extent_count, max_length) = (u32_at(b, 64), u32_at(b, 68), u32_at(b, 72));
        if first_seq == 0 || last_seq < first_seq || u32_at(b, 76) != 0 || u16_at(b, 14) != 0 {
            return Err(IndexFileError::Size.into());
        }
        let mut at = HEADER_LEN;
        let volumes = get_volumes(&b[..body], &mut at, usize::from(u16_at(b, 12)))?;
        let points_len = usize::try_from(point_count).ok().and_then(|n| n.checked_mul(POINT_LEN));
        let extents_len = usize::try_from(extent_count).ok().and_then(|n| n.checked_mul(TABLE_EXTENT_LEN));
        let want = points_len.zip(extents_len).and_then(|(p, e)| at.checked_add(p)?.checked_add(e));
        if want != Some(body) {
            return Err(IndexFileError::Size.into());
        }
        let points_end = at + points_len.expect("checked");
        let mut points: Vec<TablePoint> = Vec::with_capacity(usize::try_from(point_count).unwrap_or(0));
        for (i, p) in (0u32..).zip(b[at..points_end].chunks_exact(POINT_LEN)) {
            let bad = |why| TableError::Point(i, why);
            let kind = match p[17] {
                0 => PointKind::Tier,
                1 => PointKind::Bookmark,
                2 => PointKind::Pinned,
                _ => return Err(bad("kind")),
            };
            let point = TablePoint { seq: u64_at(p, 0), time_ns: u64_at(p, 8), tier: p[16], kind };
            if !(first_seq..=last_seq).contains(&point.seq) {
                return Err(bad("sequence number outside the segment"));
            }
            if points.last().is_some_and(|last| last.seq >= point.seq) {
                return Err(bad("not in ascending order"));
            }
            if p[18..24] != [0; 6] {
                return Err(bad("reserved bytes"));
            }
            points.push(point);
        }
        let mut extents = Vec::with_capacity(usize::try_from(extent_count).unwrap_or(0));
        for (i, e) in (0u32..).zip(b[points_end..body].chunks_exact(TABLE_EXTENT_LEN)) {
            let bad = |why| TableError::Extent(i, why);
            let ext = get_extent(&e[..EXTENT_LEN], volumes.len(), first_seq..=last_seq, max_length).map_err(bad)?;
            let crc = u32_at(e, EXTENT_LEN);
            if ext.reads_zero() {
                if ext.data_pos != 0 || crc != 0 {
                    return Err(bad("a zero extent with data"));
                }
            } else if ext.data_pos % DATA_ALIGN != 0 || ext.data_pos.checked_add(u64::from(ext.length)).is_none_or(|end| end > data_len) {
                return Err(bad("data outside the data file or not aligned"));
            }
            if u32_at(e, EXTENT_LEN + 4) != 0 {
                return Err(bad("reserved bytes"));
            }
            extents.push((ext, crc));
        }
        let mut table = ThinTable::new(first_seq, last_seq, data_len, volumes, extents, points, generation);
        (table.run.first_time_ns, table.run.last_time_ns) = (first_time_ns, last_time_ns);
        if table.run.max_length() != max_length && !table.run.extents().is_empty() {
            return Err(TableError::Extent(0, "max_length"));
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use hindsight_consistency::WriteKind;

    use super::*;

    fn table() -> ThinTable {
        let e = |volume, offset, length, seq, data_pos, kind| Extent { offset, seq, data_pos, length, volume, kind };
        let extents = vec![
            (e(0, 8192, 4096, 14, 4096, WriteKind::Data), 0xdead_beef),
            (e(0, 0, 8192, 11, 0, WriteKind::Data), 0x1234_5678),
            (e(1, 0, 512, 12, 0, WriteKind::Trim), 0),
            (e(1, 4096, 65536, 13, 8192, WriteKind::Resync), 7),
        ];
        let points = vec![
            TablePoint { seq: 11, time_ns: 1_000, tier: 1, kind: PointKind::Tier },
            TablePoint { seq: 13, time_ns: 2_000, tier: 1, kind: PointKind::Bookmark },
            TablePoint { seq: 20, time_ns: 9_000, tier: 2, kind: PointKind::Pinned },
        ];
        let mut t = ThinTable::new(10, 20, 8192 + 65536, vec!["db".into(), "logs".into()], extents, points, 3);
        (t.run.first_time_ns, t.run.last_time_ns) = (900, 9_000);
        t
    }

    #[test]
    fn a_table_decodes_to_the_table_it_was_encoded_from() {
        let t = table();
        assert_eq!(ThinTable::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.encoded_len(), t.encode().len() as u64);
        assert_eq!(t.crcs.len(), t.run.extents().len());
        let at = |seq| t.run.extents().iter().position(|e| e.seq == seq).unwrap();
        assert_eq!((t.crcs[at(11)], t.crcs[at(14)], t.crcs[at(12)]), (0x1234_5678, 0xdead_beef, 0), "each crc stays with its extent");
        let empty = ThinTable::new(5, 9, 0, vec!["db".into()], Vec::new(), Vec::new(), 1);
        assert_eq!(ThinTable::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn the_nearest_points_are_found_on_both_sides() {
        let t = table();
        let seqs = |seq| {
            let (a, b) = t.nearest(seq);
            (a.map(|p| p.seq), b.map(|p| p.seq))
        };
        assert_eq!(seqs(12), (Some(11), Some(13)));
        assert_eq!(seqs(13), (Some(13), Some(20)));
        assert_eq!(seqs(10), (None, Some(11)));
        assert_eq!(seqs(20), (Some(20), None));
    }

    #[test]
    fn a_torn_flipped_or_inconsistent_table_is_refused() {
        let bytes = table().encode();
        for cut in [0, 10, HEADER_LEN, bytes.len() - 41, bytes.len() - 1] {
            assert!(ThinTable::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in [0, 9, 20, 50, HEADER_LEN + 2, bytes.len() - 30, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(ThinTable::decode(&b).is_err(), "flip at {at}");
        }
        // Checksummed again after the change: the checks behind the checksum still hold.
        let resum = |mut b: Vec<u8>| {
            let body = b.len() - 4;
            let crc = crc32c::crc32c(&b[..body]);
            b[body..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut huge = bytes.clone();
        huge[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ThinTable::decode(&resum(huge)), Err(TableError::Layout(IndexFileError::Size)));
        let mut short_data = bytes.clone();
        short_data[40..48].copy_from_slice(&4096u64.to_le_bytes());
        assert!(matches!(ThinTable::decode(&resum(short_data)), Err(TableError::Extent(_, "data outside the data file or not aligned"))));
        let points_at = HEADER_LEN + 1 + 2 + 1 + 4;
        let mut swapped = bytes.clone();
        swapped[points_at..points_at + 8].copy_from_slice(&13u64.to_le_bytes());
        assert_eq!(ThinTable::decode(&resum(swapped)), Err(TableError::Point(1, "not in ascending order")));
        let mut v2 = bytes;
        v2[8] = 2;
        assert_eq!(ThinTable::decode(&v2), Err(TableError::Version(2)));
    }
}
