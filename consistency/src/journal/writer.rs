//! The appending side of [`Journal`]: records are buffered, then written with one write and
//! one fdatasync per commit (group commit), into a new or reused segment once the active one
//! is full; the oldest segments are trimmed once no longer needed.

use super::error::{io_err, JournalError};
use super::segment::{create_segment, encode_segment_header, segment_name, spare_name, SegmentInfo, BLOCK, MAX_SPARES, SEGMENT_HEADER_LEN};
use super::tail::TailChunk;
use super::{open_direct, CommitPlace, Journal};
use crate::record::{encode_record, RecordHeader, RecordRef, Seq};
use crate::storage::{OpenMode, DIRECT_IO_ALIGN};

impl Journal {
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

    /// Counts a record `check_append` let through. The journal relies on both orders: readers
    /// and recovery find records by number (each one more than the last), and a point in time
    /// is the prefix of records stamped at or before it.
    fn appended(&mut self, h: &RecordHeader) {
        debug_assert_eq!(h.seq, self.next_seq, "journal {}: seq {} appended where {} is next", self.dir.display(), h.seq, self.next_seq);
        debug_assert!(
            h.time_ns >= self.last_time_ns,
            "journal {}: seq {} at time {} is before the last record's time {}",
            self.dir.display(),
            h.seq,
            h.time_ns,
            self.last_time_ns
        );
        self.next_seq += 1;
        self.last_time_ns = self.last_time_ns.max(h.time_ns);
    }

    /// Where the last commit's records were written (`None` before the first commit since
    /// the journal was opened). A record appended when [`Journal::pending_bytes`] was `n` lies
    /// at `start + n`.
    pub fn last_commit(&self) -> Option<CommitPlace> {
        self.last_commit
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
            self.roll()?;
        }
        let active = self.segments.back().expect("there is always an active segment");
        let bytes = if self.direct { self.staging.padded(&self.pending) } else { &self.pending[..] };
        self.active.write_all_at(bytes, self.active_len).map_err(io_err(&active.path, "append"))?;
        self.active.sync_data().map_err(io_err(&active.path, "fdatasync"))?;
        let start = self.active_len;
        self.active_len += bytes.len() as u64;
        let first_seq = self.durable_seq + 1;
        self.last_commit = Some(CommitPlace { segment: active.first_seq, start });
        debug_assert!(self.next_seq > first_seq, "journal {}: a commit of bytes but no record", self.dir.display());
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

    /// Seals the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), JournalError> {
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
        Ok(())
    }

    /// Seals the active segment now, if it holds records and nothing is buffered, so that
    /// [`Journal::trim_through`] can remove it once they are confirmed: a journal that takes
    /// no records (a paused group) would otherwise keep its active segment, whatever its size,
    /// for ever. Returns whether it sealed.
    pub fn seal_active(&mut self) -> Result<bool, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned { path: self.dir.clone() });
        }
        let holds_records = self.segments.back().is_some_and(|s| s.first_seq <= self.durable_seq);
        if !self.pending.is_empty() || !holds_records {
            return Ok(false);
        }
        let res = self.roll();
        if res.is_err() {
            self.poisoned = true;
        }
        res.map(|()| true)
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
