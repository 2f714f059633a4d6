//! Bringing a group up: creating it at the engine's first hello, and loading it at start-up,
//! which finishes an interrupted roll of the base images and journal trim and replays into
//! the replicas every record they may have missed.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hindsight_consistency::journal::{Journal, JournalOptions};
use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::time::{format_rfc3339, now_ns};

use super::{Counters, Group, GroupOptions, Inner, Persist};
use crate::applier::{Applier, ApplyShared};
use crate::error::{data_dir_err, TargetError};
use crate::image::{Image, ImageSet};
use crate::layout::GroupPaths;
use crate::lock::{lock_file, LockKind};
use crate::marks::Marks;
use crate::meta::GroupMeta;
use crate::records::for_each_record;
use crate::state::{load_state, write_state, GroupState};
use crate::thinning::records::for_each_thinned_record;
use crate::thinning::segment::{find_thinned, Found};

impl Group {
    /// Creates a new group at the engine's first hello. `group.toml` is written last: until
    /// it exists the directory is an unfinished creation.
    pub fn create(fs: Arc<dyn Storage>, paths: GroupPaths, name: &str, meta: GroupMeta, opts: GroupOptions) -> Result<Group, TargetError> {
        for dir in [paths.dir.clone(), paths.replica_dir(), paths.base_dir()] {
            fs.create_dir_all(&dir).map_err(data_dir_err(&dir, "create directory"))?;
        }
        // The group's own entry; the entries inside it are synced with `state` below.
        if let Some(parent) = paths.dir.parent() {
            fs.sync_dir(parent).map_err(data_dir_err(parent, "sync directory"))?;
        }
        fs.open(&paths.lock(), OpenMode::Create).map_err(data_dir_err(&paths.lock(), "create lock file"))?;
        let journal =
            Journal::open(Arc::clone(&fs), &paths.journal(), JournalOptions { segment_size: opts.segment_size, direct: opts.direct_io })
                .map_err(|source| TargetError::Journal { group: name.to_owned(), step: "create", source })?;
        if journal.durable_seq() > 0 {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "{} holds records up to seq {} but group.toml is missing; move {} aside to start the group afresh",
                    paths.journal().display(),
                    journal.durable_seq(),
                    paths.dir.display()
                ),
            });
        }
        let mut replicas = ImageSet::empty(name);
        for v in &meta.volumes {
            replicas.insert(Image::create(fs.as_ref(), name, &paths.replica_dir(), v, true)?.with_direct_io(&fs, name, opts.direct_io));
            Image::create(fs.as_ref(), name, &paths.base_dir(), v, false)?;
        }
        for dir in [paths.replica_dir(), paths.base_dir()] {
            fs.sync_dir(&dir).map_err(data_dir_err(&dir, "sync directory"))?;
        }
        let state = GroupState { applied_seq: 0, base_seq: 0, base_time_ns: now_ns() };
        write_state(fs.as_ref(), &paths.state(), &state).map_err(data_dir_err(&paths.state(), "write state"))?;
        if fs.exists(&paths.state_next()) {
            fs.remove_file(&paths.state_next()).map_err(data_dir_err(&paths.state_next(), "remove"))?;
        }
        meta.store(fs.as_ref(), &paths.meta())?;
        log::info!(
            "group {name:?}: created for engine {} with volumes {}",
            meta.engine,
            meta.volumes.iter().map(|v| format!("{} ({} bytes, vm {})", v.name, v.size, v.vm)).collect::<Vec<_>>().join(", ")
        );
        Group::assemble(fs, paths, name, opts, state, (meta, journal, replicas, Vec::new()))
    }

    /// The group of a journal whose every durable record the replicas hold; starts its applier.
    fn assemble(
        fs: Arc<dyn Storage>,
        paths: GroupPaths,
        name: &str,
        opts: GroupOptions,
        state: GroupState,
        (meta, journal, replicas, thinned): (GroupMeta, Journal, ImageSet, Vec<Found>),
    ) -> Result<Group, TargetError> {
        let applied = ApplyShared::new(name, replicas, journal.durable_seq());
        let applier = Applier::start(Arc::new(applied))?;
        Ok(Group {
            name: name.to_owned(),
            paths,
            fs,
            opts,
            oldest_ns: AtomicU64::new(state.base_time_ns),
            persist: Mutex::new(Persist {
                state,
                last_checkpoint: Instant::now(),
                checkpointed_bytes: 0,
                first_time_cache: None,
                index_verified: false,
                pinned_by: None,
                gathered_runs: Vec::new(),
                thinned,
            }),
            inner: Mutex::new(Inner::new(meta, journal)),
            shipper: Mutex::new(None),
            notice: Mutex::new(None),
            applier,
            counters: Counters::default(),
            fenced: Mutex::new(None),
        })
    }

    /// Opens an existing group at start-up: finishes an interrupted roll of the base images
    /// and journal trim, and replays into the replicas every record they may have missed.
    pub fn load(fs: Arc<dyn Storage>, paths: GroupPaths, name: &str, opts: GroupOptions) -> Result<Group, TargetError> {
        let meta = GroupMeta::load(fs.as_ref(), name, &paths.meta())?;
        let mut state = load_state(fs.as_ref(), name, &paths.state())?.ok_or_else(|| TargetError::Inconsistent {
            group: name.to_owned(),
            reason: format!("{} is missing", paths.state().display()),
        })?;
        let jerr = |step| move |source| TargetError::Journal { group: name.to_owned(), step, source };
        let mut journal =
            Journal::open(Arc::clone(&fs), &paths.journal(), JournalOptions { segment_size: opts.segment_size, direct: opts.direct_io })
                .map_err(jerr("open"))?;
        // Journal::open takes every record it finds in the active segment as durable, but a
        // previous run may have stopped after a failed fdatasync with some of them only in the
        // page cache. Sync them before the engine is told they are held.
        if let Some(active) = journal.segments().last() {
            let f = fs.open(&active.path, OpenMode::Read).map_err(data_dir_err(&active.path, "open segment"))?;
            f.sync_data().map_err(data_dir_err(&active.path, "fdatasync segment"))?;
        }
        let durable = journal.durable_seq();
        if durable < state.applied_seq {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "the journal ends at seq {durable} but the replicas hold seq {}; journal/ was lost or truncated",
                    state.applied_seq
                ),
            });
        }

        let mut thinned =
            find_thinned(fs.as_ref(), &paths.thin_dir(), true).map_err(|source| TargetError::Thinned { group: name.to_owned(), source })?;
        if let Some(next) = load_state(fs.as_ref(), name, &paths.state_next())? {
            // A roll of the base images was interrupted: they hold some mix of the records
            // between the two base points. Applying the whole range again in order makes them
            // exact at the new point.
            let _lock = lock_file(&paths.lock(), LockKind::Exclusive, true, true).map_err(data_dir_err(&paths.lock(), "lock"))?;
            if next.base_seq > state.base_seq {
                if next.base_seq > durable {
                    return Err(TargetError::Inconsistent {
                        group: name.to_owned(),
                        reason: format!("state.next names seq {} beyond the journal's end at seq {durable}", next.base_seq),
                    });
                }
                log::info!(
                    "group {name:?}: finishing the interrupted roll of the base images from seq {} to seq {}",
                    state.base_seq,
                    next.base_seq
                );
                let base = ImageSet::open(fs.as_ref(), name, &paths.base_dir(), &meta.volumes)?;
                // Thinned history first, then the journal.
                let mut from = state.base_seq + 1;
                for f in &thinned {
                    if f.table.run.last_seq < from || f.table.run.first_seq > next.base_seq {
                        continue;
                    }
                    let through = f.table.run.last_seq.min(next.base_seq);
                    for_each_thinned_record(fs.as_ref(), name, f, from, through, |r| base.apply(r))?;
                    from = through + 1;
                }
                for_each_record(&fs, name, &paths.journal(), from, next.base_seq, |r| {
                    base.apply(r)?;
                    Ok(ControlFlow::Continue(()))
                })?;
                base.sync()?;
                // Retention checkpoints the replicas past the new base before it writes
                // state.next, so its applied_seq is a true claim.
                state = GroupState { applied_seq: state.applied_seq.max(next.applied_seq), ..next };
            }
            finish_roll(fs.as_ref(), &paths, &state)?;
        }
        // Thinned segments the base images hold now (a crash came before their files went).
        for f in thinned.iter().filter(|f| f.table.run.last_seq <= state.base_seq) {
            super::thin::remove_thinned(fs.as_ref(), &paths, f)?;
        }
        thinned.retain(|f| f.table.run.last_seq > state.base_seq);
        let history_to = crate::thinning::segment::thinned_through(&thinned, state.base_seq);
        let trimmed = journal.trim_through(history_to).map_err(jerr("trim"))?;
        if trimmed > 0 {
            log::info!("group {name:?}: removed {trimmed} journal segment(s) already folded into the base images");
        }
        if journal.first_seq() > state.applied_seq + 1 {
            return Err(TargetError::Inconsistent {
                group: name.to_owned(),
                reason: format!(
                    "the journal starts at seq {} but the replicas need seq {} onwards",
                    journal.first_seq(),
                    state.applied_seq + 1
                ),
            });
        }

        if !fs.exists(&paths.bookmarks()) || !fs.exists(&paths.spans()) {
            // No index (a group from before it existed, or the file was removed): the journal
            // is the truth; rebuild them once.
            let _ = fs.remove_file(&paths.bookmarks());
            let _ = fs.remove_file(&paths.spans());
            let mut marks = Marks::default();
            for_each_record(&fs, name, &paths.journal(), history_to + 1, durable, |r| {
                marks.see(r);
                Ok(ControlFlow::Continue(()))
            })?;
            let text_err = |reason| TargetError::Inconsistent { group: name.to_owned(), reason };
            marks.save(fs.as_ref(), &paths).map_err(|e| text_err(e.to_string()))?;
            for index in [paths.bookmarks(), paths.spans()] {
                if !fs.exists(&index) {
                    write_file_atomic(fs.as_ref(), &index, b"").map_err(|e| text_err(e.to_string()))?;
                }
            }
            log::info!("group {name:?}: rebuilt the bookmark and span indexes from the journal ({} bookmark(s))", marks.bookmark_count());
        }
        let replicas = ImageSet::open_replicas(&fs, name, &paths.replica_dir(), &meta.volumes, opts.direct_io)?;
        if durable > state.applied_seq {
            let started = Instant::now();
            let mut n = 0u64;
            let mut marks = Marks::default();
            for_each_record(&fs, name, &paths.journal(), state.applied_seq + 1, durable, |r| {
                replicas.apply(r)?;
                marks.see(r);
                n += 1;
                Ok(ControlFlow::Continue(()))
            })?;
            marks.save(fs.as_ref(), &paths).map_err(|e| TargetError::Inconsistent { group: name.to_owned(), reason: e.to_string() })?;
            replicas.sync()?;
            log::info!(
                "group {name:?}: replayed {n} record(s), seq {}..={durable}, into the replicas in {:.1?}",
                state.applied_seq + 1,
                started.elapsed()
            );
            state.applied_seq = durable;
            write_state(fs.as_ref(), &paths.state(), &state).map_err(data_dir_err(&paths.state(), "write state"))?;
        }
        log::info!(
            "group {name:?}: loaded; journal durable through seq {durable}, recoverable from seq {} ({})",
            state.base_seq,
            format_rfc3339(state.base_time_ns)
        );
        Group::assemble(fs, paths, name, opts, state, (meta, journal, replicas, thinned))
    }
}

