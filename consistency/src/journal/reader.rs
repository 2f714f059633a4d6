//! Reading a journal: the cursor that walks the records of one segment to the first invalid
//! one (used to recover a torn tail at open, too), and [`JournalReader`], which follows the
//! writer from segment to segment and takes commits from its [`Tail`] in memory when it can.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{io_err, JournalError};
use super::segment::{decode_segment_header, list_segments, read_fully, segment_name, BLOCK, SEGMENT_HEADER_LEN};
use super::tail::{Tail, TailChunk};
use crate::record::{decode_record, decode_record_trusted, record_len_from_header, DecodeError, RecordRef, Seq, RECORD_HEADER_LEN};
use crate::storage::{OpenMode, Storage, StorageFile};

pub(super) struct Scan {
    pub(super) end: u64,
    pub(super) next_seq: Seq,
    pub(super) last_time_ns: u64,
    pub(super) stop_reason: Option<&'static str>,
}

/// Walks a segment's records to the first invalid one.
pub(super) fn scan_segment(f: &dyn StorageFile, first_seq: Seq, path: &Path) -> Result<Scan, JournalError> {
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
    /// How much the next refill reads at least: it starts small and doubles each time a
    /// refill gets all it asked for, so a reader of a short segment (thousands of idle groups
    /// each have one) holds a small buffer and one of a long segment reads in large chunks.
    chunk: usize,
}

/// The first refill's size.
const FIRST_READ_CHUNK: usize = 16 << 10;
/// The largest refill.
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
            chunk: FIRST_READ_CHUNK,
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
        let want = n.max(self.chunk);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let got = read_fully(f, &mut self.buf[have..want], self.pos + have as u64).map_err(io_err(path, "read segment"))?;
        if have + got == want {
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
        }
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
    /// them (see [`Journal::keep_tail`](super::Journal::keep_tail)); everything else still
    /// comes from the files. One reader per tail: it takes the commits it reads.
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
