//! A fixed pool of threads that runs many tasks, each a state machine that is woken by events.
//!
//! A daemon serving thousands of groups cannot give each group a thread of its own: the threads
//! and their stacks would grow with the groups, idle or not. Instead each group's work is a
//! [`Task`]; whoever gives it something to do (queues a write, confirms a record, asks it to
//! stop) calls its [`Waker`], and one of the pool's threads runs one round of it.
//!
//! ```text
//!  wake() ──▶ IDLE ─▶ READY ──(ready queue, FIFO)──▶ RUNNING ──▶ Next::Idle     ─▶ IDLE
//!                       ▲                              │  wake()  Next::At(t)   ─▶ IDLE + timer
//!                       └──────── NOTIFIED ◀───────────┘          Next::Again   ─▶ READY (at the back)
//!                                  (run again once the round ends)  Next::Done    ─▶ DONE
//! ```
//!
//! Promises:
//! - a task is run by one thread at a time, never by two at once;
//! - a wake is never lost: a task woken while it runs is run again after the round;
//! - rounds are fair: a task that has more to do returns [`Next::Again`] and goes behind every
//!   task already ready, so a busy task delays another by at most one of its rounds per thread;
//! - a task may be run without having been woken (a timer it no longer needs, a wake that
//!   raced with its round): it must look at its state and return early when it has nothing to do.
//!
//! Two hand-offs save the wake-up of another thread where the caller's thread would only wait
//! next (at 4 KiB QD1 each wake-up of a sleeping thread costs more than the work it hands over):
//! [`Waker::run_here`] runs an idle task's round on the caller's thread at once (a connection
//! that has read a group's writes commits them itself), and [`Waker::wake_next`] runs a task on
//! the current worker right after its round (a commit's acknowledgements go out on the thread
//! that committed them), at most four in a row. Both keep the promises above: the
//! state machine decides who runs a round, never two threads at once.
//!
//! Timers are kept by one timer thread: a task returning [`Next::At`] is woken at that instant
//! (or earlier, by its waker). A panic in a round ends that task (it is logged, the task's
//! [`Task::abandoned`] lets go of what others wait for, and it never runs again); the pool's
//! threads go on.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::sync::lock;
use queue::ReadyQueue;

mod queue;
mod readiness;
mod reading;
pub use readiness::{socket_readable, wait_socket_readable, Readiness, Socket, Watch};
pub use reading::{start_reading, Reading, Step, BURST_WAIT_MS};

/// One group's (or one connection's) work, run a round at a time by the pool.
pub trait Task: Send + Sync + 'static {
    /// Does what there is to do now, without waiting for anything that another task must
    /// provide, and says when to run again.
    fn run(&self) -> Next;

    /// A round panicked and the task will not run again: let go of what others wait for (a
    /// connection's registration, the volumes it attached). Nothing by default.
    fn abandoned(&self) {}
}

/// When a task wants its next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// When it is woken.
    Idle,
    /// At this instant, or when it is woken if that comes first.
    At(Instant),
    /// As soon as possible, behind the tasks already ready (it has more to do).
    Again,
    /// Never: the task is finished and dropped once every waker is gone.
    Done,
}

const IDLE: u8 = 0;
const READY: u8 = 1;
const RUNNING: u8 = 2;
const NOTIFIED: u8 = 3;
const DONE: u8 = 4;

/// A task and its state in the pool.
struct Slot {
    state: AtomicU8,
    /// The earliest instant the timer thread holds for this task, if any: an older entry of
    /// the heap that does not match is stale and wakes nothing.
    timer: Mutex<Option<Instant>>,
    task: Box<dyn Task>,
    name: String,
}

/// What the pool's threads, its timer thread and every waker share.
struct Shared {
    ready: ReadyQueue<Arc<Slot>>,
    timers: Mutex<Timers>,
    /// Signalled when an earlier timer is added or the pool stops.
    timer_added: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<TimerEntry>>,
    /// Breaks ties, so that entries never compare slots.
    next: u64,
}

