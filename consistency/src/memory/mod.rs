//! Giving freed memory back to the system.
//!
//! The C library's allocator keeps the pages of freed blocks in the middle of its heaps
//! resident: a daemon whose thousands of idle connections and groups gave their buffers back
//! still shows them in its resident size (measured: 1,000 groups, target 75 MiB resident of
//! which 34 MiB freed, engine 90 MiB of which 39 MiB). [`give_back`] returns those pages
//! (`malloc_trim`); the daemons call it from a thread that is idle anyway, a second after
//! something gave its buffers back ([`note_freed`]: a group or a connection gone idle; busy
//! ones keep theirs, so a steady load trims nothing) and every [`TRIM_EVERY`] besides. It takes
//! a few milliseconds for a heap of a few hundred MiB.

mod sys;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;
use crate::tasks::{Next, Task};

/// How often the freed pages are given back in any case.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The shortest time between two trims, and how often a [`TrimTask`] looks.
pub const TRIM_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Something gave buffers back since the last trim.
static FREED: AtomicBool = AtomicBool::new(false);

/// Says that buffers were given back (an idle connection's, an idle journal's): the next
/// trim comes within [`TRIM_AT_MOST_EVERY`].
pub fn note_freed() {
    FREED.store(true, Ordering::Relaxed);
}

/// Returns the pages of freed memory to the system; what it takes is logged when it is long.
pub fn give_back() {
    let started = Instant::now();
    sys::trim();
    let took = started.elapsed();
    if took > Duration::from_millis(20) {
        log::debug!("giving freed memory back took {took:?}");
    }
}

/// Calls [`give_back`] from a loop that runs about every second: after [`note_freed`], and
/// every [`TRIM_EVERY`].
#[derive(Debug)]
pub struct Trimmer {
    last: Instant,
    /// What [`note_freed`] sets (the tests have their own).
    freed: &'static AtomicBool,
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer { last: Instant::now(), freed: &FREED }
    }
}

impl Trimmer {
    /// Gives freed memory back if buffers were given back since the last time, or
    /// [`TRIM_EVERY`] has passed; returns when to look next.
    pub fn tick(&mut self) -> Instant {
        let since = self.last.elapsed();
        if since >= TRIM_EVERY || (since >= TRIM_AT_MOST_EVERY && self.freed.swap(false, Ordering::Relaxed)) {
            give_back();
            self.last = Instant::now();
        }
        Instant::now() + TRIM_AT_MOST_EVERY
    }
}

/// A pool's task that gives freed memory back every [`TRIM_EVERY`].
#[derive(Debug, Default)]
pub struct TrimTask(Mutex<Trimmer>);

impl Task for TrimTask {
    fn run(&self) -> Next {
        Next::At(lock(&self.0).tick())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_freed_buffers_at_most_once_a_second_and_keeps_what_is_allocated() {
        // Heap blocks freed: trimming must not disturb what is still allocated.
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i; 64 << 10]).collect();
        let freed: Vec<Vec<u8>> = (0..64).map(|i| vec![i; 64 << 10]).collect();
        drop(freed);
        static OURS: AtomicBool = AtomicBool::new(false);
        let just_now = Instant::now();
        let mut t = Trimmer { last: just_now, freed: &OURS };
        OURS.store(true, Ordering::Relaxed);
        t.tick();
        assert_eq!(t.last, just_now, "not twice within a second");
        t.last = Instant::now() - TRIM_AT_MOST_EVERY;
        let before = t.last;
        t.tick();
        assert!(t.last > before, "buffers freed: trimmed once a second has passed");
        let after = t.last;
        t.last = Instant::now() - TRIM_AT_MOST_EVERY;
        let before = t.last;
        t.tick();
        assert_eq!(t.last, before, "nothing freed since: no trim before TRIM_EVERY");
        t.last = Instant::now() - TRIM_EVERY;
        t.tick();
        assert!(t.last > after, "and one every TRIM_EVERY in any case");
        for (i, v) in kept.iter().enumerate() {
            assert!(v.iter().all(|&b| usize::from(b) == i));
        }
    }
}
