//! The maintenance thread's side of retention tiers (docs/retention-tiers.md): the oldest
//! sealed journal segments that have left the first tier are thinned into thinned segments,
//! thinned segments are thinned again as their points move into coarser tiers (dropped
//! extents punched out of the data file), and a thinned segment whose points have all left
//! the last tier rolls the base images forward. Each step holds the group's lock exclusively,
//! as retention does: no reader sees history change under it.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use std::time::Duration;

use hindsight_consistency::config::{JournalFull, Tier};
use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::sync::lock;
use hindsight_consistency::time::format_duration;
use hindsight_consistency::Seq;

use super::open::finish_roll;
use super::{Group, Persist};
use crate::error::{data_dir_err, TargetError};
use crate::image::ImageSet;
use crate::layout::GroupPaths;
use crate::model::Bookmark;
use crate::point_index::store::{sealed_run, Segment};
use crate::records::for_each_record;
use crate::state::{write_state, GroupState};
use crate::thinning::kept::{kept_points, tier_of};
use crate::thinning::records::for_each_thinned_record;
use crate::thinning::segment::{table_path, write_thinned, Found};
use crate::thinning::survivors::needed;
use crate::thinning::table::{PointKind, TablePoint, ThinTable, DATA_ALIGN};

/// What one round of thinning did, for the log.
#[derive(Default)]
struct Round {
    thinned: usize,
    rethinned: usize,
    folded: usize,
}

impl Group {
    /// One round of tiered retention at time `now`: thin, thin again, roll the base. Does
    /// nothing while the group's lock is held by a reader (an export pins history).
    pub(super) fn thin(&self, p: &mut Persist, tiers: &[Tier], now: u64) -> Result<(), TargetError> {
        let mut round = Round::default();
        while self.thin_oldest_segment(p, tiers, now, false, &mut round)? {}
        self.rethin(p, tiers, now, &mut round)?;
        while self.fold_oldest_thinned(p, tiers, now, false, &mut round)? {}
        // Over the budget, where the group lets history be cut: the coarsest points go first
        // (the oldest thinned segment, rolled into the base), then the first tier's oldest
        // segment is thinned early. Never silently.
        let policy = lock(&self.inner).on_journal_full;
        while policy == JournalFull::TrimHistory && self.history_bytes(p) > self.opts.journal_size.unwrap_or(u64::MAX) {
            let done = if p.thinned.is_empty() {
                self.thin_oldest_segment(p, tiers, now, true, &mut round)?
            } else {
                self.fold_oldest_thinned(p, tiers, now, true, &mut round)?
            };
            if !done {
                break;
            }
            let bytes = lock(&self.inner).journal.size_bytes();
            *lock(&self.notice) = Some(self.journal_state(false, true, bytes));
        }
        if round.thinned + round.rethinned + round.folded > 0 {
            log::info!(
                "group {:?}: history thinned to its tiers: {} journal segment(s) thinned, {} thinned segment(s) thinned again, \
                 {} rolled into the base images; the oldest point is now seq {}",
                self.name,
                round.thinned,
                round.rethinned,
                round.folded,
                p.state.base_seq
            );
        }
        Ok(())
    }

