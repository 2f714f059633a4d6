//! Writing a thinned segment from a sealed journal segment, and finding the thinned segments
//! of a group again after a crash (docs/retention-tiers.md, "Crash analysis"): the data file
//! first (`thin/<first_seq>.hsd`, synced), then the table (`thin/<first_seq>.hsm.<generation>`,
//! written aside, synced, renamed, directory synced). Only a table that checks out makes a
//! thinned segment; the journal segment it came from is deleted by the caller after that.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight_consistency::journal::{segment_name, JournalError, JournalReader};
use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::Seq;
use thiserror::Error;

use super::table::{TableError, TablePoint, ThinTable, DATA_ALIGN};
use crate::point_index::build::{volume_number, BuildError};
use crate::point_index::Extent;

/// Survivors' data is written in pieces of about this size.
const WRITE_CHUNK: usize = 4 << 20;

/// Why a segment could not be thinned, or the thinned segments not read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ThinError {
    #[error("{step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading journal segment {segment}")]
    Journal {
        segment: Seq,
        #[source]
        source: JournalError,
    },
    #[error("journal segment {segment}")]
    Record {
        segment: Seq,
        #[source]
        source: BuildError,
    },
    #[error("journal segment {segment} ends at seq {got}, not at {want}")]
    Short { segment: Seq, got: Seq, want: Seq },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ThinError + 'a {
    move |source| ThinError::Io { step, path: path.to_owned(), source }
}

/// The last sequence number history holds before the journal: that of the newest thinned
/// segment in `found` (oldest first), or `base` when there is none after it.
pub fn thinned_through(found: &[Found], base: Seq) -> Seq {
    found.last().map_or(base, |f| f.table.run.last_seq).max(base)
}

/// The data file of the thinned segment starting at `first_seq`.
pub fn data_path(thin_dir: &Path, first_seq: Seq) -> PathBuf {
    thin_dir.join(segment_name(first_seq).replace(".hsj", ".hsd"))
}

/// Generation `generation` of its table.
pub fn table_path(thin_dir: &Path, first_seq: Seq, generation: u64) -> PathBuf {
    thin_dir.join(format!("{}.{generation}", segment_name(first_seq).replace(".hsj", ".hsm")))
}

/// Writes the thinned segment of the sealed journal segment holding `first_seq ..= last_seq`:
/// the records `needed` says a kept point shows, their data aligned to [`DATA_ALIGN`], and
/// `points` as the points it can serve. Returns its table (generation 1).
#[allow(clippy::too_many_arguments)]
pub fn write_thinned(
    fs: &Arc<dyn Storage>,
    journal_dir: &Path,
    thin_dir: &Path,
    volumes: &[String],
    first_seq: Seq,
    last_seq: Seq,
    needed: &dyn Fn(Seq) -> bool,
    points: Vec<TablePoint>,
) -> Result<ThinTable, ThinError> {
    fs.create_dir_all(thin_dir).map_err(io_err("create", thin_dir))?;
    let data = data_path(thin_dir, first_seq);
    let file = fs.open(&data, OpenMode::Truncate).map_err(io_err("create", &data))?;
    let jerr = |source| ThinError::Journal { segment: first_seq, source };
    let mut reader = JournalReader::open(Arc::clone(fs), journal_dir, first_seq).map_err(jerr)?;
    let mut extents: Vec<(Extent, u32)> = Vec::new();
    let mut times = None;
    let (mut buf, mut written) = (Vec::with_capacity(WRITE_CHUNK + 4096), 0u64);
    while reader.next_seq() <= last_seq {
        let Some((rec, _)) = reader.next_raw().map_err(jerr)? else { break };
        let h = rec.header;
        let t = times.get_or_insert((h.time_ns, h.time_ns));
        t.1 = h.time_ns;
        let volume =
            volume_number(volumes, h.seq, h.kind, rec.volume).map_err(|source| ThinError::Record { segment: first_seq, source })?;
        let Some(volume) = volume.filter(|_| needed(h.seq)) else { continue };
        let mut e = Extent { offset: h.offset, seq: h.seq, data_pos: 0, length: h.length, volume, kind: h.kind };
        if e.reads_zero() {
            extents.push((e, 0));
            continue;
        }
        let at = (written + buf.len() as u64).next_multiple_of(DATA_ALIGN);
        buf.resize(usize::try_from(at - written).expect("within the buffer"), 0);
        buf.extend_from_slice(rec.data);
        e.data_pos = at;
        extents.push((e, crc32c::crc32c(rec.data)));
        if buf.len() >= WRITE_CHUNK {
            file.write_all_at(&buf, written).map_err(io_err("write", &data))?;
            written += buf.len() as u64;
            buf.clear();
        }
    }
    if reader.next_seq() != last_seq + 1 {
        return Err(ThinError::Short { segment: first_seq, got: reader.next_seq() - 1, want: last_seq });
    }
    file.write_all_at(&buf, written).map_err(io_err("write", &data))?;
    let data_len = written + buf.len() as u64;
    file.sync_data().map_err(io_err("sync", &data))?;
    drop(file);
    let mut table = ThinTable::new(first_seq, last_seq, data_len, volumes.to_vec(), extents, points, 1);
    (table.run.first_time_ns, table.run.last_time_ns) = times.unwrap_or_default();
    let path = table_path(thin_dir, first_seq, 1);
    write_file_atomic(fs.as_ref(), &path, &table.encode()).map_err(io_err("write", &path))?;
    Ok(table)
}

