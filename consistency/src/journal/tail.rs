//! The newest commits of a journal, kept in memory for the one reader that follows the writer.
//!
//! The engine's shipper reads records moments after the journal committed them. With the
//! journal written by direct I/O, reading them back from the file is a device read of every
//! byte shipped, on the same disk that takes the next commits. Instead the journal hands each
//! commit's encoded records to its [`Tail`] (a buffer swap, not a copy) and the reader takes
//! them from there when its next record is the first of a kept commit; it falls back to the
//! file when it is behind (after a reconnect, or when the tail overflowed while the target
//! was away). The file stays the truth: the tail holds only what is already durable in it.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::record::Seq;
use crate::sync::lock;

/// Buffers kept for reuse: fresh memory costs far more to fill than memory touched before.
const SPARE_BUFFERS: usize = 4;
/// Capacity of a new commit buffer: small, it grows with the commits it holds (an idle
/// group's journal holds a few of these).
const BUFFER_CAPACITY: usize = 16 << 10;

/// One commit's records, as written to the journal file.
#[derive(Debug)]
pub(crate) struct TailChunk {
    /// Sequence number of its first record.
    pub first_seq: Seq,
    /// One past its last record.
    pub next_seq: Seq,
    /// First sequence number of the segment it was written to.
    pub segment: Seq,
    /// File offset in that segment just past its records (padding, if any, follows).
    pub end: u64,
    /// The encoded records.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: VecDeque<TailChunk>,
    bytes: usize,
    spare: Vec<Vec<u8>>,
}

/// The newest commits of a journal, up to a byte limit (see the module docs). Shared by the
/// journal, which fills it, and one reader, which empties it.
#[derive(Debug)]
pub struct Tail {
    inner: Mutex<Inner>,
    limit: usize,
}

impl Tail {
    /// A tail keeping at most `limit` bytes of records; older commits are dropped (their
    /// reader reads them from the file instead).
    pub fn new(limit: usize) -> Tail {
        Tail { inner: Mutex::new(Inner::default()), limit }
    }

    /// Bytes of records held.
    pub fn held_bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    /// An empty buffer for the journal's next commit.
    pub(crate) fn buffer(&self) -> Vec<u8> {
        lock(&self.inner).spare.pop().unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY))
    }

    /// Keeps a committed chunk, dropping the oldest ones over the limit.
    pub(crate) fn push(&self, chunk: TailChunk) {
        let mut inner = lock(&self.inner);
        inner.bytes += chunk.bytes.len();
        inner.chunks.push_back(chunk);
        while inner.bytes > self.limit {
            let Some(old) = inner.chunks.pop_front() else { break };
            inner.bytes -= old.bytes.len();
            keep_spare(&mut inner, old.bytes);
        }
    }

    /// The chunk starting at `seq`, if it is held; chunks wholly before `seq` are dropped
    /// (the reader is past them).
    pub(crate) fn take(&self, seq: Seq) -> Option<TailChunk> {
        let mut inner = lock(&self.inner);
        while let Some(front) = inner.chunks.front() {
            if front.next_seq > seq {
                break;
            }
            let old = inner.chunks.pop_front().expect("front exists");
            inner.bytes -= old.bytes.len();
            keep_spare(&mut inner, old.bytes);
        }
        if inner.chunks.front()?.first_seq != seq {
            return None;
        }
        let chunk = inner.chunks.pop_front().expect("front exists");
        inner.bytes -= chunk.bytes.len();
        Some(chunk)
    }

    /// Drops every chunk held (the journal started a new numbering).
    pub(crate) fn clear(&self) {
        let mut inner = lock(&self.inner);
        while let Some(old) = inner.chunks.pop_front() {
            keep_spare(&mut inner, old.bytes);
        }
        inner.bytes = 0;
    }

    /// Drops the spare buffers (the journal has gone idle).
    pub(crate) fn release_spares(&self) {
        lock(&self.inner).spare = Vec::new();
    }

    /// Returns a chunk's buffer once read.
    pub(crate) fn recycle(&self, bytes: Vec<u8>) {
        keep_spare(&mut lock(&self.inner), bytes);
    }
}

fn keep_spare(inner: &mut Inner, mut bytes: Vec<u8>) {
    if inner.spare.len() < SPARE_BUFFERS {
        bytes.clear();
        inner.spare.push(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first: Seq, n: u64, len: usize) -> TailChunk {
        TailChunk { first_seq: first, next_seq: first + n, segment: 1, end: 0, bytes: vec![7; len] }
    }

    #[test]
    fn takes_only_the_chunk_starting_at_the_readers_position() {
        let t = Tail::new(1 << 20);
        t.push(chunk(1, 3, 100));
        t.push(chunk(4, 2, 100));
        t.push(chunk(6, 1, 100));
        // Inside the first chunk (the reader read part of it from the file): nothing, and the
        // chunk is kept until the reader is past it.
        assert!(t.take(2).is_none());
        assert_eq!(t.held_bytes(), 300);
        // Past the first: it goes, the second is handed out.
        let c = t.take(4).unwrap();
        assert_eq!((c.first_seq, c.next_seq), (4, 6));
        assert_eq!(t.held_bytes(), 100);
        assert!(t.take(7).is_none());
        assert_eq!(t.held_bytes(), 0);
    }

    #[test]
    fn drops_the_oldest_over_the_limit_and_reuses_buffers() {
        let t = Tail::new(250);
        for i in 0..5 {
            t.push(chunk(1 + i, 1, 100));
        }
        assert_eq!(t.held_bytes(), 200);
        assert!(t.take(1).is_none(), "dropped: read from the file instead");
        let c = t.take(4).unwrap();
        t.recycle(c.bytes);
        let b = t.buffer();
        assert!(b.is_empty() && b.capacity() >= 100);
    }
}
