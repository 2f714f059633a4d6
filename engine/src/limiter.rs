//! The bandwidth limit of the link to one target (`max_bandwidth`), shared fairly by the
//! groups that ship there.
//!
//! A virtual clock: each sender reserves the next free slot for a chunk of at most
//! [`CHUNK`] bytes (its length at the configured rate), sleeps until the slot begins, and
//! sends. Reservations are made one chunk at a time, right before sending, so groups with data
//! to send take turns chunk by chunk. A group with a backlog ships frames of up to 1 MiB, so
//! groups that all have more to send than the link carries get equal shares of it; a group
//! that sends less than its share gets all it sends.

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hindsight_consistency::sync::lock;

/// Largest piece sent under one reservation.
pub const CHUNK: usize = 64 << 10;

/// Idle time that may be made up in a burst.
const BURST: Duration = Duration::from_millis(50);

/// A rate limit, in bytes per second.
#[derive(Debug)]
pub struct Limiter {
    rate: u64,
    next_free: Mutex<Instant>,
}

impl Limiter {
    pub fn new(bytes_per_second: u64) -> Limiter {
        Limiter { rate: bytes_per_second.max(1), next_free: Mutex::new(Instant::now()) }
    }

    /// The configured rate.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits for the turn to send `n` bytes.
    pub fn acquire(&self, n: usize) {
        let cost = Duration::from_secs_f64(n as f64 / self.rate as f64);
        let start = {
            let mut next = lock(&self.next_free);
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + cost;
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

/// A writer whose writes wait for the limiter (none: unlimited).
pub struct Paced<'a, W: Write> {
    pub inner: &'a mut W,
    pub limiter: Option<&'a Limiter>,
}

impl<W: Write> Write for Paced<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.limiter {
            None => self.inner.write(buf),
            Some(l) => {
                let n = buf.len().min(CHUNK);
                l.acquire(n);
                self.inner.write_all(&buf[..n])?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn two_senders_share_the_rate_equally() {
        // 4 MiB/s for 0.6 s: two greedy senders with different frame sizes.
        let limiter = Arc::new(Limiter::new(4 << 20));
        let sent: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let until = Instant::now() + Duration::from_millis(600);
        let threads: Vec<_> = [1 << 20, 256 << 10]
            .into_iter()
            .zip(sent.iter().cloned())
            .map(|(size, counter)| {
                let limiter = Arc::clone(&limiter);
                std::thread::spawn(move || {
                    let buf = vec![0u8; size];
                    let mut sink = io::sink();
                    let mut w = Paced { inner: &mut sink, limiter: Some(&limiter) };
                    while Instant::now() < until {
                        w.write_all(&buf).unwrap();
                        counter.fetch_add(size as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (a, b) = (sent[0].load(Ordering::Relaxed) as f64, sent[1].load(Ordering::Relaxed) as f64);
        let total = a + b;
        // The rate holds (plus the burst and the last big write in flight) ...
        assert!(total < (4 << 20) as f64 * 0.6 + (1 << 20) as f64 * 1.5 + (4 << 20) as f64 * 0.05, "total {total}");
        // ... and each gets about half of it.
        assert!(a > total * 0.35 && b > total * 0.35, "shares {a} and {b} of {total}");
    }
}
