//! Write records and their journal encoding (docs/journal-format.md).
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSJR"                      | version| kind   |name_len| flags  |
//!    8  | body_len (u32)                    | length (u32)                      |
//!   16  | seq (u64)                                                             |
//!   24  | time_ns (u64)                                                         |
//!   32  | offset (u64)                                                          |
//!   40  | volume name | data                                  | crc32c (u32)    |
//! ```
//!
//! `{ magic | version | kind | name_len | flags | body_len | length | seq | time_ns | offset | volume | data | crc32c }`

use thiserror::Error;

/// A group sequence number. The first write of a group is 1; 0 means "nothing yet".
pub type Seq = u64;

/// Magic bytes that open every record.
pub const RECORD_MAGIC: [u8; 4] = *b"HSJR";
/// Record format version written by this code.
pub const RECORD_VERSION: u8 = 1;
/// Size of the fixed record header.
pub const RECORD_HEADER_LEN: usize = 40;
/// Size of the trailing checksum.
pub const RECORD_CRC_LEN: usize = 4;
/// Largest write one record may carry.
pub const MAX_WRITE_LEN: u32 = 32 << 20;
/// Longest volume (and group, and VM) name.
pub const MAX_NAME_LEN: usize = 64;
/// Largest `body_len` a valid record can have.
pub const MAX_BODY_LEN: usize = MAX_NAME_LEN + MAX_WRITE_LEN as usize;

/// Name of a point record that ends an async interval.
pub const INTERVAL_POINT_NAME: &str = "interval";
/// Name of a point record that ends a resync.
pub const RESYNC_POINT_NAME: &str = "resync";

/// What a write does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// Write the carried bytes.
    Data,
    /// The range reads back as zeroes.
    Zeroes,
    /// The range is discarded; replicas make it zeroes.
    Trim,
    /// Not a write: a named point in the group's sequence (a bookmark), placed by the engine.
    /// Its name travels in the volume field and its [`BookmarkBody`] as data; it changes no
    /// volume.
    Bookmark,
    /// Not a write: the end of an async interval (name [`INTERVAL_POINT_NAME`]) or of a
    /// resync (name [`RESYNC_POINT_NAME`]), placed by the engine; its data is the first
    /// sequence number of what it ends. It changes no volume.
    Point,
    /// A write an async delta left out because a later write of the same interval covers it:
    /// its header without data. It changes no volume.
    Superseded,
    /// A dirty region an agent re-sends from its local disk after an outage or a crash:
    /// written like [`WriteKind::Data`], but not in the guest's write order, so no point
    /// between the first resync record and the next resync point is consistent.
    Resync,
}

impl WriteKind {
    /// Encoded value.
    pub fn code(self) -> u8 {
        match self {
            WriteKind::Data => 1,
            WriteKind::Zeroes => 2,
            WriteKind::Trim => 3,
            WriteKind::Bookmark => 4,
            WriteKind::Point => 5,
            WriteKind::Superseded => 6,
            WriteKind::Resync => 7,
        }
    }

    /// Decodes a kind value.
    pub fn from_code(code: u8) -> Option<WriteKind> {
        match code {
            1 => Some(WriteKind::Data),
            2 => Some(WriteKind::Zeroes),
            3 => Some(WriteKind::Trim),
            4 => Some(WriteKind::Bookmark),
            5 => Some(WriteKind::Point),
            6 => Some(WriteKind::Superseded),
            7 => Some(WriteKind::Resync),
            _ => None,
        }
    }

    /// True for the kinds that carry `length` bytes of data.
    pub fn carries_data(self) -> bool {
        matches!(self, WriteKind::Data | WriteKind::Bookmark | WriteKind::Point | WriteKind::Resync)
    }

    /// True for the kinds that change a volume (data, zeroes, trim, resync).
    pub fn changes_volume(self) -> bool {
        matches!(self, WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim | WriteKind::Resync)
    }

    /// True for the kinds an agent may send in a `Write` (the others are placed by the engine).
    pub fn from_agent(self) -> bool {
        matches!(self, WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim | WriteKind::Resync)
    }

    /// Short lower-case name, for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Data => "data",
            WriteKind::Zeroes => "zeroes",
            WriteKind::Trim => "trim",
            WriteKind::Bookmark => "bookmark",
            WriteKind::Point => "point",
            WriteKind::Superseded => "superseded",
            WriteKind::Resync => "resync",
        }
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// More bytes are needed: at least this many in total.
    #[error("incomplete: {needed} bytes needed")]
    Incomplete {
        /// Total bytes needed to go on.
        needed: usize,
    },
    /// The bytes are not a valid encoding.
    #[error("corrupt: {0}")]
    Corrupt(&'static str),
}