    /// Bytes of history: the journal and the thinned segments (their data files' allocated
    /// bytes and their tables), the budget `journal_size` bounds.
    fn history_bytes(&self, p: &Persist) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let journal = lock(&self.inner).journal.size_bytes();
        let thinned: u64 = p
            .thinned
            .iter()
            .map(|f| std::fs::metadata(&f.data).map_or(f.table.run.segment_len, |m| m.blocks() * 512) + f.table.encoded_len())
            .sum();
        journal + thinned
    }

    /// The last sequence number thinned history covers (the base's when there is none).
    pub(super) fn thinned_to(p: &Persist) -> Seq {
        crate::thinning::segment::thinned_through(&p.thinned, p.state.base_seq)
    }

    /// Thins the oldest sealed journal segment if every record of it has left the first tier,
    /// or with `early` (history over its budget) at once, to the next tier's points. Returns
    /// whether it did.
    fn thin_oldest_segment(&self, p: &mut Persist, tiers: &[Tier], now: u64, early: bool, round: &mut Round) -> Result<bool, TargetError> {
        let (segs, volumes) = {
            let inner = lock(&self.inner);
            let segs: Vec<(Seq, PathBuf)> = inner.journal.segments().map(|s| (s.first_seq, s.path.clone())).collect();
            (segs, inner.meta.volume_names())
        };
        if segs.len() < 2 {
            return Ok(false);
        }
        let (first, last) = (segs[0].0, segs[1].0 - 1);
        let first_tier = u64::try_from(tiers[0].until.as_nanos()).unwrap_or(u64::MAX);
        // Times never decrease: once the next segment's first record is past the first tier,
        // so is every record of this one.
        let Some(next_time) = self.first_time(p, segs[1].0)? else { return Ok(false) };
        let mut now = now;
        if next_time >= now.saturating_sub(first_tier) {
            if !early {
                return Ok(false);
            }
            // Younger than the first tier: thinned as if it had just left it.
            now = next_time + first_tier;
            log::warn!(
                "group {:?}: history reached journal_size ({} bytes): seq {first}..={last}, younger than the first tier ({}), \
                 is thinned to the next tier's points to stay within it; raise journal_size to keep every write for {}",
                self.name,
                self.opts.journal_size.unwrap_or(0),
                format_duration(tiers[0].until),
                format_duration(tiers[0].until)
            );
        }
        if first != Self::thinned_to(p) + 1 {
            return Err(TargetError::Inconsistent {
                group: self.name.clone(),
                reason: format!(
                    "the oldest journal segment starts at seq {first}, but history before it ends at seq {}",
                    Self::thinned_to(p)
                ),
            });
        }
        if p.state.applied_seq < last {
            self.checkpoint(p)?;
            if p.state.applied_seq < last {
                return Ok(false); // the replicas have not applied it yet; next time
            }
        }
        let Some(_lock) = self.lock_for_retention()? else {
            self.report_pin(p, &self.paths.lock());
            return Ok(false);
        };
        let spans = crate::spans::load(self.fs.as_ref(), &self.paths.spans())
            .map_err(|reason| TargetError::Inconsistent { group: self.name.clone(), reason: format!("span index: {reason}") })?;
        let consistent = |seq: Seq| crate::spans::inconsistency(&spans, seq).is_none();
        let mut points = Vec::new();
        for_each_record(&self.fs, &self.name, &self.paths.journal(), first, last, |r| {
            if consistent(r.header.seq) {
                points.push((r.header.seq, r.header.time_ns));
            }
            Ok(ControlFlow::Continue(()))
        })?;
        // The next segment's first record decides whether this one's last point is the last
        // of its interval; an inconsistent one cannot stand for the interval's end.
        let sentinel = consistent(last + 1).then_some((last + 1, next_time));
        points.extend(sentinel);
        let mut kept: Vec<TablePoint> = kept_points(tiers, now, &points)
            .into_iter()
            .filter(|k| k.seq <= last)
            .map(|k| TablePoint { seq: k.seq, time_ns: k.time_ns, tier: tier_byte(k.tier), kind: PointKind::Tier })
            .collect();
        let bookmarks = crate::bookmarks::load(self.fs.as_ref(), &self.paths.bookmarks()).unwrap_or_default();
        add_bookmarks(&bookmarks, &mut kept, first, last, tiers, now);
        let segment = Segment { first_seq: first, path: segs[0].1.clone() };
        let (run, _) = sealed_run(&self.fs, &self.paths.journal(), &self.paths.index_dir(), &volumes, &segment, last)
            .map_err(|source| TargetError::Index { group: self.name.clone(), source })?;
        let seqs: Vec<Seq> = kept.iter().map(|k| k.seq).collect();
        let keep = needed(run.extents(), &seqs, last);
        let survivors: HashSet<Seq> = run.extents().iter().zip(&keep).filter(|(_, k)| **k).map(|(e, _)| e.seq).collect();
        let table = write_thinned(
            &self.fs,
            &self.paths.journal(),
            &self.paths.thin_dir(),
            &volumes,
            first,
            last,
            &|s| survivors.contains(&s),
            kept,
        )
        .map_err(|source| TargetError::Thinned { group: self.name.clone(), source })?;
        let data = crate::thinning::segment::data_path(&self.paths.thin_dir(), first);
        log::info!(
            "group {:?}: thinned journal segment seq {first}..={last}: {} of {} records kept ({} bytes of data), {} point(s)",
            self.name,
            table.run.extents().len(),
            run.extents().len(),
            table.run.segment_len,
            table.points.len()
        );
        p.thinned.push(Found { table, data });
        lock(&self.inner).journal.trim_through(last).map_err(self.journal_err("trim"))?;
        round.thinned += 1;
        Ok(true)
    }

    /// Thins each thinned segment again whose points the tiers keep fewer of now: a new
    /// generation of its table, then the dropped extents' blocks punched out of its data.
    fn rethin(&self, p: &mut Persist, tiers: &[Tier], now: u64, round: &mut Round) -> Result<(), TargetError> {
        let bookmarks = crate::bookmarks::load(self.fs.as_ref(), &self.paths.bookmarks()).unwrap_or_default();
        for i in 0..p.thinned.len() {
            let kept = {
                let table = &p.thinned[i].table;
                let mut points: Vec<(Seq, u64)> = table.points.iter().map(|k| (k.seq, k.time_ns)).collect();
                let next = p.thinned.get(i + 1).and_then(|f| f.table.points.first()).map(|k| (k.seq, k.time_ns));
                points.extend(next);
                let last = table.run.last_seq;
                let mut kept: Vec<TablePoint> = kept_points(tiers, now, &points)
                    .into_iter()
                    .filter(|k| k.seq <= last)
                    .map(|k| TablePoint { seq: k.seq, time_ns: k.time_ns, tier: tier_byte(k.tier), kind: PointKind::Tier })
                    .collect();
                add_bookmarks(&bookmarks, &mut kept, table.run.first_seq, last, tiers, now);
                // Nothing to drop; or everything is past the last tier (the roll takes it whole).
                if kept.len() == table.points.len() || kept.is_empty() {
                    continue;
                }
                kept
            };
            let table = p.thinned[i].table.clone();
            let last = table.run.last_seq;
            let Some(_lock) = self.lock_for_retention()? else {
                self.report_pin(p, &self.paths.lock());
                return Ok(());
            };
            let seqs: Vec<Seq> = kept.iter().map(|k| k.seq).collect();
            let keep = needed(table.run.extents(), &seqs, last);
            let mut extents = Vec::new();
            let mut dropped = Vec::new();
            for ((e, crc), k) in table.run.extents().iter().zip(&table.crcs).zip(&keep) {
                if *k {
                    extents.push((*e, *crc));
                } else if !e.reads_zero() {
                    dropped.push(*e);
                }
            }
            let r = &table.run;
            let mut next_table = ThinTable::new(r.first_seq, last, r.segment_len, r.volumes.clone(), extents, kept, table.generation + 1);
            (next_table.run.first_time_ns, next_table.run.last_time_ns) = (r.first_time_ns, r.last_time_ns);
            let thin_dir = self.paths.thin_dir();
            let path = table_path(&thin_dir, r.first_seq, next_table.generation);
            write_file_atomic(self.fs.as_ref(), &path, &next_table.encode()).map_err(data_dir_err(&path, "write"))?;
            let data = p.thinned[i].data.clone();
            let f = self.fs.open(&data, OpenMode::ReadWrite).map_err(data_dir_err(&data, "open"))?;
            for e in &dropped {
                // A data extent owns its blocks: the next one starts at the next boundary.
                let len = u64::from(e.length).next_multiple_of(DATA_ALIGN);
                f.zero_range(e.data_pos, len).map_err(data_dir_err(&data, "punch"))?;
            }
            f.sync_data().map_err(data_dir_err(&data, "sync"))?;
            let old = table_path(&thin_dir, r.first_seq, table.generation);
            self.fs.remove_file(&old).map_err(data_dir_err(&old, "remove"))?;
            self.fs.sync_dir(&thin_dir).map_err(data_dir_err(&thin_dir, "sync"))?;
            p.thinned[i].table = next_table;
            round.rethinned += 1;
        }
        Ok(())
    }

    /// Rolls the base images forward over the oldest thinned segment once every record of it
    /// has left the last tier (bookmarks are kept only inside the tiers' span, so they do not
    /// keep history alive past it), or with `early` (history over its budget) at once, saying
    /// which tier lost what. Returns whether it did.
    fn fold_oldest_thinned(&self, p: &mut Persist, tiers: &[Tier], now: u64, early: bool, round: &mut Round) -> Result<bool, TargetError> {
        let Some(oldest) = p.thinned.first() else { return Ok(false) };
        let last_tier = tiers.last().expect("tiers are not empty");
        let cutoff = now.saturating_sub(u64::try_from(last_tier.until.as_nanos()).unwrap_or(u64::MAX));
        if oldest.table.run.last_time_ns >= cutoff {
            if !early {
                return Ok(false);
            }
            let lost = |t: usize| oldest.table.points.iter().filter(|k| usize::from(k.tier) == t).count();
            let by_tier: Vec<String> = (0..tiers.len())
                .filter(|t| lost(*t) > 0)
                .map(|t| format!("{} point(s) of the {} tier", lost(t), every_text(&tiers[t])))
                .collect();
            let age = Duration::from_nanos(now.saturating_sub(oldest.table.run.last_time_ns));
            log::warn!(
                "group {:?}: history reached journal_size ({} bytes): points older than {} (before {}) were dropped to stay \
                 within it (seq {}..={}: {}); raise journal_size to keep the tiers whole",
                self.name,
                self.opts.journal_size.unwrap_or(0),
                format_duration(age),
                hindsight_consistency::time::format_rfc3339_seconds(oldest.table.run.last_time_ns),
                oldest.table.run.first_seq,
                oldest.table.run.last_seq,
                if by_tier.is_empty() { "no kept point".to_owned() } else { by_tier.join(", ") }
            );
        }
        let Some(_lock) = self.lock_for_retention()? else {
            self.report_pin(p, &self.paths.lock());
            return Ok(false);
        };
        let through = oldest.table.run.last_seq;
        let next = GroupState { applied_seq: p.state.applied_seq, base_seq: through, base_time_ns: oldest.table.run.last_time_ns };
        write_state(self.fs.as_ref(), &self.paths.state_next(), &next).map_err(data_dir_err(&self.paths.state_next(), "write"))?;
        let volumes = lock(&self.inner).meta.volumes.clone();
        let base = ImageSet::open(self.fs.as_ref(), &self.name, &self.paths.base_dir(), &volumes)?;
        for_each_thinned_record(self.fs.as_ref(), &self.name, oldest, p.state.base_seq + 1, through, |r| base.apply(r))?;
        base.sync()?;
        finish_roll(self.fs.as_ref(), &self.paths, &next)?;
        p.state = next;
        let done = p.thinned.remove(0);
        remove_thinned(self.fs.as_ref(), &self.paths, &done)?;
        self.oldest_ns.store(next.base_time_ns, Ordering::Relaxed);
        round.folded += 1;
        Ok(true)
    }
}

