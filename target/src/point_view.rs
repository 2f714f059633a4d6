//! A group as it was at one point, readable at once: every volume's bytes resolved through the
//! point-in-time index (docs/point-index.md) from the journal's segments and the base images,
//! with nothing copied first. `hindsight export` serves it over NBD; it holds the group's lock
//! shared for as long as it lives, so retention folds nothing while a point is served (the
//! point is *pinned*).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::journal::list_segments;
use hindsight_consistency::storage::{OpenMode, StdStorage, Storage, StorageFile};
use hindsight_consistency::Seq;

use crate::error::{data_dir_err, TargetError};
use crate::group_view::{find_group, open_view, point_consistency, resolve_point, GroupView};
use crate::layout::image_name;
use crate::model::{Point, Volume};
use crate::point_index::resolve::{resolve, Piece, Source, Window};
use crate::point_index::store::{sealed_run, Segment};
use crate::point_index::Run;

/// One volume of a [`PointView`].
struct ViewVolume {
    volume: Volume,
    base: Box<dyn StorageFile>,
}

/// A group at one point.
pub struct PointView {
    group: String,
    seq: Seq,
    time_ns: u64,
    consistency: String,
    window: Window,
    volumes: Vec<ViewVolume>,
    /// The runs of the segments the point needs, oldest first.
    runs: Vec<Run>,
    /// Their segment files, by first sequence number.
    segments: BTreeMap<Seq, Box<dyn StorageFile>>,
    /// How many runs had to be built from the journal (no index file, or a damaged one).
    rebuilt: usize,
    /// Holds the group's lock shared: the pin.
    view: GroupView,
}

impl PointView {
    /// Opens group `group` of the target at `point`; refuses a point outside the window or
    /// one that is not consistent, as `recover` does.
    pub fn open(config: &TargetConfig, group: &str, point: &Point) -> Result<PointView, TargetError> {
        let fs: Arc<dyn Storage> = StdStorage::shared();
        let (paths, meta) = find_group(config, fs.as_ref(), group)?;
        let view = open_view(&fs, paths, meta, group)?;
        let (through, until_time) = resolve_point(&fs, &view, point)?;
        let jerr = |step| move |source| TargetError::Journal { group: group.to_owned(), step, source };
        let journal_dir = view.paths.journal();
        let listed = list_segments(fs.as_ref(), &journal_dir).map_err(jerr("list segments"))?;
        let names: Vec<String> = view.meta.volumes.iter().map(|v| v.name.clone()).collect();
        let after = view.state.base_seq;
        let mut runs = Vec::new();
        let mut segments = BTreeMap::new();
        let mut rebuilt = 0;
        // Thinned history first (the oldest), its data files read like segments.
        for f in &view.thinned {
            let run = &f.table.run;
            if run.first_seq > through || run.last_seq <= after {
                continue;
            }
            let file = fs.open(&f.data, OpenMode::Read).map_err(data_dir_err(&f.data, "open thinned segment"))?;
            segments.insert(run.first_seq, file);
            runs.push(run.clone());
        }
        for (i, (first_seq, path)) in listed.iter().enumerate() {
            let last = listed.get(i + 1).map(|next| next.0 - 1);
            if *first_seq > through || last.is_some_and(|l| l <= after) || (*first_seq <= view.thinned_to && !view.thinned.is_empty()) {
                continue;
            }
            let seg = Segment { first_seq: *first_seq, path: path.clone() };
            let run = match last {
                Some(last) => {
                    let (run, built) = sealed_run(&fs, &journal_dir, &view.paths.index_dir(), &names, &seg, last)
                        .map_err(|source| TargetError::Index { group: group.to_owned(), source })?;
                    rebuilt += usize::from(built);
                    run
                }
                // The active segment has no index file: read it up to the point.
                None => {
                    let built = crate::point_index::build::build_runs(&fs, &journal_dir, &names, *first_seq, through)
                        .map_err(|source| TargetError::Index { group: group.to_owned(), source: source.into() })?;
                    match built.into_iter().next() {
                        Some(run) => run,
                        None => continue,
                    }
                }
            };
            let file = fs.open(path, OpenMode::Read).map_err(data_dir_err(path, "open segment"))?;
            segments.insert(*first_seq, file);
            runs.push(run);
        }
        // A time is found from the runs' times: only the segment that holds it is read.
        let seq = match until_time {
            Some(t) => seq_at_time_in(&fs, &view, &runs, t)?.min(through),
            None => through,
        };
        let time_ns = if seq == view.last.0 { view.last.1 } else { time_at(&fs, &view, seq)? };
        let mut volumes = Vec::with_capacity(view.meta.volumes.len());
        for v in &view.meta.volumes {
            let path = view.paths.base_dir().join(image_name(&v.name));
            let base = fs.open(&path, OpenMode::Read).map_err(data_dir_err(&path, "open base image"))?;
            volumes.push(ViewVolume { volume: v.clone(), base });
        }
        let consistency = point_consistency(fs.as_ref(), &view, seq);
        Ok(PointView {
            group: group.to_owned(),
            seq,
            time_ns,
            consistency,
            window: Window { after, point: seq },
            volumes,
            runs,
            segments,
            rebuilt,
            view,
        })
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The point: after the record with this sequence number.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The time of that record (of the base, at the oldest point).
    pub fn time_ns(&self) -> u64 {
        self.time_ns
    }

    /// `crash` or `application`, as `recover` reports it.
    pub fn consistency(&self) -> &str {
        &self.consistency
    }

    /// The group's volumes, in its order.
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.iter().map(|v| &v.volume)
    }

