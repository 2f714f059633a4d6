//! Giving freed memory back to the system.
//!
//! The C library's allocator keeps the pages of freed blocks in the middle of its heaps
//! resident: a daemon whose thousands of idle connections and groups gave their buffers back
//! still shows them in its resident size (measured: 1,000 groups, target 75 MiB resident of
//! which 34 MiB freed, engine 90 MiB of which 39 MiB). [`give_back`] returns those pages
//! (`malloc_trim`); the daemons call it every [`TRIM_EVERY`], from a thread that is idle
//! anyway, and it takes a few milliseconds for a heap of a few hundred MiB.

mod sys;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;
use crate::tasks::{Next, Task};

/// How often the freed pages are given back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Returns the pages of freed memory to the system; what it takes is logged when it is long.
pub fn give_back() {
    let started = Instant::now();
    sys::trim();
    let took = started.elapsed();
    if took > Duration::from_millis(20) {
        log::debug!("giving freed memory back took {took:?}");
    }
}

/// Calls [`give_back`] every [`TRIM_EVERY`] from a loop that runs more often.
#[derive(Debug)]
pub struct Trimmer {
    last: Instant,
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer { last: Instant::now() }
    }
}

impl Trimmer {
    /// Gives freed memory back if [`TRIM_EVERY`] has passed since the last time; returns when
    /// it is due next.
    pub fn tick(&mut self) -> Instant {
        if self.last.elapsed() >= TRIM_EVERY {
            give_back();
            self.last = Instant::now();
        }
        self.last + TRIM_EVERY
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
    fn freed_pages_are_given_back_and_the_next_time_is_ten_seconds_on() {
        // A large heap block freed: trimming must not disturb what is still allocated.
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i; 64 << 10]).collect();
        let freed: Vec<Vec<u8>> = (0..64).map(|i| vec![i; 64 << 10]).collect();
        drop(freed);
        let mut t = Trimmer { last: Instant::now() - TRIM_EVERY };
        let next = t.tick();
        assert!(next > Instant::now() + TRIM_EVERY - Duration::from_secs(1));
        assert_eq!(t.tick(), next, "not again before it is due");
        for (i, v) in kept.iter().enumerate() {
            assert!(v.iter().all(|&b| usize::from(b) == i));
        }
    }
}
