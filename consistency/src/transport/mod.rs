//! The links' transport: TLS with mutual certificate authentication, or plaintext on loopback
//! when a configuration says `insecure_plaintext = true` (docs/security.md). Frames
//! (docs/wire-protocol.md) travel on top, unchanged.
//!
//! ```text
//!   agent ──TLS (client cert <vm>.agent.hindsight)──▶ engine ──TLS (client cert <name>.engine.hindsight)──▶ target
//!          ◀─ server cert <name>.engine.hindsight ──         ◀─ server cert <name>.target.hindsight ─────
//! ```
//!
//! A server hands each accepted `TcpStream` to [`Security::accept`], a client each connected
//! one to [`Security::connect`]; both return a [`Connection`] whose [`Peer`] says who is on
//! the other side (the identities of its verified certificate), for the caller to authorise.
//! [`Connection::split`] gives a [`ReadHalf`] and a [`WriteHalf`] for a reader thread and a
//! writer thread, as the data path uses them (see [`halves`] for how one TLS state machine
//! serves both without either thread blocking the other).

pub mod elastic;
mod error;
pub mod halves;
pub mod identity;
pub mod tls;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub use elastic::ElasticReader;
pub use error::TransportError;
pub use halves::{Closer, ReadHalf, WriteHalf};
pub use identity::{Identity, NameError, PeerIdentity, Role};
pub use tls::{TlsEndpoint, TlsFiles, TlsSetupError};

/// How a daemon protects its links.
#[derive(Clone, Debug)]
pub enum Security {
    /// TLS 1.3, both sides authenticated by certificates of one CA.
    Tls(Arc<TlsEndpoint>),
    /// No encryption, no authentication: only allowed when every address is loopback.
    InsecurePlaintext,
}

/// Who is on the other side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A plaintext connection: nobody is authenticated.
    Plaintext,
    /// A TLS peer whose certificate chain was verified; the identities it names.
    Certified(PeerIdentity),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Plaintext => f.write_str("plaintext"),
            Peer::Certified(id) => write!(f, "certificate {id}"),
        }
    }
}

/// Why [`Security::accept`] did not give an authenticated connection.
#[derive(Debug)]
pub enum AcceptError {
    /// A plaintext client on a TLS port. The connection is returned only to tell the client
    /// why it is refused, in plaintext; nothing it sends may be used.
    Plaintext(Connection),
    /// Anything else: a failed handshake, a TLS client on a plaintext port, a socket error.
    Failed(TransportError),
}

/// A connection whose handshake is done: read and write it from one thread, or split it.
pub struct Connection {
    read: ReadHalf,
    write: WriteHalf,
    peer: Peer,
    remote: Option<SocketAddr>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.peer).field("remote", &self.remote).finish()
    }
}

impl Security {
    /// True for TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// The TLS endpoint, if any.
    pub fn tls(&self) -> Option<&TlsEndpoint> {
        match self {
            Security::Tls(t) => Some(t),
            Security::InsecurePlaintext => None,
        }
    }

    /// The server side of a new connection: waits for the client's first byte (at most
    /// [`tls::HANDSHAKE_TIMEOUT`]), then runs the TLS handshake. A plaintext client on a TLS
    /// port and a TLS client on a plaintext port are recognised by that byte and refused.
    pub fn accept(&self, mut tcp: TcpStream) -> Result<Connection, AcceptError> {
        let remote = tcp.peer_addr().ok();
        let fail = |e: TransportError| AcceptError::Failed(e);
        let first = tls::peek_first_byte(&tcp).map_err(|e| fail(e.into()))?.ok_or(fail(TransportError::ClosedEarly))?;
        match self {
            Security::InsecurePlaintext if first == tls::TLS_HANDSHAKE_RECORD => Err(fail(TransportError::TlsClientOnPlaintextPort)),
            Security::InsecurePlaintext => Ok(Connection::plain(tcp, remote)),
            Security::Tls(_) if first != tls::TLS_HANDSHAKE_RECORD => Err(AcceptError::Plaintext(Connection::plain(tcp, remote))),
            Security::Tls(endpoint) => {
                let (conn, peer) = endpoint.accept(&mut tcp).map_err(fail)?;
                let (read, write) = halves::tls(tcp, conn);
                Ok(Connection { read, write, peer: Peer::Certified(peer), remote })
            }
        }
    }

    /// The client side of a new connection. With TLS, the server's certificate must be valid
    /// for `server_name` (a DNS name or an IP address) and name an identity of `role`.
    pub fn connect(&self, mut tcp: TcpStream, server_name: &str, role: Role) -> Result<Connection, TransportError> {
        let remote = tcp.peer_addr().ok();
        match self {
            Security::InsecurePlaintext => Ok(Connection::plain(tcp, remote)),
            Security::Tls(endpoint) => {
                let (conn, peer) = endpoint.connect(&mut tcp, server_name, role)?;
                let (read, write) = halves::tls(tcp, conn);
                Ok(Connection { read, write, peer: Peer::Certified(peer), remote })
            }
        }
    }
}

impl Connection {
    fn plain(tcp: TcpStream, remote: Option<SocketAddr>) -> Connection {
        let (read, write) = halves::plain(tcp);
        Connection { read, write, peer: Peer::Plaintext, remote }
    }

    /// Who is on the other side.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The peer's socket address, if known.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// The two halves, for a reader thread and a writer thread.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.read.set_read_timeout(timeout)
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.write.set_write_timeout(timeout)
    }

    /// Ends the stream cleanly (see [`WriteHalf::close`]).
    pub fn close(&self) {
        self.write.close();
    }

    /// A handle that closes the connection from another thread.
    pub fn closer(&self) -> Closer {
        self.write.closer()
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// True if an error from a [`ReadHalf`] or [`WriteHalf`] means the peer refused this side
/// (its certificate, or TLS itself): retrying with the same files cannot succeed.
pub fn is_refusal_io(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
}
