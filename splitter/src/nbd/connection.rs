//! Transmission phase of one client connection, as a task of the process's NBD pool.
//!
//! Every connection of the process (the server's, TCP or unix, and the kernel driver's socket
//! pair) is a [`Task`] of one pool of a few threads (`tasks::io_threads()`), woken by
//! `tasks::Readiness` when its socket has bytes. With no request arriving a connection parks
//! and holds no thread, only its small read buffer. A round reads whole requests in order (the
//! rest of a request that has begun to arrive is waited for: clients send whole requests), at
//! most [`ROUND_REQUESTS`] or [`ROUND_BYTES`] of payload, and then goes behind the other
//! connections ready.
//!
//! Reads are answered within the round (the device reads synchronously). Writes, write-zeroes
//! and trims are submitted to the device and answered from their completion, whichever thread
//! runs it, so many writes are in flight at once and their replies may go out of order. Every
//! reply goes through one mutex-protected writer, in a single `write_all`, so replies never
//! interleave on the wire. Completions that run under a [`block::Cork`] (the engine link's
//! acknowledgement reader, while it holds more acknowledgements) add their replies to a buffer
//! sent in one `write_all` when it goes.
//!
//! A per-connection in-flight count bounds how much write data one client can have queued,
//! and lets FLUSH and DISC wait for every write this connection submitted earlier. No wait
//! blocks a pool thread: the request that must wait is kept, the task leaves its waker with the
//! count and parks, and the completion that makes room (or finishes the last write) wakes it.
//!
//! ```text
//!           bytes on the socket (the watch)             room / last write done (a completion)
//!  PARKED ─────────────────────────────────▶ READING ◀───────────────────────────── WAITING
//!    ▲   nothing buffered, the socket empty:    │  a write without room, a FLUSH or the   ▲
//!    └────── held frames sent, watch armed ─────┘  end with writes in flight ────────────┘
//! ```
//!
//! Whatever the device holds back (`submit_held`) is sent whenever no whole request is
//! buffered, before any wait, and at the end of every round. At the end (DISC, EOF, an error)
//! the connection waits for every write it submitted, then closes the socket and runs the
//! `on_end` it was started with.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{self, Next, Pool, Readiness, Task, Waker, Watch};
use hindsight_consistency::transport::elastic::RELEASE_AFTER;
use hindsight_consistency::transport::ElasticReader;
use log::{debug, warn};

use crate::block::{self, BlockDevice, BlockError, Deferred, WriteKind, WriteOp};

use super::error::NbdError;
use super::proto::decode::{self, Request};
use super::proto::encode;
use super::proto::{
    command_name, error_value, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EINVAL, ENOSPC, MAX_BLOCK_SIZE, REQUEST_LEN, SIMPLE_REPLY_LEN,
};
use super::stream::{read_or_eof, ReadSide, Stream};

/// Most requests one connection may have submitted and not yet completed; the connection
/// stops reading requests at this point until one completes. Above the queue depth of common
/// clients (the Linux kernel uses 128, nbdcopy 64, fio what it is told).
pub const MAX_IN_FLIGHT_REQUESTS: usize = 256;

/// Most the request reader's buffer grows to: several small requests arrive in one system
/// call, while large write payloads bypass it. It starts at 16 KiB and shrinks back once the
/// connection is idle (`ElasticReader`).
pub(crate) const REQUEST_READ_BUFFER: usize = 64 * 1024;

/// Most write payload bytes one connection may have submitted and not yet completed.
pub const MAX_IN_FLIGHT_BYTES: u64 = 256 * 1024 * 1024;

/// How long a request that has begun to arrive may go without a byte before the connection
/// is dropped: the rest of a request is read on a thread of the pool, which a client stopping
/// mid-request must not hold for ever.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Most requests one round reads before the connection goes behind the others ready.
const ROUND_REQUESTS: usize = 32;

/// Most write payload bytes one round reads before the connection goes behind the others.
const ROUND_BYTES: u64 = 8 << 20;

