//! Segment files: their names (`<first_seq:020>.hsj`, and `.hsj.spare` for a trimmed file
//! kept for reuse), their 32-byte header, listing, creating and opening them
//! (docs/journal-format.md).

use std::io;
use std::path::{Path, PathBuf};

use super::error::{io_err, JournalError};
use crate::record::{read_u32, read_u64, Seq};
use crate::storage::{OpenMode, Storage, StorageFile, DIRECT_IO_ALIGN};

/// Magic bytes opening every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HSJOURNL";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Segment header size.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".hsj";

/// Direct-I/O commits start on multiples of this; a record position inside a block that holds
/// zero bytes is padding up to the block's end.
pub const BLOCK: u64 = DIRECT_IO_ALIGN as u64;

pub(super) fn align_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Suffix of a spare: a trimmed segment's file kept for reuse.
pub const SPARE_SUFFIX: &str = ".hsj.spare";
/// Most spares a journal keeps.
pub(super) const MAX_SPARES: usize = 2;

/// File name of the spare that held records up to `last_seq`.
pub(super) fn spare_name(last_seq: Seq) -> String {
    format!("{last_seq:020}{SPARE_SUFFIX}")
}

pub(super) fn parse_spare_name(name: &str) -> Option<Seq> {
    parse_seq_name(name, SPARE_SUFFIX)
}

/// File name of the segment starting at `first_seq`.
pub fn segment_name(first_seq: Seq) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<Seq> {
    parse_seq_name(name, SEGMENT_SUFFIX)
}

/// The sequence number of a name of 20 digits and `suffix`.
fn parse_seq_name(name: &str, suffix: &str) -> Option<Seq> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn encode_segment_header(first_seq: Seq) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(super) fn decode_segment_header(h: &[u8]) -> Result<Seq, &'static str> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err("segment header truncated");
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if read_u32(h, 8) != SEGMENT_VERSION {
        return Err("unsupported segment version");
    }
    if crc32c::crc32c(&h[0..28]) != read_u32(h, 28) {
        return Err("segment header checksum mismatch");
    }
    Ok(read_u64(h, 16))
}

/// Lists the segments of a journal directory, oldest first, as `(first_seq, path)`.
pub fn list_segments(fs: &dyn Storage, dir: &Path) -> Result<Vec<(Seq, PathBuf)>, JournalError> {
    let mut segs: Vec<(Seq, PathBuf)> = fs
        .list(dir)
        .map_err(io_err(dir, "list directory"))?
        .into_iter()
        .filter_map(|n| parse_segment_name(&n).map(|s| (s, dir.join(n))))
        .collect();
    segs.sort_by_key(|s| s.0);
    Ok(segs)
}

/// A segment kept by the writer.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Sequence number of its first record.
    pub first_seq: Seq,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes once sealed (the active segment's size is kept by the journal).
    pub bytes: u64,
}

pub(super) fn create_segment(fs: &dyn Storage, dir: &Path, first_seq: Seq) -> Result<SegmentInfo, JournalError> {
    let path = dir.join(segment_name(first_seq));
    let f = fs.open(&path, OpenMode::Truncate).map_err(io_err(&path, "create segment"))?;
    f.write_all_at(&encode_segment_header(first_seq), 0).map_err(io_err(&path, "write segment header"))?;
    f.sync_data().map_err(io_err(&path, "sync segment header"))?;
    fs.sync_dir(dir).map_err(io_err(dir, "sync directory"))?;
    Ok(SegmentInfo { first_seq, path, bytes: 0 })
}

pub(super) fn read_fully(f: &dyn StorageFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
