//! A group's failover at the recovery site (docs/failover.md): its state file
//! `failover.toml`, the release of the group by whoever serves it (the daemon, or this process
//! when no daemon runs), and the promotion of its replicas to the production volumes at a
//! consistent point.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::storage::{write_file_atomic, OpenMode, StdStorage, Storage};
use hindsight_consistency::time::{format_rfc3339, now_ns};
use hindsight_consistency::{Seq, WriteKind};
use serde::{Deserialize, Serialize};

use crate::error::{data_dir_err, TargetError};
use crate::group::{Group, GroupOptions};
use crate::group_view::find_group;
use crate::layout::{image_name, GroupPaths, DAEMON_LOCK, FAILOVER_ASKED};
use crate::lock::{lock_file, LockKind};
use crate::model::{Point, Volume};
use crate::point_view::PointView;
use crate::records::for_each_record;

/// Version of the `failover.toml` layout.
const VERSION: u32 = 1;
/// Longest `failover.toml` read; a real one is a few hundred bytes.
const MAX_LEN: u64 = 64 << 10;
/// How often the command looks whether the daemon has released the group.
const POLL: Duration = Duration::from_millis(20);
/// Bytes read and written at a time when a range is brought back to the point.
const CHUNK: usize = 1 << 20;

/// Where a group is in its failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The target takes nothing more of the group; whoever serves it is to release it.
    Requested,
    /// The replicas hold every record of the journal and nothing serves the group.
    Released,
    /// The replicas are being made the production volumes at the chosen point.
    Promoting,
    /// The promoted volumes are the production volumes.
    FailedOver,
}

/// The contents of `failover.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverState {
    /// Layout version.
    pub version: u32,
    /// Where the failover is.
    pub state: Stage,
    /// The group's epoch from the request on.
    pub epoch: u64,
    /// When the failover was asked for.
    pub requested_ns: u64,
    /// What asked for it.
    pub by: String,
    /// The newest record the target holds (released and after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<Seq>,
    /// The point the volumes are brought to (promoting and after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    /// The time of that point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
    /// What kind of point it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// When the promoted volumes were ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_ns: Option<u64>,
}

impl FailoverState {
    /// What an engine is told when it ships a group in this state.
    pub fn refusal(&self, group: &str) -> String {
        let to = match self.seq {
            Some(seq) => format!(", to seq {seq}"),
            None => String::new(),
        };
        format!(
            "group {group:?} was failed over at the recovery site at {} (epoch {}{to}): this engine may no longer ship it",
            format_rfc3339(self.requested_ns),
            self.epoch
        )
    }
}

fn bad_state(group: &str, path: &Path, reason: String) -> TargetError {
    TargetError::FailoverState { group: group.to_owned(), path: path.to_owned(), reason }
}

/// Reads `failover.toml` of a group: `None` when there is none (the group is a replica).
pub(crate) fn load(fs: &dyn Storage, group: &str, paths: &GroupPaths) -> Result<Option<FailoverState>, TargetError> {
    let path = paths.failover();
    if !fs.exists(&path) {
        return Ok(None);
    }
    let bad = |reason: String| bad_state(group, &path, reason);
    let state: FailoverState = crate::toml_file::read(fs, &path, MAX_LEN, "failover.toml").map_err(bad)?;
    if state.version != VERSION {
        return Err(bad(format!("has version {}, this target reads version {VERSION}; use a matching hindsight", state.version)));
    }
    Ok(Some(state))
}

/// Writes `failover.toml` atomically and durably.
pub(crate) fn store(fs: &dyn Storage, paths: &GroupPaths, state: &FailoverState) -> Result<(), TargetError> {
    let path = paths.failover();
    let text = toml::to_string(state).expect("a failover state always serializes");
    write_file_atomic(fs, &path, text.as_bytes()).map_err(data_dir_err(&path, "write failover.toml"))
}

/// Releases a group that this process has loaded (the daemon's, once its connection has
/// ended; or one loaded for the purpose): waits until the replicas hold every record of the
/// journal, stops the applier, checkpoints the replicas and records `released`.
pub(crate) fn finish_release(fs: &dyn Storage, group: Group, mut state: FailoverState) -> Result<FailoverState, TargetError> {
    let last = group.with_replicas(|_, seq| seq).map_err(|e| TargetError::Inconsistent {
        group: group.name.clone(),
        reason: format!("the replicas cannot be brought up to the journal: {e}"),
    })?;
    group.maintain(true);
    if let Some(why) = group.stopped() {
        return Err(TargetError::Inconsistent { group: group.name.clone(), reason: why });
    }
    let paths = group.paths().clone();
    drop(group);
    state.state = Stage::Released;
    state.last_seq = Some(last);
    store(fs, &paths, &state)?;
    log::info!("group {:?}: released for failover with every record up to seq {last} in its replicas", paths_name(&paths));
    Ok(state)
}

