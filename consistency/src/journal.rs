//! The segmented, checksummed journal shared by the engine and the target
//! (docs/journal-format.md).
//!
//! ```text
//! segment header (32 bytes):
//!    0  | magic "HSJOURNL"                                                  |
//!    8  | version (u32) = 1                 | reserved (u32) = 0            |
//!   16  | first_seq (u64)                                                   |
//!   24  | reserved (u32) = 0                | header_crc (u32)              |
//! then records, each { magic | version | kind | name_len | flags | body_len | length | seq
//!                      | time_ns | offset | volume | data | crc32c } (see `record`).
//! ```
//!
//! [`Journal`] appends with group commit (one write and one fdatasync per batch) and recovers
//! a torn tail on open. [`JournalReader`] reads records from any retained sequence number on,
//! following the writer as it grows, from the same process or another.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

mod tail;
pub use tail::Tail;
use tail::TailChunk;

use crate::record::{
    decode_record, decode_record_trusted, encode_record, read_u32, read_u64, record_len_from_header, DecodeError, RecordHeader, RecordRef,
    Seq, RECORD_HEADER_LEN,
};
use crate::storage::{AlignedBuf, OpenMode, Storage, StorageFile, DIRECT_IO_ALIGN};

/// Magic bytes opening every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HSJOURNL";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Segment header size.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".hsj";
/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Journal errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JournalError {
    /// I/O on a journal file failed.
    #[error("journal {path}: {op}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A journal file is damaged somewhere other than the tail.
    #[error("journal {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A sequence number that is no longer (or not yet) in the journal was asked for.
    #[error("sequence number {requested} is not in the journal (it holds {first}..={last})")]
    NotRetained {
        /// The requested number.
        requested: Seq,
        /// First retained.
        first: Seq,
        /// Last written.
        last: Seq,
    },
    /// A record was appended out of order.
    #[error("append of seq {got} but the journal expects {expected}")]
    OutOfOrder {
        /// What was appended.
        got: Seq,
        /// What was expected.
        expected: Seq,
    },
    /// An earlier write or flush failed; the journal accepts nothing more.
    #[error("journal {path} is stopped after an earlier I/O failure; fix the cause and restart")]
    Poisoned {
        /// The journal directory.
        path: PathBuf,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { path: path.to_owned(), op, source }
}

/// Journal tuning.
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    /// A new segment is started once the active one reaches this size.
    pub segment_size: u64,
    /// Write with direct I/O where the file system allows it (docs/journal-format.md,
    /// "Direct I/O and padding").
    pub direct: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions { segment_size: DEFAULT_SEGMENT_SIZE, direct: true }
    }
}

/// Direct-I/O commits start on multiples of this; a record position inside a block that holds
/// zero bytes is padding up to the block's end.
pub const BLOCK: u64 = DIRECT_IO_ALIGN as u64;

fn align_up(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Suffix of a spare: a trimmed segment's file kept for reuse.
pub const SPARE_SUFFIX: &str = ".hsj.spare";
/// Most spares a journal keeps.
const MAX_SPARES: usize = 2;

/// File name of the spare that held records up to `last_seq`.
fn spare_name(last_seq: Seq) -> String {
    format!("{last_seq:020}{SPARE_SUFFIX}")
}

fn parse_spare_name(name: &str) -> Option<Seq> {
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

fn encode_segment_header(first_seq: Seq) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn decode_segment_header(h: &[u8]) -> Result<Seq, &'static str> {
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

/// The appending side of a journal.
pub struct Journal {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    opts: JournalOptions,
    segments: VecDeque<SegmentInfo>,
    active: Box<dyn StorageFile>,
    /// Where the next commit goes in the active segment.
    active_len: u64,
    /// The active segment is open for direct I/O: commits are padded to whole blocks.
    direct: bool,
    /// The padded copy of a direct-I/O commit.
    staging: AlignedBuf,
    /// Next sequence number to append.
    next_seq: Seq,
    /// Sequence number up to which everything is durable.
    durable_seq: Seq,
    /// Time of the last appended record.
    last_time_ns: u64,
    pending: Vec<u8>,
    poisoned: bool,
    /// Where each commit's records go for a reader following the writer, if one does.
    tail: Option<Arc<Tail>>,
    /// Trimmed segment files kept for reuse, as `(last_seq they held, path)`, newest first.
    spares: Vec<(Seq, PathBuf)>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).field("next_seq", &self.next_seq).finish()
    }
}