/// Ends a roll of the base images: `state` takes the new base, `state.next` goes.
pub(super) fn finish_roll(fs: &dyn Storage, paths: &GroupPaths, state: &GroupState) -> Result<(), TargetError> {
    write_state(fs, &paths.state(), state).map_err(data_dir_err(&paths.state(), "write state"))?;
    fs.remove_file(&paths.state_next()).map_err(data_dir_err(&paths.state_next(), "remove"))?;
    fs.sync_dir(&paths.dir).map_err(data_dir_err(&paths.dir, "sync directory"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::*;
    use super::*;
    use crate::state::read_state;

    #[test]
    fn load_replays_what_the_replicas_lost_after_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let recs = records(30);
        let r = g.receive(&mut vec![frame(&recs[..15]), frame(&recs[15..])]);
        assert_eq!((r.durable_seq, r.error), (30, None));
        // No checkpoint ran, so the state still claims nothing; a crash may have kept any
        // subset of the replica's writes since it was created.
        drop(g);
        let replica = paths.replica_dir().join("v.img");
        std::fs::write(&replica, apply_some(&recs, &[21, 4, 9])).unwrap();
        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert!(std::fs::read(&replica).unwrap() == model(&recs, 30), "replica equals the model after replay");
        assert_eq!(read_state(fs.as_ref(), &paths.state()).unwrap().unwrap().applied_seq, 30);
        drop(g);
    }

    #[test]
    fn load_finishes_an_interrupted_roll_of_the_base_images() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, paths, g) = new_group(dir.path());
        let recs = records(30);
        assert_eq!(g.receive(&mut vec![frame(&recs)]).durable_seq, 30);
        g.maintain(true);
        drop(g);
        // Crash while rolling the base from 0 to 20: state.next written, the base images hold
        // a few of the records, some of them beyond 20.
        let next = GroupState { applied_seq: 30, base_seq: 20, base_time_ns: recs[19].0.time_ns };
        write_state(fs.as_ref(), &paths.state_next(), &next).unwrap();
        // a few records of the range made it to the base images, in any order.
        let base = paths.base_dir().join("v.img");
        std::fs::write(&base, apply_some(&recs, &[18, 3, 11])).unwrap();

        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert!(std::fs::read(&base).unwrap() == model(&recs, 20), "base is exact at the new point");
        assert_eq!(read_state(fs.as_ref(), &paths.state()).unwrap(), Some(next));
        assert!(!paths.state_next().exists());
        drop(g);
    }
}