    /// The group's `exports/` directory: scratch space of writable exports, beside the journal.
    pub fn scratch_dir(&self) -> std::path::PathBuf {
        self.view.paths.exports_dir()
    }

    /// How many records of volume number `volume` lie between the base and the point.
    pub fn records_of(&self, volume: usize) -> u64 {
        let Some(v) = self.volumes.get(volume) else { return 0 };
        let w = self.window;
        self.runs
            .iter()
            .filter_map(|r| r.volume_number(&v.volume.name).map(|n| (r, n)))
            .map(|(r, n)| r.extents().iter().filter(|e| e.volume == n && e.seq > w.after && e.seq <= w.point).count() as u64)
            .sum()
    }

    /// Registers a running export of this point in the group's `exports/` directory, for
    /// `history` and the retention log; the registration is removed when dropped.
    pub fn register(&self, listen: &str, volumes: Vec<String>, writable: bool) -> std::io::Result<crate::exports::Registration> {
        let export = crate::exports::ActiveExport {
            pid: std::process::id(),
            seq: self.seq,
            time_ns: self.time_ns,
            listen: listen.to_owned(),
            volumes,
            writable,
            clients: 0,
            overlay_bytes: 0,
            started_ns: hindsight_consistency::time::now_ns(),
        };
        crate::exports::Registration::create(&StdStorage, &self.scratch_dir(), export)
    }

    /// How many segments had no index file that checked out and were read to index them.
    pub fn rebuilt_runs(&self) -> usize {
        self.rebuilt
    }

    /// Where each stretch of `[from, to)` of volume number `volume` comes from, in offset
    /// order (see [`resolve`]).
    pub fn pieces(&self, volume: usize, from: u64, to: u64) -> io::Result<Vec<Piece>> {
        let v = self.volumes.get(volume).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such volume"))?;
        if from > to || to > v.volume.size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the volume"));
        }
        let runs: Vec<&Run> = self.runs.iter().collect();
        Ok(resolve(&runs, &v.volume.name, from, to, self.window))
    }

    /// Reads the bytes of one piece of volume number `volume` into `out` (`piece.len` bytes).
    pub fn read_piece(&self, volume: usize, piece: &Piece, out: &mut [u8]) -> io::Result<()> {
        let v = self.volumes.get(volume).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such volume"))?;
        match piece.source {
            Source::Base => v.base.read_exact_at(out, piece.offset),
            Source::Zero => {
                out.fill(0);
                Ok(())
            }
            Source::Journal { segment, pos } => {
                let file = self.segments.get(&segment).ok_or_else(|| io::Error::other("a segment the index names is not open"))?;
                file.read_exact_at(out, pos)
            }
        }
    }

    /// False if the base image of volume number `volume` is known to hold only zeroes in
    /// `[from, to)` (a hole), so that reading it can be skipped.
    pub fn base_may_hold_data(&self, volume: usize, from: u64, to: u64) -> bool {
        self.volumes.get(volume).is_none_or(|v| v.base.may_hold_data(from, to))
    }

    /// Reads `buf.len()` bytes of volume number `volume` at `offset`, as they were at the
    /// point.
    pub fn read(&self, volume: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for p in self.pieces(volume, offset, offset + buf.len() as u64)? {
            let at = usize::try_from(p.offset - offset).expect("inside the buffer");
            self.read_piece(volume, &p, &mut buf[at..at + usize::try_from(p.len).expect("inside the buffer")])?;
        }
        Ok(())
    }
}

/// The last sequence number whose time is at or before `t`: the run whose records span `t` is
/// found by the times its index holds, and only its segment is read.
fn seq_at_time_in(fs: &Arc<dyn Storage>, view: &GroupView, runs: &[Run], t: u64) -> Result<Seq, TargetError> {
    let Some(run) = runs.iter().rev().find(|r| r.first_time_ns <= t) else { return Ok(view.state.base_seq) };
    if run.last_time_ns <= t {
        return Ok(run.last_seq);
    }
    let mut seq = run.first_seq.saturating_sub(1).max(view.state.base_seq);
    crate::records::for_each_record(fs, &view.name, &view.paths.journal(), run.first_seq, run.last_seq, |rec| {
        if rec.header.time_ns > t {
            return Ok(std::ops::ControlFlow::Break(()));
        }
        seq = rec.header.seq;
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    Ok(seq)
}

/// The time of record `seq` (the base's time for the base point).
fn time_at(fs: &Arc<dyn Storage>, view: &GroupView, seq: Seq) -> Result<u64, TargetError> {
    if seq <= view.state.base_seq {
        return Ok(view.first.1);
    }
    if seq <= view.thinned_to {
        return Ok(view.kept_time(seq).unwrap_or(view.first.1));
    }
    let mut time = view.first.1;
    crate::records::for_each_record(fs, &view.name, &view.paths.journal(), seq, seq, |rec| {
        time = rec.header.time_ns;
        Ok(std::ops::ControlFlow::Break(()))
    })?;
    Ok(time)
}
