//! Errors of the NBD front end.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::proto::ProtoError;

/// What went wrong while configuring, starting or running the NBD server, or while serving
/// one client connection.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NbdError {
    /// A listen address that cannot be parsed.
    #[error("listen address {spec:?}: {reason}; give unix:/path/to.sock or tcp:127.0.0.1:10809")]
    InvalidListen {
        /// The string given.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The server was given no export.
    #[error("no export configured; give at least one (name, device) pair")]
    NoExports,
    /// An export name the protocol cannot carry.
    #[error("export name {name:?}: {reason}")]
    InvalidExportName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two exports share a name.
    #[error("export name {0:?} is given twice; export names must be unique")]
    DuplicateExport(String),
    /// The unix socket path is taken by something that is not a stale socket.
    #[error("{}: {reason}", path.display())]
    SocketPathInUse {
        /// The socket path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {listen}")]
    Bind {
        /// The address as given.
        listen: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Starting a server thread failed.
    #[error("cannot start thread {name}")]
    SpawnThread {
        /// The thread's name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A listener failed in a way it cannot recover from; the accept loop stopped.
    #[error("accepting connections on {listen} failed")]
    Accept {
        /// The listener's address.
        listen: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for connections on the listeners failed (or its wake-up could not be made);
    /// the accept loop stopped, or did not start.
    #[error("waiting for connections failed")]
    Poll(#[source] io::Error),
    /// Reading or writing the socket failed during the handshake.
    #[error("handshake I/O failed")]
    HandshakeIo(#[source] io::Error),
    /// The client sent a message that cannot be parsed during the handshake.
    #[error("handshake protocol error")]
    HandshakeProtocol(#[source] ProtoError),
    /// The client chose an export with `NBD_OPT_EXPORT_NAME` that does not exist; the
    /// protocol leaves the server no way but to close the connection.
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// Reading a request from the socket failed.
    #[error("reading request failed")]
    ReadRequest(#[source] io::Error),
    /// The client sent a request that cannot be parsed; the stream cannot be resynchronised.
    #[error("malformed request")]
    RequestProtocol(#[source] ProtoError),
    /// Watching the socket for the next request failed (the connection cannot park).
    #[error("watching the socket for requests failed")]
    WatchSocket(#[source] io::Error),
    /// Writing a reply to the socket failed.
    #[error("writing reply failed")]
    WriteReply(#[source] io::Error),
    /// Serving a request panicked (a bug, logged where it happened): the connection is closed.
    #[error("serving a request failed unexpectedly; the connection is closed")]
    Panicked,
}
