//! A group's recoverable window as readers see it: the group found by name, its state, base
//! point and newest record read under the group's lock held shared (retention takes it
//! exclusively to change them), and a requested point resolved to a sequence number of that
//! window. `history`, `recover` and point views all start here.

use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;

use hindsight_consistency::config::{check_name, TargetConfig};
use hindsight_consistency::journal::{list_segments, JournalReader};
use hindsight_consistency::storage::{OpenMode, StdStorage, Storage};
use hindsight_consistency::{PointConsistency, Seq};

use crate::error::{data_dir_err, TargetError};
use crate::layout::{groups_dir, GroupPaths};
use crate::lock::{lock_file, FileLock, LockKind};
use crate::meta::GroupMeta;
use crate::model::{Point, Volume};
use crate::records::for_each_record;
use crate::state::{load_state, GroupState};
use crate::thinning::segment::{find_thinned, Found};
use crate::thinning::table::TablePoint;

/// Lists the groups stored in the data directory, sorted by name.
pub fn groups(config: &TargetConfig) -> Result<Vec<String>, TargetError> {
    let fs = StdStorage;
    if !config.data_dir.is_dir() {
        return Err(TargetError::DataDir {
            path: config.data_dir.clone(),
            step: "read the data directory",
            source: io::Error::new(io::ErrorKind::NotFound, "not a directory; check target.data_dir"),
        });
    }
    let dir = groups_dir(&config.data_dir);
    let names = match fs.list(&dir) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TargetError::DataDir { path: dir, step: "list groups", source: e }),
    };
    let mut out: Vec<String> =
        names.into_iter().filter(|n| check_name("group", n).is_ok() && fs.exists(&GroupPaths::new(&config.data_dir, n).meta())).collect();
    out.sort();
    Ok(out)
}

/// A consistent view of a group's recoverable window, taken under the shared lock.
pub(crate) struct GroupView {
    pub name: String,
    pub paths: GroupPaths,
    pub meta: GroupMeta,
    /// The state as written; records from `state.base_seq + 1` on are applied on the base.
    pub state: GroupState,
    /// The oldest recoverable point (the base, or the base being rolled to).
    pub first: (Seq, u64),
    /// The newest point the journal holds.
    pub last: (Seq, u64),
    pub segments: usize,
    pub journal_bytes: u64,
    /// History past the first retention tier, oldest first (after the base).
    pub thinned: Vec<Found>,
    /// The last sequence number thinned history covers (the base's when there is none):
    /// the journal holds the records after it.
    pub thinned_to: Seq,
    /// The journal's first record after `thinned_to` (seq, time), if it holds any.
    pub journal_first: Option<(Seq, u64)>,
    _lock: FileLock,
}

impl GroupView {
    /// The points thinned history keeps, oldest first.
    pub fn thinned_points(&self) -> impl Iterator<Item = &TablePoint> {
        self.thinned.iter().flat_map(|f| f.table.points.iter())
    }

    /// Refuses a sequence number inside thinned history that is not one of its kept points,
    /// naming the nearest ones.
    pub fn check_kept(&self, seq: Seq) -> Result<(), TargetError> {
        if seq <= self.first.0 || seq > self.thinned_to || self.thinned_points().any(|p| p.seq == seq) {
            return Ok(());
        }
        let before = self.thinned_points().filter(|p| p.seq < seq).last().map(|p| (p.seq, p.time_ns)).or(Some(self.first));
        let after = self.thinned_points().find(|p| p.seq > seq).map(|p| (p.seq, p.time_ns)).or(self.journal_first);
        Err(TargetError::NotKept { group: self.name.clone(), requested: seq, before, after })
    }

    /// The last kept point of thinned history at or before time `t` (the base if none is).
    pub fn kept_at_or_before(&self, t: u64) -> Seq {
        self.thinned_points().filter(|p| p.time_ns <= t).last().map_or(self.first.0, |p| p.seq)
    }

    /// The time of a kept point of thinned history.
    pub fn kept_time(&self, seq: Seq) -> Option<u64> {
        self.thinned_points().find(|p| p.seq == seq).map(|p| p.time_ns)
    }
}

pub(crate) fn unknown_group(config: &TargetConfig, group: &str) -> TargetError {
    TargetError::UnknownGroup { group: group.to_owned(), known: groups(config).unwrap_or_default() }
}

