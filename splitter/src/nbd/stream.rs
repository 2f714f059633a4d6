//! One accepted client socket, TCP or unix, behind one type, and the reader of its requests.
//!
//! A connection keeps one descriptor of its socket, shared (`Arc<Stream>`): its request
//! reader, its replies and the server's list of live connections all use it, and the
//! readiness watch holds it so that the descriptor stays open as long as it is watched.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix-domain socket connection.
    Unix(UnixStream),
}

impl Stream {
    /// Shuts down one or both directions of the socket, for every handle to it.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Bounds how long one read may block (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Bounds how long one write may block (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// True if a read would not wait: bytes (or the end of the stream, or an error) are
    /// waiting in the socket.
    pub fn readable(&self) -> bool {
        hindsight_consistency::tasks::socket_readable(self.as_fd())
    }

    /// Waits up to `ms` milliseconds until a read would not wait (see [`Stream::readable`]).
    pub fn wait_readable(&self, ms: u8) -> bool {
        hindsight_consistency::tasks::wait_socket_readable(self.as_fd(), ms)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => (&*s).flush(),
            Stream::Unix(s) => (&*s).flush(),
        }
    }
}

/// Reads a connection's socket: the handshake, then the requests. During the handshake every
/// read is bounded by what is left of one deadline, so that a client that trickles bytes
/// cannot hold its handshake thread for longer than that either.
pub struct ReadSide {
    stream: Arc<Stream>,
    deadline: Option<Instant>,
}

impl ReadSide {
    /// Reads `stream` with no deadline (its read timeout, if any, bounds each read).
    pub fn new(stream: Arc<Stream>) -> ReadSide {
        ReadSide { stream, deadline: None }
    }

    /// Reads `stream` until `deadline`; a read after it fails with `TimedOut`.
    pub fn until(stream: Arc<Stream>, deadline: Instant) -> ReadSide {
        ReadSide { stream, deadline: Some(deadline) }
    }

    /// Removes the deadline (the handshake is over).
    pub fn clear_deadline(&mut self) {
        self.deadline = None;
    }

    /// The socket.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }
}

impl Read for ReadSide {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        (&*self.stream).read(buf)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the peer closed before the first byte.
pub fn read_or_eof<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
