//! The read half and the write half of one connection, for two threads.
//!
//! A plaintext connection is a `TcpStream` shared by both halves. A TLS connection is one
//! rustls state machine for both directions, so the halves share it under a mutex and keep
//! every blocking socket call outside it:
//!
//! ```text
//!  ReadHalf (one thread)                               WriteHalf (one sender at a time)
//!  socket ─read, no lock─▶ raw bytes                    plaintext
//!                             │                            │
//!                             ▼                            ▼
//!               ┌──────── conn: Mutex<rustls::Connection> ────────┐
//!               │ read_tls + process_new_packets ▶ plaintext out   │ writer().write ▶ records
//!               └──────────────────────────────────────────────────┘
//!                  records the reader's processing made │          │ drained under `outbox`
//!                  (alerts): flag + try_lock            ▼          ▼
//!                              outbox: Mutex<Outbox> ──write──▶ socket
//! ```
//!
//! Rules that keep the two threads from blocking each other:
//!
//! - Lock order is `outbox`, then `conn`. `conn` is held only to encrypt or decrypt bytes
//!   already in memory, never across a socket call.
//! - `outbox` orders the records on the socket: a sender encrypts under `conn` into the
//!   outbox buffer, releases `conn`, then writes the buffer to the socket, still holding
//!   `outbox`, so records reach the socket in the order they were made.
//! - The reader reads raw socket bytes with no lock held, then takes `conn` briefly to feed
//!   them in and take the plaintext out. If that processing made records to send (a fatal
//!   alert; rustls sends a key-update answer with the next data record), the reader raises
//!   `flush_wanted` and only *tries* `outbox`: if a sender holds it, that sender flushes them
//!   after its own bytes; if not, the reader sends them without blocking (`MSG_DONTWAIT`) and
//!   leaves what the socket would not take for the next sender. The reader therefore never
//!   waits for a socket write, which could otherwise deadlock two peers that both write.
//! - A sender writes one socket call per batch it is given (split at [`SEND_CHUNK`]), so
//!   batched frames stay batched.
//!
//! A TCP close without a TLS `close_notify` reads as end of stream, as on plaintext: frames
//! carry their own lengths, so a truncated frame is still detected by the frame reader.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use crate::sync::lock;

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};

use super::tls::{explain, is_refusal};

/// Raw bytes read from the socket at once on a TLS connection.
const RAW_BUFFER: usize = 256 << 10;
/// What the raw receive buffer starts at: it doubles while reads fill it, up to `RAW_BUFFER`.
const RAW_FIRST: usize = 16 << 10;
/// Most plaintext encrypted for one socket write.
pub const SEND_CHUNK: usize = 256 << 10;

/// Encrypted bytes on their way to the socket, in record order.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    /// How much of `bytes` the socket has taken.
    sent: usize,
    /// A socket write failed part way: the record stream is cut, nothing more may be sent.
    broken: bool,
}

/// What both halves of a TLS connection share.
pub(super) struct TlsShared {
    socket: TcpStream,
    conn: Mutex<rustls::Connection>,
    outbox: Mutex<Outbox>,
    /// The reader made records that must go out (set before it tries `outbox`).
    flush_wanted: AtomicBool,
}

impl TlsShared {
    pub(super) fn new(socket: TcpStream, conn: rustls::Connection) -> Arc<TlsShared> {
        Arc::new(TlsShared { socket, conn: Mutex::new(conn), outbox: Mutex::new(Outbox::default()), flush_wanted: AtomicBool::new(false) })
    }

    /// Sends records the reader made, if no sender is busy (it will send them otherwise),
    /// without ever blocking on the socket.
    fn try_flush(&self) {
        while self.flush_wanted.load(Ordering::SeqCst) {
            let mut outbox = match self.outbox.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            self.flush_wanted.store(false, Ordering::SeqCst);
            let ob = &mut *outbox;
            if ob.broken {
                return;
            }
            {
                let mut conn = lock(&self.conn);
                while conn.wants_write() {
                    if conn.write_tls(&mut ob.bytes).is_err() {
                        break;
                    }
                }
            }
            while ob.sent < ob.bytes.len() {
                match send(self.socket.as_raw_fd(), &ob.bytes[ob.sent..], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
                    Ok(n) => ob.sent += n,
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(_) => {
                        ob.broken = true;
                        break;
                    }
                }
            }
            if ob.sent == ob.bytes.len() {
                ob.bytes.clear();
                ob.sent = 0;
            }
        }
    }

