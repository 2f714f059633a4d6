//! The target's errors: [`TargetError`], what callers of the crate see, and one enum per step
//! inside the daemon: the index files ([`MarksError`]), the applier
//! ([`ApplierError`]), an engine connection's claim, hello and frames ([`ClaimError`],
//! [`CheckHelloError`], [`AuthoriseError`], [`GroupForHelloError`], [`AcceptHelloError`],
//! [`FrameRefused`]). The words of the messages are those engines, operators and logs have
//! always read: where a message named its cause, it still does, and the cause is also the
//! error's source. Declarations only, read best together.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use hindsight_consistency::error_chain;
use hindsight_consistency::journal::JournalError;
use hindsight_consistency::record::DecodeError;
use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::wire::PROTOCOL_VERSION;
use hindsight_consistency::Seq;
use thiserror::Error;

use crate::index_file::IndexError;

/// Everything that can go wrong in the target daemon, in recovery and in history queries.
///
/// Each variant is named for the step that failed and carries the group, volume, file or
/// sequence number an operator needs to act on it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr} ({reason}); is another process using it? Change target.metrics_listen or stop that process")]
    MetricsBind { addr: std::net::SocketAddr, reason: String },
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
    /// Thinned history could not be read.
    #[error("group {group:?}: thinned history")]
    Thinned {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: crate::thinning::segment::ThinError,
    },
    /// The requested point is inside thinned history and is not one of its kept points.
    #[error(
        "group {group:?}: seq {requested} is not kept: history there is thinned to fewer points (docs/retention-tiers.md); \
         the nearest kept points are {}",
        nearest(*before, *after)
    )]
    NotKept {
        /// The group.
        group: String,
        /// The requested sequence number.
        requested: Seq,
        /// The kept point before it (seq, time), if any.
        before: Option<(Seq, u64)>,
        /// The kept point after it, if any.
        after: Option<(Seq, u64)>,
    },
    /// The requested time is before the group existed (nothing was ever folded away).
    #[error(
        "group {group:?}: {requested} is before the group was created at {}: there is no point before it; the recoverable \
         window is {}",
        format_rfc3339(*created_ns),
        window(0, *created_ns, *last_seq, *last_time_ns)
    )]
    BeforeCreation {
        group: String,
        requested: String,
        /// When the target first saw the group (its blank first point).
        created_ns: u64,
        last_seq: Seq,
        last_time_ns: u64,
    },
    /// A group cannot be seeded from the volumes given.
    #[error("group {group:?} cannot be seeded: {reason}")]
    Seed {
        /// The group.
        group: String,
        /// Why not, and what to do.
        reason: String,
    },
    /// `failover.toml` cannot be read or does not check out.
    #[error("group {group:?}: {}: {reason}; fix or move the file aside (docs/failover.md)", path.display())]
    FailoverState {
        /// The group.
        group: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The group is failed over already.
    #[error(
        "group {group:?} was failed over already, at {} to seq {seq}; its production volumes are in {}",
        format_rfc3339(*at_ns),
        dir.display()
    )]
    AlreadyFailedOver {
        /// The group.
        group: String,
        /// When its volumes were promoted.
        at_ns: u64,
        /// The point they were promoted at.
        seq: Seq,
        /// Where they are.
        dir: PathBuf,
    },
    /// The daemon did not release the group in time.
    #[error(
        "group {group:?}: the target daemon has not released the group within {waited:?}; the failover is asked for (failover.toml) and \
         resumes when the command is run again; the daemon's log says what holds it"
    )]
    NotReleased {
        /// The group.
        group: String,
        /// How long the command waited.
        waited: std::time::Duration,
    },
    /// An interrupted failover is resumed at another point than it started with.
    #[error(
        "group {group:?}: the failover interrupted earlier was bringing the volumes to seq {recorded}; run it again with --seq {recorded} \
         (the point seq {requested} cannot be chosen once the promotion has begun)"
    )]
    FailoverPointChanged {
        /// The group.
        group: String,
        /// The point recorded in failover.toml.
        recorded: Seq,
        /// The point asked for now.
        requested: Seq,
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

/// The kept points around a point that is not kept.
fn nearest(before: Option<(Seq, u64)>, after: Option<(Seq, u64)>) -> String {
    let show = |(seq, t): (Seq, u64)| format!("seq {seq} ({})", format_rfc3339(t));
    match (before, after) {
        (Some(b), Some(a)) => format!("{} and {}", show(b), show(a)),
        (Some(b), None) => show(b),
        (None, Some(a)) => show(a),
        (None, None) => "none".to_owned(),
    }
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

/// Why the marks of committed records (bookmarks, spans) could not be added to the indexes.
#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum MarksError {
    /// Adding to `bookmarks.toml` failed.
    #[error("bookmark index: {source}")]
    BookmarkIndex {
        /// The cause.
        #[source]
        source: IndexError,
    },
    /// Updating `spans.toml` failed.
    #[error("span index: {source}")]
    SpanIndex {
        /// The cause.
        #[source]
        source: IndexError,
    },
}

/// Why the group's applier cannot do what is asked of it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ApplierError {
    /// The group is stopped after an I/O failure.
    #[error("{}", poisoned_message(group, cause))]
    Poisoned {
        /// The group.
        group: String,
        /// The failure that stopped it.
        cause: String,
    },
    /// The applier stopped (the daemon is shutting down) before the replicas reached `seq`.
    #[error("group {group:?} is stopping; the replicas hold seq {applied_seq}, not seq {seq}")]
    Stopping {
        /// The group.
        group: String,
        /// What the replicas hold.
        applied_seq: Seq,
        /// What was waited for.
        seq: Seq,
    },
    /// A batch could not be queued: the applier has stopped.
    #[error("group {group:?}: the replicas' applier has stopped")]
    Stopped {
        /// The group.
        group: String,
    },
}