struct TimerEntry {
    at: Instant,
    order: u64,
    slot: Weak<Slot>,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Wakes one task: it is run by the pool soon (again, if it is running now).
#[derive(Clone)]
pub struct Waker {
    slot: Arc<Slot>,
    shared: Weak<Shared>,
}

impl Waker {
    /// Asks for a round of the task. Cheap when the task is already ready or running.
    pub fn wake(&self) {
        if let Some(shared) = self.shared.upgrade() {
            wake(&shared, &self.slot);
        }
    }

    /// True if this task's round may wait a moment for its next input (a connection's next
    /// message, about to come) instead of parking: another thread of the pool sleeps, free to
    /// run whatever is woken meanwhile. Waiting then saves the two wake-ups of parking (the
    /// readiness thread, then a pool thread) and delays no other task.
    pub fn may_linger(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| s.ready.has_sleeper())
    }

    /// Runs the task's round on this thread now, if it is idle (nobody runs it, nothing has
    /// queued it); otherwise wakes it as [`Waker::wake`] does. For the last hand-off of a
    /// round whose thread would only wait next (a connection that has read a group's writes
    /// and would wait for more commits them itself): the round then costs no wake-up of
    /// another thread. The caller must hold nothing the task's round takes.
    pub fn run_here(&self) {
        let Some(shared) = self.shared.upgrade() else { return };
        if self.slot.state.compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            round(&shared, &self.slot);
        } else {
            wake(&shared, &self.slot);
        }
    }

    /// Wakes the task to run on this thread right after the round it runs now, when this
    /// thread is one of the task's pool (and has not been asked so already); otherwise as
    /// [`Waker::wake`]. For a hand-off at the end of a round (a commit's acknowledgements to
    /// the connection's writer): no other thread is woken for it.
    pub fn wake_next(&self) {
        let Some(shared) = self.shared.upgrade() else { return };
        if !mark_ready(&self.slot) {
            return;
        }
        let pool = Arc::as_ptr(&shared) as usize;
        let kept = WORKER.with(|w| match w.borrow_mut().as_mut() {
            Some(me) if me.pool == pool && me.next.is_none() => {
                me.next = Some(Arc::clone(&self.slot));
                true
            }
            _ => false,
        });
        if !kept {
            shared.ready.push(Arc::clone(&self.slot));
        }
    }

    /// True once the task has returned [`Next::Done`] (or panicked).
    pub fn is_done(&self) -> bool {
        self.slot.state.load(Ordering::Acquire) == DONE
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Waker({})", self.slot.name)
    }
}

fn wake(shared: &Shared, slot: &Arc<Slot>) {
    if mark_ready(slot) {
        // Fails only once the pool has stopped: the task is never run again.
        shared.ready.push(Arc::clone(slot));
    }
}

/// Marks a task woken; true if it was idle and is READY now, so that the caller must queue it.
fn mark_ready(slot: &Slot) -> bool {
    let mut state = slot.state.load(Ordering::Acquire);
    loop {
        let next = match state {
            IDLE => READY,
            RUNNING => NOTIFIED,
            _ => return false,
        };
        match slot.state.compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next == READY,
            Err(now) => state = now,
        }
    }
}

/// What a worker thread knows of itself, for [`Waker::wake_next`].
struct WorkerLocal {
    /// Its pool (the address of the pool's shared state, as an identity).
    pool: usize,
    /// The task to run after the current round.
    next: Option<Arc<Slot>>,
}

thread_local! {
    static WORKER: RefCell<Option<WorkerLocal>> = const { RefCell::new(None) };
}

/// Most tasks a worker runs one after the other through [`Waker::wake_next`] before it
/// looks at the queue again.
const NEXT_CHAIN: usize = 4;

