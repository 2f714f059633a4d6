//! Reading a group from outside the daemon: the list of groups, a group's history (its
//! recoverable window), and recovery of a volume at any point of that window.
//!
//! These functions only read the group (they write nothing under the data directory), so
//! they may run in another process while the daemon works on the same data directory. They
//! hold the group's `lock` shared while they read `state`, `base/` and the journal; the
//! daemon's retention takes it exclusively to change those.

use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight_consistency::config::{check_name, TargetConfig};
use hindsight_consistency::journal::{list_segments, JournalReader};
use hindsight_consistency::storage::{OpenMode, StdStorage, Storage, StorageFile};
use hindsight_consistency::{PointConsistency, Seq};

use crate::error::{data_dir_err, TargetError};
use crate::image::{apply_record, Image};
use crate::layout::{groups_dir, GroupPaths};
use crate::lock::{lock_file, FileLock, LockKind};
use crate::meta::GroupMeta;
use crate::model::{Bookmark, History, Point, RecoverReport, RecoverRequest, Volume};
use crate::records::for_each_record;
use crate::state::{load_state, GroupState};

/// Copy and zero-detection granularity of recovery.
const CHUNK: usize = 1 << 20;

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
    segments: usize,
    journal_bytes: u64,
    _lock: FileLock,
}

fn unknown_group(config: &TargetConfig, group: &str) -> TargetError {
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
    let journal_dir = paths.journal();
    let segs = match list_segments(fs.as_ref(), &journal_dir) {
        Ok(s) => s,
        Err(source) => return Err(TargetError::Journal { group: group.to_owned(), step: "list segments", source }),
    };
    let mut journal_bytes = 0;
    for (_, path) in &segs {
        let f = fs.open(path, OpenMode::Read).map_err(data_dir_err(path, "open segment"))?;
        journal_bytes += f.len().map_err(data_dir_err(path, "stat segment"))?;
    }
    let jerr = |step| move |source| TargetError::Journal { group: group.to_owned(), step, source };
    // The newest record: read the last segment to its end (the tail may be being written
    // right now; the reader stops before an incomplete record). A segment without records
    // sends the search one segment back.
    let mut last = first;
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
    Ok(GroupView { name: group.to_owned(), paths, meta, state, first, last, segments: segs.len(), journal_bytes, _lock: lock })
}

/// The history of a group: its volumes and the window of points that can be recovered.
pub fn history(config: &TargetConfig, group: &str) -> Result<History, TargetError> {
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let (paths, meta) = find_group(config, fs.as_ref(), group)?;
    let v = open_view(&fs, paths, meta, group)?;
    // Bookmarks come from the index the receiver keeps, never from reading the journal;
    // those outside the recoverable window are left out.
    let bookmarks: Vec<Bookmark> = crate::bookmarks::load(fs.as_ref(), &v.paths.bookmarks())
        .map_err(|reason| TargetError::Inconsistent { group: group.to_owned(), reason: format!("bookmark index: {reason}") })?
        .into_iter()
        .filter(|b| b.seq > v.first.0 && b.seq <= v.last.0)
        .collect();
    let inconsistent: Vec<crate::spans::Span> = crate::spans::load(fs.as_ref(), &v.paths.spans())
        .map_err(|reason| TargetError::Inconsistent { group: group.to_owned(), reason: format!("span index: {reason}") })?
        .into_iter()
        .filter(|s| s.to.is_none_or(|t| t > v.first.0) && s.from <= v.last.0)
        .collect();
    let last_consistent_seq = crate::spans::consistent_at_or_before(&inconsistent, v.last.0);
    Ok(History {
        group: v.name.clone(),
        engine: v.meta.engine.clone(),
        volumes: v.meta.volumes.clone(),
        first_seq: v.first.0,
        first_time_ns: v.first.1,
        last_seq: v.last.0,
        last_time_ns: v.last.1,
        applied_seq: v.state.applied_seq,
        journal_bytes: v.journal_bytes,
        segments: v.segments,
        retention_ns: config.retention.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        journal_size: config.journal_size,
        bookmarks,
        inconsistent,
        last_consistent_seq,
    })
}