/// The fixed fields of a write record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The group sequence number.
    pub seq: Seq,
    /// Engine receive time, ns since the Unix epoch.
    pub time_ns: u64,
    /// What the write does.
    pub kind: WriteKind,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes covered.
    pub length: u32,
}

/// A decoded record borrowing its name and data from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Fixed fields.
    pub header: RecordHeader,
    /// Volume name.
    pub volume: &'a str,
    /// Data bytes (empty unless kind is `Data`).
    pub data: &'a [u8],
}

impl RecordRef<'_> {
    /// Encoded size of this record.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.volume.len() + self.data.len() + RECORD_CRC_LEN
    }
}

/// An owned write record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Fixed fields.
    pub header: RecordHeader,
    /// Volume name.
    pub volume: String,
    /// Data bytes (empty unless kind is `Data`).
    pub data: Vec<u8>,
}

impl Record {
    /// Borrows this record.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef { header: self.header, volume: &self.volume, data: &self.data }
    }
}

impl RecordRef<'_> {
    /// Copies into an owned record.
    pub fn to_owned(&self) -> Record {
        Record { header: self.header, volume: self.volume.to_owned(), data: self.data.to_vec() }
    }
}

/// How consistent a bookmarked point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PointConsistency {
    /// What a crash at that instant would leave (every point of a group is at least this).
    Crash,
    /// The applications were quiesced (file systems frozen) when the point was placed.
    Application,
}

impl PointConsistency {
    /// As shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            PointConsistency::Crash => "crash-consistent",
            PointConsistency::Application => "app-consistent",
        }
    }
}

/// The data of a bookmark record.
///
/// ```text
/// { version:u8 = 1 | consistency:u8 (1 crash, 2 application) | reserved:u16 = 0 | note (UTF-8) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookmarkBody {
    /// How consistent the point is.
    pub consistency: PointConsistency,
    /// Free text: why the point is only crash-consistent, who placed it, ...
    pub note: String,
}

/// Longest bookmark note.
pub const MAX_BOOKMARK_NOTE: usize = 1024;

impl BookmarkBody {
    /// Encodes the body (at least 4 bytes, so a bookmark record is never empty).
    pub fn encode(&self) -> Vec<u8> {
        let note = &self.note.as_bytes()[..self.note.len().min(MAX_BOOKMARK_NOTE)];
        let mut v = Vec::with_capacity(4 + note.len());
        v.push(1);
        v.push(match self.consistency {
            PointConsistency::Crash => 1,
            PointConsistency::Application => 2,
        });
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(note);
        v
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<BookmarkBody, DecodeError> {
        if b.len() < 4 {
            return Err(DecodeError::Corrupt("bookmark body too short"));
        }
        if b[0] != 1 {
            return Err(DecodeError::Corrupt("unknown bookmark body version"));
        }
        let consistency = match b[1] {
            1 => PointConsistency::Crash,
            2 => PointConsistency::Application,
            _ => return Err(DecodeError::Corrupt("unknown bookmark consistency")),
        };
        let note = String::from_utf8_lossy(&b[4..]).into_owned();
        Ok(BookmarkBody { consistency, note })
    }
}

/// Checks the invariants an encoder must hold; returns a static reason on failure.
fn check_fields(h: &RecordHeader, volume: &str, data_len: usize) -> Result<(), &'static str> {
    if volume.is_empty() || volume.len() > MAX_NAME_LEN {
        return Err("volume name length out of range");
    }
    if h.length == 0 || h.length > MAX_WRITE_LEN {
        return Err("length out of range");
    }
    if h.offset.checked_add(u64::from(h.length)).is_none() {
        return Err("offset + length overflows");
    }
    let want = if h.kind.carries_data() { h.length as usize } else { 0 };
    if data_len != want {
        return Err("data length does not match kind and length");
    }
    Ok(())
}