/// Why an engine connection cannot take a group.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ClaimError {
    /// Another connection ships the group.
    #[error("group {group:?} is already being shipped by {engine}")]
    AlreadyShipped {
        /// The group.
        group: String,
        /// The engine whose connection has it.
        engine: String,
    },
    /// The connection shipping the group has a newer ownership token.
    #[error(transparent)]
    Superseded(AcceptHelloError),
}

/// Why a group refuses an engine's hello.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum AcceptHelloError {
    /// A failover was asked for: the group takes nothing more from any engine.
    #[error("{why}")]
    Fenced {
        /// What the failover says.
        why: String,
    },
    /// The hello carries another epoch than the group's.
    #[error(
        "group {group:?}: the engine ships it at epoch {engine}, but the group is at epoch {target} here: a failover or failback \
         happened since (docs/failover.md); this engine may not ship it until its engine.toml gives the group's epoch"
    )]
    Epoch {
        /// The group.
        group: String,
        /// The engine's epoch.
        engine: u64,
        /// The group's.
        target: u64,
    },
    /// A newer owner of the group has connected (docs/ha.md, "Fencing").
    #[error(
        "group {group:?}: this engine's ownership (token {engine}) is older than the group's owner here (token {target}): \
         another engine owns the group now; this one may not ship it"
    )]
    Superseded {
        /// The engine's token.
        engine: u64,
        /// The largest token the target has accepted.
        target: u64,
        /// The group.
        group: String,
    },
    /// The group is stopped after an I/O failure (before the hello, or adding its volumes).
    #[error("{}", poisoned_message(group, cause))]
    Poisoned {
        /// The group.
        group: String,
        /// The failure that stopped it.
        cause: String,
    },
    /// A volume's size differs from the one stored.
    #[error(
        "group {group:?}: volume {volume:?} is {stored} bytes here but {offered} bytes at the engine; a replicated volume cannot change size. \
         Give it its old size again, or replicate it as a new volume (or a new group)"
    )]
    VolumeResized {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// Its size at the target.
        stored: u64,
        /// Its size in the hello.
        offered: u64,
    },
}

