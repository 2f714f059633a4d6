//! The index file of a sealed journal segment (docs/point-index.md, "One index file per sealed
//! segment"):
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSINDEX1"                                                  |
//!    8  | version (u32) = 1                 | volume_count (u16)| reserved  |
//!   16  | first_seq (u64)                                                   |
//!   24  | last_seq (u64)                                                    |
//!   32  | segment_len (u64)                                                 |
//!   40  | first_time_ns (u64)                                               |
//!   48  | last_time_ns (u64)                                                |
//!   56  | extent_count (u64)                                                |
//!   64  | max_length (u32)                  | reserved (u32) = 0            |
//!   72  | volume table: volume_count × { name_len (u8) | name (UTF-8) }      |
//!       | extents: extent_count × { offset | seq | data_pos | length | volume | kind | 0 } |
//!       | crc32c (u32) of every byte before it                               |
//! ```
//!
//! Grammar: `{ magic | version | volume_count | reserved | first_seq | last_seq | segment_len |
//! first_time_ns | last_time_ns | extent_count | max_length | reserved | volumes | extents | crc32c }`. A decoder checks the
//! size against the counts and the checksum before it uses anything, and never allocates from
//! an unchecked count.

use hindsight_consistency::WriteKind;
use thiserror::Error;

use super::{Extent, Run, EXTENT_LEN};

/// The file's first eight bytes.
pub const MAGIC: &[u8; 8] = b"HSINDEX1";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the volume table.
const HEADER_LEN: usize = 72;

/// Why bytes are not a valid index file.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexFileError {
    #[error("too short for an index file ({0} bytes)")]
    Short(usize),
    #[error("not an index file (bad magic)")]
    Magic,
    #[error("index file version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("the checksum does not match")]
    Checksum,
    #[error("the size does not match the counts in the header")]
    Size,
    #[error("a volume name is not valid UTF-8")]
    VolumeName,
    #[error("extent {0} is not valid: {1}")]
    Extent(u64, &'static str),
}