/// Bookmarks inside `first..=last` that the tiers did not keep already are kept, while
/// they are inside the tiers' span.
fn add_bookmarks(bookmarks: &[Bookmark], kept: &mut Vec<TablePoint>, first: Seq, last: Seq, tiers: &[Tier], now: u64) {
    for b in bookmarks.iter().filter(|b| (first..=last).contains(&b.seq)) {
        let Some(tier) = tier_of(tiers, now, b.time_ns) else { continue };
        match kept.binary_search_by_key(&b.seq, |k| k.seq) {
            Ok(i) => kept[i].kind = PointKind::Bookmark,
            Err(i) => kept.insert(i, TablePoint { seq: b.seq, time_ns: b.time_ns, tier: tier_byte(tier), kind: PointKind::Bookmark }),
        }
    }
}

/// Deletes a thinned segment's files (its history is in the base images now).
pub(super) fn remove_thinned(fs: &dyn Storage, paths: &GroupPaths, f: &Found) -> Result<(), TargetError> {
    let thin_dir = paths.thin_dir();
    let table = table_path(&thin_dir, f.table.run.first_seq, f.table.generation);
    fs.remove_file(&table).map_err(data_dir_err(&table, "remove"))?;
    fs.remove_file(&f.data).map_err(data_dir_err(&f.data, "remove"))?;
    fs.sync_dir(&thin_dir).map_err(data_dir_err(&thin_dir, "sync"))
}

