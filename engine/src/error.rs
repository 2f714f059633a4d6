//! Engine errors.

use std::io;
use std::net::SocketAddr;

use hindsight_consistency::journal::JournalError;
use thiserror::Error;

/// What went wrong in the engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address from engine.listen.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A group's journal could not be opened.
    #[error("group {group:?}: cannot open the journal")]
    OpenJournal {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: JournalError,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread")]
    Spawn {
        /// Which thread.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}