/// How long, in milliseconds, a connection whose last request was answered or submitted
/// within its round waits for the next one before it parks (when another pool thread is free
/// meanwhile, [`Waker::may_linger`]): a client that has its reply sends the next request at
/// once, a write's reply comes within a replication round trip, and parking costs two
/// wake-ups (the readiness thread, then a pool thread).
const BURST_WAIT_MS: u8 = 1;

/// How a connection's transmission phase ended.
#[derive(Debug)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket (or the server shut its read side down).
    Closed,
    /// A reply could not be written; the socket has been shut down.
    ReplyFailed,
    /// The client broke the protocol or the socket failed.
    Error(NbdError),
}

/// Runs once a connection has ended: every write it submitted has completed and its socket
/// is closed.
pub type OnEnd = Box<dyn FnOnce(End) + Send>;

struct Writer {
    stream: Arc<Stream>,
    failed: bool,
    /// Replies held back under a [`block::Cork`], and the requests and payload bytes they
    /// finish once sent.
    held: Vec<u8>,
    held_requests: usize,
    held_bytes: u64,
}

impl Writer {
    /// Writes whole replies. After the first failure every later reply is dropped and the
    /// socket is shut down, which also ends the connection's reading.
    fn write(&mut self, bytes: &[u8], peer: &str) {
        if self.failed {
            return;
        }
        if let Err(e) = (&*self.stream).write_all(bytes) {
            self.failed = true;
            warn!("nbd {peer}: writing reply failed: {e}");
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// What the connection's task waits for in the in-flight count.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Room for one more request carrying this many payload bytes.
    Room(u64),
    /// No request in flight.
    Idle,
}

#[derive(Default)]
struct InFlight {
    requests: usize,
    bytes: u64,
    /// The task waiting for the count to change, and for what: only then does a finish wake
    /// anyone, and only once what it waits for holds.
    waiter: Option<(Want, Waker)>,
}

impl InFlight {
    fn holds(&self, want: Want) -> bool {
        match want {
            Want::Room(bytes) => {
                self.requests == 0 || (self.requests < MAX_IN_FLIGHT_REQUESTS && self.bytes + bytes <= MAX_IN_FLIGHT_BYTES)
            }
            Want::Idle => self.requests == 0,
        }
    }
}

/// State shared between the connection's task and its completions.
struct Shared {
    writer: Mutex<Writer>,
    in_flight: Mutex<InFlight>,
    peer: String,
}

impl Shared {
    /// Writes one whole reply (see [`Writer::write`]).
    fn send(&self, bytes: &[u8]) {
        lock(&self.writer).write(bytes, &self.peer);
    }

    /// Sends a completed request's reply (now, or with the others of a cork on this thread),
    /// then counts the request finished.
    fn reply_and_finish(self: &Arc<Self>, reply: &[u8], payload: u64) {
        {
            let mut w = lock(&self.writer);
            let me: Arc<dyn Deferred> = Arc::clone(self) as Arc<dyn Deferred>;
            if !w.failed && block::defer(&me) {
                w.held.extend_from_slice(reply);
                w.held_requests += 1;
                w.held_bytes += payload;
                return;
            }
        }
        self.send(reply);
        self.finish_many(1, payload);
    }

    fn failed(&self) -> bool {
        lock(&self.writer).failed
    }

    /// True if `want` holds now (and then, for room, the request is counted); else `waker` is
    /// woken once it does.
    fn holds_or_wake(&self, want: Want, waker: &Waker) -> bool {
        let mut f = lock(&self.in_flight);
        if !f.holds(want) {
            f.waiter = Some((want, waker.clone()));
            return false;
        }
        f.waiter = None;
        if let Want::Room(bytes) = want {
            f.requests += 1;
            f.bytes += bytes;
        }
        true
    }

    fn finish_many(&self, requests: usize, bytes: u64) {
        let mut f = lock(&self.in_flight);
        f.requests -= requests;
        f.bytes -= bytes;
        let wake = match f.waiter {
            Some((want, _)) if f.holds(want) => f.waiter.take().map(|(_, w)| w),
            _ => None,
        };
        drop(f);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

fn reply_error(e: BlockError) -> u32 {
    error_value(e.errno())
}

/// Checks a request header against the export size and the flags each command accepts.
/// Returns the NBD error to reply with when the request must be refused.
pub fn check(req: &Request, export_size: u64) -> Result<(), u32> {
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised.
    let allowed = match req.command {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    if req.command == CMD_FLUSH {
        return if req.offset == 0 && req.length == 0 { Ok(()) } else { Err(EINVAL) };
    }
    if req.length == 0 {
        return Err(EINVAL);
    }
    // The maximum block size binds requests whose length is a payload. Trim and write-zeroes
    // carry none, so a longer one is accepted: refusing it would only break clients that
    // ignore the advertised maximum for them, as some kernels do.
    if matches!(req.command, CMD_READ | CMD_WRITE) && req.length > MAX_BLOCK_SIZE {
        return Err(EINVAL);
    }
    let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= export_size);
    if !in_range {
        // The spec asks for ENOSPC on writes past the end, EINVAL on reads and trims.
        return Err(match req.command {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        });
    }
    Ok(())
}

/// The threads that run every NBD connection's task in this process.
fn pool() -> io::Result<&'static Pool> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    Pool::process_wide(&POOL, "nbd", tasks::io_threads())
}

/// Serves a connection in its transmission phase as a task of the process's NBD pool, until
/// the client disconnects, breaks the protocol, or the socket fails; then, once every write it
/// submitted has completed, closes the socket and runs `on_end`. `reader` (the socket's) may
/// already hold the first requests. Fails, with the socket closed and `on_end` dropped unrun,
/// if the pool or the watch on the socket cannot be set up.
pub fn start(reader: ElasticReader<ReadSide>, device: Arc<dyn BlockDevice>, peer: &str, on_end: OnEnd) -> io::Result<()> {
    let stream = Arc::clone(reader.get_ref().stream());
    let set_up = stream.set_read_timeout(Some(REQUEST_READ_TIMEOUT)).and_then(|()| Ok((pool()?, Readiness::global()?)));
    let (pool, readiness) = match set_up {
        Ok(p) => p,
        Err(e) => {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let shared = Arc::new(Shared {
        writer: Mutex::new(Writer { stream: Arc::clone(&stream), failed: false, held: Vec::new(), held_requests: 0, held_bytes: 0 }),
        in_flight: Mutex::new(InFlight::default()),
        peer: peer.to_string(),
    });
    let conn = Connection {
        shared,
        size: device.size(),
        device,
        reader,
        read_buf: Vec::new(),
        waiting: None,
        answered: false,
        watch: None,
        waker: None,
        on_end: Some(on_end),
    };
    let task = ConnRef(Arc::new(ConnTask(Mutex::new(Some(conn)))));
    let waker = pool.add(&format!("nbd {peer}"), task.clone());
    let mut state = lock(&task.0 .0);
    if let Some(conn) = state.as_mut() {
        match readiness.watch(Arc::clone(&stream) as tasks::Socket, waker.clone()) {
            Ok(w) => {
                conn.watch = Some(w);
                conn.waker = Some(waker.clone());
            }
            Err(e) => {
                let _ = stream.shutdown(Shutdown::Both);
                *state = None;
                return Err(e);
            }
        }
    }
    drop(state);
    waker.wake();
    Ok(())
}

/// A connection being served; `None` once it has ended.
struct ConnTask(Mutex<Option<Connection>>);

/// The connection's task, shared by the pool and whoever sets it up.
#[derive(Clone)]
struct ConnRef(Arc<ConnTask>);

impl Task for ConnRef {
    fn run(&self) -> Next {
        let mut state = lock(&self.0 .0);
        let Some(conn) = state.as_mut() else { return Next::Done };
        // Not set up yet: `start` wakes it once it is.
        let Some(waker) = conn.waker.clone() else { return Next::Idle };
        match conn.round(&waker) {
            Round::More => Next::Again,
            Round::Wait => Next::Idle,
            Round::Park(at) => at.map_or(Next::Idle, Next::At),
            Round::Ended(end) => {
                if let Some(conn) = state.take() {
                    conn.close(end);
                }
                Next::Done
            }
        }
    }

    /// A round panicked: the connection closes as if it had failed, so that it is no longer
    /// counted and whoever waits for its end (a kernel device's stop) learns of it.
    fn abandoned(&self) {
        if let Some(conn) = lock(&self.0 .0).take() {
            conn.close(End::Error(NbdError::Panicked));
        }
    }
}

/// What a round of the connection leads to.
enum Round {
    /// More requests are there: run again behind the others ready.
    More,
    /// A request waits for requests in flight; a completion wakes the task.
    Wait,
    /// Nothing to read: the watch is armed; run again when it fires, or at this instant to
    /// give idle buffers back.
    Park(Option<Instant>),
    /// Every write submitted has completed: close.
    Ended(End),
}

/// A request whose turn waits for requests in flight.
enum Waiting {
    /// A write, write-zeroes or trim, for room in the in-flight count.
    Submit { req: Request, kind: WriteKind, payload: u64 },
    /// A FLUSH, for every write submitted before it.
    Flush(Request),
    /// The end of the connection, for every write submitted.
    End(End),
}

/// One connection in its transmission phase: what its task owns.
struct Connection {
    shared: Arc<Shared>,
    device: Arc<dyn BlockDevice>,
    size: u64,
    reader: ElasticReader<ReadSide>,
    /// Reply header plus data of the last read; kept to reuse its allocation (given back once
    /// the connection is idle), and never larger than the reply to a read of the maximum
    /// block size.
    read_buf: Vec<u8>,
    /// The request read that waits for its turn; no other is read meanwhile.
    waiting: Option<Waiting>,
    /// The last request was answered or submitted within its round (see [`BURST_WAIT_MS`]).
    answered: bool,
    watch: Option<Watch>,
    waker: Option<Waker>,
    on_end: Option<OnEnd>,
}

impl Connection {
    /// Takes the waiting request's turn if it has come, then reads and serves requests until
    /// none is there, one must wait, the round's share is used, or the connection ends.
    fn round(&mut self, waker: &Waker) -> Round {
        if let Some(waiting) = self.waiting.take() {
            if let Some(round) = self.turn(waiting, waker) {
                return round;
            }
        }
        let (mut requests, mut bytes) = (0, 0);
        loop {
            if !request_ready(self.reader.buffer()) {
                // What follows may wait for the client, or park: nothing may stay held.
                self.device.send_held();
                if self.reader.buffer().is_empty() && !self.client_sends(waker) {
                    return self.park(waker);
                }
            }
            if requests >= ROUND_REQUESTS || bytes >= ROUND_BYTES {
                self.device.send_held();
                return Round::More;
            }
            let waiting = match self.request() {
                Ok(w) => w,
                Err(end) => return self.end(end, waker),
            };
            requests += 1;
            if let Some(waiting) = waiting {
                if let Waiting::Submit { payload, .. } = &waiting {
                    bytes += payload;
                }
                if let Some(round) = self.turn(waiting, waker) {
                    return round;
                }
            }
            if self.shared.failed() {
                return self.end(End::ReplyFailed, waker);
            }
        }
    }

    /// True if the client has sent something (bytes, the end of the stream): right after a
    /// request answered or submitted within the round, once it has had up to
    /// [`BURST_WAIT_MS`] to send the next.
    fn client_sends(&mut self, waker: &Waker) -> bool {
        let stream = self.reader.get_ref().stream();
        if std::mem::take(&mut self.answered) && waker.may_linger() {
            stream.wait_readable(BURST_WAIT_MS)
        } else {
            stream.readable()
        }
    }

    /// Nothing to read: arms the watch (the socket's next bytes wake the task), and gives
    /// back buffers once the connection has been idle for [`RELEASE_AFTER`].
    fn park(&mut self, waker: &Waker) -> Round {
        let mut at = self.reader.park();
        if self.read_buf.capacity() > ElasticReader::<ReadSide>::MIN {
            let since = self.reader.idle_since().unwrap_or_else(Instant::now);
            if since.elapsed() >= RELEASE_AFTER {
                self.read_buf = Vec::new();
            } else {
                let release = since + RELEASE_AFTER;
                at = Some(at.map_or(release, |a| a.min(release)));
            }
        }
        match self.watch.as_ref().map(Watch::arm) {
            None | Some(Ok(())) => Round::Park(at),
            Some(Err(e)) => self.end(End::Error(NbdError::WatchSocket(e)), waker),
        }
    }

    /// Ends the connection once every write it submitted has completed.
    fn end(&mut self, end: End, waker: &Waker) -> Round {
        if self.shared.holds_or_wake(Want::Idle, waker) {
            return Round::Ended(end);
        }
        self.device.send_held();
        self.waiting = Some(Waiting::End(end));
        Round::Wait
    }

    /// Serves a waiting request if its turn has come, and returns `None` (reading goes on);
    /// else keeps it, leaves the waker to be woken when its turn comes, and the round ends
    /// (whatever the device holds is sent first: what is waited for may be among it).
    fn turn(&mut self, waiting: Waiting, waker: &Waker) -> Option<Round> {
        let want = match &waiting {
            Waiting::Submit { payload, .. } => Want::Room(*payload),
            Waiting::Flush(_) | Waiting::End(_) => Want::Idle,
        };
        if !self.shared.holds_or_wake(want, waker) {
            self.device.send_held();
            self.waiting = Some(waiting);
            return Some(Round::Wait);
        }
        match waiting {
            Waiting::Submit { req, kind, payload } => self.submit(&req, kind, payload),
            Waiting::Flush(req) => self.flush(&req),
            Waiting::End(end) => return Some(Round::Ended(end)),
        }
        None
    }

    /// Closes the socket (every write submitted has completed) and runs `on_end`.
    fn close(mut self, end: End) {
        let _ = self.reader.get_ref().stream().shutdown(Shutdown::Both);
        drop(self.watch.take());
        lock(&self.shared.in_flight).waiter = None;
        if let Some(on_end) = self.on_end.take() {
            on_end(end);
        }
    }

    /// Reads one request and serves it if it can be now (reads, refusals); returns what waits
    /// for its turn (writes, FLUSH, DISC), or the end of the connection.
    fn request(&mut self) -> Result<Option<Waiting>, End> {
        let mut header = [0u8; REQUEST_LEN];
        match read_or_eof(&mut self.reader, &mut header) {
            Ok(true) => {}
            Ok(false) => return Err(End::Closed),
            Err(e) if self.shared.failed() => {
                debug!("nbd {}: reading ends after reply failure: {e}", self.shared.peer);
                return Err(End::ReplyFailed);
            }
            Err(e) => return Err(End::Error(NbdError::ReadRequest(stalled(e)))),
        }
        let req = decode::request(&header).map_err(|e| End::Error(NbdError::RequestProtocol(e)))?;
        match req.command {
            CMD_DISC => return Err(End::Disconnect),
            CMD_READ => self.read(&req),
            CMD_WRITE => return self.write(req).map_err(End::Error),
            CMD_WRITE_ZEROES | CMD_TRIM => return Ok(self.zero_or_trim(req)),
            CMD_FLUSH => match check(&req, self.size) {
                Ok(()) => return Ok(Some(Waiting::Flush(req))),
                Err(error) => self.refuse(&req, error),
            },
            _ => {
                warn!("nbd {}: unknown command {} (flags {:#x})", self.shared.peer, req.command, req.flags);
                self.shared.send(&encode::simple_reply(EINVAL, req.handle));
            }
        }
        self.answered = true;
        Ok(None)
    }

    fn refuse(&self, req: &Request, error: u32) {
        debug!(
            "nbd {}: {} offset {} length {} flags {:#x} refused with error {error}",
            self.shared.peer,
            command_name(req.command),
            req.offset,
            req.length,
            req.flags
        );
        self.shared.send(&encode::simple_reply(error, req.handle));
    }

    fn read(&mut self, req: &Request) {
        if let Err(error) = check(req, self.size) {
            return self.refuse(req, error);
        }
        // check() bounds the length by MAX_BLOCK_SIZE.
        let total = SIMPLE_REPLY_LEN + req.length as usize;
        if self.read_buf.len() < total {
            self.read_buf.resize(total, 0);
        }
        let buf = &mut self.read_buf[..total];
        match self.device.read(req.offset, &mut buf[SIMPLE_REPLY_LEN..]) {
            Ok(()) => {
                buf[..SIMPLE_REPLY_LEN].copy_from_slice(&encode::simple_reply(0, req.handle));
                self.shared.send(buf);
            }
            Err(e) => {
                warn!("nbd {}: read at {} length {} failed: {e}", self.shared.peer, req.offset, req.length);
                // Simple replies carry no data after an error.
                self.shared.send(&encode::simple_reply(reply_error(e), req.handle));
            }
        }
    }

    /// Reads a WRITE's payload; returns the write to submit, or `None` if it was refused.
    fn write(&mut self, req: Request) -> Result<Option<Waiting>, NbdError> {
        let len = u64::from(req.length);
        if req.length > MAX_BLOCK_SIZE {
            // The payload follows whatever we answer; skip it through a fixed-size buffer so
            // the next request header is found where it belongs.
            let skipped = io::copy(&mut (&mut self.reader).take(len), &mut io::sink()).map_err(|e| NbdError::ReadRequest(stalled(e)))?;
            if skipped != len {
                return Err(NbdError::ReadRequest(io::ErrorKind::UnexpectedEof.into()));
            }
            warn!("nbd {}: WRITE of {} bytes is over the {MAX_BLOCK_SIZE}-byte maximum", self.shared.peer, req.length);
            self.shared.send(&encode::simple_reply(EINVAL, req.handle));
            self.answered = true;
            return Ok(None);
        }
        // Bounded by MAX_BLOCK_SIZE just above.
        let mut data = Vec::new();
        hindsight_consistency::wire::read_exact_to_vec(&mut self.reader, req.length as usize, &mut data)
            .map_err(|e| NbdError::ReadRequest(stalled(e)))?;
        if let Err(error) = check(&req, self.size) {
            self.refuse(&req, error);
            self.answered = true;
            return Ok(None);
        }
        Ok(Some(Waiting::Submit { req, kind: WriteKind::Data(data), payload: len }))
    }

    fn zero_or_trim(&mut self, req: Request) -> Option<Waiting> {
        if let Err(error) = check(&req, self.size) {
            self.refuse(&req, error);
            self.answered = true;
            return None;
        }
        // NBD_CMD_FLAG_NO_HOLE needs nothing: the device writes zeroes, it does not punch.
        let kind = if req.command == CMD_TRIM { WriteKind::Trim { len: req.length } } else { WriteKind::Zeroes { len: req.length } };
        Some(Waiting::Submit { req, kind, payload: 0 })
    }

    /// Submits a data-modifying request, already counted in flight; its completion sends the
    /// reply. A write may be held back by the device, to go with the next ones, when the next
    /// request is already here.
    fn submit(&mut self, req: &Request, kind: WriteKind, payload: u64) {
        let more = matches!(kind, WriteKind::Data(_)) && request_ready(self.reader.buffer());
        let shared = Arc::clone(&self.shared);
        let handle = req.handle;
        let (offset, length, command) = (req.offset, req.length, req.command);
        let op = WriteOp { offset, kind, fua: req.flags & CMD_FLAG_FUA != 0 };
        // The completion may run on this thread before submit returns: no lock is held here.
        let submit = if more { BlockDevice::submit_held } else { BlockDevice::submit };
        self.answered = true;
        submit(
            &*self.device,
            op,
            Box::new(move |result| {
                let error = match result {
                    Ok(()) => 0,
                    Err(e) => {
                        warn!("nbd {}: {} at {offset} length {length} failed: {e}", shared.peer, command_name(command));
                        reply_error(e)
                    }
                };
                // Counted down only after the reply is out, so that FLUSH and DISC, which
                // wait for the count to reach zero, come after these replies.
                shared.reply_and_finish(&encode::simple_reply(error, handle), payload);
            }),
        );
    }

    /// Flushes the device (every write this connection submitted before the flush has
    /// completed: the device flush covers completed writes) and replies.
    fn flush(&mut self, req: &Request) {
        let error = match self.device.flush() {
            Ok(()) => 0,
            Err(e) => {
                warn!("nbd {}: flush failed: {e}", self.shared.peer);
                reply_error(e)
            }
        };
        self.shared.send(&encode::simple_reply(error, req.handle));
        self.answered = true;
    }
}

/// A read that timed out mid-request, said as such.
fn stalled(e: io::Error) -> io::Error {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        io::Error::new(io::ErrorKind::TimedOut, format!("the client sent part of a request and nothing more for {REQUEST_READ_TIMEOUT:?}"))
    } else {
        e
    }
}

impl Deferred for Shared {
    fn send_deferred(&self) {
        let (requests, bytes) = {
            let mut w = lock(&self.writer);
            let held = std::mem::take(&mut w.held);
            if !held.is_empty() {
                w.write(&held, &self.peer);
            }
            // Keeps the buffer for the next batch.
            w.held = held;
            w.held.clear();
            (std::mem::take(&mut w.held_requests), std::mem::take(&mut w.held_bytes))
        };
        self.finish_many(requests, bytes);
    }
}

/// True if `buf` starts with a whole request, payload included (or with bytes that cannot
/// start one, which the next read reports): reading it will not wait for the client.
fn request_ready(buf: &[u8]) -> bool {
    let Some(header) = buf.get(..REQUEST_LEN) else { return false };
    match decode::request(header) {
        Ok(req) if req.command == CMD_WRITE => buf.len() >= REQUEST_LEN + req.length as usize,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO};
    use super::*;

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, command, handle: 1, offset, length }
    }

    const SIZE: u64 = 1 << 20;

    fn request_bytes(command: u16, length: u32) -> Vec<u8> {
        let mut b = super::super::proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b
    }

    /// A request from `handle`, as the kernel driver sends it on its socket pair.
    fn request_to(command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut b = super::super::proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b
    }

    /// Reads one simple reply header: (error, handle).
    fn reply_from(s: &mut std::os::unix::net::UnixStream) -> (u32, u64) {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[..4], super::super::proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (u32::from_be_bytes(b[4..8].try_into().unwrap()), u64::from_be_bytes(b[8..].try_into().unwrap()))
    }

    #[test]
    fn a_socket_pair_without_handshake_is_served_until_disc_then_reports_its_end() {
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
        let mode = crate::file_device::CompletionMode::Deferred { max_delay: Duration::from_millis(5) };
        let device: Arc<dyn BlockDevice> = Arc::new(crate::file_device::FileDevice::open(&img, mode).unwrap());
        let (ours, mut kernel) = UnixStream::pair().unwrap();
        kernel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ours = Arc::new(Stream::Unix(ours));
        let (ended_tx, ended) = crossbeam_channel::bounded(1);
        let reader = ElasticReader::new(ReadSide::new(ours), REQUEST_READ_BUFFER);
        start(reader, device, "pair", Box::new(move |end| ended_tx.send(end).unwrap())).unwrap();
        // Writes in flight, then a DISC: every write is answered before the socket closes.
        for h in 0..16u64 {
            kernel.write_all(&request_to(CMD_WRITE, h, h * 512, 512)).unwrap();
            kernel.write_all(&[u8::try_from(h).unwrap(); 512]).unwrap();
        }
        let mut handles: Vec<u64> =
            (0..16).map(|_| reply_from(&mut kernel)).map(|(e, h)| if e == 0 { h } else { panic!("error {e}") }).collect();
        handles.sort_unstable();
        assert_eq!(handles, (0..16).collect::<Vec<_>>());
        kernel.write_all(&request_to(CMD_READ, 99, 15 * 512, 512)).unwrap();
        assert_eq!(reply_from(&mut kernel), (0, 99));
        let mut data = [0u8; 512];
        kernel.read_exact(&mut data).unwrap();
        assert_eq!(data, [15u8; 512]);
        for h in 100..108u64 {
            kernel.write_all(&request_to(CMD_WRITE, h, 0, 512)).unwrap();
            kernel.write_all(&[0xaa; 512]).unwrap();
        }
        kernel.write_all(&request_to(CMD_DISC, 0, 0, 0)).unwrap();
        for _ in 100..108 {
            assert_eq!(reply_from(&mut kernel).0, 0);
        }
        assert!(matches!(ended.recv_timeout(Duration::from_secs(10)), Ok(End::Disconnect)));
        assert_eq!(kernel.read(&mut data).unwrap(), 0, "the socket is closed once the connection has ended");
    }

    #[test]
    fn a_request_is_ready_only_when_whole_in_the_buffer() {
        let mut write = request_bytes(CMD_WRITE, 4096);
        assert!(!request_ready(&write[..REQUEST_LEN - 1]), "part of a header");
        assert!(!request_ready(&write), "a write without its payload");
        write.extend_from_slice(&[1; 4095]);
        assert!(!request_ready(&write), "a write without all its payload");
        write.push(1);
        assert!(request_ready(&write));
        assert!(request_ready(&request_bytes(CMD_READ, 4096)), "a read has no payload");
        assert!(request_ready(&[0xff; REQUEST_LEN]), "garbage: the next read reports it at once");
    }

    #[test]
    fn requests_inside_the_export_pass() {
        assert_eq!(check(&req(CMD_READ, 0, 0, 4096), SIZE), Ok(()));
        assert_eq!(check(&req(CMD_WRITE, CMD_FLAG_FUA, SIZE - 1, 1), SIZE), Ok(()));
        assert_eq!(check(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), SIZE), Ok(()));
        assert_eq!(check(&req(CMD_TRIM, 0, 512, 512), SIZE), Ok(()));
        assert_eq!(check(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), SIZE), Ok(()));
    }