    /// Encrypts `buf` and writes it to the socket, after anything still waiting.
    fn send(&self, buf: &[u8]) -> io::Result<()> {
        let mut outbox = lock(&self.outbox);
        let ob = &mut *outbox;
        let result = self.send_locked(ob, buf);
        if result.is_err() {
            ob.broken = true;
        }
        drop(outbox);
        // The reader may have made records while this sender held the outbox.
        self.try_flush();
        result
    }

    fn send_locked(&self, ob: &mut Outbox, mut rest: &[u8]) -> io::Result<()> {
        if ob.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier write on this connection failed"));
        }
        loop {
            {
                let mut conn = lock(&self.conn);
                while !rest.is_empty() && ob.bytes.len() - ob.sent < SEND_CHUNK {
                    let n = conn.writer().write(rest)?;
                    rest = &rest[n..];
                    while conn.wants_write() {
                        conn.write_tls(&mut ob.bytes)?;
                    }
                    if n == 0 {
                        break;
                    }
                }
                while conn.wants_write() {
                    conn.write_tls(&mut ob.bytes)?;
                }
            }
            if ob.sent < ob.bytes.len() {
                (&self.socket).write_all(&ob.bytes[ob.sent..])?;
            } else if !rest.is_empty() {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "the TLS connection takes no more data"));
            }
            ob.bytes.clear();
            ob.sent = 0;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Sends a TLS `close_notify`, then ends the socket's sending direction.
    fn close(&self) {
        let mut outbox = lock(&self.outbox);
        if !outbox.broken {
            lock(&self.conn).send_close_notify();
            let _ = self.send_locked(&mut outbox, &[]);
        }
        outbox.broken = true;
        let _ = self.socket.shutdown(Shutdown::Write);
    }
}

