//! A plain file served as a [`BlockDevice`], with no replication: the baseline a front end is
//! tested and benchmarked against.
//!
//! Writes go to the file with positional I/O before `submit` returns. The completion then
//! runs either at once on the submitting thread, or later, after a varying delay, on a
//! timer thread, so that front ends meet completions that arrive late and out of order as
//! they will from the replicating device.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::block::{BlockDevice, BlockError, Completion, WriteKind, WriteOp};

/// Largest buffer of zeroes used to write a zeroed or trimmed range.
const ZERO_CHUNK: usize = 1024 * 1024;

/// When a [`FileDevice`] runs the completion of a submitted write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionMode {
    /// On the submitting thread, before `submit` returns.
    Inline,
    /// On a timer thread, after a delay between zero and `max_delay` that varies from one
    /// request to the next, so completions come back out of order.
    Deferred {
        /// Longest delay.
        max_delay: Duration,
    },
}

/// A regular file as a block device; its size is the file's length when opened.
pub struct FileDevice {
    file: File,
    size: u64,
    deferred: Option<Deferred>,
}

struct Deferred {
    max_delay: Duration,
    sender: Sender<Pending>,
    /// Picks each request's delay; a counter run through a mixing function keeps this
    /// deterministic without a random number generator.
    counter: std::sync::atomic::AtomicU64,
}

struct Pending {
    due: Instant,
    seq: u64,
    done: Completion,
    result: Result<(), BlockError>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Runs completions when they fall due. Ends once every sender is gone and nothing is
/// pending, so every completion runs exactly once.
fn timer_loop(receiver: &Receiver<Pending>) {
    let mut heap: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut open = true;
    while open || !heap.is_empty() {
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(p)| p.due <= now) {
            if let Some(Reverse(p)) = heap.pop() {
                (p.done)(p.result);
            }
        }
        let next = if let Some(Reverse(p)) = heap.peek() {
            if !open {
                thread::sleep(p.due.saturating_duration_since(Instant::now()));
                continue;
            }
            receiver.recv_timeout(p.due.saturating_duration_since(Instant::now()))
        } else {
            receiver.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match next {
            Ok(p) => heap.push(Reverse(p)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
    }
}

/// Mixes a counter into a well-spread 64-bit value (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl FileDevice {
    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path, mode: CompletionMode) -> io::Result<FileDevice> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let deferred = match mode {
            CompletionMode::Inline => None,
            CompletionMode::Deferred { max_delay } => {
                let (sender, receiver) = crossbeam_channel::unbounded();
                thread::Builder::new().name("file-device-timer".to_string()).spawn(move || timer_loop(&receiver))?;
                Some(Deferred { max_delay, sender, counter: std::sync::atomic::AtomicU64::new(0) })
            }
        };
        Ok(FileDevice { file, size, deferred })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::Invalid),
        }
    }

    fn write_zeroes(&self, mut offset: u64, len: u32) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn apply(&self, op: &WriteOp) -> Result<(), BlockError> {
        self.check(op.offset, op.kind.len())?;
        let written = match &op.kind {
            WriteKind::Data(data) => self.file.write_all_at(data, op.offset),
            WriteKind::Zeroes { len } | WriteKind::Trim { len } => self.write_zeroes(op.offset, *len),
        };
        written.and_then(|()| if op.fua { self.file.sync_data() } else { Ok(()) }).map_err(|e| BlockError::from_io(&e))
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(|e| BlockError::from_io(&e))
    }

    fn submit(&self, op: WriteOp, done: Completion) {
        let result = self.apply(&op);
        let Some(deferred) = &self.deferred else {
            return done(result);
        };
        let seq = deferred.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let max_us = u64::try_from(deferred.max_delay.as_micros()).unwrap_or(u64::MAX);
        let delay = Duration::from_micros(mix(seq) % max_us.saturating_add(1));
        let pending = Pending { due: Instant::now() + delay, seq, done, result };
        // The timer thread lives as long as the sender; should it be gone, run the
        // completion here rather than lose it.
        if let Err(e) = deferred.sender.send(pending) {
            let p = e.into_inner();
            (p.done)(p.result);
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_all().map_err(|e| BlockError::from_io(&e))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hindsight_consistency::sync::lock;

    use super::*;

    fn device(mode: CompletionMode) -> (tempfile::NamedTempFile, FileDevice) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = FileDevice::open(f.path(), mode).unwrap();
        (f, d)
    }

    #[test]
    fn inline_write_completes_before_submit_returns() {
        let (_f, d) = device(CompletionMode::Inline);
        let got = Arc::new(Mutex::new(None));
        let g = Arc::clone(&got);
        let op = WriteOp { offset: 4096, kind: WriteKind::Data(vec![7; 512]), fua: true };
        d.submit(op, Box::new(move |r| *lock(&g) = Some(r)));
        assert_eq!(*lock(&got), Some(Ok(())));
        let mut buf = [0u8; 512];
        d.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn out_of_range_requests_are_invalid() {
        let (_f, d) = device(CompletionMode::Inline);
        let mut buf = [0u8; 2];
        assert_eq!(d.read((1 << 20) - 1, &mut buf), Err(BlockError::Invalid));
        let got = Arc::new(Mutex::new(None));
        let g = Arc::clone(&got);
        let op = WriteOp { offset: 1 << 20, kind: WriteKind::Zeroes { len: 1 }, fua: false };
        d.submit(op, Box::new(move |r| *lock(&g) = Some(r)));
        assert_eq!(*lock(&got), Some(Err(BlockError::Invalid)));
    }

    #[test]
    fn deferred_completions_all_run_and_some_out_of_order() {
        let (_f, d) = device(CompletionMode::Deferred { max_delay: Duration::from_millis(5) });
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..64u64 {
            let o = Arc::clone(&order);
            let op = WriteOp { offset: i * 512, kind: WriteKind::Trim { len: 512 }, fua: false };
            d.submit(op, Box::new(move |r| lock(&o).push((i, r))));
        }
        drop(d); // the timer thread still runs everything pending
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&order).len() < 64 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let order = lock(&order);
        assert_eq!(order.len(), 64);
        assert!(order.iter().all(|(_, r)| r.is_ok()));
        assert!(order.windows(2).any(|w| w[0].0 > w[1].0), "completions came in order");
    }
}
