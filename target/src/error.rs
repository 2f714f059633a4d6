//! The target's error type.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use hindsight_consistency::journal::JournalError;
use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::Seq;
use thiserror::Error;

/// Everything that can go wrong in the target daemon, in recovery and in history queries.
///
/// Each variant is named for the step that failed and carries the group, volume, file or
/// sequence number an operator needs to act on it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}; is another process using it? Change target.listen or stop that process")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another target daemon already works on this data directory.
    #[error("data_dir {} is in use by another target process; stop it first or give another data_dir", data_dir.display())]
    DataDirInUse {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// A file or directory of the data directory could not be read or written.
    #[error("{}: {step}", path.display())]
    DataDir {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The group is not stored in this data directory.
    #[error("group {group:?} is not known to this target; known groups: {}", list_or_none(known))]
    UnknownGroup {
        /// The requested group.
        group: String,
        /// The groups the data directory holds.
        known: Vec<String>,
    },
    /// The volume is not part of the group.
    #[error("group {group:?} has no volume {volume:?}; its volumes are: {}", list_or_none(known))]
    UnknownVolume {
        /// The group.
        group: String,
        /// The requested volume.
        volume: String,
        /// The group's volumes.
        known: Vec<String>,
    },
    /// A group's `group.toml` is unreadable or invalid.
    #[error("group {group:?}: {}: {reason}", path.display())]
    GroupMeta {
        /// The group.
        group: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A group's `state` file is damaged.
    #[error("group {group:?}: state file {} is damaged ({reason}); the group cannot be served until it is repaired", path.display())]
    StateCorrupt {
        /// The group.
        group: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The group's journal could not be opened, read, written or trimmed.
    #[error("group {group:?}: journal: {step}")]
    Journal {
        /// The group.
        group: String,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: JournalError,
    },
    /// The journal does not hold what the group's state says it must.
    #[error("group {group:?}: {reason}")]
    Inconsistent {
        /// The group.
        group: String,
        /// What does not fit.
        reason: String,
    },
    /// A record could not be applied to a replica, base or recovered image.
    #[error("group {group:?}: volume {volume:?}: applying seq {seq} to {}", path.display())]
    Apply {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// The record's sequence number.
        seq: Seq,
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A replica or base image could not be opened, created or synced.
    #[error("group {group:?}: volume {volume:?}: {step} {}", path.display())]
    Image {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// What was being done.
        step: &'static str,
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The group stopped after an I/O failure and refuses work until the target restarts.
    #[error("group {group:?} is stopped after an I/O failure ({cause}); fix the cause and restart the target")]
    Poisoned {
        /// The group.
        group: String,
        /// The failure that stopped it.
        cause: String,
    },
    /// The requested point is older than the retained history.
    #[error(
        "group {group:?}: {requested} is no longer retained; the recoverable window is {}",
        window(*first_seq, *first_time_ns, *last_seq, *last_time_ns)
    )]
    NotRetained {
        /// The group.
        group: String,
        /// The requested point, as the user gave it.
        requested: String,
        /// Oldest recoverable sequence number.
        first_seq: Seq,
        /// Its time.
        first_time_ns: u64,
        /// Newest recoverable sequence number.
        last_seq: Seq,
        /// Its time.
        last_time_ns: u64,
    },
    /// The requested sequence number has not reached the target yet.
    #[error("group {group:?}: seq {requested} is not received yet; the latest point is seq {last_seq} ({})", format_rfc3339(*last_time_ns))]
    NotReceived {
        /// The group.
        group: String,
        /// The requested sequence number.
        requested: Seq,
        /// The newest point held.
        last_seq: Seq,
        /// Its time.
        last_time_ns: u64,
    },
    /// The requested sequence number lies inside a stretch that is not consistent (an async
    /// delta that left writes out, or a resync).
    #[error("group {group:?}: seq {requested} is not a consistent point: {why}")]
    NotConsistent {
        /// The group.
        group: String,
        /// The requested sequence number.
        requested: Seq,
        /// The spans that hold it and the consistent points around them.
        why: crate::spans::Inconsistency,
    },
    /// The recovery output path is not acceptable.
    #[error("{}: {reason}", path.display())]
    OutputRefused {
        /// The requested output.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// Writing the recovered image failed.
    #[error("{}: {step}", path.display())]
    Output {
        /// The output file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No volume of the group belongs to the requested VM.
    #[error("group {group:?} has no volume of vm {vm:?}; its VMs are: {}", list_or_none(known))]
    UnknownVm {
        /// The group.
        group: String,
        /// The requested VM.
        vm: String,
        /// The VMs of the group's volumes.
        known: Vec<String>,
    },
    /// A thread could not be started.
    #[error("group {group:?}: point-in-time index")]
    Index {
        group: String,
        #[source]
        source: crate::point_index::store::StoreError,
    },
    #[error("cannot start the {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

/// `seq A (time) .. seq B (time)`, as every message about the recoverable window spells it.
pub(crate) fn window(first_seq: Seq, first_time_ns: u64, last_seq: Seq, last_time_ns: u64) -> String {
    format!("seq {first_seq} ({}) .. seq {last_seq} ({})", format_rfc3339(first_time_ns), format_rfc3339(last_time_ns))
}

/// Shorthand for mapping an `io::Error` on a data-directory path.
pub(crate) fn data_dir_err(path: &std::path::Path, step: &'static str) -> impl FnOnce(io::Error) -> TargetError {
    let path = path.to_owned();
    move |source| TargetError::DataDir { path, step, source }
}

/// What the engine is told while a group is stopped after an I/O failure.
pub(crate) fn poisoned_message(group: &str, cause: &str) -> String {
    TargetError::Poisoned { group: group.to_owned(), cause: cause.to_owned() }.to_string()
}