/// Checks that the group exists and reads its description (no lock needed: `group.toml`
/// is replaced atomically).
pub(crate) fn find_group(config: &TargetConfig, fs: &dyn Storage, group: &str) -> Result<(GroupPaths, GroupMeta), TargetError> {
    if check_name("group", group).is_err() {
        return Err(unknown_group(config, group));
    }
    let paths = GroupPaths::new(&config.data_dir, group);
    if !fs.exists(&paths.meta()) {
        return Err(unknown_group(config, group));
    }
    let meta = GroupMeta::load(fs, group, &paths.meta())?;
    Ok((paths, meta))
}

/// The volumes of a group, from its `group.toml` (no journal is read).
pub(crate) fn group_volumes(config: &TargetConfig, group: &str) -> Result<Vec<Volume>, TargetError> {
    Ok(find_group(config, &StdStorage, group)?.1.volumes)
}

pub(crate) fn open_view(fs: &Arc<dyn Storage>, paths: GroupPaths, meta: GroupMeta, group: &str) -> Result<GroupView, TargetError> {
    let lock = lock_file(&paths.lock(), LockKind::Shared, true, true)
        .map_err(data_dir_err(&paths.lock(), "lock"))?
        .expect("a waiting lock is always taken");
    let state = load_state(fs.as_ref(), group, &paths.state())?
        .ok_or_else(|| TargetError::Inconsistent { group: group.to_owned(), reason: format!("{} is missing", paths.state().display()) })?;
    // An interrupted roll of the base images leaves them somewhere between the two base
    // points: only points from the newer one on can be built exactly.
    let first = match load_state(fs.as_ref(), group, &paths.state_next())? {
        Some(next) if next.base_seq > state.base_seq => (next.base_seq, next.base_time_ns),
        _ => (state.base_seq, state.base_time_ns),
    };
    let thinned: Vec<Found> = find_thinned(fs.as_ref(), &paths.thin_dir(), false)
        .map_err(|source| TargetError::Thinned { group: group.to_owned(), source })?
        .into_iter()
        .filter(|f| f.table.run.last_seq > first.0)
        .collect();
    let thinned_to = crate::thinning::segment::thinned_through(&thinned, first.0);
    let journal_dir = paths.journal();
    let mut segs = match list_segments(fs.as_ref(), &journal_dir) {
        Ok(s) => s,
        Err(source) => return Err(TargetError::Journal { group: group.to_owned(), step: "list segments", source }),
    };
    // A segment thinned already (a crash came before the daemon deleted it) is not history.
    segs.retain(|(seg_first, _)| *seg_first > thinned_to || thinned.is_empty());
    let mut journal_bytes = 0;
    for (_, path) in &segs {
        let f = fs.open(path, OpenMode::Read).map_err(data_dir_err(path, "open segment"))?;
        journal_bytes += f.len().map_err(data_dir_err(path, "stat segment"))?;
    }
    let jerr = |step| move |source| TargetError::Journal { group: group.to_owned(), step, source };
    // The newest record: read the last segment to its end (the tail may be being written
    // right now; the reader stops before an incomplete record). A segment without records
    // sends the search one segment back.
    let mut last = thinned.last().and_then(|f| f.table.points.last()).map_or(first, |p| (p.seq, p.time_ns)).max(first);
    let journal_first = match segs.first() {
        Some((seg_first, _)) => JournalReader::open(Arc::clone(fs), &journal_dir, *seg_first)
            .map_err(jerr("open a reader"))?
            .next()
            .map_err(jerr("read"))?
            .map(|rec| (rec.header.seq, rec.header.time_ns)),
        None => None,
    };
    for (seg_first, _) in segs.iter().rev() {
        let mut r = JournalReader::open(Arc::clone(fs), &journal_dir, *seg_first).map_err(jerr("open a reader"))?;
        let mut found = None;
        while let Some(rec) = r.next().map_err(jerr("read"))? {
            found = Some((rec.header.seq, rec.header.time_ns));
        }
        if let Some(f) = found {
            if f.0 > last.0 {
                last = f;
            }
            break;
        }
    }
    Ok(GroupView {
        name: group.to_owned(),
        paths,
        meta,
        state,
        first,
        last,
        segments: segs.len(),
        journal_bytes,
        thinned,
        thinned_to,
        journal_first,
        _lock: lock,
    })
}