/// How a tier's points are spaced, as its `every` is written.
fn every_text(t: &Tier) -> String {
    match t.every {
        hindsight_consistency::config::Every::Write => "every-write".to_owned(),
        hindsight_consistency::config::Every::Interval(d) => format_duration(d),
    }
}

fn tier_byte(tier: usize) -> u8 {
    u8::try_from(tier).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use hindsight_consistency::config::{Every, TargetConfig, TierPlan};
    use hindsight_consistency::faults::{Fault, FaultPlan, FaultyStorage, Op, Rule};
    use hindsight_consistency::storage::StdStorage;
    use hindsight_consistency::time::now_ns;
    use hindsight_consistency::{RecordHeader, WriteKind};

    use super::super::testing::{applied, frame, model, us, SIZE};
    use super::super::{Group, GroupOptions};
    use super::*;
    use crate::meta::GroupMeta;
    use crate::model::{Point, Volume};
    use crate::point_view::PointView;

    const S: u64 = 1_000_000_000;

    /// Every write for 20 s, a point per 5 s to 100 s, per 20 s to 150 s.
    fn opts() -> GroupOptions {
        let tiers = vec![
            Tier { every: Every::Write, until: Duration::from_secs(20) },
            Tier { every: Every::Interval(Duration::from_secs(5)), until: Duration::from_secs(100) },
            Tier { every: Every::Interval(Duration::from_secs(20)), until: Duration::from_secs(150) },
        ];
        let plan: &'static TierPlan = Box::leak(Box::new(TierPlan { default: tiers, groups: Vec::new() }));
        GroupOptions { segment_size: 1 << 20, retention: None, journal_size: None, direct_io: true, tiers: plan }
    }

    fn config(dir: &Path) -> TargetConfig {
        let path = dir.join("target.toml");
        let text = format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"{}\"\n[tls]\ninsecure_plaintext = true\n", dir.display());
        std::fs::write(&path, text).unwrap();
        TargetConfig::load(&path).unwrap()
    }

    /// 2,000 writes of 4 KiB over the last 200 s (one per 100 ms), at pseudo-random blocks of
    /// the 256 KiB volume; every 97th a zero write.
    fn records(now: u64) -> Vec<(RecordHeader, Vec<u8>)> {
        let mut x = 88_172_645_463_325_252u64;
        (1..=2000u64)
            .map(|seq| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = x % (SIZE / 4096) * 4096;
                let time_ns = now - 200 * S + seq * S / 10;
                if seq % 97 == 0 {
                    return (RecordHeader { seq, time_ns, kind: WriteKind::Zeroes, offset, length: 4096 }, Vec::new());
                }
                let fill = u8::try_from(seq % 251).unwrap() + 1;
                (RecordHeader { seq, time_ns, kind: WriteKind::Data, offset, length: 4096 }, vec![fill; 4096])
            })
            .collect()
    }

    fn image_at(config: &TargetConfig, point: &Point) -> Result<(u64, Vec<u8>), TargetError> {
        let view = PointView::open(config, "g", point)?;
        let mut img = vec![0u8; us(SIZE)];
        view.read(0, 0, &mut img).unwrap();
        Ok((view.seq(), img))
    }

    fn zeroes_model(recs: &[(RecordHeader, Vec<u8>)], upto: u64) -> Vec<u8> {
        let mut img = model(recs, upto);
        for (h, _) in recs.iter().filter(|(h, _)| h.seq <= upto) {
            if h.kind == WriteKind::Zeroes {
                // `model` skips empty data; a zero write hides what came before it until the
                // next write of the block.
                let later = recs.iter().any(|(l, _)| l.seq > h.seq && l.seq <= upto && l.offset == h.offset);
                if !later {
                    img[us(h.offset)..us(h.offset) + 4096].fill(0);
                }
            }
        }
        img
    }

    /// A group in `dir` on `fs` that received [`records`] stamped up to `now`.
    fn group_with_records(dir: &Path, fs: &Arc<dyn Storage>, now: u64) -> (GroupPaths, Group, Vec<(RecordHeader, Vec<u8>)>) {
        group_with(dir, fs, now, opts())
    }

    /// The same with other options.
    fn group_with(dir: &Path, fs: &Arc<dyn Storage>, now: u64, opts: GroupOptions) -> (GroupPaths, Group, Vec<(RecordHeader, Vec<u8>)>) {
        let paths = GroupPaths::new(dir, "g");
        let meta = GroupMeta::new("e".into(), vec![Volume { name: "v".into(), vm: "vm".into(), size: SIZE }]);
        let g = Group::create(Arc::clone(fs), paths.clone(), "g", meta, opts).unwrap();
        let recs = records(now);
        for chunk in recs.chunks(50) {
            assert_eq!(g.receive(&mut vec![frame(chunk)]).error, None);
        }
        assert_eq!(applied(&g), 2000);
        (paths, g, recs)
    }

    /// Every point thinned history lists, and a sample of the journal's, recover equal to the
    /// model; thinned history and the journal follow each other without a gap. Returns the
    /// kept points.
    fn check_history(config: &TargetConfig, recs: &[(RecordHeader, Vec<u8>)], what: &str) -> Vec<TablePoint> {
        let fs = StdStorage::shared();
        let (paths, meta) = crate::group_view::find_group(config, fs.as_ref(), "g").unwrap();
        let view = crate::group_view::open_view(&fs, paths, meta, "g").unwrap();
        let points: Vec<TablePoint> = view.thinned_points().copied().collect();
        let (base, thinned_to) = (view.first.0, view.thinned_to);
        let mut next = base + 1;
        for f in &view.thinned {
            assert_eq!(f.table.run.first_seq, next, "{what}: thinned history has a gap");
            next = f.table.run.last_seq + 1;
        }
        assert_eq!(view.journal_first.map_or(next, |j| j.0), next, "{what}: the journal does not follow thinned history");
        drop(view);
        for seq in points.iter().map(|k| k.seq).chain([base, thinned_to + 1, 1999, 2000]) {
            let (got, img) = image_at(config, &Point::Seq(seq)).unwrap_or_else(|e| panic!("{what}: seq {seq}: {e}"));
            assert_eq!(got, seq);
            assert!(img == zeroes_model(recs, seq), "{what}: seq {seq} differs from the model");
        }
        points
    }

    #[test]
    fn every_kept_point_of_every_tier_recovers_equal_to_the_model_and_other_points_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        let now = now_ns();
        let (paths, g, recs) = group_with_records(dir.path(), &fs, now);
        // At `now` exactly: the segment boundaries' ages are then what the assertions expect.
        g.thin(&mut lock(&g.persist), g.opts.tiers.of("g"), now).unwrap();
        let config = config(dir.path());

        let (base, thinned_to, points) = {
            let p = lock(&g.persist);
            let points: Vec<TablePoint> = p.thinned.iter().flat_map(|f| f.table.points.clone()).collect();
            (p.state.base_seq, Group::thinned_to(&p), points)
        };
        // Past 150 s (records up to about 500): in the base; 20 s to 150 s: thinned.
        assert!((300..600).contains(&base), "base at seq {base}");
        assert!((1400..1800).contains(&thinned_to), "thinned through seq {thinned_to}");
        let in_tier = |t| points.iter().filter(|k| k.tier == t).count();
        assert!(in_tier(1) >= 9 && in_tier(2) >= 2, "points per tier: {} {}", in_tier(1), in_tier(2));
        assert!(points.len() < 40, "{} points kept of about 1,200 writes", points.len());

        for k in &points {
            let (seq, img) = image_at(&config, &Point::Seq(k.seq)).unwrap();
            assert_eq!(seq, k.seq);
            assert!(img == zeroes_model(&recs, k.seq), "kept point seq {} (tier {}) differs from the model", k.seq, k.tier);
        }
        for seq in [base, thinned_to + 1, thinned_to + 77, 1999, 2000] {
            let (_, img) = image_at(&config, &Point::Seq(seq)).unwrap();
            assert!(img == zeroes_model(&recs, seq), "seq {seq} differs from the model");
        }
        // A point between two kept ones: refused, naming both.
        let (a, b) = (points[3].seq, points[4].seq);
        assert!(b > a + 1);
        let e = image_at(&config, &Point::Seq(a + 1)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("seq {} is not kept", a + 1)) && e.contains(&format!("seq {a} (")) && e.contains(&format!("seq {b} (")),
            "{e}"
        );
        // A time in thinned history: the kept point at or before it.
        let (seq, _) = image_at(&config, &Point::Time(points[4].time_ns + 1)).unwrap();
        assert_eq!(seq, b);

        // The data of about 1,200 writes of 4 KiB shrank to what the kept points show.
        let data: u64 = lock(&g.persist).thinned.iter().map(|f| f.table.run.segment_len).sum();
        assert!(data < 4096 * 64 * 40, "thinned data {data} bytes");

        // After a restart the same history.
        drop(g);
        let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
        assert_eq!(Group::thinned_to(&lock(&g.persist)), thinned_to);
        let k = points[points.len() / 2];
        assert!(image_at(&config, &Point::Seq(k.seq)).unwrap().1 == zeroes_model(&recs, k.seq));
    }

    #[test]
    fn as_time_passes_points_move_to_coarser_tiers_their_blocks_are_punched_and_the_base_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        let now = now_ns();
        let (paths, g, recs) = group_with_records(dir.path(), &fs, now);
        let config = config(dir.path());
        let tiers = g.opts.tiers.of("g");
        let mut before: Option<Vec<Seq>> = None;
        for (step, later) in [0u64, 15, 30, 45, 60, 90].into_iter().enumerate() {
            g.thin(&mut lock(&g.persist), tiers, now + later * S).unwrap();
            let points = check_history(&config, &recs, &format!("{later} s later"));
            let seqs: Vec<Seq> = points.iter().map(|k| k.seq).collect();
            if let Some(b) = &before {
                // Thinning only removes points; new ones come only from the journal.
                let horizon = b.last().copied().unwrap_or(0);
                let came_back: Vec<&Seq> = seqs.iter().filter(|s| **s <= horizon && !b.contains(s)).collect();
                assert!(came_back.is_empty(), "step {step}: points {came_back:?} came back");
            }
            before = Some(seqs);
        }
        let p = lock(&g.persist);
        assert!(p.thinned.iter().any(|f| f.table.generation > 1), "some thinned segment was thinned again");
        assert!(p.state.base_seq >= 1200, "the base rolled forward to seq {}", p.state.base_seq);
        // The dropped extents' blocks are given back to the file system.
        for f in p.thinned.iter().filter(|f| f.table.generation > 1) {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&f.data).unwrap();
            let live: u64 =
                f.table.run.extents().iter().filter(|e| !e.reads_zero()).map(|e| u64::from(e.length).next_multiple_of(4096)).sum();
            assert!(
                m.blocks() * 512 <= live + 4096,
                "{}: {} bytes allocated for {live} bytes of live data",
                f.data.display(),
                m.blocks() * 512
            );
        }
        drop(p);
        drop(g);
        let _ = Group::load(Arc::clone(&fs), paths, "g", opts()).unwrap();
        check_history(&config, &recs, "after a restart");
    }

    #[test]
    fn a_crash_at_any_step_of_thinning_leaves_the_old_history_or_the_new_never_a_mix() {
        let now = now_ns();
        let template = tempfile::tempdir().unwrap();
        {
            let (_, g, _) = group_with_records(template.path(), &StdStorage::shared(), now);
            g.maintain(true);
        }
        let recs = records(now);
        let mut crashes = 0;
        // Every other operation of each kind (all of them: 159 crash points, 40 s of a debug
        // build), the odd ones for writes.
        for (op, start) in [(Op::Write, 1), (Op::Sync, 0), (Op::Open, 0)] {
            for after in (start..).step_by(2) {
                let dir = tempfile::tempdir().unwrap();
                let copy = std::process::Command::new("cp").arg("-a").arg(template.path().join("groups")).arg(dir.path()).status().unwrap();
                assert!(copy.success());
                let plan = Arc::new(FaultPlan::default());
                let faulty = Arc::new(FaultyStorage::new(StdStorage::shared(), Arc::clone(&plan)));
                let fs: Arc<dyn Storage> = Arc::clone(&faulty) as Arc<dyn Storage>;
                let paths = GroupPaths::new(dir.path(), "g");
                let g = Group::load(Arc::clone(&fs), paths.clone(), "g", opts()).unwrap();
                plan.add(Rule { path_contains: "/groups/g/".into(), op, fault: Fault::Eio, after, times: Some(1) });
                g.thin(&mut lock(&g.persist), g.opts.tiers.of("g"), now).ok();
                let fired = plan.fired() > 0;
                drop(g);
                faulty.crash().unwrap();
                plan.clear();
                let what = format!("{op:?} fault after {after} operations");
                let g = Group::load(StdStorage::shared(), paths.clone(), "g", opts()).unwrap_or_else(|e| panic!("{what}: load: {e}"));
                let config = config(dir.path());
                check_history(&config, &recs, &format!("{what}, after the crash"));
                // And thinning, done again, gets to the same history as without a crash.
                g.thin(&mut lock(&g.persist), g.opts.tiers.of("g"), now).unwrap();
                check_history(&config, &recs, &format!("{what}, thinned again"));
                if !fired {
                    break;
                }
                crashes += 1;
            }
        }
        assert!(crashes > 50, "only {crashes} crash points");
    }

    #[test]
    fn over_journal_size_young_segments_are_thinned_early_and_every_kept_point_still_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        // Every record younger than the first tier (20 s): only the budget thins them.
        let (_, g, recs) = group_with(dir.path(), &fs, now_ns() + 190 * S, GroupOptions { journal_size: Some(3 << 20), ..opts() });
        g.maintain(false);
        let history = g.history_bytes(&lock(&g.persist));
        assert!(history <= 4 << 20, "history holds {history} bytes over a 3 MiB budget");
        assert!(lock(&g.persist).state.base_seq > 0, "the coarsest points went first, into the base");
        let config = config(dir.path());
        let points = check_history(&config, &recs, "thinned for room");
        assert!(!points.is_empty() && points.len() < 60, "{} points of 2,000 records", points.len());
    }
}