/// Why a `Records` frame is refused whole before anything of it is journaled.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum FrameRefused {
    /// The frame holds no record.
    #[error("group {group:?}: a Records frame carries no record")]
    Empty {
        /// The group.
        group: String,
    },
    /// A record is cut short.
    #[error("group {group:?}: the record at byte {at} of a Records frame is truncated")]
    Truncated {
        /// The group.
        group: String,
        /// Where the record starts in the frame.
        at: usize,
    },
    /// A record does not decode.
    #[error("group {group:?}: the record at byte {at} of a Records frame is invalid ({source})")]
    Invalid {
        /// The group.
        group: String,
        /// Where the record starts in the frame.
        at: usize,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// A bookmark record's body does not decode.
    #[error("group {group:?}: bookmark {name:?} at seq {seq} is invalid ({source})")]
    Bookmark {
        /// The group.
        group: String,
        /// The bookmark's name.
        name: String,
        /// Its sequence number.
        seq: Seq,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// A point record does not carry its 8 bytes.
    #[error("group {group:?}: point {name:?} at seq {seq} carries {len} bytes, not 8")]
    Point {
        /// The group.
        group: String,
        /// The point's name.
        name: String,
        /// Its sequence number.
        seq: Seq,
        /// The bytes it carries.
        len: usize,
    },
    /// A record names a volume the group does not have.
    #[error(
        "group {group:?}: seq {seq} is for volume {volume:?}, which the group does not have (volumes: {}); \
         the engine must announce it in its hello",
        volumes.join(", ")
    )]
    UnknownVolume {
        /// The group.
        group: String,
        /// The record's sequence number.
        seq: Seq,
        /// The volume it names.
        volume: String,
        /// The group's volumes.
        volumes: Vec<String>,
    },
    /// A record reaches past the end of its volume.
    #[error("group {group:?}: seq {seq} writes {length} bytes at offset {offset}, past the end of volume {volume:?} ({size} bytes)")]
    PastEnd {
        /// The group.
        group: String,
        /// The record's sequence number.
        seq: Seq,
        /// Its length.
        length: u32,
        /// Its offset.
        offset: u64,
        /// The volume.
        volume: String,
        /// The volume's size.
        size: u64,
    },
    /// The records of the frame do not follow each other.
    #[error("group {group:?}: a Records frame holds seq {seq} after seq {prev}; records must be consecutive")]
    NotConsecutive {
        /// The group.
        group: String,
        /// The record out of order.
        seq: Seq,
        /// The record before it.
        prev: Seq,
    },
    /// The frame skips records the target has not received.
    #[error(
        "group {group:?}: gap in the stream: received seq {seq} but the target expects seq {next}; \
         the engine must resend from seq {next}"
    )]
    Gap {
        /// The group.
        group: String,
        /// The record received.
        seq: Seq,
        /// The record expected.
        next: Seq,
    },
    /// A record is stamped before the one before it.
    #[error(
        "group {group:?}: seq {seq} is stamped {}, before the previous record ({}); record times must never decrease",
        format_rfc3339(*time_ns),
        format_rfc3339(*last_time_ns)
    )]
    TimeBackwards {
        /// The group.
        group: String,
        /// The record.
        seq: Seq,
        /// Its time.
        time_ns: u64,
        /// The time of the record before it.
        last_time_ns: u64,
    },
}

/// Why an engine's hello is refused before anything is created from it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum CheckHelloError {
    /// The engine speaks another protocol version.
    #[error("the engine speaks protocol version {got}, this target speaks {PROTOCOL_VERSION}; run matching hindsight versions")]
    Protocol {
        /// The engine's version.
        got: u16,
    },
    /// The group's name is not acceptable.
    #[error("{reason}")]
    GroupName {
        /// Why.
        reason: String,
    },
    /// The hello lists no volume.
    #[error("group {group:?}: the hello lists no volumes")]
    NoVolumes {
        /// The group.
        group: String,
    },
    /// A volume's name is not acceptable.
    #[error("group {group:?}: {reason}")]
    VolumeName {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// A volume has no bytes.
    #[error("group {group:?}: volume {volume:?} has size 0")]
    EmptyVolume {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
    },
    /// A volume is listed twice.
    #[error("group {group:?}: volume {volume:?} is listed twice")]
    DuplicateVolume {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
    },
}

/// Why a connection's certificate may not ship here.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum AuthoriseError {
    /// The certificate names no engine.
    #[error("its certificate names {certificate}, not an engine (a name ending in .engine.hindsight); nothing was written")]
    NotAnEngine {
        /// What it names.
        certificate: String,
    },
    /// The engine is not in `tls.engines`.
    #[error(
        "engine {engine} is not trusted here: tls.engines in target.toml lists {}; add it there to let it ship \
         (nothing was written)",
        allowed.join(", ")
    )]
    NotTrusted {
        /// The engine the certificate names.
        engine: String,
        /// The engines `tls.engines` lists.
        allowed: Vec<String>,
    },
}

