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
//!
//! - `error.rs` — [`JournalError`]
//! - `segment.rs` — segment files: names, header, listing, creation
//! - `writer.rs` — appending and group commit, new segments, trimming
//! - `reader.rs` — the segment cursor and [`JournalReader`]
//! - `tail.rs` — the newest commits in memory, for the reader following the writer
//!
//! This module holds the [`Journal`] itself (opening it, recovering the tail, what it
//! holds) and its options.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod error;
mod reader;
mod segment;
mod tail;
mod writer;

use error::io_err;
pub use error::JournalError;
use reader::scan_segment;
pub use reader::JournalReader;
use segment::{align_up, create_segment, decode_segment_header, parse_spare_name, read_fully, MAX_SPARES};
pub use segment::{
    list_segments, segment_name, SegmentInfo, BLOCK, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_SUFFIX, SEGMENT_VERSION, SPARE_SUFFIX,
};
pub use tail::Tail;

use crate::record::Seq;
use crate::storage::{AlignedBuf, OpenMode, Storage, StorageFile};

/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

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
    /// Where the last commit's records were written.
    last_commit: Option<CommitPlace>,
}

/// Where a commit's records lie: the first of them at `start` in the segment `segment`, the
/// others after it exactly as they were appended (padding, if any, follows the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPlace {
    /// The segment's `first_seq`.
    pub segment: Seq,
    /// Byte position of the commit's first record in the segment file.
    pub start: u64,
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
                    // Nothing after the last good record was acknowledged: bytes of a reused
                    // file's earlier life (after every restart once segments are recycled), or
                    // a commit torn by a crash.
                    log::info!(
                        "journal {}: the active segment ends after seq {}; the {} bytes after it hold no record of this journal \
                         ({}): what the recycled segment file held before (normal), or a commit a crash interrupted, which was \
                         never acknowledged; they are cut",
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
            // Grows with the commits (and the tail hands buffers back): an idle journal holds
            // none.
            pending: Vec::new(),
            poisoned: false,
            tail: None,
            spares,
            last_commit: None,
        })
    }

    /// Starts the journal again at `next`, empty: every segment and spare file goes, and the
    /// next record appended must carry `next` (docs/ha.md, "Takeover": an engine that takes a
    /// group over continues the target's sequence). The caller needs nothing the old segments
    /// hold. A crash part way leaves some of the old segments, or none: the journal opens on
    /// what is left, and the caller starts it again the same way.
    pub fn restart_at(&mut self, next: Seq) -> Result<(), JournalError> {
        assert!(next >= 1, "sequence numbers start at 1");
        let fs = Arc::clone(&self.fs);
        let old: Vec<PathBuf> = self.segments.iter().map(|s| s.path.clone()).chain(self.spares.iter().map(|(_, p)| p.clone())).collect();
        for path in &old {
            fs.remove_file(path).map_err(io_err(path, "remove segment (the journal starts again)"))?;
        }
        create_segment(fs.as_ref(), &self.dir, next)?;
        fs.sync_dir(&self.dir).map_err(io_err(&self.dir, "sync directory"))?;
        let mut fresh = Journal::open(fs, &self.dir, self.opts)?;
        if let Some(t) = self.tail.take() {
            t.clear();
            fresh.tail = Some(t);
        }
        *self = fresh;
        Ok(())
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

    /// Gives back the memory kept for the next commits (the pending and staging buffers, the
    /// tail's spare buffers): a group that has gone idle holds none; its next commit
    /// allocates again.
    pub fn release_memory(&mut self) {
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
        self.staging = AlignedBuf::default();
        if let Some(t) = &self.tail {
            t.release_spares();
        }
        crate::memory::note_freed();
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
}

/// The segment opened for direct I/O, if the options ask for it and the file system can.
fn open_direct(fs: &dyn Storage, path: &Path, opts: JournalOptions) -> Result<Option<Box<dyn StorageFile>>, JournalError> {
    if !opts.direct {
        return Ok(None);
    }
    fs.open_direct(path).map_err(io_err(path, "open segment for direct I/O"))
}