    #[test]
    fn requests_past_the_end_fail_enospc_for_writes_einval_otherwise() {
        assert_eq!(check(&req(CMD_READ, 0, SIZE, 1), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_TRIM, 0, SIZE - 1, 2), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_WRITE, 0, SIZE - 1, 2), SIZE), Err(ENOSPC));
        assert_eq!(check(&req(CMD_WRITE_ZEROES, 0, SIZE, 1), SIZE), Err(ENOSPC));
    }

    #[test]
    fn offset_plus_length_overflow_is_out_of_range() {
        assert_eq!(check(&req(CMD_READ, 0, u64::MAX, 2), u64::MAX), Err(EINVAL));
        assert_eq!(check(&req(CMD_WRITE, 0, u64::MAX - 1, 4), u64::MAX), Err(ENOSPC));
    }

    #[test]
    fn zero_length_and_oversized_payloads_are_invalid() {
        for c in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(check(&req(c, 0, 0, 0), SIZE), Err(EINVAL));
        }
        let big = u64::from(MAX_BLOCK_SIZE) * 4;
        assert_eq!(check(&req(CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1), big), Err(EINVAL));
        assert_eq!(check(&req(CMD_WRITE, 0, 0, MAX_BLOCK_SIZE + 1), big), Err(EINVAL));
        assert_eq!(check(&req(CMD_READ, 0, 0, MAX_BLOCK_SIZE), big), Ok(()));
        // No payload: a long trim or write-zeroes is accepted.
        assert_eq!(check(&req(CMD_TRIM, 0, 0, MAX_BLOCK_SIZE * 2), big), Ok(()));
        assert_eq!(check(&req(CMD_WRITE_ZEROES, 0, 0, MAX_BLOCK_SIZE * 2), big), Ok(()));
    }

    #[test]
    fn unknown_commands_and_flags_are_invalid() {
        assert_eq!(check(&req(CMD_CACHE, 0, 0, 512), SIZE), Err(EINVAL));
        assert_eq!(check(&req(99, 0, 0, 512), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_READ, CMD_FLAG_DF, 0, 512), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_READ, 1 << 15, 0, 512), SIZE), Err(EINVAL));
    }

    #[test]
    fn flush_with_offset_or_length_is_invalid() {
        assert_eq!(check(&req(CMD_FLUSH, 0, 1, 0), SIZE), Err(EINVAL));
        assert_eq!(check(&req(CMD_FLUSH, 0, 0, 1), SIZE), Err(EINVAL));
    }
}
