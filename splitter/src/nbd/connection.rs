//! Transmission phase of one client connection.
//!
//! One thread reads requests in order. Reads are answered from that thread (the device reads
//! synchronously). Writes, write-zeroes and trims are submitted to the device and answered
//! from their completion, whichever thread runs it, so many writes are in flight at once and
//! their replies may go out of order. Every reply goes through one mutex-protected writer,
//! in a single `write_all`, so replies never interleave on the wire. Completions that run
//! under a [`block::Cork`] (the engine link's acknowledgement reader, while it holds more
//! acknowledgements) add their replies to a buffer sent in one `write_all` when it goes.
//!
//! A per-connection in-flight count lets FLUSH and DISC wait for every write this connection
//! submitted earlier, and bounds how much write data one client can have queued.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};

use hindsight_consistency::sync::lock;
use log::{debug, warn};

use crate::block::{self, BlockDevice, BlockError, Deferred, WriteKind, WriteOp};

use super::error::NbdError;
use super::proto::decode::{self, Request};
use super::proto::encode;
use super::proto::{
    command_name, error_value, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EINVAL, ENOSPC, MAX_BLOCK_SIZE, REQUEST_LEN, SIMPLE_REPLY_LEN,
};
use super::stream::{read_or_eof, Stream};

/// Most requests one connection may have submitted and not yet completed; the reader stops
/// reading requests at this point until one completes. Above the queue depth of common
/// clients (the Linux kernel uses 128, nbdcopy 64, fio what it is told).
pub const MAX_IN_FLIGHT_REQUESTS: usize = 256;

/// Buffer of the request reader: several small requests arrive in one system call, while
/// large write payloads bypass it.
pub(crate) const REQUEST_READ_BUFFER: usize = 64 * 1024;

/// Most write payload bytes one connection may have submitted and not yet completed.
pub const MAX_IN_FLIGHT_BYTES: u64 = 256 * 1024 * 1024;

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

struct Writer {
    stream: Stream,
    failed: bool,
    /// Replies held back under a [`block::Cork`], and the requests and payload bytes they
    /// finish once sent.
    held: Vec<u8>,
    held_requests: usize,
    held_bytes: u64,
}

