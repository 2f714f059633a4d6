//! The pool's queue of ready tasks: first in, first out, and a worker with nothing to run
//! sleeps on a condition variable.
//!
//! Not a crossbeam channel: its receive spins and then calls `sched_yield` several times
//! before it sleeps, on every receive that finds the queue empty. A pool's worker finds it
//! empty after nearly every round when writes come one at a time, and with sixteen such
//! workers on two vCPUs the yields took a third of the engine's CPU at 4 KiB QD1
//! (docs/benchmarks.md, 2026-12-05). Here a worker sleeps at once, and a push wakes one only
//! when one sleeps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::sync::lock;

pub(super) struct ReadyQueue<T> {
    inner: Mutex<Inner<T>>,
    /// Signalled when an item is pushed while a worker sleeps, and when the pool stops.
    pushed: Condvar,
    /// How many workers sleep in [`ReadyQueue::pop`]; changed only under the lock, read
    /// without it by [`ReadyQueue::has_sleeper`].
    sleepers: AtomicUsize,
}

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> ReadyQueue<T> {
    pub(super) fn new() -> ReadyQueue<T> {
        ReadyQueue {
            inner: Mutex::new(Inner { items: VecDeque::new(), closed: false }),
            pushed: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        }
    }

    /// Adds an item at the back; false (and the item dropped) once the queue is closed.
    pub(super) fn push(&self, item: T) -> bool {
        let mut g = lock(&self.inner);
        if g.closed {
            return false;
        }
        g.items.push_back(item);
        let wake = self.sleepers.load(Ordering::Relaxed) > 0;
        drop(g);
        if wake {
            self.pushed.notify_one();
        }
        true
    }

    /// The oldest item, waiting up to `patience` for one; `None` when none came or the queue
    /// is closed.
    pub(super) fn pop(&self, patience: Duration) -> Option<T> {
        let mut g = lock(&self.inner);
        if let Some(item) = g.items.pop_front() {
            return Some(item);
        }
        if g.closed {
            return None;
        }
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        let (mut g, _) = self.pushed.wait_timeout(g, patience).unwrap_or_else(std::sync::PoisonError::into_inner);
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        if g.closed {
            return None;
        }
        g.items.pop_front()
    }

    /// True if a worker sleeps with nothing to run (a moment ago): one is free for a task
    /// woken now.
    pub(super) fn has_sleeper(&self) -> bool {
        self.sleepers.load(Ordering::Relaxed) > 0
    }

    /// Refuses further items and wakes every sleeping worker; what is queued is dropped.
    pub(super) fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.items.clear();
        drop(g);
        self.pushed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn items_come_out_in_order_and_a_push_wakes_a_sleeper() {
        let q = Arc::new(ReadyQueue::new());
        assert!(q.push(1) && q.push(2));
        assert_eq!((q.pop(Duration::ZERO), q.pop(Duration::ZERO)), (Some(1), Some(2)));
        assert_eq!(q.pop(Duration::from_millis(10)), None, "nothing queued: the wait ends empty");
        let q2 = Arc::clone(&q);
        let sleeper = std::thread::spawn(move || q2.pop(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        assert!(q.push(3));
        assert_eq!(sleeper.join().unwrap(), Some(3));
        assert!(start.elapsed() < Duration::from_secs(5), "the push woke the sleeping worker");
    }

    #[test]
    fn close_wakes_the_sleepers_and_refuses_more() {
        let q = Arc::new(ReadyQueue::<u32>::new());
        let q2 = Arc::clone(&q);
        let sleeper = std::thread::spawn(move || q2.pop(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(sleeper.join().unwrap(), None);
        assert!(!q.push(1), "a closed queue takes nothing");
    }
}
