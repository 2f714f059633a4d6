//! Room on a group's channel. The channel itself is unbounded (crossbeam's list channel, whose
//! memory grows and shrinks with what is queued; a bounded one allocates and touches every slot
//! at once, some 400 KiB per group for 4,096 writes), and this count bounds it: a sender takes
//! room before it queues an item, and waits while [`QUEUE_ITEMS`] are queued, so that a stalled
//! disk pushes back on the agents instead of growing memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use hindsight_consistency::sync::lock;

/// Most items queued on a group's channel.
pub const QUEUE_ITEMS: usize = 4096;

/// How long a waiting sender sleeps before it looks again, should a wake-up be missed.
const RECHECK: Duration = Duration::from_millis(50);

/// See the module documentation.
#[derive(Default)]
pub struct Room {
    queued: AtomicUsize,
    /// The journal task has ended: nothing queued is taken any more.
    closed: AtomicBool,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Room {
    /// Takes room for one item, waiting while the channel is full. False once the journal
    /// task has ended (the item must not be queued).
    pub fn take(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) < QUEUE_ITEMS {
            return true;
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        let mut g = lock(&self.lock);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            let q = self.queued.load(Ordering::Acquire);
            if q < QUEUE_ITEMS && self.queued.compare_exchange(q, q + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return true;
            }
            g = self.freed.wait_timeout(g, RECHECK).map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
    }

    /// The journal task has ended: senders waiting for room, and later ones, are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _g = lock(&self.lock);
        self.freed.notify_all();
    }

    /// Gives back the room of `n` items taken off the channel (or never queued).
    pub fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        if before >= QUEUE_ITEMS {
            let _g = lock(&self.lock);
            self.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_full_channel_makes_the_sender_wait_until_room_is_given() {
        let room = Arc::new(Room::default());
        for _ in 0..QUEUE_ITEMS {
            assert!(room.take());
        }
        let r = Arc::clone(&room);
        let waiter = std::thread::spawn(move || {
            let start = Instant::now();
            assert!(r.take());
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "a sender took room from a full channel");
        room.give(1);
        let waited = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(100));
        assert_eq!(room.queued.load(Ordering::SeqCst), QUEUE_ITEMS);
    }

    #[test]
    fn a_closed_room_refuses_waiting_and_later_senders() {
        let room = Arc::new(Room::default());
        for _ in 0..QUEUE_ITEMS {
            assert!(room.take());
        }
        let r = Arc::clone(&room);
        let waiter = std::thread::spawn(move || r.take());
        std::thread::sleep(Duration::from_millis(50));
        room.close();
        assert!(!waiter.join().unwrap(), "a sender waiting for room is refused once the task ended");
        room.give(1);
        assert!(!room.take(), "and so is a later one");
    }
}