impl Journal {
    /// Opens (or creates, starting at sequence 1) the journal in `dir`, recovering a torn
    /// tail of the active segment.
    pub fn open(fs: Arc<dyn Storage>, dir: &Path, opts: JournalOptions) -> Result<Journal, JournalError> {
        fs.create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let mut segs = list_segments(fs.as_ref(), dir)?;
        let spares = Self::find_spares(fs.as_ref(), dir, segs.is_empty())?;
        // A crash while a segment was created can leave it short or with a bad header; it
        // holds nothing acknowledged, so it goes.
        while let Some((first, path)) = segs.last().cloned() {
            let f = fs.open(&path, OpenMode::Read).map_err(io_err(&path, "open segment"))?;
            let mut h = [0u8; SEGMENT_HEADER_LEN];
            let n = read_fully(f.as_ref(), &mut h, 0).map_err(io_err(&path, "read segment header"))?;
            match decode_segment_header(&h[..n]) {
                Ok(s) if s == first => break,
                Ok(_) => return Err(JournalError::Corrupt { path, offset: 16, reason: "first_seq does not match the file name".into() }),
                Err(why) => {
                    let len = f.len().map_err(io_err(&path, "stat segment"))?;
                    if len > SEGMENT_HEADER_LEN as u64 {
                        return Err(JournalError::Corrupt { path, offset: 0, reason: why.into() });
                    }
                    log::warn!("journal {}: removing half-created segment {} ({why})", dir.display(), path.display());
                    fs.remove_file(&path).map_err(io_err(&path, "remove half-created segment"))?;
                    segs.pop();
                }
            }
        }
        let mut segments = VecDeque::with_capacity(segs.len());
        for (i, (first_seq, path)) in segs.iter().cloned().enumerate() {
            // Sealed segments are sized once here; the active one is scanned below.
            let bytes = if i + 1 < segs.len() {
                fs.open(&path, OpenMode::Read).and_then(|f| f.len()).map_err(io_err(&path, "stat segment"))?
            } else {
                0
            };
            segments.push_back(SegmentInfo { first_seq, path, bytes });
        }
        for w in segments.make_contiguous().windows(2) {
            if w[0].first_seq >= w[1].first_seq {
                return Err(JournalError::Corrupt { path: w[1].path.clone(), offset: 0, reason: "segments out of order".into() });
            }
        }
        let (active, active_len, next_seq, last_time_ns) = match segments.back() {
            None => {
                let info = create_segment(fs.as_ref(), dir, 1)?;
                let f = fs.open(&info.path, OpenMode::ReadWrite).map_err(io_err(&info.path, "open segment"))?;
                segments.push_back(info);
                (f, SEGMENT_HEADER_LEN as u64, 1, 0)
            }
            Some(last) => {
                let f = fs.open(&last.path, OpenMode::ReadWrite).map_err(io_err(&last.path, "open segment"))?;
                let scan = scan_segment(f.as_ref(), last.first_seq, &last.path)?;
                let len = f.len().map_err(io_err(&last.path, "stat segment"))?;
                // Records written before a crash or a failed flush may still sit in the page
                // cache only: make them durable before they are counted as such.
                f.sync_data().map_err(io_err(&last.path, "fdatasync on open"))?;
                if scan.end < len {
                    // Nothing after the last good record was acknowledged: a commit torn by a
                    // crash, or bytes of a reused file's earlier life.
                    log::info!(
                        "journal {}: cutting the active segment after seq {}: {} bytes follow that are no record of it ({})",
                        dir.display(),
                        scan.next_seq - 1,
                        len - scan.end,
                        scan.stop_reason.unwrap_or("trailing bytes")
                    );
                    f.set_len(scan.end).map_err(io_err(&last.path, "truncate torn tail"))?;
                    f.sync_data().map_err(io_err(&last.path, "sync after truncation"))?;
                }
                (f, scan.end, scan.next_seq, scan.last_time_ns)
            }
        };
        let active_path = segments.back().expect("there is always an active segment").path.clone();
        let (active, active_len, direct) = match open_direct(fs.as_ref(), &active_path, opts)? {
            // Never into a block that holds records: the next commit starts at the next one.
            Some(d) => (d, align_up(active_len), true),
            None => (active, active_len, false),
        };
        Ok(Journal {
            fs,
            dir: dir.to_owned(),
            opts,
            segments,
            active,
            active_len,
            direct,
            staging: AlignedBuf::default(),
            next_seq,
            durable_seq: next_seq - 1,
            last_time_ns,
            pending: Vec::with_capacity(1 << 20),
            poisoned: false,
            tail: None,
            spares,
        })
    }

