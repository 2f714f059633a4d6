//! The block trait every front end (ublk, the kernel nbd driver, the NBD server) serves.
//!
//! A front end parses its protocol, then calls a [`BlockDevice`]: reads are answered
//! synchronously from the local disk; data-modifying requests are *submitted* and complete
//! later, through a [`Completion`], once every place that must hold the write holds it (the
//! local disk and the engine). The front end replies to its client from the completion, so
//! many writes are in flight at once and replies may go out of order.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

/// An error a block client understands: each maps to one errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockError {
    /// The local disk or the replication path failed (EIO).
    Io,
    /// No space left on the local disk (ENOSPC).
    NoSpace,
    /// The request lies (partly) outside the device, or is malformed (EINVAL).
    Invalid,
    /// The request is too large to accept (EOVERFLOW).
    Overflow,
    /// The operation is not supported (ENOTSUP).
    NotSupported,
    /// The device is shutting down (ESHUTDOWN).
    Shutdown,
    /// The device only reads (EPERM): a point in time exported without an overlay.
    ReadOnly,
}

impl BlockError {
    /// The errno value a client expects for this error.
    pub fn errno(self) -> i32 {
        match self {
            BlockError::Io => 5,            // EIO
            BlockError::NoSpace => 28,      // ENOSPC
            BlockError::Invalid => 22,      // EINVAL
            BlockError::Overflow => 75,     // EOVERFLOW
            BlockError::NotSupported => 95, // ENOTSUP
            BlockError::Shutdown => 108,    // ESHUTDOWN
            BlockError::ReadOnly => 1,      // EPERM
        }
    }

    /// Classifies a local I/O error.
    pub fn from_io(err: &std::io::Error) -> BlockError {
        match err.raw_os_error() {
            Some(28) => BlockError::NoSpace,
            Some(22) => BlockError::Invalid,
            _ => BlockError::Io,
        }
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            BlockError::Io => "I/O error",
            BlockError::NoSpace => "no space left on device",
            BlockError::Invalid => "invalid request",
            BlockError::Overflow => "request too large",
            BlockError::NotSupported => "operation not supported",
            BlockError::Shutdown => "device shutting down",
            BlockError::ReadOnly => "read-only device",
        };
        f.write_str(s)
    }
}

impl std::error::Error for BlockError {}

/// What a data-modifying request does to its range.
#[derive(Debug)]
pub enum WriteKind {
    /// Write these bytes (their length is the request length).
    Data(Vec<u8>),
    /// Make the range read back as zeroes.
    Zeroes { len: u32 },
    /// Discard the range; it may read back as anything afterwards (we make it zeroes).
    Trim { len: u32 },
}

impl WriteKind {
    /// Number of bytes of the device this request covers.
    pub fn len(&self) -> u64 {
        match self {
            WriteKind::Data(d) => d.len() as u64,
            WriteKind::Zeroes { len } | WriteKind::Trim { len } => u64::from(*len),
        }
    }

    /// True when the request covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One data-modifying request.
#[derive(Debug)]
pub struct WriteOp {
    /// Byte offset on the device.
    pub offset: u64,
    /// What to do to the range.
    pub kind: WriteKind,
    /// Force unit access: the local write must be durable before completion.
    pub fua: bool,
}

/// Called exactly once when a submitted request has finished, successfully or not.
pub type Completion = Box<dyn FnOnce(Result<(), BlockError>) + Send + 'static>;

/// A block device as the front ends see it. Offsets are already checked against
/// [`BlockDevice::size`] by the front end, but implementations check again.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True if the device refuses every data-modifying request (with
    /// [`BlockError::ReadOnly`]); front ends say so to their clients.
    fn read_only(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes at `offset` from the local disk.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Submits a write, write-zeroes or trim; `done` runs when it has completed everywhere it
    /// must (possibly on another thread, possibly before `submit` returns).
    fn submit(&self, op: WriteOp, done: Completion);
    /// Like [`BlockDevice::submit`], when the front end has more requests ready: what the
    /// device sends to a peer may be held back, to go with theirs in one message, until
    /// [`BlockDevice::send_held`] or the next plain `submit`.
    fn submit_held(&self, op: WriteOp, done: Completion) {
        self.submit(op, done);
    }
    /// Sends what [`BlockDevice::submit_held`] held back. A front end calls it whenever it has
    /// no request ready and before it waits for anything.
    fn send_held(&self) {}
    /// Makes every completed write durable on the local disk.
    fn flush(&self) -> Result<(), BlockError>;
}

/// Replies held back by completions that run under a [`Cork`], sent when it goes.
pub trait Deferred: Send + Sync {
    /// Sends what was held back.
    fn send_deferred(&self);
}

thread_local! {
    /// This thread's cork depth, and what to send when the outermost cork goes.
    static CORK: RefCell<(usize, Vec<Arc<dyn Deferred>>)> = const { RefCell::new((0, Vec::new())) };
}

/// While a `Cork` lives, completions running on this thread may hold their client replies
/// back ([`defer`]) and send them together when it is dropped: one system call for a batch
/// of acknowledgements instead of one each. Whoever holds one drops it before it waits for
/// anything.
#[must_use = "the cork lasts as long as the value"]
pub struct Cork(());

/// Corks this thread until the returned value is dropped.
pub fn cork() -> Cork {
    CORK.with(|c| c.borrow_mut().0 += 1);
    Cork(())
}

impl Drop for Cork {
    fn drop(&mut self) {
        let due = CORK.with(|c| {
            let mut c = c.borrow_mut();
            c.0 -= 1;
            if c.0 == 0 {
                std::mem::take(&mut c.1)
            } else {
                Vec::new()
            }
        });
        for d in due {
            d.send_deferred();
        }
    }
}

/// If this thread is corked, registers `d` to send its held replies when the cork goes and
/// returns true; else returns false (send now).
pub fn defer(d: &Arc<dyn Deferred>) -> bool {
    CORK.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 == 0 {
            return false;
        }
        if !c.1.iter().any(|x| std::ptr::addr_eq(Arc::as_ptr(x), Arc::as_ptr(d))) {
            c.1.push(Arc::clone(d));
        }
        true
    })
}

#[cfg(test)]
mod cork_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Deferred for Counter {
        fn send_deferred(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn corked_replies_go_once_when_the_outermost_cork_goes() {
        let (a, b) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let (da, db): (Arc<dyn Deferred>, Arc<dyn Deferred>) = (Arc::clone(&a) as _, Arc::clone(&b) as _);
        assert!(!defer(&da), "no cork: send now");
        {
            let _outer = cork();
            assert!(defer(&da));
            {
                let _inner = cork();
                assert!(defer(&da), "registered once however often");
                assert!(defer(&db));
            }
            assert_eq!(a.0.load(Ordering::SeqCst), 0, "the inner cork sends nothing");
        }
        assert_eq!((a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst)), (1, 1));
        assert!(!defer(&da), "uncorked again");
    }
}
