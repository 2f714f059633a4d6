//! A buffered reader whose buffer grows while the stream is busy and is given back while it is
//! idle, so that thousands of idle connections hold almost no memory, and a busy one still sees
//! several frames in one buffer (one commit for all of them).
//!
//! The buffer starts at [`ElasticReader::MIN`] bytes. A read that fills it doubles it, up to
//! the maximum given. A connection's task calls [`ElasticReader::park`] each time it has read
//! everything and waits for more: the buffer is given back once the connection has had
//! nothing to read for [`RELEASE_AFTER`] (a busy stream parks between frames all the time, and
//! must keep its buffer; one that wakes for a small frame every few seconds allocates and
//! clears `MIN` bytes each time, a microsecond). Only the bytes of the buffer are ever touched:
//! `std::io::BufReader` of a reader without `read_buf` zeroes its whole buffer on first use.

use std::io::{self, BufRead, Read};
use std::time::{Duration, Instant};

/// How long a connection has nothing to read before its grown buffer is given back.
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// See the module documentation.
pub struct ElasticReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    max: usize,
    /// Since when nothing has been read (set by `park`, cleared by a read).
    idle_since: Option<Instant>,
}

impl<R: Read> ElasticReader<R> {
    /// The size of the buffer after it was released or when it starts.
    pub const MIN: usize = 16 << 10;

    /// A reader over `inner` whose buffer grows up to `max` bytes.
    pub fn new(inner: R, max: usize) -> ElasticReader<R> {
        ElasticReader { inner, buf: Vec::new(), pos: 0, filled: 0, max: max.max(Self::MIN), idle_since: None }
    }

    /// The bytes read from `inner` and not yet consumed.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The reader underneath, to change how it reads (the bytes already buffered stay).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The connection waits for more: gives back the buffer once nothing was read for
    /// [`RELEASE_AFTER`]. Returns when to call it again (to give the buffer back) while it
    /// still holds one.
    pub fn park(&mut self) -> Option<Instant> {
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if self.buf.is_empty() {
            return None;
        }
        if since.elapsed() >= RELEASE_AFTER {
            self.release();
            return None;
        }
        Some(since + RELEASE_AFTER)
    }

    /// Since when nothing has been read, if `park` was called since the last read.
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Gives back the buffer if nothing is in it.
    pub fn release(&mut self) {
        if self.pos == self.filled && !self.buf.is_empty() {
            self.buf = Vec::new();
            self.pos = 0;
            self.filled = 0;
            crate::memory::note_freed();
        }
    }
}

impl<R: Read> BufRead for ElasticReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            self.pos = 0;
            self.filled = 0;
            if self.buf.len() < Self::MIN {
                self.buf.resize(Self::MIN, 0);
            }
            let n = self.inner.read(&mut self.buf)?;
            self.filled = n;
            self.idle_since = None;
            if n == self.buf.len() && self.buf.len() < self.max {
                // Busy: the next read may bring several frames at once.
                let grown = (self.buf.len() * 2).min(self.max);
                self.buf.resize(grown, 0);
            }
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.filled);
    }
}

impl<R: Read> Read for ElasticReader<R> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        // A large read with nothing buffered goes straight to `inner`.
        if self.pos == self.filled && dst.len() >= self.buf.len().max(Self::MIN) {
            self.idle_since = None;
            return self.inner.read(dst);
        }
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(dst.len());
            dst[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives at most `chunk` bytes per read.
    struct Chunks<'a> {
        data: &'a [u8],
        chunk: usize,
    }
    impl Read for Chunks<'_> {
        fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(self.chunk).min(dst.len());
            dst[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn reads_every_byte_in_order_and_grows_only_when_full() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = ElasticReader::new(Chunks { data: &data, chunk: 1 << 20 }, 1 << 20);
        let mut out = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
        }
        assert_eq!(out, data);
        assert!(r.buf.len() > ElasticReader::<Chunks>::MIN, "a busy stream grows the buffer");
        assert!(r.buf.len() <= 1 << 20);
        let grown = r.buf.len();
        let again = r.park().expect("a grown buffer is kept for a while");
        assert_eq!(r.buf.len(), grown, "kept while the stream may go on");
        r.idle_since = Some(Instant::now() - RELEASE_AFTER);
        assert!(again > Instant::now() - RELEASE_AFTER);
        assert_eq!(r.park(), None);
        assert_eq!(r.buf.capacity(), 0, "a grown buffer is released once idle");
    }

    #[test]
    fn a_trickling_stream_keeps_the_small_buffer_until_idle_and_release_keeps_unread_bytes() {
        let data = vec![7u8; 10_000];
        let mut r = ElasticReader::new(Chunks { data: &data, chunk: 100 }, 1 << 20);
        assert_eq!(r.fill_buf().unwrap().len(), 100);
        assert_eq!(r.buf.len(), ElasticReader::<Chunks>::MIN);
        r.consume(40);
        r.release();
        assert_eq!(r.buffer().len(), 60, "nothing buffered is dropped");
        r.consume(60);
        assert!(r.park().is_some(), "the small buffer is kept while the stream may go on");
        assert_eq!(r.buf.len(), ElasticReader::<Chunks>::MIN);
        r.idle_since = Some(Instant::now() - RELEASE_AFTER);
        assert_eq!(r.park(), None);
        assert_eq!(r.buf.capacity(), 0, "an idle connection holds no buffer");
        assert_eq!(r.fill_buf().unwrap().len(), 100, "and gets one again with its next bytes");
    }
}