    /// The spares of `dir`, newest first; all are deleted when the journal has no segment
    /// (it starts a new numbering), and any beyond [`MAX_SPARES`].
    fn find_spares(fs: &dyn Storage, dir: &Path, fresh: bool) -> Result<Vec<(Seq, PathBuf)>, JournalError> {
        let mut spares: Vec<(Seq, PathBuf)> = fs
            .list(dir)
            .map_err(io_err(dir, "list directory"))?
            .into_iter()
            .filter_map(|n| parse_spare_name(&n).map(|s| (s, dir.join(n))))
            .collect();
        spares.sort_by_key(|s| std::cmp::Reverse(s.0));
        let keep = if fresh { 0 } else { MAX_SPARES };
        for (_, path) in spares.drain(keep.min(spares.len())..) {
            fs.remove_file(&path).map_err(io_err(&path, "remove spare segment file"))?;
        }
        Ok(spares)
    }

    /// Trimmed segment files kept for reuse.
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }

    /// Keeps up to `limit` bytes of the newest commits in memory from now on, for one
    /// [`JournalReader`] given the returned tail ([`JournalReader::with_tail`]).
    pub fn keep_tail(&mut self, limit: usize) -> Arc<Tail> {
        let tail = Arc::new(Tail::new(limit));
        self.tail = Some(Arc::clone(&tail));
        tail
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next appended record must carry.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Everything up to this sequence number is durable (0: nothing yet).
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }

    /// First sequence number still held (the first segment's first record).
    pub fn first_seq(&self) -> Seq {
        self.segments.front().map_or(self.next_seq, |s| s.first_seq)
    }

    /// Time of the last record appended (0 if none since the journal was created).
    pub fn last_time_ns(&self) -> u64 {
        self.last_time_ns
    }

    /// The segments, oldest first; the last is the active one.
    pub fn segments(&self) -> impl Iterator<Item = &SegmentInfo> {
        self.segments.iter()
    }

    /// Bytes held in all segments, committed records only.
    pub fn size_bytes(&self) -> u64 {
        let sealed: u64 = self.segments.iter().take(self.segments.len().saturating_sub(1)).map(|s| s.bytes).sum();
        sealed + self.active_len
    }

    /// Buffers a record; its `seq` must be [`Journal::next_seq`]. Durable after
    /// [`Journal::commit`].
    pub fn append(&mut self, h: &RecordHeader, volume: &str, data: &[u8]) -> Result<(), JournalError> {
        self.check_append(h.seq)?;
        encode_record(h, volume, data, &mut self.pending);
        self.appended(h);
        Ok(())
    }

    /// Buffers an already encoded record (as received from the engine) verbatim.
    pub fn append_encoded(&mut self, rec: &RecordRef<'_>, raw: &[u8]) -> Result<(), JournalError> {
        self.check_append(rec.header.seq)?;
        debug_assert_eq!(raw.len(), rec.encoded_len());
        self.pending.extend_from_slice(raw);
        self.appended(&rec.header);
        Ok(())
    }

    fn check_append(&self, seq: Seq) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned { path: self.dir.clone() });
        }
        if seq != self.next_seq {
            return Err(JournalError::OutOfOrder { got: seq, expected: self.next_seq });
        }
        Ok(())
    }

    fn appended(&mut self, h: &RecordHeader) {
        self.next_seq += 1;
        self.last_time_ns = self.last_time_ns.max(h.time_ns);
    }

    /// Bytes buffered and not yet committed.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Writes every buffered record with one write and one fdatasync. On failure the journal
    /// is poisoned: the records are not acknowledged and nothing more is accepted.
    pub fn commit(&mut self) -> Result<Seq, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned { path: self.dir.clone() });
        }
        if self.pending.is_empty() {
            return Ok(self.durable_seq);
        }
        let res = self.commit_inner();
        if res.is_err() {
            self.poisoned = true;
        }
        res
    }

    fn commit_inner(&mut self) -> Result<Seq, JournalError> {
        if self.active_len >= self.opts.segment_size {
            let first = self.durable_seq + 1;
            if let Some(sealed) = self.segments.back_mut() {
                // A reused file may hold bytes of its earlier life past the last commit.
                self.active.set_len(self.active_len).map_err(io_err(&sealed.path, "cut sealed segment"))?;
                sealed.bytes = self.active_len;
            }
            let info = self.new_segment(first)?;
            self.active = self.fs.open(&info.path, OpenMode::ReadWrite).map_err(io_err(&info.path, "open segment"))?;
            self.active_len = SEGMENT_HEADER_LEN as u64;
            self.direct = false;
            if let Some(d) = open_direct(self.fs.as_ref(), &info.path, self.opts)? {
                self.active = d;
                self.active_len = BLOCK;
                self.direct = true;
            }
            self.segments.push_back(info);
        }
        let active = self.segments.back().expect("there is always an active segment");
        let bytes = if self.direct { self.staging.padded(&self.pending) } else { &self.pending[..] };
        self.active.write_all_at(bytes, self.active_len).map_err(io_err(&active.path, "append"))?;
        self.active.sync_data().map_err(io_err(&active.path, "fdatasync"))?;
        let start = self.active_len;
        self.active_len += bytes.len() as u64;
        let first_seq = self.durable_seq + 1;
        self.durable_seq = self.next_seq - 1;
        match &self.tail {
            Some(tail) => {
                let records = std::mem::replace(&mut self.pending, tail.buffer());
                let end = start + records.len() as u64;
                tail.push(TailChunk { first_seq, next_seq: self.next_seq, segment: active.first_seq, end, bytes: records });
            }
            None => self.pending.clear(),
        }
        Ok(self.durable_seq)
    }

    /// A new segment starting at `first`: a spare reused when one fits (its commits then
    /// overwrite written blocks, and `fdatasync` writes no metadata), else a new file.
    fn new_segment(&mut self, first: Seq) -> Result<SegmentInfo, JournalError> {
        while let Some((last, spare)) = self.spares.pop() {
            if last >= first {
                // From another numbering: its records could carry sequence numbers to come.
                self.fs.remove_file(&spare).map_err(io_err(&spare, "remove spare segment file"))?;
                continue;
            }
            let path = self.dir.join(segment_name(first));
            let f = self.fs.open(&spare, OpenMode::ReadWrite).map_err(io_err(&spare, "open spare segment file"))?;
            let mut block = [0u8; DIRECT_IO_ALIGN];
            block[..SEGMENT_HEADER_LEN].copy_from_slice(&encode_segment_header(first));
            f.write_all_at(&block, 0).map_err(io_err(&spare, "write segment header"))?;
            f.sync_data().map_err(io_err(&spare, "sync segment header"))?;
            self.fs.rename(&spare, &path).map_err(io_err(&spare, "rename spare to segment"))?;
            self.fs.sync_dir(&self.dir).map_err(io_err(&self.dir, "sync directory"))?;
            return Ok(SegmentInfo { first_seq: first, path, bytes: 0 });
        }
        create_segment(self.fs.as_ref(), &self.dir, first)
    }

    /// Trims the oldest segments whose records all have `seq <= through`; never the active
    /// one. Their files become spares for reuse, or are deleted. Returns how many were trimmed.
    pub fn trim_through(&mut self, through: Seq) -> Result<usize, JournalError> {
        let mut removed = 0;
        while self.segments.len() > 1 {
            let next_first = self.segments[1].first_seq;
            if next_first - 1 > through {
                break;
            }
            let seg = self.segments.pop_front().expect("len > 1");
            if self.spares.len() < MAX_SPARES {
                let spare = self.dir.join(spare_name(next_first - 1));
                self.fs.rename(&seg.path, &spare).map_err(io_err(&seg.path, "keep trimmed segment as a spare"))?;
                // Newest first, as `find_spares` orders them.
                self.spares.insert(0, (next_first - 1, spare));
            } else {
                self.fs.remove_file(&seg.path).map_err(io_err(&seg.path, "remove trimmed segment"))?;
            }
            removed += 1;
        }
        if removed > 0 {
            self.fs.sync_dir(&self.dir).map_err(io_err(&self.dir, "sync directory"))?;
        }
        Ok(removed)
    }
}

