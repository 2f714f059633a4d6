//! The writing side of an agent connection: acknowledgements and the session's other frames,
//! in the order they were given, as a task of the engine's link pool woken by its
//! [`Outbox`]. It is the only writer of the socket. An `Error` frame is the last thing sent:
//! the connection is closed after it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Receiver;
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{Next, Pool, Task};
use hindsight_consistency::transport::WriteHalf;
use hindsight_consistency::wire::{write_frame, FrameType};

use crate::acks::{AckTo, Outbox, Outgoing};

/// Most items of the outbox written with one socket write; more wait for the next round, behind
/// the other connections.
const ITEMS_PER_ROUND: usize = 256;

/// An agent that takes nothing for this long is taken as gone (a socket write never holds a
/// thread of the pool longer).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

struct Writer {
    w: WriteHalf,
    rx: Receiver<Outgoing>,
    closed: Arc<AtomicBool>,
    peer: SocketAddr,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

struct WriterTask(Mutex<Option<Writer>>);

impl Task for WriterTask {
    fn run(&self) -> Next {
        let mut state = lock(&self.0);
        let Some(writer) = state.as_mut() else { return Next::Done };
        let next = writer.round();
        if next == Next::Done {
            // What is given later fails at once (the channel's end goes).
            *state = None;
        }
        next
    }
}

/// Starts the writer of an agent connection on `pool`; the outbox returned feeds it.
pub(super) fn start(pool: &Pool, w: WriteHalf, peer: SocketAddr) -> AckTo {
    if let Err(e) = w.set_write_timeout(Some(SEND_TIMEOUT)) {
        log::warn!("agent {peer}: cannot bound the time a write to it takes: {e}");
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let closed = Arc::new(AtomicBool::new(false));
    let writer = Writer { w, rx, closed: Arc::clone(&closed), peer, buf: Vec::new(), scratch: Vec::new() };
    let waker = pool.add(&format!("acks-{peer}"), WriterTask(Mutex::new(Some(writer))));
    Arc::new(Outbox::new(tx, waker, closed))
}

impl Writer {
    /// Writes what is queued, as one socket write.
    fn round(&mut self) -> Next {
        // Read before the queue is looked at: whatever was queued before the session closed
        // is then seen below.
        let closed = self.closed.load(Ordering::Acquire);
        self.buf.clear();
        let mut error = None;
        for out in self.rx.try_iter().take(ITEMS_PER_ROUND) {
            match out {
                Outgoing::Acks(acks) => {
                    for ack in acks {
                        let _ = write_frame(&mut self.buf, FrameType::WriteAck, &ack.encode(), &mut self.scratch);
                    }
                }
                Outgoing::Frame(FrameType::Error, payload) => {
                    error = Some(payload);
                    break;
                }
                Outgoing::Frame(ftype, payload) => {
                    let _ = write_frame(&mut self.buf, ftype, &payload, &mut self.scratch);
                }
            }
        }
        if !self.buf.is_empty() {
            if let Err(e) = self.w.send(&self.buf) {
                log::debug!("agent {}: cannot send acknowledgements: {e}", self.peer);
                self.w.shutdown();
                return Next::Done;
            }
        }
        if let Some(payload) = error {
            self.send_error(&payload);
            return Next::Done;
        }
        if !self.rx.is_empty() {
            return Next::Again;
        }
        // A buffer grown by a burst is not kept by an idle connection.
        if self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
        if closed {
            // The session ended (its reader shut the socket): acknowledgements due later go
            // nowhere.
            return Next::Done;
        }
        Next::Idle
    }

    /// Sends an `Error` frame and closes the connection (the agent reads everything before it).
    fn send_error(&mut self, payload: &[u8]) {
        self.buf.clear();
        let _ = write_frame(&mut self.buf, FrameType::Error, payload, &mut self.scratch);
        if let Err(e) = self.w.send(&self.buf) {
            log::debug!("agent {}: cannot send the refusal: {e}", self.peer);
        }
        self.w.close();
    }
}