/// Appends the encoding of a record to `out`.
///
/// # Panics
/// If the fields break the format's invariants (a programming error: callers validate
/// requests before building records).
pub fn encode_record(h: &RecordHeader, volume: &str, data: &[u8], out: &mut Vec<u8>) {
    if let Err(why) = check_fields(h, volume, data.len()) {
        panic!("encode_record: {why}");
    }
    let start = out.len();
    let name_len = volume.len();
    let body_len = name_len + data.len();
    out.reserve(RECORD_HEADER_LEN + body_len + RECORD_CRC_LEN);
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(RECORD_VERSION);
    out.push(h.kind.code());
    out.push(u8::try_from(name_len).expect("checked above"));
    out.push(0);
    out.extend_from_slice(&u32::try_from(body_len).expect("checked above").to_le_bytes());
    out.extend_from_slice(&h.length.to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.time_ns.to_le_bytes());
    out.extend_from_slice(&h.offset.to_le_bytes());
    out.extend_from_slice(volume.as_bytes());
    out.extend_from_slice(data);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Reads a little-endian u32 at `at`; the caller guarantees the bounds.
pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `at`; the caller guarantees the bounds.
pub(crate) fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Validates a fixed header and returns the total encoded length of the record it opens.
/// Needs at least [`RECORD_HEADER_LEN`] bytes.
pub fn record_len_from_header(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(DecodeError::Incomplete { needed: RECORD_HEADER_LEN });
    }
    if buf[0..4] != RECORD_MAGIC {
        return Err(DecodeError::Corrupt("bad record magic"));
    }
    if buf[4] != RECORD_VERSION {
        return Err(DecodeError::Corrupt("unknown record version"));
    }
    let kind = WriteKind::from_code(buf[5]).ok_or(DecodeError::Corrupt("unknown record kind"))?;
    let name_len = usize::from(buf[6]);
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(DecodeError::Corrupt("volume name length out of range"));
    }
    if buf[7] != 0 {
        return Err(DecodeError::Corrupt("unknown record flags"));
    }
    let body_len = read_u32(buf, 8) as usize;
    let length = read_u32(buf, 12);
    if length == 0 || length > MAX_WRITE_LEN {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    let want_body = name_len + if kind.carries_data() { length as usize } else { 0 };
    if body_len != want_body {
        return Err(DecodeError::Corrupt("record body length does not match kind and length"));
    }
    let offset = read_u64(buf, 32);
    if offset.checked_add(u64::from(length)).is_none() {
        return Err(DecodeError::Corrupt("record offset + length overflows"));
    }
    Ok(RECORD_HEADER_LEN + body_len + RECORD_CRC_LEN)
}

/// Decodes the record at the start of `buf`; returns it and the bytes it used.
pub fn decode_record(buf: &[u8]) -> Result<(RecordRef<'_>, usize), DecodeError> {
    let total = record_len_from_header(buf)?;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let crc_at = total - RECORD_CRC_LEN;
    if crc32c::crc32c(&buf[..crc_at]) != read_u32(buf, crc_at) {
        return Err(DecodeError::Corrupt("record checksum mismatch"));
    }
    decode_fields(buf, total)
}

/// Like [`decode_record`] without the checksum, for bytes already verified or encoded by this
/// process (a reader decoding again what it validated, the journal's tail in memory). The
/// layout is still checked.
pub fn decode_record_trusted(buf: &[u8]) -> Result<(RecordRef<'_>, usize), DecodeError> {
    let total = record_len_from_header(buf)?;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    decode_fields(buf, total)
}