/// Why the group a hello names cannot be served.
#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum GroupForHelloError {
    /// The group was failed over (or a failover is under way).
    #[error("{why}")]
    FailedOver {
        /// What the failover says.
        why: String,
    },
    /// The group could not be loaded at start-up.
    #[error("group {group:?} could not be loaded at start-up ({why}); fix it and restart the target")]
    Broken {
        /// The group.
        group: String,
        /// Why it could not be loaded.
        why: String,
    },
    /// The group is new and could not be created.
    #[error("group {group:?} cannot be created at the target: {}", error_chain(source.as_ref()))]
    Create {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: Box<TargetError>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Engines, operators and system tests read these words: they must not drift.
    #[test]
    fn messages_read_as_they_always_did() {
        let cases: Vec<(String, &str)> = vec![
            (ApplierError::Poisoned { group: "g".into(), cause: "c".into() }.to_string(), "group \"g\" is stopped after an I/O failure (c); fix the cause and restart the target"),
            (ApplierError::Stopping { group: "g".into(), applied_seq: 3, seq: 5 }.to_string(), "group \"g\" is stopping; the replicas hold seq 3, not seq 5"),
            (ApplierError::Stopped { group: "g".into() }.to_string(), "group \"g\": the replicas' applier has stopped"),
            (ClaimError::AlreadyShipped { group: "g".into(), engine: "e1".into() }.to_string(), "group \"g\" is already being shipped by e1"),
            (AcceptHelloError::Poisoned { group: "g".into(), cause: "c".into() }.to_string(), "group \"g\" is stopped after an I/O failure (c); fix the cause and restart the target"),
            (AcceptHelloError::VolumeResized { group: "g".into(), volume: "v".into(), stored: 1, offered: 2 }.to_string(), "group \"g\": volume \"v\" is 1 bytes here but 2 bytes at the engine; a replicated volume cannot change size. Give it its old size again, or replicate it as a new volume (or a new group)"),
            (FrameRefused::Empty { group: "g".into() }.to_string(), "group \"g\": a Records frame carries no record"),
            (FrameRefused::Truncated { group: "g".into(), at: 7 }.to_string(), "group \"g\": the record at byte 7 of a Records frame is truncated"),
            (FrameRefused::Invalid { group: "g".into(), at: 7, source: DecodeError::Corrupt("x") }.to_string(), "group \"g\": the record at byte 7 of a Records frame is invalid (corrupt: x)"),
            (FrameRefused::Bookmark { group: "g".into(), name: "b".into(), seq: 4, source: DecodeError::Corrupt("x") }.to_string(), "group \"g\": bookmark \"b\" at seq 4 is invalid (corrupt: x)"),
            (FrameRefused::Point { group: "g".into(), name: "p".into(), seq: 4, len: 3 }.to_string(), "group \"g\": point \"p\" at seq 4 carries 3 bytes, not 8"),
            (FrameRefused::UnknownVolume { group: "g".into(), seq: 4, volume: "w".into(), volumes: vec!["a".into(), "b".into()] }.to_string(), "group \"g\": seq 4 is for volume \"w\", which the group does not have (volumes: a, b); the engine must announce it in its hello"),
            (FrameRefused::PastEnd { group: "g".into(), seq: 4, length: 5, offset: 6, volume: "v".into(), size: 7 }.to_string(), "group \"g\": seq 4 writes 5 bytes at offset 6, past the end of volume \"v\" (7 bytes)"),
            (FrameRefused::NotConsecutive { group: "g".into(), seq: 9, prev: 7 }.to_string(), "group \"g\": a Records frame holds seq 9 after seq 7; records must be consecutive"),
            (FrameRefused::Gap { group: "g".into(), seq: 9, next: 7 }.to_string(), "group \"g\": gap in the stream: received seq 9 but the target expects seq 7; the engine must resend from seq 7"),
            (FrameRefused::TimeBackwards { group: "g".into(), seq: 9, time_ns: 1_800_000_000_000_000_000, last_time_ns: 1_800_000_000_100_000_000 }.to_string(), "group \"g\": seq 9 is stamped 2027-01-15T08:00:00.000000000Z, before the previous record (2027-01-15T08:00:00.100000000Z); record times must never decrease"),
            (CheckHelloError::Protocol { got: 9 }.to_string(), "the engine speaks protocol version 9, this target speaks 1; run matching hindsight versions"),
            (CheckHelloError::GroupName { reason: "bad".into() }.to_string(), "bad"),
            (CheckHelloError::NoVolumes { group: "g".into() }.to_string(), "group \"g\": the hello lists no volumes"),
            (CheckHelloError::VolumeName { group: "g".into(), reason: "bad".into() }.to_string(), "group \"g\": bad"),
            (CheckHelloError::EmptyVolume { group: "g".into(), volume: "v".into() }.to_string(), "group \"g\": volume \"v\" has size 0"),
            (CheckHelloError::DuplicateVolume { group: "g".into(), volume: "v".into() }.to_string(), "group \"g\": volume \"v\" is listed twice"),
            (AuthoriseError::NotAnEngine { certificate: "x.agent".into() }.to_string(), "its certificate names x.agent, not an engine (a name ending in .engine.hindsight); nothing was written"),
            (AuthoriseError::NotTrusted { engine: "e".into(), allowed: vec!["a".into(), "b".into()] }.to_string(), "engine e is not trusted here: tls.engines in target.toml lists a, b; add it there to let it ship (nothing was written)"),
            (GroupForHelloError::Broken { group: "g".into(), why: "w".into() }.to_string(), "group \"g\" could not be loaded at start-up (w); fix it and restart the target"),
            (GroupForHelloError::Create { group: "g".into(), source: Box::new(TargetError::Spawn { what: "x", source: io::Error::other("boom") }) }.to_string(), "group \"g\" cannot be created at the target: cannot start the x thread: boom"),
            (MarksError::BookmarkIndex { source: IndexError::Encode { source: <toml::ser::Error as serde::ser::Error>::custom("enc") } }.to_string(), "bookmark index: enc"),
            (MarksError::SpanIndex { source: IndexError::Write { path: "/p/spans.toml".into(), source: io::Error::other("boom") } }.to_string(), "span index: /p/spans.toml: boom"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