impl AsFd for TlsShared {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The reading side of a TLS connection.
struct TlsReader {
    shared: Arc<TlsShared>,
    /// Raw bytes from the socket: empty until the first read and after [`ReadHalf::release`],
    /// grown while reads fill it.
    raw: Vec<u8>,
    /// The size of the next raw buffer.
    raw_wanted: usize,
    /// `raw[start..end]` is received but not yet given to rustls.
    start: usize,
    end: usize,
    /// The socket reached end of file.
    socket_eof: bool,
    /// A TLS error ended the stream: every later read returns it again (kind, message).
    failed: Option<(io::ErrorKind, String)>,
}

impl TlsReader {
    /// Moves plaintext into `dst` from what has already been received, feeding raw bytes to
    /// rustls as room allows. Returns how many bytes, and whether the stream has ended.
    fn drain(&mut self, dst: &mut [u8]) -> io::Result<(usize, bool)> {
        let mut conn = lock(&self.shared.conn);
        let mut filled = 0;
        let mut made_records = false;
        let result = loop {
            match conn.reader().read(&mut dst[filled..]) {
                Ok(0) => break Ok((filled, true)),
                Ok(n) => {
                    filled += n;
                    if filled == dst.len() {
                        break Ok((filled, false));
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A TCP close without close_notify: the end of the stream, as on plaintext.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok((filled, true)),
                Err(e) => break Err(e),
            }
            if self.start == self.end {
                if !self.socket_eof {
                    break Ok((filled, false));
                }
                if let Err(e) = conn.read_tls(&mut io::empty()) {
                    break Err(e);
                }
                continue;
            }
            let n = match conn.read_tls(&mut &self.raw[self.start..self.end]) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                // After close_notify rustls takes nothing more.
                self.start = self.end;
                continue;
            }
            self.start += n;
            let processed = conn.process_new_packets();
            made_records |= conn.wants_write();
            if let Err(e) = processed {
                break Err(tls_error(e));
            }
        };
        drop(conn);
        if made_records {
            self.shared.flush_wanted.store(true, Ordering::SeqCst);
            self.shared.try_flush();
        }
        match result {
            Err(e) => {
                // The bytes before an error are delivered; the error comes with the next read.
                self.failed = Some((e.kind(), e.to_string()));
                if filled > 0 {
                    Ok((filled, false))
                } else {
                    Err(e)
                }
            }
            ok => ok,
        }
    }

    /// A raw buffer to read into (of the size the last reads asked for), once everything in
    /// the old one is with rustls.
    fn make_room(&mut self) {
        debug_assert_eq!(self.start, self.end, "raw bytes not yet given to rustls");
        if self.raw.len() < self.raw_wanted {
            self.raw = vec![0; self.raw_wanted];
        }
    }

    /// A read that filled the raw buffer: the next gets one twice as large (up to
    /// `RAW_BUFFER`).
    fn grown_if_full(&mut self, got: usize) {
        if got == self.raw.len() && self.raw.len() < RAW_BUFFER {
            self.raw_wanted = (self.raw.len() * 2).min(RAW_BUFFER);
        }
    }

    /// Gives the raw buffer back if rustls has everything in it, and lets rustls shrink its
    /// own (a record's worth, up to 16 KiB, kept until its next read).
    fn release(&mut self) {
        if self.start == self.end {
            self.raw = Vec::new();
            self.start = 0;
            self.end = 0;
            self.raw_wanted = RAW_FIRST;
            // With nothing buffered, rustls shrinks its buffer to one small read before it
            // reads; a source with nothing to give ends the read there (not an end of stream).
            let _ = lock(&self.shared.conn).read_tls(&mut NothingYet);
        }
    }

    /// Reads raw bytes from the socket without blocking; `Ok(None)` if none are there.
    fn read_ready(&mut self) -> io::Result<Option<usize>> {
        loop {
            match recv(self.shared.socket.as_raw_fd(), &mut self.raw, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for TlsReader {
    /// Fills `dst` with what has arrived, like a socket read: blocks only while nothing at all
    /// is available.
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        if dst.is_empty() {
            return Ok(0);
        }
        let mut filled = 0;
        loop {
            let (n, ended) = self.drain(&mut dst[filled..])?;
            filled += n;
            if ended || filled == dst.len() {
                return Ok(filled);
            }
            // Everything received is with rustls now (`drain` took it): the buffer may change.
            self.make_room();
            let got = if filled > 0 {
                match self.read_ready() {
                    Ok(Some(n)) => n,
                    Ok(None) | Err(_) => return Ok(filled),
                }
            } else {
                loop {
                    match (&self.shared.socket).read(&mut self.raw) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other?,
                    }
                }
            };
            self.start = 0;
            self.end = got;
            if got == 0 {
                self.socket_eof = true;
            }
            self.grown_if_full(got);
        }
    }
}

/// A source with nothing to read yet.
struct NothingYet;

impl Read for NothingYet {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// A rustls error as an I/O error whose message says what to look at.
fn tls_error(e: rustls::Error) -> io::Error {
    let kind = if is_refusal(&e) { io::ErrorKind::PermissionDenied } else { io::ErrorKind::InvalidData };
    io::Error::new(kind, explain(&e))
}

/// The reading half of a connection. Only one thread reads.
pub struct ReadHalf(ReadKind);

enum ReadKind {
    Plain(Arc<TcpStream>),
    Tls(Box<TlsReader>),
}

/// The writing half of a connection. Each `write` sends the whole buffer (one socket write
/// per [`SEND_CHUNK`]); concurrent writers are served one at a time.
pub struct WriteHalf(WriteKind);

#[derive(Clone)]
enum WriteKind {
    Plain(Arc<TcpStream>),
    Tls(Arc<TlsShared>),
}

/// Closes a connection from any thread (both directions): the reader sees the end of the
/// stream, writers get errors.
#[derive(Clone)]
pub struct Closer(WriteKind);

impl WriteKind {
    fn socket(&self) -> &TcpStream {
        match self {
            WriteKind::Plain(s) => s,
            WriteKind::Tls(t) => &t.socket,
        }
    }
}

/// Makes the two halves of a plaintext connection.
pub(super) fn plain(socket: TcpStream) -> (ReadHalf, WriteHalf) {
    let s = Arc::new(socket);
    (ReadHalf(ReadKind::Plain(Arc::clone(&s))), WriteHalf(WriteKind::Plain(s)))
}

/// Makes the two halves of a TLS connection whose handshake is done.
pub(super) fn tls(socket: TcpStream, conn: rustls::Connection) -> (ReadHalf, WriteHalf) {
    let shared = TlsShared::new(socket, conn);
    let reader = TlsReader {
        shared: Arc::clone(&shared),
        raw: Vec::new(),
        raw_wanted: RAW_FIRST,
        start: 0,
        end: 0,
        socket_eof: false,
        failed: None,
    };
    (ReadHalf(ReadKind::Tls(Box::new(reader))), WriteHalf(WriteKind::Tls(shared)))
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            ReadKind::Plain(s) => (&**s).read(buf),
            ReadKind::Tls(t) => t.read(buf),
        }
    }
}

impl ReadHalf {
    /// Sets the socket's read timeout (a read then fails with `WouldBlock` or `TimedOut`).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match &self.0 {
            ReadKind::Plain(s) => s.set_read_timeout(timeout),
            ReadKind::Tls(t) => t.shared.socket.set_read_timeout(timeout),
        }
    }

    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        let _ = match &self.0 {
            ReadKind::Plain(s) => s.shutdown(Shutdown::Both),
            ReadKind::Tls(t) => t.shared.socket.shutdown(Shutdown::Both),
        };
    }