/// The point `point` of the group in `view` stands for: the sequence number to go through,
/// and for a time in a stretch where every point is consistent, that time (the records after
/// it are left out as they are read). Refuses points outside the window and points that are
/// not consistent.
pub(crate) fn resolve_point(fs: &Arc<dyn Storage>, view: &GroupView, point: &Point) -> Result<(Seq, Option<u64>), TargetError> {
    let not_retained = |requested: String| TargetError::NotRetained {
        group: view.name.clone(),
        requested,
        first_seq: view.first.0,
        first_time_ns: view.first.1,
        last_seq: view.last.0,
        last_time_ns: view.last.1,
    };
    let spans = crate::spans::load(fs.as_ref(), &view.paths.spans())
        .map_err(|reason| TargetError::Inconsistent { group: view.name.clone(), reason: format!("span index: {reason}") })?;
    let spans: Vec<crate::spans::Span> = spans.into_iter().filter(|s| s.to.is_none_or(|t| t > view.thinned_to)).collect();
    // Inside thinned history only its kept points are points (they are consistent).
    if view.thinned_to > view.first.0 {
        match *point {
            Point::Seq(n) if n > view.first.0 && n <= view.thinned_to => {
                view.check_kept(n)?;
                return Ok((n, None));
            }
            Point::Time(t) if t >= view.first.1 && view.journal_first.is_none_or(|(_, first)| t < first) => {
                return Ok((view.kept_at_or_before(t), None));
            }
            _ => {}
        }
    }
    let (through, until_time) = match *point {
        Point::Seq(n) if n < view.first.0 => return Err(not_retained(point.to_string())),
        Point::Seq(n) if n > view.last.0 => {
            return Err(TargetError::NotReceived {
                group: view.name.clone(),
                requested: n,
                last_seq: view.last.0,
                last_time_ns: view.last.1,
            })
        }
        Point::Seq(n) => match crate::spans::inconsistency(&spans, n) {
            Some(why) => return Err(TargetError::NotConsistent { group: view.name.clone(), requested: n, why }),
            None => (n, None),
        },
        Point::Time(t) if t < view.first.1 && view.first.0 == 0 => {
            return Err(TargetError::BeforeCreation {
                group: view.name.clone(),
                requested: point.to_string(),
                created_ns: view.first.1,
                last_seq: view.last.0,
                last_time_ns: view.last.1,
            })
        }
        Point::Time(t) if t < view.first.1 => return Err(not_retained(point.to_string())),
        // Async deltas and resyncs: the last consistent point at or before the time.
        Point::Time(t) if !spans.is_empty() => (crate::spans::consistent_at_or_before(&spans, seq_at_time(fs, view, t)?), None),
        Point::Time(t) => (view.last.0, Some(t)),
        Point::Latest => (crate::spans::consistent_at_or_before(&spans, view.last.0), None),
    };
    if through < view.first.0 {
        return Err(not_retained(format!("{point} (its last consistent point is seq {through})")));
    }
    Ok((through, until_time))
}

/// The last sequence number whose time is at or before `t` (by reading the journal, after
/// thinned history).
pub(crate) fn seq_at_time(fs: &Arc<dyn Storage>, view: &GroupView, t: u64) -> Result<Seq, TargetError> {
    let from = view.state.base_seq.max(view.thinned_to);
    let mut seq = if from > view.state.base_seq { view.kept_at_or_before(t) } else { from };
    for_each_record(fs, &view.name, &view.paths.journal(), from + 1, view.last.0, |rec| {
        if rec.header.time_ns > t {
            return Ok(ControlFlow::Break(()));
        }
        seq = rec.header.seq;
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(seq)
}

/// How consistent the point after `seq` is: a point exactly at a bookmark has the bookmark's
/// kind (an application-consistent bookmark was placed with the file systems frozen); every
/// other point is crash-consistent.
pub(crate) fn point_consistency(fs: &dyn Storage, view: &GroupView, seq: Seq) -> String {
    crate::bookmarks::load(fs, &view.paths.bookmarks())
        .unwrap_or_default()
        .into_iter()
        .rev()
        .find(|b| b.seq == seq)
        .map_or_else(|| PointConsistency::Crash.as_str().to_owned(), |b| b.consistency)
}
