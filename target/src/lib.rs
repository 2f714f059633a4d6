//! The Hindsight target: receives each consistency group's journal records from its engine,
//! keeps them in a journal of its own, keeps a replica of every volume current, and builds
//! any volume as it was at any retained point in time.
//!
//! # How a write flows through the target
//!
//! 1. An engine connects over TLS (its certificate must name an engine this target trusts,
//!    `tls.engines`) and sends a `TargetHello` for one group; the target answers
//!    `TargetWelcome { durable_seq }` (docs/wire-protocol.md), creating the group at its first
//!    hello. One engine connection per group at a time.
//! 2. Each `Records` frame is checked whole (records decode, name a volume of the group, lie
//!    inside it, and continue the sequence; resent records are skipped), then appended
//!    verbatim to the group's [`Journal`](hindsight_consistency::journal::Journal). The frames
//!    that have arrived together are committed with one write and one fdatasync, and a
//!    `Confirm(durable_seq)` goes back at once.
//! 3. The committed batch is queued (bounded) for the group's applier thread
//!    ([`applier`](crate::applier)), which applies the records to the replica images in
//!    commit order while the connection thread receives the next batch. Replicas are synced
//!    and `state.applied_seq` advanced every couple of seconds, not per record; after a crash
//!    or a stop the records after `applied_seq` are applied again at start-up (applying is
//!    idempotent).
//! 4. Retention folds the oldest journal segment into the base images (the oldest point that
//!    can be recovered) once it is older than `retention` or the journal is larger than
//!    `journal_size`, then deletes it.
//! 5. [`recover`] copies a base image and applies the volume's records up to the requested
//!    point; [`history`] reports the window. Both only read, and may run in another process
//!    beside the daemon.
//!
//! Between two batches the connection thread may be asked for the hashes of some regions of a
//! replica ([`hashes`](crate::hashes), an initial sync comparing instead of re-sending): it
//! waits until the applier has applied every record received before, and hashes holding the
//! replicas between two applied batches, so at an exact prefix of the sequence.
//!
//! One function applies records to an image (data written, zeroes and trims punched), for
//! the replicas, the base images and recovered images alike.
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/
//!   target.lock             flock, exclusive while a daemon runs on this data_dir
//!   groups/<group>/
//!     group.toml            volumes (name, vm, size) and engine; written last at creation
//!     journal/              the group's journal (docs/journal-format.md)
//!     replica/<volume>.img  the latest image of each volume (sparse)
//!     base/<volume>.img     each volume at base_seq: the oldest recoverable point
//!     state                 { "HSTS" | version | applied_seq | base_seq | base_time_ns | crc32c }
//!     state.next            present only while the base images are rolled forward
//!     bookmarks.toml        index of the bookmarks in the journal (see `bookmarks`)
//!     spans.toml            index of the stretches that are not consistent points (`spans`)
//!     lock                  flock: shared by readers, exclusive while retention works
//! ```
//!
//! # Crash points
//!
//! - Group creation: replica and base images, `state` and the journal are created first and
//!   `group.toml` last; a directory without `group.toml` holds nothing acknowledged and is
//!   created again at the next hello.
//! - Records: a record is confirmed only after its commit; the journal drops a torn tail on
//!   open. Replicas may hold more or less than `state.applied_seq` says beyond that point;
//!   start-up replays from `applied_seq + 1` to the end of the journal.
//! - Retention: the replicas are checkpointed past the segment first; then, under the
//!   exclusive lock, `state.next` (the new base point) is written, the segment's records are
//!   applied to the base images and synced, `state` takes the new base, `state.next` is
//!   removed, and only then is the segment deleted. While `state.next` exists the base images
//!   hold some mix of the records between the two base points; applying the whole range again
//!   in order makes them exact at the new point, which start-up does, and readers meanwhile
//!   treat the new point as the oldest recoverable one.
//! - A failed fdatasync (journal, replica, base or state) stops the group: it refuses its
//!   engine until the target is restarted, and is never retried.

mod applier;
mod apply;
mod bookmarks;
mod error;
mod group;
mod hashes;
mod layout;
mod lock;
mod marks;
mod meta;
mod recover;
mod recover_set;
mod server;
pub mod spans;
mod state;

use std::fmt;
use std::path::PathBuf;

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::Seq;
use serde::{Deserialize, Serialize};

pub use error::TargetError;
pub use recover::{groups, history, recover};
pub use recover_set::{recover_set, Manifest, ManifestVolume, RecoverSetRequest, Selection, MANIFEST_NAME};
pub use server::TargetHandle;