fn decode_fields(buf: &[u8], total: usize) -> Result<(RecordRef<'_>, usize), DecodeError> {
    let crc_at = total - RECORD_CRC_LEN;
    let name_len = usize::from(buf[6]);
    let volume = std::str::from_utf8(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + name_len])
        .map_err(|_| DecodeError::Corrupt("volume name is not UTF-8"))?;
    let kind = WriteKind::from_code(buf[5]).ok_or(DecodeError::Corrupt("unknown record kind"))?;
    let header =
        RecordHeader { seq: read_u64(buf, 16), time_ns: read_u64(buf, 24), kind, offset: read_u64(buf, 32), length: read_u32(buf, 12) };
    if header.seq == 0 {
        return Err(DecodeError::Corrupt("record sequence number 0"));
    }
    let data = &buf[RECORD_HEADER_LEN + name_len..crc_at];
    Ok((RecordRef { header, volume, data }, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: WriteKind) -> Record {
        let length = 4096;
        let data = if kind.carries_data() { (0..length).map(|i| (i * 7) as u8).collect() } else { vec![] };
        Record {
            header: RecordHeader { seq: 42, time_ns: 1_700_000_000_123_456_789, kind, offset: 8192, length: length as u32 },
            volume: "db-data".into(),
            data,
        }
    }

    fn encode(r: &Record) -> Vec<u8> {
        let mut v = Vec::new();
        encode_record(&r.header, &r.volume, &r.data, &mut v);
        v
    }

    #[test]
    fn round_trip_every_kind() {
        for kind in [WriteKind::Data, WriteKind::Zeroes, WriteKind::Trim, WriteKind::Superseded, WriteKind::Resync] {
            let r = sample(kind);
            let buf = encode(&r);
            let (got, used) = decode_record(&buf).unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(got.to_owned(), r);
            assert_eq!(got.encoded_len(), buf.len());
        }
    }

    #[test]
    fn bookmark_records_round_trip_with_their_body() {
        let body = BookmarkBody { consistency: PointConsistency::Application, note: "before upgrade".into() }.encode();
        let h = RecordHeader { seq: 9, time_ns: 5, kind: WriteKind::Bookmark, offset: 0, length: body.len() as u32 };
        let mut buf = Vec::new();
        encode_record(&h, "pre-upgrade", &body, &mut buf);
        let (got, _) = decode_record(&buf).unwrap();
        assert_eq!(got.header.kind, WriteKind::Bookmark);
        assert_eq!(got.volume, "pre-upgrade");
        let b = BookmarkBody::decode(got.data).unwrap();
        assert_eq!((b.consistency, b.note.as_str()), (PointConsistency::Application, "before upgrade"));
        assert!(matches!(BookmarkBody::decode(&[2, 1, 0, 0]), Err(DecodeError::Corrupt(_))));
        assert!(matches!(BookmarkBody::decode(&[1, 9, 0, 0]), Err(DecodeError::Corrupt(_))));
        assert!(matches!(BookmarkBody::decode(&[1, 1]), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn resync_records_carry_data_and_change_the_volume() {
        let r = sample(WriteKind::Resync);
        let buf = encode(&r);
        assert_eq!((buf[5], WriteKind::from_code(7)), (7, Some(WriteKind::Resync)));
        let (got, _) = decode_record(&buf).unwrap();
        assert_eq!(got.to_owned(), r);
        assert_eq!(got.data.len(), 4096);
        assert!(WriteKind::Resync.changes_volume() && WriteKind::Resync.from_agent());
        assert_eq!(WriteKind::Resync.as_str(), "resync");
        // A kind 7 header that claims no data is corrupt, like a data record's.
        let mut short = buf.clone();
        short[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(decode_record(&short), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn resync_points_round_trip_with_their_first_seq() {
        let h = RecordHeader { seq: 18, time_ns: 5, kind: WriteKind::Point, offset: 0, length: 8 };
        let mut buf = Vec::new();
        encode_record(&h, RESYNC_POINT_NAME, &11u64.to_le_bytes(), &mut buf);
        let (got, used) = decode_record(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!((got.header, got.volume, read_u64(got.data, 0)), (h, "resync", 11));
        assert!(!WriteKind::Point.changes_volume() && !WriteKind::Point.from_agent());
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for kind in [WriteKind::Data, WriteKind::Trim, WriteKind::Resync] {
            let buf = encode(&sample(kind));
            for cut in 0..buf.len() {
                match decode_record(&buf[..cut]) {
                    Err(DecodeError::Incomplete { needed }) => assert!(needed > cut),
                    other => panic!("cut {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let buf = encode(&sample(WriteKind::Zeroes));
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                let res = decode_record(&b);
                assert!(res.is_err(), "flip at byte {byte} bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn oversized_lengths_are_rejected_before_allocation() {
        let mut buf = encode(&sample(WriteKind::Data));
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_record(&buf), Err(DecodeError::Corrupt(_))));
        let mut buf = encode(&sample(WriteKind::Data));
        buf[12..16].copy_from_slice(&(MAX_WRITE_LEN + 1).to_le_bytes());
        assert!(matches!(decode_record(&buf), Err(DecodeError::Corrupt(_))));
        let mut buf = encode(&sample(WriteKind::Data));
        buf[6] = 200;
        assert!(matches!(decode_record(&buf), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn offset_overflow_is_corrupt() {
        let mut buf = encode(&sample(WriteKind::Trim));
        buf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_record(&buf), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let good = encode(&sample(WriteKind::Data));
        for _ in 0..20_000 {
            let mut b = good.clone();
            let n = rng.gen_range(1..8);
            for _ in 0..n {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let cut = rng.gen_range(0..=b.len());
            let _ = decode_record(&b[..cut]);
        }
    }
}