    /// True if the TLS layer holds a receive buffer that [`ReadHalf::release`] would give back.
    pub fn holds_buffer(&self) -> bool {
        matches!(&self.0, ReadKind::Tls(t) if !t.raw.is_empty())
    }

    /// Gives back the TLS layer's receive buffer (an idle connection's); the next read takes a
    /// small one again.
    pub fn release(&mut self) {
        if let ReadKind::Tls(t) = &mut self.0 {
            t.release();
        }
    }

    /// The socket, shared, to watch for bytes to read (`tasks::Readiness`).
    pub fn socket(&self) -> crate::tasks::Socket {
        match &self.0 {
            ReadKind::Plain(s) => Arc::clone(s) as crate::tasks::Socket,
            ReadKind::Tls(t) => Arc::clone(&t.shared) as crate::tasks::Socket,
        }
    }

    /// The socket's descriptor.
    fn socket_fd(&self) -> BorrowedFd<'_> {
        match &self.0 {
            ReadKind::Plain(s) => s.as_fd(),
            ReadKind::Tls(t) => t.shared.socket.as_fd(),
        }
    }

    /// True if a read would not wait: bytes received and not yet read, bytes (or the end of
    /// the stream, or an error) waiting in the socket.
    pub fn readable(&self) -> bool {
        self.buffered() || crate::tasks::socket_readable(self.socket_fd())
    }

    /// Waits up to `ms` milliseconds until a read would not wait (see [`ReadHalf::readable`]).
    /// A connection's task calls it once after a frame before it parks: during a burst (a
    /// sync group's writes one after the other) the next frame usually comes within that
    /// time, and is read without the wake-ups of parking.
    pub fn wait_readable(&self, ms: u8) -> bool {
        self.buffered() || crate::tasks::wait_socket_readable(self.socket_fd(), ms)
    }

    /// True if a read would return without waiting for the socket: received bytes not yet
    /// read, or an end or error to report. The socket's own buffer is not looked at.
    pub fn buffered(&self) -> bool {
        match &self.0 {
            ReadKind::Plain(_) => false,
            ReadKind::Tls(t) => {
                t.start < t.end
                    || t.failed.is_some()
                    || t.socket_eof
                    || lock(&t.shared.conn)
                        .process_new_packets()
                        .map_or(true, |io| io.plaintext_bytes_to_read() > 0 || io.peer_has_closed())
            }
        }
    }
}

impl super::ElasticReader<ReadHalf> {
    /// The connection waits for more ([`super::ElasticReader::park`]): once it has read
    /// nothing for [`super::elastic::RELEASE_AFTER`], this buffer and the TLS layer's receive
    /// buffer are given back. Returns when to call it again while either is held.
    pub fn park_idle(&mut self) -> Option<std::time::Instant> {
        let at = self.park();
        if !self.get_ref().holds_buffer() {
            return at;
        }
        let since = self.idle_since().unwrap_or_else(std::time::Instant::now);
        if since.elapsed() >= super::elastic::RELEASE_AFTER {
            self.get_mut().release();
            return at;
        }
        let release_at = since + super::elastic::RELEASE_AFTER;
        Some(at.map_or(release_at, |a| a.min(release_at)))
    }