fn create_segment(fs: &dyn Storage, dir: &Path, first_seq: Seq) -> Result<SegmentInfo, JournalError> {
    let path = dir.join(segment_name(first_seq));
    let f = fs.open(&path, OpenMode::Truncate).map_err(io_err(&path, "create segment"))?;
    f.write_all_at(&encode_segment_header(first_seq), 0).map_err(io_err(&path, "write segment header"))?;
    f.sync_data().map_err(io_err(&path, "sync segment header"))?;
    fs.sync_dir(dir).map_err(io_err(dir, "sync directory"))?;
    Ok(SegmentInfo { first_seq, path, bytes: 0 })
}

/// The segment opened for direct I/O, if the options ask for it and the file system can.
fn open_direct(fs: &dyn Storage, path: &Path, opts: JournalOptions) -> Result<Option<Box<dyn StorageFile>>, JournalError> {
    if !opts.direct {
        return Ok(None);
    }
    fs.open_direct(path).map_err(io_err(path, "open segment for direct I/O"))
}

fn read_fully(f: &dyn StorageFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

struct Scan {
    end: u64,
    next_seq: Seq,
    last_time_ns: u64,
    stop_reason: Option<&'static str>,
}

/// Walks a segment's records to the first invalid one.
fn scan_segment(f: &dyn StorageFile, first_seq: Seq, path: &Path) -> Result<Scan, JournalError> {
    let mut cur = SegmentCursor::new(first_seq);
    let mut last_time_ns = 0;
    loop {
        match cur.next(f, path) {
            Ok(Some(r)) => last_time_ns = r.header.time_ns,
            Ok(None) => return Ok(Scan { end: cur.pos, next_seq: cur.next_seq, last_time_ns, stop_reason: None }),
            Err(CursorStop::Invalid(why)) => {
                return Ok(Scan { end: cur.pos, next_seq: cur.next_seq, last_time_ns, stop_reason: Some(why) })
            }
            Err(CursorStop::Io(e)) => return Err(e),
        }
    }
}

enum CursorStop {
    Invalid(&'static str),
    Io(JournalError),
}

/// Reads records of one segment through a buffer.
struct SegmentCursor {
    /// Read buffer; only `buf[..valid]` holds file bytes. It is zeroed once when it grows,
    /// never on each refill (a reader following the live tail refills for every batch).
    buf: Vec<u8>,
    /// Bytes of `buf` that hold file data.
    valid: usize,
    /// File offset of `buf[0]`.
    buf_off: u64,
    /// File offset of the next record.
    pos: u64,
    next_seq: Seq,
    /// Encoded length of the record `next` returned last.
    last_len: usize,
    /// First sequence number of the segment this cursor reads.
    segment: Seq,
}

const READ_CHUNK: usize = 1 << 20;

impl SegmentCursor {
    fn new(first_seq: Seq) -> SegmentCursor {
        SegmentCursor {
            buf: Vec::new(),
            valid: 0,
            buf_off: SEGMENT_HEADER_LEN as u64,
            pos: SEGMENT_HEADER_LEN as u64,
            next_seq: first_seq,
            last_len: 0,
            segment: first_seq,
        }
    }

    /// Makes at least `n` bytes from `pos` available in the buffer if the file has them.
    /// Returns how many are available (possibly fewer than `n`).
    fn fill(&mut self, f: &dyn StorageFile, n: usize, path: &Path) -> Result<usize, JournalError> {
        let start = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
        if self.valid - start >= n {
            return Ok(self.valid - start);
        }
        self.buf.copy_within(start..self.valid, 0);
        self.buf_off = self.pos;
        let have = self.valid - start;
        let want = n.max(READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let got = read_fully(f, &mut self.buf[have..want], self.pos + have as u64).map_err(io_err(path, "read segment"))?;
        self.valid = have + got;
        Ok(self.valid)
    }

    /// The next record, `None` at the clean end of the written data.
    fn next(&mut self, f: &dyn StorageFile, path: &Path) -> Result<Option<RecordRef<'_>>, CursorStop> {
        let mut avail = self.fill(f, RECORD_HEADER_LEN, path).map_err(CursorStop::Io)?;
        if avail == 0 {
            return Ok(None);
        }
        if !self.pos.is_multiple_of(BLOCK) && avail >= 4 {
            let start = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
            if self.buf[start..start + 4] == [0; 4] {
                // Padding after a direct-I/O commit: zeroes to the end of the block.
                let rest = usize::try_from(BLOCK - self.pos % BLOCK).expect("below a block");
                if self.fill(f, rest, path).map_err(CursorStop::Io)? < rest {
                    return Err(CursorStop::Invalid("zero bytes up to the end of the file"));
                }
                let start = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
                if self.buf[start..start + rest].iter().any(|&b| b != 0) {
                    return Err(CursorStop::Invalid("padding holds non-zero bytes"));
                }
                self.pos += rest as u64;
                avail = self.fill(f, RECORD_HEADER_LEN, path).map_err(CursorStop::Io)?;
                if avail == 0 {
                    return Ok(None);
                }
            }
        }
        if avail < RECORD_HEADER_LEN {
            return Err(CursorStop::Invalid("incomplete record header"));
        }
        let start = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
        let total = match record_len_from_header(&self.buf[start..self.valid]) {
            Ok(t) => t,
            Err(DecodeError::Corrupt(why)) => return Err(CursorStop::Invalid(why)),
            Err(DecodeError::Incomplete { .. }) => return Err(CursorStop::Invalid("incomplete record header")),
        };
        let avail = self.fill(f, total, path).map_err(CursorStop::Io)?;
        if avail < total {
            return Err(CursorStop::Invalid("incomplete record"));
        }
        let start = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
        let rec = match decode_record(&self.buf[start..start + total]) {
            Ok((r, _)) => r,
            Err(DecodeError::Corrupt(why)) => return Err(CursorStop::Invalid(why)),
            Err(DecodeError::Incomplete { .. }) => return Err(CursorStop::Invalid("incomplete record")),
        };
        if rec.header.seq != self.next_seq {
            return Err(CursorStop::Invalid("sequence number out of order"));
        }
        self.pos += total as u64;
        self.next_seq += 1;
        self.last_len = total;
        Ok(Some(rec))
    }

    /// Continues at file offset `pos` with record `next_seq` (both known to be right: the
    /// end of a commit read from memory), forgetting what is buffered.
    fn jump(&mut self, pos: u64, next_seq: Seq) {
        self.pos = pos;
        self.buf_off = pos;
        self.valid = 0;
        self.next_seq = next_seq;
    }

    /// Drops buffered bytes past the read position, so that bytes of a record that was being
    /// written when they were read are read again next time.
    fn forget_unread(&mut self) {
        self.valid = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
    }

    /// The raw bytes of the record `next` returned last.
    fn last_raw(&self) -> &[u8] {
        let end = usize::try_from(self.pos - self.buf_off).expect("buffer offset fits");
        &self.buf[end - self.last_len..end]
    }
}

/// Reads a journal from a sequence number on, following the writer as it appends (in this
/// process or another). Returns `None` when it has read everything written so far.
pub struct JournalReader {
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    seg_path: PathBuf,
    file: Box<dyn StorageFile>,
    cursor: SegmentCursor,
    /// The writer's newest commits in memory, if it keeps them for this reader.
    tail: Option<Arc<Tail>>,
    /// The commit being read from memory, and where its next record starts.
    chunk: Option<(TailChunk, usize)>,
    /// Where in `chunk` the record returned last lies.
    chunk_last: (usize, usize),
    /// Bytes of records read from the tail rather than the file.
    from_memory: u64,
    /// Whether the record returned last came from the file.
    last_from_file: bool,
}

/// Where the record a reader returns next comes from.
enum Source {
    File,
    Memory,
}

impl JournalReader {
    /// Opens a reader whose first record will be `from` (or the first written after it, if
    /// `from` is not written yet).
    pub fn open(fs: Arc<dyn Storage>, dir: &Path, from: Seq) -> Result<JournalReader, JournalError> {
        let segs = list_segments(fs.as_ref(), dir)?;
        let first = segs.first().map_or(1, |s| s.0);
        let Some((seg_first, path)) = segs.iter().rev().find(|s| s.0 <= from.max(1)).cloned() else {
            return Err(JournalError::NotRetained { requested: from, first, last: 0 });
        };
        let file = fs.open(&path, OpenMode::Read).map_err(io_err(&path, "open segment"))?;
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        let n = read_fully(file.as_ref(), &mut h, 0).map_err(io_err(&path, "read segment header"))?;
        match decode_segment_header(&h[..n]) {
            Ok(s) if s == seg_first => {}
            Ok(_) => return Err(JournalError::Corrupt { path, offset: 16, reason: "first_seq does not match the file name".into() }),
            Err(why) => return Err(JournalError::Corrupt { path, offset: 0, reason: why.into() }),
        }
        let mut r = JournalReader {
            fs,
            dir: dir.to_owned(),
            seg_path: path,
            file,
            cursor: SegmentCursor::new(seg_first),
            tail: None,
            chunk: None,
            chunk_last: (0, 0),
            from_memory: 0,
            last_from_file: false,
        };
        while r.cursor.next_seq < from {
            if r.next()?.is_none() {
                break;
            }
        }
        Ok(r)
    }

    /// Reads the commits the writer keeps in `tail` from memory when this reader reaches
    /// them (see [`Journal::keep_tail`]); everything else still comes from the files. One
    /// reader per tail: it takes the commits it reads.
    pub fn with_tail(mut self, tail: Arc<Tail>) -> JournalReader {
        self.tail = Some(tail);
        self
    }

    /// Bytes of records this reader took from the writer's tail in memory.
    pub fn bytes_from_memory(&self) -> u64 {
        self.from_memory
    }

    /// Sequence number of the next record this reader will return.
    pub fn next_seq(&self) -> Seq {
        self.cursor.next_seq
    }

    /// Where the record returned last lies: the first sequence number of its segment and the
    /// record's byte position in the segment file. `None` before the first record and for a
    /// record taken from the writer's tail in memory.
    pub fn last_position(&self) -> Option<(Seq, u64)> {
        self.last_from_file.then(|| (self.cursor.segment, self.cursor.pos - self.cursor.last_len as u64))
    }

    /// The next record and its raw encoding, or `None` when nothing more is written yet.
    pub fn next_raw(&mut self) -> Result<Option<(RecordRef<'_>, &[u8])>, JournalError> {
        let step = self.step()?;
        self.last_from_file = matches!(step, Some(Source::File));
        let raw = match step {
            None => return Ok(None),
            Some(Source::File) => self.cursor.last_raw(),
            Some(Source::Memory) => {
                let (chunk, _) = self.chunk.as_ref().expect("reading a chunk");
                &chunk.bytes[self.chunk_last.0..self.chunk_last.1]
            }
        };
        // Decode again from the buffer so that one borrow covers both views; the record was
        // validated (or, from memory, encoded here) a moment ago.
        let (rec, _) = decode_record_trusted(raw).expect("record was just validated");
        Ok(Some((rec, raw)))
    }

    /// Moves past the next record, from the tail in memory when this reader is at the start
    /// of a commit kept there, else from the file.
    fn step(&mut self) -> Result<Option<Source>, JournalError> {
        loop {
            if let Some((chunk, at)) = &mut self.chunk {
                if *at < chunk.bytes.len() {
                    let rest = &chunk.bytes[*at..];
                    let (rec, len) = decode_record_trusted(rest).map_err(|e| JournalError::Corrupt {
                        path: self.dir.join(segment_name(chunk.segment)),
                        offset: 0,
                        reason: format!("a record kept in memory does not decode: {e:?}"),
                    })?;
                    if rec.header.seq != self.cursor.next_seq {
                        return Err(JournalError::Corrupt {
                            path: self.dir.join(segment_name(chunk.segment)),
                            offset: 0,
                            reason: "a record kept in memory is out of order".into(),
                        });
                    }
                    self.chunk_last = (*at, *at + len);
                    *at += len;
                    self.cursor.next_seq += 1;
                    self.from_memory += len as u64;
                    return Ok(Some(Source::Memory));
                }
                let (chunk, _) = self.chunk.take().expect("checked above");
                self.resume_file_after(&chunk)?;
                if let Some(tail) = &self.tail {
                    tail.recycle(chunk.bytes);
                }
            }
            if let Some(chunk) = self.tail.as_ref().and_then(|t| t.take(self.cursor.next_seq)) {
                self.chunk = Some((chunk, 0));
                continue;
            }
            return Ok(self.advance()?.then_some(Source::File));
        }
    }

    /// Points the file cursor just past a commit read from memory.
    fn resume_file_after(&mut self, chunk: &TailChunk) -> Result<(), JournalError> {
        let path = self.dir.join(segment_name(chunk.segment));
        if path == self.seg_path {
            self.cursor.jump(chunk.end, chunk.next_seq);
            return Ok(());
        }
        if self.fs.exists(&path) {
            self.file = self.fs.open(&path, OpenMode::Read).map_err(io_err(&path, "open segment"))?;
            self.seg_path = path;
            self.cursor.jump(chunk.end, chunk.next_seq);
            return Ok(());
        }
        // Trimmed already: every record in it was confirmed, so it was sealed and the next
        // segment starts right after the chunk (`advance` opens it).
        self.cursor.forget_unread();
        self.cursor.next_seq = chunk.next_seq;
        Ok(())
    }

    /// Like [`JournalReader::next_raw`] but never returns a record past `limit` (for
    /// example the writer's durable sequence number).
    pub fn next_raw_upto(&mut self, limit: Seq) -> Result<Option<(RecordRef<'_>, &[u8])>, JournalError> {
        if self.cursor.next_seq > limit {
            return Ok(None);
        }
        self.next_raw()
    }

    /// The next record, or `None` when nothing more is written yet.
    #[allow(clippy::should_implement_trait)] // lending: the record borrows the reader's buffer
    pub fn next(&mut self) -> Result<Option<RecordRef<'_>>, JournalError> {
        Ok(self.next_raw()?.map(|(r, _)| r))
    }

    /// Moves past the next record; false when there is none yet.
    fn advance(&mut self) -> Result<bool, JournalError> {
        loop {
            let stop = match self.cursor.next(self.file.as_ref(), &self.seg_path) {
                Ok(Some(_)) => return Ok(true),
                Ok(None) => None,
                Err(CursorStop::Invalid(why)) => Some(why),
                Err(CursorStop::Io(e)) => return Err(e),
            };
            self.cursor.forget_unread();
            // End of this segment's valid data: either the writer moved to the next segment,
            // or this is the live tail (possibly a record being written right now).
            let next_path = self.dir.join(segment_name(self.cursor.next_seq));
            if next_path != self.seg_path && self.fs.exists(&next_path) {
                let file = self.fs.open(&next_path, OpenMode::Read).map_err(io_err(&next_path, "open segment"))?;
                let mut h = [0u8; SEGMENT_HEADER_LEN];
                let n = read_fully(file.as_ref(), &mut h, 0).map_err(io_err(&next_path, "read segment header"))?;
                if n < SEGMENT_HEADER_LEN {
                    return Ok(false); // being created right now
                }
                if let Err(why) = decode_segment_header(&h) {
                    return Err(JournalError::Corrupt { path: next_path, offset: 0, reason: why.into() });
                }
                if let Some(why) = stop {
                    // Bytes after the last good record of a finished segment: only legal if
                    // nothing follows them, which the next segment's first_seq proves.
                    log::debug!("journal {}: ignoring trailing bytes ({why})", self.seg_path.display());
                }
                self.file = file;
                self.seg_path = next_path;
                self.cursor = SegmentCursor::new(self.cursor.next_seq);
                continue;
            }
            return Ok(false);
        }
    }
}