/// Encodes a run as its index file.
pub fn encode(run: &Run) -> Vec<u8> {
    let extents = run.extents();
    let mut out = Vec::with_capacity(HEADER_LEN + 65 * run.volumes.len() + EXTENT_LEN * extents.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let count = u16::try_from(run.volumes.len()).expect("a group has fewer than 65536 volumes");
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&run.first_seq.to_le_bytes());
    out.extend_from_slice(&run.last_seq.to_le_bytes());
    out.extend_from_slice(&run.segment_len.to_le_bytes());
    out.extend_from_slice(&run.first_time_ns.to_le_bytes());
    out.extend_from_slice(&run.last_time_ns.to_le_bytes());
    out.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    out.extend_from_slice(&run.max_length().to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_volumes(&mut out, &run.volumes);
    for e in extents {
        put_extent(&mut out, e);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Appends a volume table: `{ name_len (u8) | name }` per volume.
pub(crate) fn put_volumes(out: &mut Vec<u8>, volumes: &[String]) {
    for v in volumes {
        out.push(u8::try_from(v.len()).expect("volume names are at most 64 bytes"));
        out.extend_from_slice(v.as_bytes());
    }
}

/// Reads a volume table of `count` names at `*at` in `b` (the checksummed body), moving
/// `*at` past it.
pub(crate) fn get_volumes(b: &[u8], at: &mut usize, count: usize) -> Result<Vec<String>, IndexFileError> {
    let mut volumes = Vec::with_capacity(count.min(b.len() / 2));
    for _ in 0..count {
        let len = usize::from(*b.get(*at).ok_or(IndexFileError::Size)?);
        let name = b.get(*at + 1..*at + 1 + len).ok_or(IndexFileError::Size)?;
        volumes.push(std::str::from_utf8(name).map_err(|_| IndexFileError::VolumeName)?.to_owned());
        *at += 1 + len;
    }
    Ok(volumes)
}

/// Appends an extent's 32 bytes.
pub(crate) fn put_extent(out: &mut Vec<u8>, e: &Extent) {
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&e.data_pos.to_le_bytes());
    out.extend_from_slice(&e.length.to_le_bytes());
    out.extend_from_slice(&e.volume.to_le_bytes());
    out.push(e.kind.code());
    out.push(0);
}

/// Decodes and checks an extent's 32 bytes: a kind that changes a volume, a volume of the
/// table, a sequence number in `seqs`, a length of 1 to `max_length` that does not overflow.
pub(crate) fn get_extent(e: &[u8], volumes: usize, seqs: std::ops::RangeInclusive<u64>, max_length: u32) -> Result<Extent, &'static str> {
    let kind = WriteKind::from_code(e[30]).filter(|k| k.changes_volume()).ok_or("kind")?;
    let ext =
        Extent { offset: u64_at(e, 0), seq: u64_at(e, 8), data_pos: u64_at(e, 16), length: u32_at(e, 24), volume: u16_at(e, 28), kind };
    if usize::from(ext.volume) >= volumes {
        return Err("volume number");
    }
    if !seqs.contains(&ext.seq) {
        return Err("sequence number outside the segment");
    }
    if ext.length == 0 || ext.length > max_length || ext.offset.checked_add(u64::from(ext.length)).is_none() {
        return Err("length");
    }
    if e[31] != 0 {
        return Err("reserved byte");
    }
    Ok(ext)
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes an index file, checking everything the reading rule asks (but not whether it
/// belongs to a given segment: the caller compares `first_seq`, `last_seq` and `segment_len`).
pub fn decode(b: &[u8]) -> Result<Run, IndexFileError> {
    if b.len() < HEADER_LEN + 4 {
        return Err(IndexFileError::Short(b.len()));
    }
    if &b[..8] != MAGIC {
        return Err(IndexFileError::Magic);
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(IndexFileError::Version(version));
    }
    let body = b.len() - 4;
    if crc32c::crc32c(&b[..body]) != u32_at(b, body) {
        return Err(IndexFileError::Checksum);
    }
    let volume_count = usize::from(u16_at(b, 12));
    let (first_seq, last_seq, segment_len) = (u64_at(b, 16), u64_at(b, 24), u64_at(b, 32));
    let (first_time_ns, last_time_ns) = (u64_at(b, 40), u64_at(b, 48));
    let extent_count = u64_at(b, 56);
    let max_length = u32_at(b, 64);
    let mut at = HEADER_LEN;
    let volumes = get_volumes(&b[..body], &mut at, volume_count)?;
    let want = usize::try_from(extent_count).ok().and_then(|n| n.checked_mul(EXTENT_LEN)).and_then(|n| n.checked_add(at));
    if want != Some(body) {
        return Err(IndexFileError::Size);
    }
    let mut extents = Vec::with_capacity((body - at) / EXTENT_LEN);
    for (i, e) in b[at..body].chunks_exact(EXTENT_LEN).enumerate() {
        let ext = get_extent(e, volumes.len(), first_seq..=last_seq, max_length).map_err(|why| IndexFileError::Extent(i as u64, why))?;
        extents.push(ext);
    }
    let mut run = Run::new(first_seq, last_seq, segment_len, volumes, extents);
    run.first_time_ns = first_time_ns;
    run.last_time_ns = last_time_ns;
    if run.max_length() != max_length && !run.extents().is_empty() {
        return Err(IndexFileError::Extent(0, "max_length"));
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point_index::tests::data;

    fn run() -> Run {
        let mut zero = data(1, 8192, 4096, 12);
        zero.kind = WriteKind::Trim;
        zero.data_pos = 0;
        Run::new(
            10,
            14,
            1 << 20,
            vec!["db".into(), "logs".into()],
            vec![data(0, 0, 4096, 10), data(0, 0, 65536, 11), zero, data(1, 0, 512, 14)],
        )
    }

    #[test]
    fn an_index_file_decodes_to_the_run_it_was_encoded_from() {
        let r = run();
        assert_eq!(decode(&encode(&r)).unwrap(), r);
        let empty = Run::new(5, 5, 4096, vec!["db".into()], Vec::new());
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn a_torn_or_flipped_index_file_is_refused() {
        let bytes = encode(&run());
        for cut in [0, 10, HEADER_LEN, bytes.len() - 33, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in [0, 9, 20, 60, bytes.len() - 10, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {at}");
        }
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(decode(&v2), Err(IndexFileError::Version(2))));
    }

    #[test]
    fn a_checksummed_file_with_a_bad_count_is_refused_before_allocating() {
        let mut b = encode(&run());
        b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let body = b.len() - 4;
        let crc = crc32c::crc32c(&b[..body]);
        b[body..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&b), Err(IndexFileError::Size));
    }

    /// The file of version 1, as written by the first release of the format: it must always
    /// decode to the same run, and its torn or flipped variants never.
    const FIXTURE_V1: &[u8] = include_bytes!("../../tests/fixtures/index-v1.hsx");

    #[test]
    fn the_version_1_fixture_decodes_and_its_corrupt_variants_do_not() {
        assert_eq!(decode(FIXTURE_V1), Ok(run()));
        assert_eq!(encode(&run()), FIXTURE_V1);
        assert!(matches!(decode(&FIXTURE_V1[..FIXTURE_V1.len() - 1]), Err(IndexFileError::Checksum)));
        let mut flipped = FIXTURE_V1.to_vec();
        flipped[HEADER_LEN + 3] ^= 1;
        assert!(matches!(decode(&flipped), Err(IndexFileError::Checksum)));
    }
}