fn paths_name(paths: &GroupPaths) -> String {
    paths.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Releases a group with no daemon serving it: loads it (which replays the journal into the
/// replicas as at every start) and finishes the release.
pub(crate) fn release_offline(
    fs: &Arc<dyn Storage>,
    paths: GroupPaths,
    name: &str,
    opts: GroupOptions,
    state: FailoverState,
) -> Result<FailoverState, TargetError> {
    let group = Group::load(Arc::clone(fs), paths, name, opts)?;
    finish_release(fs.as_ref(), group, state)
}

/// What a failover did.
#[derive(Debug, Clone)]
pub struct FailoverReport {
    pub group: String,
    pub epoch: u64,
    /// The point the volumes hold.
    pub seq: Seq,
    pub time_ns: u64,
    pub consistency: String,
    /// The newest record the target held.
    pub last_seq: Seq,
    /// Each volume and its promoted image.
    pub volumes: Vec<(Volume, PathBuf)>,
    /// Bytes written back to bring the replicas from `last_seq` to the point.
    pub undone_bytes: u64,
    /// From the request to the release of the group.
    pub release_took: Duration,
    /// From the request to the promoted volumes ready.
    pub took: Duration,
}

/// Fails group `group` over to `point` (docs/failover.md): asks whoever serves the group to
/// release it (or releases it when no daemon runs), waits up to `wait` for that, then makes
/// the replicas the production volumes at the point. Run again after a crash, it resumes.
pub fn failover(config: &TargetConfig, group: &str, point: &Point, wait: Duration) -> Result<FailoverReport, TargetError> {
    let started = Instant::now();
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let (paths, meta) = find_group(config, fs.as_ref(), group)?;
    let state = match load(fs.as_ref(), group, &paths)? {
        Some(s) if s.state == Stage::FailedOver => {
            return Err(TargetError::AlreadyFailedOver {
                group: group.to_owned(),
                at_ns: s.promoted_ns.unwrap_or(s.requested_ns),
                seq: s.seq.unwrap_or(0),
                dir: paths.promoted_dir(),
            })
        }
        Some(s) => {
            log::info!("group {group:?}: resuming the failover asked for at {} ({:?})", format_rfc3339(s.requested_ns), s.state);
            s
        }
        None => {
            let s = FailoverState {
                version: VERSION,
                state: Stage::Requested,
                epoch: meta.epoch + 1,
                requested_ns: now_ns(),
                by: "failover".to_owned(),
                last_seq: None,
                seq: None,
                time_ns: None,
                consistency: None,
                promoted_ns: None,
            };
            store(fs.as_ref(), &paths, &s)?;
            // After failover.toml: a daemon that sees this finds the request at once.
            let asked = config.data_dir.join(FAILOVER_ASKED);
            fs.open(&asked, OpenMode::Create).map_err(data_dir_err(&asked, "tell the daemon"))?;
            log::info!("group {group:?}: failover asked for (epoch {}); the target takes nothing more of it", s.epoch);
            s
        }
    };
    let state = wait_released(config, &fs, &paths, group, state, wait)?;
    let release_took = started.elapsed();
    let last_seq = state.last_seq.expect("a released group records its last seq");
    let view = PointView::open(config, group, point)?;
    let seq = view.seq();
    if let Some(recorded) = state.seq.filter(|s| *s != seq) {
        return Err(TargetError::FailoverPointChanged { group: group.to_owned(), recorded, requested: seq });
    }
    if seq > last_seq {
        return Err(TargetError::Inconsistent {
            group: group.to_owned(),
            reason: format!("the point seq {seq} is past the newest record the replicas hold (seq {last_seq})"),
        });
    }
    let mut state = FailoverState {
        state: Stage::Promoting,
        seq: Some(seq),
        time_ns: Some(view.time_ns()),
        consistency: Some(view.consistency().to_owned()),
        ..state
    };
    store(fs.as_ref(), &paths, &state)?;
    let volumes: Vec<Volume> = view.volumes().cloned().collect();
    let promoted = move_replicas(fs.as_ref(), group, &paths, &volumes)?;
    let undone_bytes = bring_back(&fs, &paths, &view, &promoted, last_seq)?;
    for path in &promoted {
        let f = fs.open(path, OpenMode::ReadWrite).map_err(data_dir_err(path, "open promoted image"))?;
        f.sync_data().map_err(data_dir_err(path, "sync promoted image"))?;
    }
    state.state = Stage::FailedOver;
    state.promoted_ns = Some(now_ns());
    store(fs.as_ref(), &paths, &state)?;
    let took = started.elapsed();
    log::info!(
        "group {group:?}: failed over to seq {seq} ({}) in {took:?}: {} bytes written back from seq {last_seq}",
        format_rfc3339(view.time_ns()),
        undone_bytes
    );
    Ok(FailoverReport {
        group: group.to_owned(),
        epoch: state.epoch,
        seq,
        time_ns: view.time_ns(),
        consistency: view.consistency().to_owned(),
        last_seq,
        volumes: volumes.into_iter().zip(promoted).collect(),
        undone_bytes,
        release_took,
        took,
    })
}

/// Waits until the group is released: by the daemon, or by this process when no daemon holds
/// the data directory.
fn wait_released(
    config: &TargetConfig,
    fs: &Arc<dyn Storage>,
    paths: &GroupPaths,
    group: &str,
    mut state: FailoverState,
    wait: Duration,
) -> Result<FailoverState, TargetError> {
    let deadline = Instant::now() + wait;
    let daemon_lock = config.data_dir.join(DAEMON_LOCK);
    while state.state == Stage::Requested {
        if let Some(_held) = lock_file(&daemon_lock, LockKind::Exclusive, false, true).map_err(data_dir_err(&daemon_lock, "lock"))? {
            // No daemon: this process serves the data directory until the release is done.
            let opts = GroupOptions {
                segment_size: config.segment_size,
                retention: None,
                journal_size: None,
                direct_io: config.direct_io,
                tiers: &hindsight_consistency::config::NO_TIERS,
            };
            return release_offline(fs, paths.clone(), group, opts, state);
        }
        if Instant::now() >= deadline {
            return Err(TargetError::NotReleased { group: group.to_owned(), waited: wait });
        }
        std::thread::sleep(POLL);
        state = load(fs.as_ref(), group, paths)?
            .ok_or_else(|| bad_state(group, &paths.failover(), "disappeared while the failover waited for the daemon".to_owned()))?;
    }
    Ok(state)
}

/// Moves every volume's replica to `promoted/` (those not moved yet), durably.
fn move_replicas(fs: &dyn Storage, group: &str, paths: &GroupPaths, volumes: &[Volume]) -> Result<Vec<PathBuf>, TargetError> {
    let dir = paths.promoted_dir();
    fs.create_dir_all(&dir).map_err(data_dir_err(&dir, "create directory"))?;
    let mut out = Vec::new();
    for v in volumes {
        let from = paths.replica_dir().join(image_name(&v.name));
        let to = dir.join(image_name(&v.name));
        if !fs.exists(&to) {
            if !fs.exists(&from) {
                return Err(TargetError::Inconsistent {
                    group: group.to_owned(),
                    reason: format!("volume {:?} has neither a replica ({}) nor a promoted image", v.name, from.display()),
                });
            }
            fs.rename(&from, &to).map_err(data_dir_err(&from, "move the replica to promoted/"))?;
        }
        out.push(to);
    }
    for d in [paths.replica_dir(), dir] {
        fs.sync_dir(&d).map_err(data_dir_err(&d, "sync directory"))?;
    }
    Ok(out)
}

/// Writes over every range that the records after the view's point wrote its content at the
/// point, in `promoted` (one image per volume of the view, at `last_seq`); returns the bytes
/// written.
fn bring_back(
    fs: &Arc<dyn Storage>,
    paths: &GroupPaths,
    view: &PointView,
    promoted: &[PathBuf],
    last_seq: Seq,
) -> Result<u64, TargetError> {
    let group = view.group();
    let index: BTreeMap<String, usize> = view.volumes().enumerate().map(|(i, v)| (v.name.clone(), i)).collect();
    let mut ranges: Vec<Vec<(u64, u64)>> = vec![Vec::new(); index.len()];
    // Thinned history after the point: a record it dropped wrote nothing that a record it
    // kept (or the journal after it) does not write again, so the kept extents' ranges cover
    // every byte changed since the point.
    let mut from = view.seq() + 1;
    let thinned = crate::thinning::segment::find_thinned(fs.as_ref(), &paths.thin_dir(), false)
        .map_err(|source| TargetError::Thinned { group: group.to_owned(), source })?;
    for f in &thinned {
        if f.table.run.last_seq <= view.seq() {
            continue;
        }
        for e in f.table.run.extents().iter().filter(|e| e.seq > view.seq()) {
            if let Some(&i) = index.get(&f.table.run.volumes[usize::from(e.volume)]) {
                ranges[i].push((e.offset, e.end()));
            }
        }
        from = from.max(f.table.run.last_seq + 1);
    }
    for_each_record(fs, group, &paths.journal(), from, last_seq, |rec| {
        // The kinds the applier applies to the replicas (a superseded record changed nothing).
        let writes = matches!(rec.header.kind, WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim | WriteKind::Resync);
        if writes && rec.header.length > 0 {
            if let Some(&i) = index.get(rec.volume) {
                ranges[i].push((rec.header.offset, rec.header.offset + u64::from(rec.header.length)));
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (i, list) in ranges.iter_mut().enumerate() {
        let path = &promoted[i];
        let file = fs.open(path, OpenMode::ReadWrite).map_err(data_dir_err(path, "open promoted image"))?;
        for (from, to) in merge(list) {
            let mut at = from;
            while at < to {
                let n = usize::try_from((to - at).min(CHUNK as u64)).expect("at most CHUNK");
                view.read(i, at, &mut buf[..n]).map_err(|e| TargetError::Inconsistent {
                    group: group.to_owned(),
                    reason: format!("reading the point at byte {at} of a volume: {e}"),
                })?;
                file.write_all_at(&buf[..n], at).map_err(data_dir_err(path, "write promoted image"))?;
                written += n as u64;
                at += n as u64;
            }
        }
    }
    Ok(written)
}

/// Sorts ranges and joins those that overlap or touch.
fn merge(list: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    list.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(from, to) in list.iter() {
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

/// The group's failover state, for `history` and `status` at the target.
pub fn state_of(config: &TargetConfig, group: &str) -> Result<Option<FailoverState>, TargetError> {
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let (paths, _) = find_group(config, fs.as_ref(), group)?;
    load(fs.as_ref(), group, &paths)
}

/// `failover-test.toml` of a group: the test failover running now, if any.
pub fn test_record(config: &TargetConfig, group: &str) -> PathBuf {
    GroupPaths::new(&config.data_dir, group).dir.join("failover-test.toml")
}

/// `failover-tests/` of a group: a report per finished test failover.
pub fn test_reports(config: &TargetConfig, group: &str) -> PathBuf {
    GroupPaths::new(&config.data_dir, group).dir.join("failover-tests")
}

/// Where the production volumes of a failed-over group are.
pub fn promoted_dir(config: &TargetConfig, group: &str) -> PathBuf {
    GroupPaths::new(&config.data_dir, group).promoted_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_when_they_overlap_or_touch() {
        let mut l = vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 41)];
        assert_eq!(merge(&mut l), vec![(0, 8), (10, 30), (40, 41)]);
        assert!(merge(&mut []).is_empty());
    }

    #[test]
    fn the_state_file_round_trips_and_refuses_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        let paths = GroupPaths::new(dir.path(), "g");
        fs.create_dir_all(&paths.dir).unwrap();
        assert_eq!(load(fs.as_ref(), "g", &paths).unwrap(), None);
        let s = FailoverState {
            version: VERSION,
            state: Stage::Promoting,
            epoch: 1,
            requested_ns: 1,
            by: "failover".into(),
            last_seq: Some(9),
            seq: Some(7),
            time_ns: Some(2),
            consistency: Some("crash-consistent".into()),
            promoted_ns: None,
        };
        store(fs.as_ref(), &paths, &s).unwrap();
        let text = std::fs::read_to_string(paths.failover()).unwrap();
        assert!(text.contains("state = \"promoting\"") && !text.contains("promoted_ns"), "{text}");
        assert_eq!(load(fs.as_ref(), "g", &paths).unwrap(), Some(s.clone()));
        assert!(s.refusal("g").contains("epoch 1, to seq 7"));
        std::fs::write(paths.failover(), text.replace("version = 1", "version = 2")).unwrap();
        let e = load(fs.as_ref(), "g", &paths).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
    }
}
