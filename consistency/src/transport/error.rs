//! Why a connection could not be set up: [`TransportError`].

use std::io;

use thiserror::Error;

use super::identity::{NameError, Role};

/// Why a connection could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The TLS handshake failed; `reason` says why (an invalid certificate, none, an alert).
    #[error("TLS handshake failed: {reason}")]
    Handshake {
        /// Why, in words that say what to look at.
        reason: String,
        /// A certificate was refused (by either side): retrying cannot help.
        refused: bool,
    },
    /// The server's certificate is valid but does not name the role expected there.
    #[error(
        "the server's certificate names {presented}, not a {expected} (a name ending in .{expected}.hindsight); is the address right?"
    )]
    WrongPeer {
        /// The role expected.
        expected: Role,
        /// What the certificate names.
        presented: String,
    },
    /// The name to check the server's certificate against is not usable.
    #[error("cannot check the server's certificate: {0}")]
    BadServerName(#[source] NameError),
    /// A TLS client connected to a plaintext port.
    #[error("a TLS client connected, but this side has tls.insecure_plaintext = true; configure [tls] with ca, cert and key here too")]
    TlsClientOnPlaintextPort,
    /// The peer closed the connection before saying anything.
    #[error("the peer closed the connection before the handshake")]
    ClosedEarly,
    /// A socket call failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

impl TransportError {
    /// True if retrying with the same configuration cannot help: a certificate was refused
    /// (by either side), or the two sides disagree on TLS.
    pub fn is_refusal(&self) -> bool {
        match self {
            TransportError::Handshake { refused, .. } => *refused,
            TransportError::WrongPeer { .. } | TransportError::BadServerName(_) => true,
            TransportError::TlsClientOnPlaintextPort | TransportError::ClosedEarly | TransportError::Io(_) => false,
        }
    }
}
