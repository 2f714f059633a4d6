//! The shared model of Hindsight: what a write is, how it is numbered, how it is encoded on
//! the wire and in journals, and how the daemons are configured.
//!
//! A guest write enters the agent as a block request, crosses to the engine as a
//! [`wire::WriteMsg`] inside a [`wire::frame`], is given the next [`Seq`] of its consistency
//! group and a timestamp, becomes a [`record`] appended to the engine's [`journal::Journal`]
//! (group commit), is shipped verbatim in a `Records` frame to the target, and lands in the
//! target's journal, from which replicas and any point in time are built.
//!
//! - [`record`] — write records and their encoding (docs/journal-format.md)
//! - [`journal`] — segmented journal: group-commit writer, torn-tail recovery, tailing reader
//! - [`wire`] — frames and messages (docs/wire-protocol.md)
//! - [`region_hash`] — the region hashes an initial sync compares (BLAKE3)
//! - [`storage`] — the file-system trait all journal and replica I/O goes through
//! - [`config`] — engine, target and agent configuration
//! - [`transport`] — TLS (or loopback plaintext) under the frames: handshakes, peer identities,
//!   a read half and a write half per connection
//! - [`time`] — timestamps
//! - [`memory`] — freed heap pages given back to the system now and then
//! - [`open_files`] — the daemons raise their limit on open files
//! - [`tasks`] — a fixed pool of threads running many event-driven tasks (the daemons' groups)
//! - [`metrics_http`] and [`dashboard`] — the daemons' metrics address: `/metrics`, and the
//!   web page at `/` with the document it draws (docs/dashboard.md)
//! - `faults` — a storage that injects I/O errors, for tests (in this crate's tests, and for
//!   other crates with the cargo feature `faults`)

// Casts in tests build fixtures from small literals.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap))]

pub mod config;
pub mod dashboard;
#[cfg(any(test, feature = "faults"))]
pub mod faults;
pub mod journal;
pub mod memory;
pub mod metrics_http;
pub mod open_files;
pub mod record;
pub mod region_hash;
pub mod storage;
pub mod sync;
pub mod tasks;
pub mod time;
pub mod transport;
pub mod wire;

pub use record::{BookmarkBody, PointConsistency, Record, RecordHeader, RecordRef, Seq, WriteKind};

/// An error and its chain of sources on one line (`a: b: c`), for log lines and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