/// Runs the target daemon in the calling thread (`hindsight target`). It returns an error if
/// the daemon cannot start, and otherwise runs until the process ends. Ending it with a signal
/// is safe: the journal holds everything confirmed, and start-up brings the replicas up to it.
pub fn run(config: TargetConfig) -> Result<(), TargetError> {
    start(config)?.wait();
    Ok(())
}

/// Starts the target daemon in background threads: every stored group is loaded (and its
/// replicas brought up to date) before this returns, then engines are accepted.
pub fn start(config: TargetConfig) -> Result<TargetHandle, TargetError> {
    server::start(config, hindsight_consistency::storage::StdStorage::shared())
}

/// Like [`start`], with every journal, replica and index file going through `fs` (tests use a
/// `FaultyStorage` of `hindsight_consistency::faults` to inject I/O errors).
pub fn start_with_storage(
    config: TargetConfig,
    fs: std::sync::Arc<dyn hindsight_consistency::storage::Storage>,
) -> Result<TargetHandle, TargetError> {
    server::start(config, fs)
}

/// A point in a group's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Right after the record with this sequence number (0: before the first write).
    Seq(u64),
    /// Every write the engine received at or before this time (ns since the Unix epoch).
    Time(u64),
    /// The newest point the target holds.
    Latest,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Point::Seq(s) => write!(f, "seq {s}"),
            Point::Time(t) => write!(f, "time {}", format_rfc3339(*t)),
            Point::Latest => f.write_str("the latest point"),
        }
    }
}

/// What to recover, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverRequest {
    /// The consistency group.
    pub group: String,
    /// The volume of that group.
    pub volume: String,
    /// The point in time.
    pub point: Point,
    /// The image to create: a new file (refused if it exists), or an existing block device at
    /// least as large as the volume. Never inside the target's group directories.
    pub out: PathBuf,
}

/// What a recovery produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoverReport {
    /// The group.
    pub group: String,
    /// The volume.
    pub volume: String,
    /// The point actually recovered: the last record of the group included (the base point
    /// if none was).
    pub seq: Seq,
    /// That record's time (or the base point's).
    pub time_ns: u64,
    /// `crash-consistent`, or `app-consistent` for a point at such a bookmark.
    pub consistency: String,
    /// How many records of the volume were applied on top of the base image.
    pub records_applied: u64,
    /// Size of the recovered image (the volume size).
    pub bytes: u64,
}

/// A volume of a group, as the target stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Volume name, unique in the group.
    pub name: String,
    /// The VM whose disk it is.
    pub vm: String,
    /// Size in bytes.
    pub size: u64,
}

/// The history of a group: what it holds and which points can be recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct History {
    /// The group.
    pub group: String,
    /// The engine that ships it.
    pub engine: String,
    /// Its volumes.
    pub volumes: Vec<Volume>,
    /// The oldest recoverable point (the base images; 0 = blank volumes).
    pub first_seq: Seq,
    /// Its time (for 0: when the target first saw the group).
    pub first_time_ns: u64,
    /// The newest point held (the last record in the journal, or the base point).
    pub last_seq: Seq,
    /// Its time.
    pub last_time_ns: u64,
    /// The replicas are synced up to here.
    pub applied_seq: Seq,
    /// Bytes of journal held.
    pub journal_bytes: u64,
    /// Journal segments held.
    pub segments: usize,
    /// The configured retention time, in ns, if any.
    pub retention_ns: Option<u64>,
    /// The configured journal size limit, in bytes, if any.
    pub journal_size: Option<u64>,
    /// The bookmarks inside the recoverable window, oldest first.
    pub bookmarks: Vec<Bookmark>,
    /// Stretches inside the window that are not consistent points (async deltas that left
    /// writes out, resyncs), by `from`: seq `from` up to, not including, `to`. Spans may
    /// overlap; the inconsistent sequence numbers are their union.
    pub inconsistent: Vec<spans::Span>,
    /// The newest consistent point (`last_seq` unless a delta is still arriving or a resync
    /// has not completed).
    pub last_consistent_seq: Seq,
}

/// A named point of a group, placed with `hindsight bookmark`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bookmark {
    /// Its name.
    pub name: String,
    /// The bookmark record's sequence number; recovering at it gives every write before it.
    pub seq: Seq,
    /// Engine time of the bookmark.
    pub time_ns: u64,
    /// `crash-consistent` or `app-consistent`.
    pub consistency: String,
    /// The note given with it.
    pub note: String,
}