/// Where the recovered image goes.
enum Output {
    /// A new regular file, built under a temporary name and renamed at the end.
    NewFile { tmp: PathBuf },
    /// An existing block device, written in place (every byte, zeroes included).
    Device,
}

/// Checks the output path: not inside the data directory's groups, not an existing file.
fn check_output(config: &TargetConfig, out: &Path, size: u64) -> Result<Output, TargetError> {
    let refuse = |reason: String| TargetError::OutputRefused { path: out.to_owned(), reason };
    let Some(file_name) = out.file_name() else {
        return Err(refuse("is not a file path; give e.g. /srv/restore/db.img".into()));
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent =
        parent.canonicalize().map_err(|e| refuse(format!("its directory {} cannot be used ({e}); create it first", parent.display())))?;
    let resolved = parent.join(file_name);
    if let Ok(groups) = groups_dir(&config.data_dir).canonicalize() {
        if resolved.starts_with(&groups) {
            return Err(refuse(format!(
                "is inside the target's group directories ({}); write the recovered image somewhere else",
                groups.display()
            )));
        }
    }
    match std::fs::metadata(&resolved) {
        Ok(m) if m.file_type().is_block_device() => {
            let f = StdStorage.open(&resolved, OpenMode::Read).map_err(|e| TargetError::Output {
                path: out.to_owned(),
                step: "open",
                source: e,
            })?;
            let len = f.len().map_err(|e| TargetError::Output { path: out.to_owned(), step: "size", source: e })?;
            if len < size {
                return Err(refuse(format!("is a block device of {len} bytes, smaller than the volume ({size} bytes)")));
            }
            Ok(Output::Device)
        }
        Ok(_) => Err(refuse("already exists; remove it or give another path".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut tmp = out.as_os_str().to_owned();
            tmp.push(".partial");
            Ok(Output::NewFile { tmp: tmp.into() })
        }
        Err(e) => Err(TargetError::Output { path: out.to_owned(), step: "stat", source: e }),
    }
}

/// Builds the image of one volume at a point in time: the base image, then every record of
/// the volume after the base up to the point.
pub fn recover(config: &TargetConfig, req: &RecoverRequest) -> Result<RecoverReport, TargetError> {
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let (paths, meta) = find_group(config, fs.as_ref(), &req.group)?;
    let Some(vol) = meta.volume(&req.volume).cloned() else {
        return Err(TargetError::UnknownVolume { group: req.group.clone(), volume: req.volume.clone(), known: meta.volume_names() });
    };
    let output = check_output(config, &req.out, vol.size)?;
    let view = open_view(&fs, paths, meta, &req.group)?;
    let (through, until_time) = resolve_point(&fs, &view, &req.point)?;

    let (file_path, dst) = match &output {
        Output::NewFile { tmp } => {
            let f = fs.open(tmp, OpenMode::Truncate).map_err(|e| TargetError::Output { path: tmp.clone(), step: "create", source: e })?;
            f.set_len(vol.size).map_err(|e| TargetError::Output { path: tmp.clone(), step: "set the size", source: e })?;
            (tmp.clone(), f)
        }
        Output::Device => {
            let f = fs.open(&req.out, OpenMode::ReadWrite).map_err(|e| TargetError::Output {
                path: req.out.clone(),
                step: "open",
                source: e,
            })?;
            (req.out.clone(), f)
        }
    };
    let out = OutFile { file: dst, path: file_path, device: matches!(output, Output::Device) };
    let res = build(&fs, &view, &vol, &out, through, until_time);
    let dst = out.file;
    let (point, records_applied) = match res {
        Ok(r) => r,
        Err(e) => {
            if let Output::NewFile { tmp } = &output {
                let _ = fs.remove_file(tmp);
            }
            return Err(e);
        }
    };
    let base_seq = view.state.base_seq;
    let consistency = point_consistency(fs.as_ref(), &view, point.0);
    drop(view);
    let out_err = |step| {
        let path = req.out.clone();
        move |source| TargetError::Output { path, step, source }
    };
    let finish = (|| {
        dst.sync_data().map_err(out_err("sync"))?;
        if let Output::NewFile { tmp } = &output {
            fs.rename(tmp, &req.out).map_err(out_err("rename the finished image to its name"))?;
            let dir = match req.out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            fs.sync_dir(dir).map_err(out_err("sync its directory"))?;
        }
        Ok(())
    })();
    if let (Err(_), Output::NewFile { tmp }) = (&finish, &output) {
        let _ = fs.remove_file(tmp);
    }
    finish?;
    log::info!(
        "recovered group {:?} volume {:?} at seq {} ({}) into {}: {records_applied} record(s) applied on the base at seq {}",
        req.group,
        req.volume,
        point.0,
        hindsight_consistency::time::format_rfc3339(point.1),
        req.out.display(),
        base_seq,
    );
    Ok(RecoverReport {
        group: req.group.clone(),
        volume: req.volume.clone(),
        seq: point.0,
        time_ns: point.1,
        consistency,
        records_applied,
        bytes: vol.size,
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
    let spans: Vec<crate::spans::Span> = spans.into_iter().filter(|s| s.to.is_none_or(|t| t > view.first.0)).collect();
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

/// The last sequence number whose time is at or before `t` (by reading the journal).
pub(crate) fn seq_at_time(fs: &Arc<dyn Storage>, view: &GroupView, t: u64) -> Result<Seq, TargetError> {
    let mut seq = view.state.base_seq;
    for_each_record(fs, &view.name, &view.paths.journal(), view.state.base_seq + 1, view.last.0, |rec| {
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

/// The image being written.
struct OutFile {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    /// A block device: zeroes must be written, not skipped.
    device: bool,
}

/// Copies the base image and applies the records; returns the point reached and how many
/// records of the volume were applied.
fn build(
    fs: &Arc<dyn Storage>,
    view: &GroupView,
    vol: &Volume,
    out: &OutFile,
    through: Seq,
    until_time: Option<u64>,
) -> Result<((Seq, u64), u64), TargetError> {
    let (dst, dst_path) = (out.file.as_ref(), out.path.as_path());
    let base = Image::open(fs.as_ref(), &view.name, &view.paths.base_dir(), vol, false)?;
    copy_image(base.file.as_ref(), dst, vol.size, out.device).map_err(|source| TargetError::Output {
        path: dst_path.to_owned(),
        step: "copy the base image",
        source,
    })?;
    let mut applied = 0u64;
    let from = view.state.base_seq + 1;
    let last = for_each_record(fs, &view.name, &view.paths.journal(), from, through, |rec| {
        if until_time.is_some_and(|t| rec.header.time_ns > t) {
            return Ok(ControlFlow::Break(()));
        }
        if rec.volume == vol.name && rec.header.kind.changes_volume() {
            apply_record(dst, rec).map_err(|source| TargetError::Apply {
                group: view.name.clone(),
                volume: vol.name.clone(),
                seq: rec.header.seq,
                path: dst_path.to_owned(),
                source,
            })?;
            applied += 1;
        }
        Ok(ControlFlow::Continue(()))
    })?;
    let point = if last.0 == view.state.base_seq { (view.state.base_seq, view.state.base_time_ns) } else { last };
    Ok((point, applied))
}

/// Copies `size` bytes; all-zero chunks are skipped (the new file reads back zeroes there)
/// or, on a device, zeroed.
fn copy_image(src: &dyn StorageFile, dst: &dyn StorageFile, size: u64, device: bool) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(CHUNK as u64)).expect("at most CHUNK");
        src.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().all(|&b| b == 0) {
            if device {
                dst.zero_range(off, n as u64)?;
            }
        } else {
            dst.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
    }
    Ok(())
}
