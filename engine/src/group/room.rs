//! Room on a group's channel. The channel itself is unbounded (crossbeam's list channel, whose
//! memory grows and shrinks with what is queued; a bounded one allocates and touches every slot
//! at once, some 400 KiB per group for 4,096 writes), and this count bounds it: a sender takes
//! room before it queues an item, and waits while [`QUEUE_ITEMS`] are queued, so that a stalled
//! disk pushes back on the agents instead of growing memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::Waker;

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
    /// Tasks that found no room ([`Room::offer`]), woken when some is given back.
    waiting: Mutex<Vec<Waker>>,
}

/// What [`Room::offer`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Room for one item is taken.
    Taken,
    /// None: the waker given is woken once there is.
    Full,
    /// The journal task has ended.
    Closed,
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

    /// Takes room for one item without waiting: a task that finds none is woken by `waiter`
    /// once some is given back (or the room closes), and offers again then.
    pub fn offer(&self, waiter: &Waker) -> Offer {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Offer::Closed;
            }
            if self.queued.fetch_add(1, Ordering::AcqRel) < QUEUE_ITEMS {
                return Offer::Taken;
            }
            self.queued.fetch_sub(1, Ordering::AcqRel);
            lock(&self.waiting).push(waiter.clone());
            // Room given back between the failed take and the registration woke nobody: look
            // again (the waker stays registered; a spare wake-up is harmless).
            if self.queued.load(Ordering::Acquire) >= QUEUE_ITEMS && !self.closed.load(Ordering::Acquire) {
                return Offer::Full;
            }
        }
    }

    /// The journal task has ended: senders waiting for room, and later ones, are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        {
            let _g = lock(&self.lock);
            self.freed.notify_all();
        }
        self.wake_waiting();
    }

    fn wake_waiting(&self) {
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        for w in waiting {
            w.wake();
        }
    }

    /// Gives back the room of `n` items taken off the channel (or never queued).
    pub fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        if before >= QUEUE_ITEMS {
            {
                let _g = lock(&self.lock);
                self.freed.notify_all();
            }
            self.wake_waiting();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_full_channel_makes_the_sender_wait_until_room_is_given() {
        let room = Arc::new(Room::default());
        for _ in 0..QUEUE_ITEMS {
            assert!(room.take());
        }
        let given = Arc::new(AtomicBool::new(false));
        let (r, g) = (Arc::clone(&room), Arc::clone(&given));
        let waiter = std::thread::spawn(move || {
            assert!(r.take());
            g.load(Ordering::SeqCst)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "a sender took room from a full channel");
        given.store(true, Ordering::SeqCst);
        room.give(1);
        assert!(waiter.join().unwrap(), "the sender got room before any was given");
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

    #[test]
    fn a_task_finding_no_room_is_woken_when_room_is_given() {
        use std::sync::atomic::AtomicUsize;

        use hindsight_consistency::tasks::{Next, Pool, Task};

        struct Count(Arc<AtomicUsize>);
        impl Task for Count {
            fn run(&self) -> Next {
                self.0.fetch_add(1, Ordering::SeqCst);
                Next::Idle
            }
        }
        let pool = Pool::new("room-test", 1).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let waker = pool.add("sender", Count(Arc::clone(&runs)));
        let settled = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while runs.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(20));
            runs.load(Ordering::SeqCst)
        };
        let first = settled(1);
        let room = Room::default();
        for _ in 0..QUEUE_ITEMS {
            assert_eq!(room.offer(&waker), Offer::Taken);
        }
        assert_eq!(room.offer(&waker), Offer::Full);
        assert_eq!(settled(first), first, "nobody wakes a task while there is no room");
        room.give(1);
        assert_eq!(settled(first + 1), first + 1, "room given back wakes the task once");
        assert_eq!(room.offer(&waker), Offer::Taken);
        assert_eq!(room.offer(&waker), Offer::Full);
        room.close();
        assert_eq!(settled(first + 2), first + 2, "and so does the end of the journal task");
        assert_eq!(room.offer(&waker), Offer::Closed);
    }
}