    /// True if a read would not wait: bytes buffered here or in the TLS layer, or waiting in
    /// the socket. `burst`: wait up to [`crate::tasks::BURST_WAIT_MS`] for the socket (see
    /// [`ReadHalf::wait_readable`]).
    pub fn has_input(&self, burst: bool) -> bool {
        !self.buffer().is_empty()
            || if burst { self.get_ref().wait_readable(crate::tasks::BURST_WAIT_MS) } else { self.get_ref().readable() }
    }
}

impl WriteHalf {
    /// Gives back the buffer of encrypted bytes (up to [`SEND_CHUNK`] and a bit after a large
    /// write) if nothing waits in it: an idle connection's. Never waits for a sender.
    pub fn release(&self) {
        if let WriteKind::Tls(t) = &self.0 {
            if let Ok(mut ob) = t.outbox.try_lock() {
                if ob.sent == ob.bytes.len() {
                    ob.bytes = Vec::new();
                    ob.sent = 0;
                }
            }
        }
    }

    /// Sends `head` and then `body` as one stream of bytes. On a plaintext link they go
    /// with vectored writes, straight from both buffers (a frame's payload is not copied
    /// behind its header first); TLS encrypts them through one record buffer anyway, so
    /// there they are joined in `scratch`.
    pub fn send_two(&self, head: &[u8], body: &[u8], scratch: &mut Vec<u8>) -> io::Result<()> {
        match &self.0 {
            WriteKind::Plain(s) => write_all_two(&mut &**s, head, body),
            WriteKind::Tls(t) => {
                scratch.clear();
                scratch.extend_from_slice(head);
                scratch.extend_from_slice(body);
                t.send(scratch)
            }
        }
    }

    /// Sends all of `buf`.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        match &self.0 {
            WriteKind::Plain(s) => (&**s).write_all(buf),
            WriteKind::Tls(t) => t.send(buf),
        }
    }

    /// Ends the stream cleanly (TLS `close_notify`, then the socket's sending direction): the
    /// peer reads everything sent so far, then the end.
    pub fn close(&self) {
        match &self.0 {
            WriteKind::Plain(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            WriteKind::Tls(t) => t.close(),
        }
    }

    /// Shuts the connection down in both directions at once (the reader sees the end).
    pub fn shutdown(&self) {
        let _ = self.0.socket().shutdown(Shutdown::Both);
    }

    /// Sets the socket's write timeout. A timed-out write leaves a TLS stream cut: the
    /// connection must then be closed.
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.0.socket().set_write_timeout(timeout)
    }

    /// A handle that closes the connection from another thread.
    pub fn closer(&self) -> Closer {
        Closer(self.0.clone())
    }
}

/// Writes all of `head`, then all of `body`, with vectored writes.
fn write_all_two(w: &mut impl Write, mut head: &[u8], mut body: &[u8]) -> io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        match w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let from_head = n.min(head.len());
                head = &head[from_head..];
                body = &body[n - from_head..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Closer {
    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        let _ = self.0.socket().shutdown(Shutdown::Both);
    }

    /// Shuts the reading direction only: the reader sees the end of the stream and may still
    /// send (an error frame saying why).
    pub fn shutdown_read(&self) {
        let _ = self.0.socket().shutdown(Shutdown::Read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `step` bytes per call, from the first non-empty buffer and the next.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[io::IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.got.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(self.step - left)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn two_buffers_are_written_whole_and_in_order_across_partial_writes() {
        let head: Vec<u8> = (0..16).collect();
        let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for step in [1, 5, 16, 17, 999, 4096] {
            let mut w = Trickle { got: Vec::new(), step, calls: 0 };
            write_all_two(&mut w, &head, &body).unwrap();
            assert_eq!(w.got, [&head[..], &body[..]].concat(), "step {step}");
        }
        let mut w = Trickle { got: Vec::new(), step: 0, calls: 0 };
        assert_eq!(write_all_two(&mut w, &head, &body).unwrap_err().kind(), io::ErrorKind::WriteZero);
    }
}