/// A fixed set of threads running tasks; see the module documentation.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `threads` worker threads (at least one) named `name-0`, `name-1`, ... and the
    /// timer thread `name-timer`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            ready: ReadyQueue::new(),
            timers: Mutex::new(Timers::default()),
            timer_added: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let size = threads.max(1);
        let mut handles = Vec::with_capacity(size + 1);
        for i in 0..size {
            let s = Arc::clone(&shared);
            handles.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || worker(&s))?);
        }
        let s = Arc::clone(&shared);
        handles.push(std::thread::Builder::new().name(format!("{name}-timer")).spawn(move || timer_loop(&s))?);
        Ok(Pool { shared, threads: Mutex::new(handles) })
    }

    /// The process's pool kept in `cell`, started with `threads` threads on first use (should
    /// two callers start it at once, one pool is kept and the other stopped).
    pub fn process_wide(cell: &'static OnceLock<Pool>, name: &str, threads: usize) -> std::io::Result<&'static Pool> {
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let p = Pool::new(name, threads)?;
        Ok(cell.get_or_init(|| p))
    }

    /// Adds a task and runs its first round soon. `name` is for the log (a panic names it).
    pub fn add(&self, name: &str, task: impl Task) -> Waker {
        let slot = Arc::new(Slot { state: AtomicU8::new(IDLE), timer: Mutex::new(None), task: Box::new(task), name: name.to_owned() });
        let waker = Waker { slot, shared: Arc::downgrade(&self.shared) };
        waker.wake();
        waker
    }

    /// Stops the threads once their rounds in progress end; tasks not yet run are dropped.
    /// Waits for the threads. Idempotent.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.ready.close();
        {
            let _timers = lock(&self.shared.timers);
            self.shared.timer_added.notify_all();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        let me = std::thread::current().id();
        for t in threads {
            // A task that stops its own pool cannot wait for itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sensible number of workers for tasks that block on the disk (fdatasync) now and then:
/// two per core, at least four, at most sixteen.
pub fn io_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    (cores * 2).clamp(4, 16)
}

fn worker(shared: &Arc<Shared>) {
    WORKER.with(|w| *w.borrow_mut() = Some(WorkerLocal { pool: Arc::as_ptr(shared) as usize, next: None }));
    let take_next = || WORKER.with(|w| w.borrow_mut().as_mut().and_then(|me| me.next.take()));
    // A timeout so that a stop is seen even if no task is ever woken again.
    while !shared.stopping.load(Ordering::SeqCst) {
        let Some(slot) = shared.ready.pop(std::time::Duration::from_millis(200)) else { continue };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        run_round(shared, &slot);
        for _ in 0..NEXT_CHAIN {
            let Some(next) = take_next() else { break };
            run_round(shared, &next);
        }
        if let Some(next) = take_next() {
            shared.ready.push(next);
        }
    }
}

fn run_round(shared: &Arc<Shared>, slot: &Arc<Slot>) {
    if slot.state.compare_exchange(READY, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return;
    }
    round(shared, slot);
}

/// Runs one round of a task this thread has set RUNNING, and settles its state after it.
fn round(shared: &Arc<Shared>, slot: &Arc<Slot>) {
    let next = match catch_unwind(AssertUnwindSafe(|| slot.task.run())) {
        Ok(next) => next,
        Err(_) => {
            log::error!("task {}: panicked; it will not run again", slot.name);
            if catch_unwind(AssertUnwindSafe(|| slot.task.abandoned())).is_err() {
                log::error!("task {}: panicked again while letting go of what it held", slot.name);
            }
            Next::Done
        }
    };
    match next {
        Next::Done => slot.state.store(DONE, Ordering::Release),
        Next::Again => {
            slot.state.store(READY, Ordering::Release);
            shared.ready.push(Arc::clone(slot));
        }
        Next::Idle | Next::At(_) => {
            if let Next::At(at) = next {
                add_timer(shared, slot, at);
            }
            if slot.state.compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // Woken during the round: run again.
                slot.state.store(READY, Ordering::Release);
                shared.ready.push(Arc::clone(slot));
            }
        }
    }
}

fn add_timer(shared: &Shared, slot: &Arc<Slot>, at: Instant) {
    let mut pending = lock(&slot.timer);
    if pending.is_some_and(|p| p <= at) {
        // An earlier (or the same) timer is already set: that round sets the next one.
        return;
    }
    *pending = Some(at);
    drop(pending);
    let mut timers = lock(&shared.timers);
    let order = timers.next;
    timers.next += 1;
    let earliest = timers.heap.peek().is_none_or(|Reverse(e)| at < e.at);
    timers.heap.push(Reverse(TimerEntry { at, order, slot: Arc::downgrade(slot) }));
    if earliest {
        shared.timer_added.notify_one();
    }
}

fn timer_loop(shared: &Arc<Shared>) {
    let mut timers = lock(&shared.timers);
    while !shared.stopping.load(Ordering::SeqCst) {
        let now = Instant::now();
        match timers.heap.peek() {
            Some(Reverse(e)) if e.at <= now => {
                let Some(Reverse(e)) = timers.heap.pop() else { continue };
                let Some(slot) = e.slot.upgrade() else { continue };
                let mut pending = lock(&slot.timer);
                if *pending == Some(e.at) {
                    *pending = None;
                    drop(pending);
                    wake(shared, &slot);
                }
            }
            Some(Reverse(e)) => {
                let wait = e.at - now;
                timers = shared.timer_added.wait_timeout(timers, wait).map_or_else(|p| p.into_inner().0, |(g, _)| g);
            }
            None => timers = shared.timer_added.wait(timers).unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its rounds; `more` rounds return Again, then Idle.
    struct Counter {
        rounds: Arc<AtomicUsize>,
        running: Arc<AtomicBool>,
        more: AtomicUsize,
    }

    impl Task for Counter {
        fn run(&self) -> Next {
            assert!(!self.running.swap(true, Ordering::SeqCst), "a task ran on two threads at once");
            std::thread::sleep(Duration::from_micros(50));
            self.rounds.fetch_add(1, Ordering::SeqCst);
            self.running.store(false, Ordering::SeqCst);
            if self.more.load(Ordering::SeqCst) > 0 {
                self.more.fetch_sub(1, Ordering::SeqCst);
                return Next::Again;
            }
            Next::Idle
        }
    }

    fn counter(more: usize) -> (Counter, Arc<AtomicUsize>) {
        let rounds = Arc::new(AtomicUsize::new(0));
        (Counter { rounds: Arc::clone(&rounds), running: Arc::new(AtomicBool::new(false)), more: AtomicUsize::new(more) }, rounds)
    }

    /// Waits (at most 10 s) until `what` holds.
    pub(super) fn wait_for(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn added_task_runs_once_and_again_rounds_follow() {
        let pool = Pool::new("t", 2).unwrap();
        let (task, rounds) = counter(3);
        let _w = pool.add("c", task);
        wait_for(|| rounds.load(Ordering::SeqCst) == 4);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rounds.load(Ordering::SeqCst), 4, "an idle task is not run again unwoken");
    }

    #[test]
    fn wakes_during_a_round_are_not_lost_and_never_run_a_task_twice_at_once() {
        let pool = Pool::new("t", 4).unwrap();
        let (task, rounds) = counter(0);
        let w = pool.add("c", task);
        wait_for(|| rounds.load(Ordering::SeqCst) == 1);
        for _ in 0..2000 {
            w.wake();
        }
        // Whatever the interleaving, the last wake is followed by a round that began after it.
        let after = rounds.load(Ordering::SeqCst);
        wait_for(|| rounds.load(Ordering::SeqCst) > after);
    }

    #[test]
    fn timer_runs_the_task_at_its_instant() {
        struct Timed {
            start: Instant,
            fired: Mutex<Option<Duration>>,
        }
        impl Task for Arc<Timed> {
            fn run(&self) -> Next {
                let elapsed = self.start.elapsed();
                if elapsed < Duration::from_millis(50) {
                    return Next::At(self.start + Duration::from_millis(50));
                }
                *lock(&self.fired) = Some(elapsed);
                Next::Done
            }
        }
        let pool = Pool::new("t", 1).unwrap();
        let t = Arc::new(Timed { start: Instant::now(), fired: Mutex::new(None) });
        let w = pool.add("timed", Arc::clone(&t));
        wait_for(|| w.is_done());
        let fired = lock(&t.fired).expect("the timer round ran");
        assert!(fired >= Duration::from_millis(50), "woken before its instant: {fired:?}");
    }

    #[test]
    fn a_busy_task_does_not_starve_others_on_one_thread() {
        /// Notes how many rounds the busy task had run when it ran.
        struct Other {
            busy: Arc<AtomicUsize>,
            seen: Arc<Mutex<Option<usize>>>,
        }
        impl Task for Other {
            fn run(&self) -> Next {
                *lock(&self.seen) = Some(self.busy.load(Ordering::SeqCst));
                Next::Done
            }
        }
        let pool = Pool::new("t", 1).unwrap();
        let (busy, busy_rounds) = counter(usize::MAX / 2);
        let _b = pool.add("busy", busy);
        wait_for(|| busy_rounds.load(Ordering::SeqCst) > 10);
        let seen = Arc::new(Mutex::new(None));
        let before = busy_rounds.load(Ordering::SeqCst);
        let o = pool.add("other", Other { busy: Arc::clone(&busy_rounds), seen: Arc::clone(&seen) });
        wait_for(|| o.is_done());
        let at = lock(&seen).expect("the other task ran");
        assert!(at - before <= 2, "the other task waited behind {} busy rounds", at - before);
    }

    #[test]
    fn a_panicking_task_ends_lets_go_of_what_it_held_and_the_pool_goes_on() {
        struct Panics(Arc<AtomicBool>);
        impl Task for Panics {
            fn run(&self) -> Next {
                panic!("on purpose");
            }
            fn abandoned(&self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let pool = Pool::new("t", 1).unwrap();
        let let_go = Arc::new(AtomicBool::new(false));
        let p = pool.add("panics", Panics(Arc::clone(&let_go)));
        wait_for(|| p.is_done());
        assert!(let_go.load(Ordering::SeqCst), "abandoned runs after the panic");
        let (task, rounds) = counter(0);
        let _w = pool.add("c", task);
        wait_for(|| rounds.load(Ordering::SeqCst) == 1);
    }

    /// Notes the threads its rounds ran on; a round waits while `hold` is set.
    #[derive(Default)]
    struct Where {
        threads: Mutex<Vec<std::thread::ThreadId>>,
        hold: AtomicBool,
        /// Woken with [`Waker::wake_next`] at the end of each round, if set.
        then: OnceLock<Waker>,
    }

    impl Task for Arc<Where> {
        fn run(&self) -> Next {
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            lock(&self.threads).push(std::thread::current().id());
            if let Some(w) = self.then.get() {
                w.wake_next();
            }
            Next::Idle
        }
    }

    impl Where {
        fn rounds(&self) -> usize {
            lock(&self.threads).len()
        }
    }

    #[test]
    fn run_here_runs_an_idle_task_on_the_callers_thread_and_only_wakes_a_busy_one() {
        let pool = Pool::new("t", 1).unwrap();
        let t = Arc::new(Where::default());
        let w = pool.add("where", Arc::clone(&t));
        wait_for(|| t.rounds() == 1);
        w.run_here();
        assert_eq!(t.rounds(), 2, "the round ran before run_here returned");
        assert_eq!(lock(&t.threads)[1], std::thread::current().id());

        t.hold.store(true, Ordering::SeqCst);
        w.wake();
        wait_for(|| w.slot.state.load(Ordering::SeqCst) == RUNNING);
        w.run_here();
        assert_eq!(t.rounds(), 2, "a task that runs elsewhere is not run a second time at once");
        t.hold.store(false, Ordering::SeqCst);
        wait_for(|| t.rounds() == 4);
        assert!(lock(&t.threads)[2..].iter().all(|id| *id != std::thread::current().id()), "the pool ran the woken round");
    }

    #[test]
    fn wake_next_runs_the_task_on_the_same_worker_right_after_the_round() {
        let pool = Pool::new("t", 4).unwrap();
        let second = Arc::new(Where::default());
        let first = Arc::new(Where::default());
        let w2 = pool.add("second", Arc::clone(&second));
        wait_for(|| second.rounds() == 1);
        first.then.set(w2.clone()).unwrap();
        let w1 = pool.add("first", Arc::clone(&first));
        for round in 1..=20 {
            wait_for(|| second.rounds() == round + 1);
            assert_eq!(
                lock(&first.threads)[round - 1],
                lock(&second.threads)[round],
                "round {round} of the second task ran on another thread"
            );
            w1.wake();
        }
        wait_for(|| second.rounds() == 22);
        // From a thread that is not one of the pool's, it is an ordinary wake.
        w2.wake_next();
        wait_for(|| second.rounds() == 23);
    }

    #[test]
    fn stop_ends_the_threads() {
        let pool = Pool::new("t", 3).unwrap();
        let (task, _) = counter(1000);
        let _w = pool.add("c", task);
        pool.stop();
        assert!(lock(&pool.threads).is_empty());
    }
}
