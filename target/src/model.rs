//! The target's public data types: volumes, points in time, bookmarks, a group's history,
//! and the request and report of a recovery (re-exported at the crate root).

use std::fmt;
use std::path::PathBuf;

use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::Seq;
use serde::{Deserialize, Serialize};

use crate::spans;

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
    /// The exports of the group running now (each pins its point: retention folds nothing
    /// while one runs).
    pub exports: Vec<crate::exports::ActiveExport>,
    /// The retention tiers and what each holds now, finest first (empty without tiers).
    pub tiers: Vec<TierHistory>,
}

/// What one retention tier holds (docs/retention-tiers.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierHistory {
    /// `write`, or the interval between its points (`1m`).
    pub every: String,
    /// The age at which points leave it (`for`).
    pub until: String,
    /// Its points now: every record of the journal for the first tier, the kept points of
    /// thinned history for the others.
    pub points: u64,
    /// Its oldest and newest point (seq, time), if it has any.
    pub oldest: Option<(Seq, u64)>,
    pub newest: Option<(Seq, u64)>,
    /// Bytes on disk: the journal for the first tier; for the others the allocated bytes of
    /// the thinned segments whose newest point is in the tier.
    pub bytes: u64,
    /// The points it keeps (seq, time), oldest first; empty for the first tier, whose points
    /// are every record from `oldest` to `newest`.
    pub kept: Vec<(Seq, u64)>,
    /// Bytes it takes per second of history it covers, measured over what it holds now
    /// (`None` until it holds a span of at least a second).
    pub bytes_per_second: Option<u64>,
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
