//! A connection whose reading side is a task of a [`Pool`]: woken when its socket has bytes
//! ([`Readiness`]), parked with no thread when it has none.
//!
//! ```text
//!  woken ─▶ ready(burst)? ──no──▶ parking() ─▶ arm the watch ─▶ Idle (or At: a buffer to give back)
//!               │ yes
//!               ▼
//!             step() ─▶ Continue ─▶ Again (the next round waits a moment for a burst)
//!                    ─▶ Wait     ─▶ Idle (whatever it waits for wakes it)
//!                    ─▶ Close    ─▶ end(), the watch goes ─▶ Done
//! ```
//!
//! Right after a step that read something, the next round waits up to [`BURST_WAIT_MS`] for
//! more before it parks, if another thread of the pool is free meanwhile
//! ([`Waker::may_linger`]): during a burst (a sync group's writes one after the other) the next
//! message usually comes within that time, and is read without the wake-ups of parking.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Next, Pool, Readiness, Socket, Task, Waker, Watch};
use crate::sync::lock;

/// How long, in milliseconds, a connection that just read something waits for more before it
/// parks.
pub const BURST_WAIT_MS: u8 = 1;

/// What a step of a connection leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It read and handled something; there may be more.
    Continue,
    /// It waits for something other than its socket (room in a queue, say), which wakes it
    /// through the waker it was given.
    Wait,
    /// The connection ends.
    Close,
}

/// The reading side of one connection.
pub trait Reading: Send + 'static {
    /// True if a step has something to do now: bytes buffered or waiting in the socket, or
    /// work of its own. `burst`: the last step read something, so wait up to
    /// [`BURST_WAIT_MS`] for the socket.
    fn ready(&mut self, burst: bool) -> bool;

    /// Nothing to do: the task is about to park. Returns when to run anyway, if ever (to give
    /// back a grown buffer, say).
    fn parking(&mut self) -> Option<Instant> {
        None
    }

    /// Reads and handles what there is (a bounded amount: others wait for the thread). `me`
    /// wakes this task, for whatever a [`Step::Wait`] waits for.
    fn step(&mut self, me: &Waker) -> Step;

    /// The connection has ended (after [`Step::Close`], or when its socket cannot be
    /// watched): last words, and tidying up.
    fn end(self);
}

struct State<R> {
    conn: R,
    watch: Option<Watch>,
    /// This task's own waker (set once it is added; dropped at the end, so that the task
    /// does not keep itself alive).
    me: Option<Waker>,
    /// The last step read something.
    just_read: bool,
}

struct ReadingTask<R>(Arc<Mutex<Option<State<R>>>>);

impl<R> Clone for ReadingTask<R> {
    fn clone(&self) -> Self {
        ReadingTask(Arc::clone(&self.0))
    }
}

impl<R: Reading> Task for ReadingTask<R> {
    fn run(&self) -> Next {
        let mut guard = lock(&self.0);
        let Some(state) = guard.as_mut() else { return Next::Done };
        let Some(me) = state.me.clone() else {
            // Not started yet: `start` wakes it once the watch is set.
            return Next::Idle;
        };
        let burst = std::mem::take(&mut state.just_read) && me.may_linger();
        if !state.conn.ready(burst) {
            let at = state.conn.parking();
            return match state.watch.as_ref().map(Watch::arm) {
                None | Some(Ok(())) => at.map_or(Next::Idle, Next::At),
                Some(Err(e)) => {
                    log::warn!("cannot watch a connection's socket ({e}); closing it");
                    finish(&mut guard);
                    Next::Done
                }
            };
        }
        match state.conn.step(&me) {
            Step::Continue => {
                state.just_read = true;
                Next::Again
            }
            Step::Wait => Next::Idle,
            Step::Close => {
                finish(&mut guard);
                Next::Done
            }
        }
    }

    /// A step panicked: the connection ends as if it had closed (its socket goes, whoever
    /// waits for its end learns of it).
    fn abandoned(&self) {
        finish(&mut lock(&self.0));
    }
}

fn finish<R: Reading>(state: &mut Option<State<R>>) {
    if let Some(s) = state.take() {
        drop(s.watch);
        drop(s.me);
        s.conn.end();
    }
}

/// Hands a connection to `pool`, woken by bytes on `socket`. Returns its waker. Fails (and the
/// connection has ended) if the socket cannot be watched.
pub fn start_reading<R: Reading>(pool: &Pool, name: &str, socket: Socket, conn: R) -> io::Result<Waker> {
    let task = ReadingTask(Arc::new(Mutex::new(Some(State { conn, watch: None, me: None, just_read: false }))));
    let waker = pool.add(name, task.clone());
    let mut guard = lock(&task.0);
    let watched = Readiness::global().and_then(|r| r.watch(socket, waker.clone()));
    match (guard.as_mut(), watched) {
        (Some(state), Ok(w)) => {
            state.watch = Some(w);
            state.me = Some(waker.clone());
        }
        (_, Err(e)) => {
            finish(&mut guard);
            return Err(e);
        }
        (None, Ok(_)) => {}
    }
    drop(guard);
    waker.wake();
    Ok(waker)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use crossbeam_channel::Sender;

    use super::*;

    /// Reads bytes and passes them on; ends at the end of the stream.
    struct Echo {
        s: Arc<UnixStream>,
        out: Sender<Vec<u8>>,
        ended: Sender<()>,
    }

    impl Reading for Echo {
        fn ready(&mut self, _burst: bool) -> bool {
            let mut one = [0u8; 1];
            matches!(
                nix::sys::socket::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&*self.s),
                    &mut one,
                    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
                ),
                Ok(_) | Err(nix::errno::Errno::ECONNRESET)
            )
        }
        fn step(&mut self, _me: &Waker) -> Step {
            let mut buf = [0u8; 64];
            match (&*self.s).read(&mut buf) {
                Ok(0) | Err(_) => Step::Close,
                Ok(n) => {
                    let _ = self.out.send(buf[..n].to_vec());
                    Step::Continue
                }
            }
        }
        fn end(self) {
            let _ = self.ended.send(());
        }
    }

    #[test]
    fn a_connection_is_woken_by_its_bytes_and_ends_with_its_stream() {
        let pool = Pool::new("reading-test", 2).unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let theirs = Arc::new(theirs);
        let (out, got) = crossbeam_channel::unbounded();
        let (ended, end_seen) = crossbeam_channel::unbounded();
        start_reading(&pool, "echo", Arc::clone(&theirs) as Socket, Echo { s: theirs, out, ended }).unwrap();
        for word in [&b"one"[..], b"two", b"three"] {
            // Parked between the words: each is read only because its bytes woke the task.
            std::thread::sleep(Duration::from_millis(20));
            ours.write_all(word).unwrap();
            assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), word);
        }
        drop(ours);
        end_seen.recv_timeout(Duration::from_secs(5)).expect("the task ends with its stream");
    }
}
