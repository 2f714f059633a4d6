//! Reading a group from outside the daemon: a group's history (its recoverable window), and
//! recovery of a volume at any point of that window through the point-in-time index.
//!
//! These functions only read the group (they write nothing under the data directory), so
//! they may run in another process while the daemon works on the same data directory. They
//! hold the group's `lock` shared while they read `state`, `base/` and the journal; the
//! daemon's retention takes it exclusively to change those.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::storage::{OpenMode, StdStorage, Storage, StorageFile};
use hindsight_consistency::time::now_ns;

use crate::error::TargetError;
use crate::group_view::{find_group, open_view};
use crate::layout::groups_dir;
use crate::model::{Bookmark, History, RecoverReport, RecoverRequest};
use crate::point_index::resolve::{Piece, Source};
use crate::point_view::PointView;

/// Copy and zero-detection granularity of recovery.
const CHUNK: usize = 4 << 20;
/// How much of a volume recovery resolves at once (its pieces are held in memory meanwhile).
const WINDOW: u64 = 128 << 20;

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
    let tiers = crate::thinning::summary::tiers_of(&v, config.tiers.of(group), now_ns());
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
        exports: crate::exports::active(fs.as_ref(), &v.paths.exports_dir()),
        tiers,
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

/// Writes the image of one volume at a point in time: each stretch of it resolved through the
/// point-in-time index ([`PointView`]) and read once, from the journal or the base image;
/// stretches that hold only zeroes are left as holes in a new file (written on a device).
/// The time this takes depends on the volume's size, not on the journal's length.
pub fn recover(config: &TargetConfig, req: &RecoverRequest) -> Result<RecoverReport, TargetError> {
    recover_with(config, req, &mut |_, _| {})
}

/// Like [`recover`], calling `progress(done, total)` (bytes of the volume) as it goes.
pub fn recover_with(config: &TargetConfig, req: &RecoverRequest, progress: &mut dyn FnMut(u64, u64)) -> Result<RecoverReport, TargetError> {
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let (_, meta) = find_group(config, fs.as_ref(), &req.group)?;
    let Some(vol) = meta.volume(&req.volume).cloned() else {
        return Err(TargetError::UnknownVolume { group: req.group.clone(), volume: req.volume.clone(), known: meta.volume_names() });
    };
    let output = check_output(config, &req.out, vol.size)?;
    let view = PointView::open(config, &req.group, &req.point)?;
    let index = view.volumes().position(|v| v.name == vol.name).expect("the group's own volume");

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
    let res = copy_volume(&view, index, dst.as_ref(), matches!(output, Output::Device), progress).map_err(|source| TargetError::Output {
        path: file_path.clone(),
        step: "write the image",
        source,
    });
    if let Err(e) = res {
        if let Output::NewFile { tmp } = &output {
            let _ = fs.remove_file(tmp);
        }
        return Err(e);
    }
    let (seq, time_ns) = (view.seq(), view.time_ns());
    let records_applied = view.records_of(index);
    let consistency = view.consistency().to_owned();
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
        "recovered group {:?} volume {:?} at seq {seq} ({}) into {}: {records_applied} record(s) of the volume after the base",
        req.group,
        req.volume,
        hindsight_consistency::time::format_rfc3339(time_ns),
        req.out.display(),
    );
    Ok(RecoverReport { group: req.group.clone(), volume: req.volume.clone(), seq, time_ns, consistency, records_applied, bytes: vol.size })
}

/// Copies volume `index` of the view, a window of [`WINDOW`] bytes at a time: first what comes
/// from the base image, in offset order (its holes skipped), then what comes from the journal,
/// in the order it lies in the segment files, so that the journal is read front to back
/// rather than in the volume's order (which would be a random read of it). Every block is
/// read once. Zeroes are left as holes in a new file, or written on a device.
fn copy_volume(view: &PointView, index: usize, dst: &dyn StorageFile, device: bool, progress: &mut dyn FnMut(u64, u64)) -> io::Result<()> {
    let size = view.volumes().nth(index).map_or(0, |v| v.size);
    // A flusher syncs what the windows before wrote while the next one is copied, so that the
    // final sync waits for the last window only (writeback overlaps the copy).
    let (flush_tx, flush_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::scope(|scope| {
        let flusher = scope.spawn(move || -> io::Result<()> {
            while flush_rx.recv().is_ok() {
                dst.sync_data()?;
            }
            Ok(())
        });
        let copied = (|| {
            let mut buf = vec![0u8; CHUNK];
            let mut start = 0u64;
            while start < size {
                let end = (start + WINDOW).min(size);
                copy_window(view, index, dst, device, &mut buf, start, end)?;
                let _ = flush_tx.try_send(());
                progress(end, size);
                start = end;
            }
            Ok(())
        })();
        drop(flush_tx);
        let flushed = flusher.join().unwrap_or_else(|_| Err(io::Error::other("the flusher thread panicked")));
        copied.and(flushed)
    })
}

/// Copies `[start, end)` of the volume: what comes from the base image first, in offset order,
/// then what comes from the journal, in the order it lies in the segment files.
fn copy_window(
    view: &PointView,
    index: usize,
    dst: &dyn StorageFile,
    device: bool,
    buf: &mut Vec<u8>,
    start: u64,
    end: u64,
) -> io::Result<()> {
    let pieces = view.pieces(index, start, end)?;
    let mut journal = Vec::new();
    for p in &pieces {
        match p.source {
            Source::Journal { segment, pos } => journal.push((segment, pos, p)),
            Source::Zero if device => dst.zero_range(p.offset, p.len)?,
            Source::Zero => {}
            Source::Base => copy_base(view, index, p, dst, device, buf)?,
        }
    }
    journal.sort_unstable_by_key(|&(segment, pos, _)| (segment, pos));
    for (_, _, p) in journal {
        let n = usize::try_from(p.len).expect("a record's length");
        if buf.len() < n {
            buf.resize(n, 0);
        }
        view.read_piece(index, p, &mut buf[..n])?;
        dst.write_all_at(&buf[..n], p.offset)?;
    }
    Ok(())
}

/// Copies a stretch that comes from the base image, in chunks; chunks the base image holds no
/// data in are not read.
fn copy_base(view: &PointView, index: usize, p: &Piece, dst: &dyn StorageFile, device: bool, buf: &mut [u8]) -> io::Result<()> {
    let end = p.offset + p.len;
    let mut off = p.offset;
    while off < end {
        let n = usize::try_from((end - off).min(CHUNK as u64)).expect("at most CHUNK");
        let chunk = Piece { offset: off, len: n as u64, source: Source::Base };
        let zero = !view.base_may_hold_data(index, off, off + n as u64) || {
            view.read_piece(index, &chunk, &mut buf[..n])?;
            buf[..n].iter().all(|&b| b == 0)
        };
        if !zero {
            dst.write_all_at(&buf[..n], off)?;
        } else if device {
            dst.zero_range(off, n as u64)?;
        }
        off += n as u64;
    }
    Ok(())
}