/// A thinned segment found on disk.
#[derive(Debug)]
pub struct Found {
    pub table: ThinTable,
    pub data: PathBuf,
}

/// The thinned segments of `thin_dir`, oldest first: for each data file, the newest
/// generation of its table that checks out. With `repair` (the daemon, holding the group) it
/// deletes what a crash left half done (a data file with no table, temporaries, older
/// generations) and sets a table that does not check out aside (renamed `*.bad`, logged);
/// readers only leave such files out.
pub fn find_thinned(fs: &dyn Storage, thin_dir: &Path, repair: bool) -> Result<Vec<Found>, ThinError> {
    if !fs.exists(thin_dir) {
        return Ok(Vec::new());
    }
    let names = fs.list(thin_dir).map_err(io_err("list", thin_dir))?;
    let mut tables: std::collections::BTreeMap<Seq, Vec<(u64, PathBuf)>> = Default::default();
    let mut datas = Vec::new();
    for name in &names {
        let path = thin_dir.join(name);
        if name.ends_with(".tmp") {
            if repair {
                fs.remove_file(&path).map_err(io_err("remove", &path))?;
            }
        } else if let Some(first) = name.strip_suffix(".hsd").and_then(|n| n.parse::<Seq>().ok()) {
            datas.push(first);
        } else if let Some((first, generation)) =
            name.split_once(".hsm.").and_then(|(f, g)| Some((f.parse::<Seq>().ok()?, g.parse::<u64>().ok()?)))
        {
            tables.entry(first).or_default().push((generation, path));
        }
    }
    datas.sort_unstable();
    let mut found = Vec::new();
    for first in datas {
        let data = data_path(thin_dir, first);
        let mut gens = tables.remove(&first).unwrap_or_default();
        gens.sort_unstable_by_key(|g| std::cmp::Reverse(g.0));
        let mut table = None;
        for (generation, path) in gens {
            if table.is_some() {
                // An older generation: the newer one replaced it.
                if repair {
                    fs.remove_file(&path).map_err(io_err("remove", &path))?;
                }
                continue;
            }
            match read_table(fs, &path, first, generation) {
                Ok(t) => table = Some(t),
                Err(_) if !repair => {}
                Err(why) => {
                    log::warn!("thinned segment {first}: table {} does not check out ({why}); set aside", path.display());
                    let mut bad = path.clone().into_os_string();
                    bad.push(".bad");
                    fs.rename(&path, Path::new(&bad)).map_err(io_err("set aside", &path))?;
                }
            }
        }
        match table {
            Some(table) => found.push(Found { table, data }),
            // Written before its table: the journal segment is still the truth.
            None if repair => fs.remove_file(&data).map_err(io_err("remove", &data))?,
            None => {}
        }
    }
    if !repair {
        return Ok(found);
    }
    for (_, gens) in tables {
        for (_, path) in gens {
            log::warn!("thinned segment table {} has no data file; removed", path.display());
            fs.remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    fs.sync_dir(thin_dir).map_err(io_err("sync", thin_dir))?;
    Ok(found)
}

fn read_table(fs: &dyn Storage, path: &Path, first: Seq, generation: u64) -> Result<ThinTable, String> {
    let f = fs.open(path, OpenMode::Read).map_err(|e| e.to_string())?;
    let len = usize::try_from(f.len().map_err(|e| e.to_string())?).map_err(|_| "too large".to_owned())?;
    let mut bytes = vec![0; len];
    f.read_exact_at(&mut bytes, 0).map_err(|e| e.to_string())?;
    let t = ThinTable::decode(&bytes).map_err(|e: TableError| e.to_string())?;
    if t.run.first_seq != first || t.generation != generation {
        return Err(format!("it is the table of segment {} generation {}", t.run.first_seq, t.generation));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use hindsight_consistency::journal::{list_segments, Journal, JournalOptions};
    use hindsight_consistency::record::RecordHeader;
    use hindsight_consistency::storage::StdStorage;
    use hindsight_consistency::WriteKind;

    use super::super::table::PointKind;
    use super::*;

    /// A journal of 60 records on volumes "db" and "logs", in segments of 64 KiB; a bookmark
    /// at 30. Returns the sealed segments as (first, last).
    fn journal(dir: &Path) -> Vec<(Seq, Seq)> {
        let fs = StdStorage::shared();
        let mut j = Journal::open(Arc::clone(&fs), dir, JournalOptions { segment_size: 64 << 10, direct: false }).unwrap();
        for seq in 1..=60u64 {
            let (kind, data) = match seq {
                30 => (WriteKind::Bookmark, b"before-upgrade".to_vec()),
                s if s % 7 == 0 => (WriteKind::Zeroes, Vec::new()),
                s => (WriteKind::Data, vec![u8::try_from(s).unwrap(); 3000 + usize::try_from(s).unwrap()]),
            };
            let length = if kind == WriteKind::Zeroes { 8192 } else { u32::try_from(data.len()).unwrap() };
            let h = RecordHeader { seq, time_ns: 1_000 + seq, kind, offset: seq * 512, length };
            j.append(&h, if seq % 3 == 0 { "logs" } else { "db" }, &data).unwrap();
            j.commit().unwrap();
        }
        let segs = list_segments(fs.as_ref(), dir).unwrap();
        segs.windows(2).map(|w| (w[0].0, w[1].0 - 1)).collect()
    }

    #[test]
    fn a_thinned_segment_holds_exactly_the_needed_records_aligned_and_checksummed() {
        let d = tempfile::tempdir().unwrap();
        let (jdir, tdir) = (d.path().join("journal"), d.path().join("thin"));
        let fs = StdStorage::shared();
        let sealed = journal(&jdir);
        let (first, last) = sealed[0];
        assert!(last >= 10, "the first segment holds {first}..={last}");
        let volumes = vec!["db".to_string(), "logs".to_string()];
        let points = vec![TablePoint { seq: last, time_ns: 1_000 + last, tier: 1, kind: PointKind::Tier }];
        let needed = |s: Seq| s.is_multiple_of(2);
        let t = write_thinned(&fs, &jdir, &tdir, &volumes, first, last, &needed, points.clone()).unwrap();
        let want: Vec<Seq> = (first..=last).filter(|s| needed(*s)).collect();
        let mut got: Vec<Seq> = t.run.extents().iter().map(|e| e.seq).collect();
        got.sort_unstable();
        assert_eq!(got, want);
        let data = std::fs::read(data_path(&tdir, first)).unwrap();
        assert_eq!(data.len() as u64, t.run.segment_len);
        for (e, crc) in t.run.extents().iter().zip(&t.crcs) {
            if e.kind == WriteKind::Zeroes {
                assert_eq!((e.data_pos, *crc), (0, 0));
                continue;
            }
            assert_eq!(e.data_pos % DATA_ALIGN, 0);
            let bytes = &data[usize::try_from(e.data_pos).unwrap()..][..e.length as usize];
            assert!(bytes.iter().all(|b| u64::from(*b) == e.seq), "seq {} reads its own bytes", e.seq);
            assert_eq!(crc32c::crc32c(bytes), *crc);
        }
        assert_eq!(t.points, points);
        // Found again as written, and only once.
        let found = find_thinned(fs.as_ref(), &tdir, true).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].table, t);
    }

    #[test]
    fn what_a_crash_left_half_done_is_cleared_and_the_newest_good_table_wins() {
        let d = tempfile::tempdir().unwrap();
        let (jdir, tdir) = (d.path().join("journal"), d.path().join("thin"));
        let fs = StdStorage::shared();
        let sealed = journal(&jdir);
        let volumes = vec!["db".to_string(), "logs".to_string()];
        let all = |_: Seq| true;
        let (a, b) = (sealed[0], sealed[1]);
        let ta = write_thinned(&fs, &jdir, &tdir, &volumes, a.0, a.1, &all, Vec::new()).unwrap();
        let tb = write_thinned(&fs, &jdir, &tdir, &volumes, b.0, b.1, &all, Vec::new()).unwrap();
        // Segment a: a newer generation that is torn; segment b: a newer good generation.
        let mut torn = ta.clone();
        torn.generation = 2;
        let bytes = torn.encode();
        std::fs::write(table_path(&tdir, a.0, 2), &bytes[..bytes.len() - 3]).unwrap();
        let mut newer = tb.clone();
        newer.generation = 2;
        newer.points = vec![TablePoint { seq: b.1, time_ns: 1, tier: 2, kind: PointKind::Pinned }];
        std::fs::write(table_path(&tdir, b.0, 2), newer.encode()).unwrap();
        // A data file whose table was never written, and a temporary.
        let c = 99_999;
        std::fs::write(data_path(&tdir, c), b"survivors").unwrap();
        std::fs::write(tdir.join("x.hsm.1.tmp"), b"half").unwrap();

        let count = |d: &Path| std::fs::read_dir(d).unwrap().count();
        let before = count(&tdir);
        let seen = find_thinned(fs.as_ref(), &tdir, false).unwrap();
        assert_eq!((seen.len(), count(&tdir)), (2, before), "a reader changes nothing");
        assert_eq!(seen[1].table, newer);
        let found = find_thinned(fs.as_ref(), &tdir, true).unwrap();
        assert_eq!(found.iter().map(|f| f.table.run.first_seq).collect::<Vec<_>>(), [a.0, b.0]);
        assert_eq!(found[0].table, ta, "the torn generation is set aside, the older one is used");
        assert_eq!(found[1].table, newer, "the newest good generation wins");
        let mut names = std::fs::read_dir(&tdir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect::<Vec<_>>();
        names.sort();
        let name = |s: Seq, ext: &str| format!("{}{ext}", segment_name(s).trim_end_matches(".hsj"));
        assert_eq!(names, [name(a.0, ".hsd"), name(a.0, ".hsm.1"), name(a.0, ".hsm.2.bad"), name(b.0, ".hsd"), name(b.0, ".hsm.2")]);
    }
}
