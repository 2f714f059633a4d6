//! What can go wrong in a journal: [`JournalError`].

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::record::Seq;

/// Journal errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JournalError {
    /// I/O on a journal file failed.
    #[error("journal {path}: {op}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A journal file is damaged somewhere other than the tail.
    #[error("journal {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A sequence number that is no longer (or not yet) in the journal was asked for.
    #[error("sequence number {requested} is not in the journal (it holds {first}..={last})")]
    NotRetained {
        /// The requested number.
        requested: Seq,
        /// First retained.
        first: Seq,
        /// Last written.
        last: Seq,
    },
    /// A record was appended out of order.
    #[error("append of seq {got} but the journal expects {expected}")]
    OutOfOrder {
        /// What was appended.
        got: Seq,
        /// What was expected.
        expected: Seq,
    },
    /// An earlier write or flush failed; the journal accepts nothing more.
    #[error("journal {path} is stopped after an earlier I/O failure; fix the cause and restart")]
    Poisoned {
        /// The journal directory.
        path: PathBuf,
    },
}

pub(super) fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { path: path.to_owned(), op, source }
}
