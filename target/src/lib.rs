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
//! 3. The committed batch is queued (bounded) for the group's applier task
//!    (the `applier` module), which applies the records to the replica images in
//!    commit order while the connection thread receives the next batch. Replicas are synced
//!    and `state.applied_seq` advanced every 10 s (or after each GiB applied), not per
//!    record; after a crash or a stop the records after `applied_seq` are applied again at
//!    start-up (applying is idempotent).
//! 4. Retention folds the oldest journal segment into the base images (the oldest point that
//!    can be recovered) once it is older than `retention` or the journal is larger than
//!    `journal_size`, then deletes it.
//! 5. Once a segment is sealed, the maintenance thread writes its point-in-time index file
//!    ([`point_index`], docs/point-index.md). A [`PointView`] resolves any range of a volume at
//!    any point from those runs and the base image, with nothing copied first: `hindsight
//!    export` serves one over NBD, and [`recover()`] copies one out; [`history()`] reports the
//!    window. They only read, and may run in another process beside the daemon.
//!
//! Between two batches the connection thread may be asked for the hashes of some regions of a
//! replica (the `hashes` module, an initial sync comparing instead of re-sending): it
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
//!   failover-asked          made by `hindsight failover` after a group's failover.toml
//!   groups/<group>/
//!     group.toml            volumes (name, vm, size) and engine; written last at creation
//!     journal/              the group's journal (docs/journal-format.md)
//!     replica/<volume>.img  the latest image of each volume (sparse); in a seeded group a
//!                           link to the volume itself (`seed`)
//!     base/<volume>.img     each volume at base_seq: the oldest recoverable point
//!     state                 { "HSTS" | version | applied_seq | base_seq | base_time_ns | crc32c }
//!     state.next            present only while the base images are rolled forward
//!     bookmarks.toml        index of the bookmarks in the journal (see `bookmarks`)
//!     spans.toml            index of the stretches that are not consistent points (`spans`)
//!     index/<first>.hsx     point-in-time index of each sealed journal segment
//!     exports/<pid>/        scratch overlays of a writable export while it runs
//!     failover.toml         the failover state, once one was asked for (docs/failover.md)
//!     promoted/<volume>.img the production volumes after a failover
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
mod bookmarks;
mod dashboard;
mod error;
mod exports;
pub mod failover;
mod group;
mod group_view;
mod hashes;
mod image;
mod index_file;
mod layout;
mod lock;
mod marks;
mod meta;
mod metrics;
mod model;
pub mod point_index;
mod point_view;
mod records;
mod recover;
mod recover_set;
pub mod seed;
mod server;
pub mod spans;
mod state;
pub mod thinning;
mod toml_file;

use hindsight_consistency::config::TargetConfig;

pub use error::TargetError;
pub use exports::{ActiveExport, Registration};
pub use group_view::groups;
pub use model::{Bookmark, History, Point, RecoverReport, RecoverRequest, TierHistory, Volume};
pub use point_view::PointView;
pub use recover::{history, recover, recover_with};
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