impl Writer {
    /// Writes whole replies. After the first failure every later reply is dropped and the
    /// socket is shut down, which also ends the reader blocked on it.
    fn write(&mut self, bytes: &[u8], peer: &str) {
        if self.failed {
            return;
        }
        if let Err(e) = self.stream.write_all(bytes) {
            self.failed = true;
            warn!("nbd {peer}: writing reply failed: {e}");
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct InFlight {
    requests: usize,
    bytes: u64,
    /// Threads waiting for a request to finish: only then does a finish wake anyone (a
    /// wake-up is a system call per request otherwise).
    waiting: usize,
}

/// State shared between the reader thread and the completions of one connection.
struct Shared {
    writer: Mutex<Writer>,
    in_flight: Mutex<InFlight>,
    changed: Condvar,
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

    /// Waits for room for one more request carrying `bytes` of payload, then counts it.
    /// `before_waiting` runs first if it has to wait (what the device holds must go out, or
    /// the requests it waits for may never complete).
    fn begin(&self, bytes: u64, before_waiting: impl Fn()) {
        let mut f = lock(&self.in_flight);
        let full = |f: &InFlight| f.requests > 0 && (f.requests >= MAX_IN_FLIGHT_REQUESTS || f.bytes + bytes > MAX_IN_FLIGHT_BYTES);
        if full(&f) {
            drop(f);
            before_waiting();
            f = lock(&self.in_flight);
        }
        while full(&f) {
            f.waiting += 1;
            f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
            f.waiting -= 1;
        }
        f.requests += 1;
        f.bytes += bytes;
    }

    fn finish_many(&self, requests: usize, bytes: u64) {
        let mut f = lock(&self.in_flight);
        f.requests -= requests;
        f.bytes -= bytes;
        let wake = f.waiting > 0;
        drop(f);
        if wake {
            self.changed.notify_all();
        }
    }

    /// Waits until every submitted request has completed and its reply has been written.
    fn wait_idle(&self) {
        let mut f = lock(&self.in_flight);
        while f.requests > 0 {
            f.waiting += 1;
            f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
            f.waiting -= 1;
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

/// Serves requests until the client disconnects, breaks the protocol, or the socket fails.
/// Returns only once every write this connection submitted has completed.
pub fn serve<S: Read>(reader: &mut BufReader<S>, writer: Stream, device: &Arc<dyn BlockDevice>, peer: &str) -> End {
    let shared = Arc::new(Shared {
        writer: Mutex::new(Writer { stream: writer, failed: false, held: Vec::new(), held_requests: 0, held_bytes: 0 }),
        in_flight: Mutex::new(InFlight::default()),
        changed: Condvar::new(),
        peer: peer.to_string(),
    });
    let end = Transmission { device, shared: &shared, read_buf: Vec::new() }.run(reader);
    // Completions still running hold `shared`; let them deliver their replies (the spec
    // wants outstanding requests handled before the connection closes).
    device.send_held();
    shared.wait_idle();
    // Close now rather than when the last handle to the socket is dropped.
    let _ = lock(&shared.writer).stream.shutdown(Shutdown::Both);
    end
}

struct Transmission<'a> {
    device: &'a Arc<dyn BlockDevice>,
    shared: &'a Arc<Shared>,
    /// Reply header plus data of the last read; kept to reuse its allocation, and never
    /// larger than the reply to a read of the maximum block size.
    read_buf: Vec<u8>,
}

impl Transmission<'_> {
    fn run<S: Read>(&mut self, reader: &mut BufReader<S>) -> End {
        let size = self.device.size();
        let mut header = [0u8; REQUEST_LEN];
        loop {
            if !request_ready(reader.buffer()) {
                // The read below may wait for the client: nothing may stay held meanwhile.
                self.device.send_held();
            }
            match read_or_eof(reader, &mut header) {
                Ok(true) => {}
                Ok(false) => return End::Closed,
                Err(e) if self.shared.failed() => {
                    debug!("nbd {}: reader ends after reply failure: {e}", self.shared.peer);
                    return End::ReplyFailed;
                }
                Err(e) => return End::Error(NbdError::ReadRequest(e)),
            }
            let req = match decode::request(&header) {
                Ok(r) => r,
                Err(e) => return End::Error(NbdError::RequestProtocol(e)),
            };
            let result = match req.command {
                CMD_DISC => return End::Disconnect,
                CMD_READ => {
                    self.read(&req, size);
                    Ok(())
                }
                CMD_WRITE => self.write(reader, req, size),
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    self.zero_or_trim(&req, size);
                    Ok(())
                }
                CMD_FLUSH => {
                    self.flush(&req, size);
                    Ok(())
                }
                _ => {
                    warn!("nbd {}: unknown command {} (flags {:#x})", self.shared.peer, req.command, req.flags);
                    self.shared.send(&encode::simple_reply(EINVAL, req.handle));
                    Ok(())
                }
            };
            if let Err(e) = result {
                return End::Error(e);
            }
            if self.shared.failed() {
                return End::ReplyFailed;
            }
        }
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

    fn read(&mut self, req: &Request, size: u64) {
        if let Err(error) = check(req, size) {
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

    fn write<S: Read>(&mut self, reader: &mut BufReader<S>, req: Request, size: u64) -> Result<(), NbdError> {
        let len = u64::from(req.length);
        if req.length > MAX_BLOCK_SIZE {
            // The payload follows whatever we answer; skip it through a fixed-size buffer so
            // the next request header is found where it belongs.
            let skipped = io::copy(&mut reader.by_ref().take(len), &mut io::sink()).map_err(NbdError::ReadRequest)?;
            if skipped != len {
                return Err(NbdError::ReadRequest(io::ErrorKind::UnexpectedEof.into()));
            }
            warn!("nbd {}: WRITE of {} bytes is over the {MAX_BLOCK_SIZE}-byte maximum", self.shared.peer, req.length);
            self.shared.send(&encode::simple_reply(EINVAL, req.handle));
            return Ok(());
        }
        // Bounded by MAX_BLOCK_SIZE just above.
        let mut data = Vec::new();
        hindsight_consistency::wire::read_exact_to_vec(reader, req.length as usize, &mut data).map_err(NbdError::ReadRequest)?;
        if let Err(error) = check(&req, size) {
            self.refuse(&req, error);
            return Ok(());
        }
        // The next request already here: this write's frame to the engine may go with its.
        let more = request_ready(reader.buffer());
        self.submit(&req, WriteKind::Data(data), len, more);
        Ok(())
    }

    fn zero_or_trim(&mut self, req: &Request, size: u64) {
        if let Err(error) = check(req, size) {
            return self.refuse(req, error);
        }
        // NBD_CMD_FLAG_NO_HOLE needs nothing: the device writes zeroes, it does not punch.
        let kind = if req.command == CMD_TRIM { WriteKind::Trim { len: req.length } } else { WriteKind::Zeroes { len: req.length } };
        self.submit(req, kind, 0, false);
    }

    /// Submits a data-modifying request; its completion sends the reply. With `more`, the
    /// device may hold it back to send it with the next ones.
    fn submit(&mut self, req: &Request, kind: WriteKind, payload: u64, more: bool) {
        self.shared.begin(payload, || self.device.send_held());
        let shared = Arc::clone(self.shared);
        let handle = req.handle;
        let (offset, length, command) = (req.offset, req.length, req.command);
        let op = WriteOp { offset, kind, fua: req.flags & CMD_FLAG_FUA != 0 };
        // The completion may run on this thread before submit returns: no lock is held here.
        let submit = if more { BlockDevice::submit_held } else { BlockDevice::submit };
        submit(
            &**self.device,
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

    fn flush(&mut self, req: &Request, size: u64) {
        if let Err(error) = check(req, size) {
            return self.refuse(req, error);
        }
        // The device flush covers completed writes; wait until every write this connection
        // submitted before the flush has completed.
        self.device.send_held();
        self.shared.wait_idle();
        let error = match self.device.flush() {
            Ok(()) => 0,
            Err(e) => {
                warn!("nbd {}: flush failed: {e}", self.shared.peer);
                reply_error(e)
            }
        };
        self.shared.send(&encode::simple_reply(error, req.handle));
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
