//! The index files of a group's sealed segments (`index/<first_seq>.hsx`): written by the
//! daemon once a segment is sealed, read by whoever serves points, rebuilt from the segment
//! whenever one is missing or does not check out (docs/point-index.md, "Crash analysis").

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight_consistency::journal::segment_name;
use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::Seq;
use thiserror::Error;

use super::build::{build_runs, BuildError};
use super::file::{decode, encode, IndexFileError};
use super::Run;

/// Suffix of an index file.
const SUFFIX: &str = ".hsx";

/// Why the index of a group could not be had.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("indexing the journal")]
    Journal(#[from] BuildError),
    #[error("indexing segment {segment} of the journal")]
    Build {
        segment: Seq,
        #[source]
        source: BuildError,
    },
}

/// The index file of the segment starting at `first_seq`.
pub fn index_path(index_dir: &Path, first_seq: Seq) -> PathBuf {
    index_dir.join(segment_name(first_seq).replace(".hsj", SUFFIX))
}

/// One segment of the journal as the index sees it.
#[derive(Debug, Clone)]
pub struct Segment {
    pub first_seq: Seq,
    pub path: PathBuf,
}

/// Reads the index file of a sealed segment (records `first_seq ..= last_seq`, `len` bytes)
/// if it is there and is that segment's; otherwise builds the run from the segment and says
/// why in the log. Returns the run and whether it was rebuilt.
pub fn sealed_run(
    fs: &Arc<dyn Storage>,
    journal_dir: &Path,
    index_dir: &Path,
    volumes: &[String],
    seg: &Segment,
    last_seq: Seq,
) -> Result<(Run, bool), StoreError> {
    let len = file_len(fs.as_ref(), &seg.path)?;
    let path = index_path(index_dir, seg.first_seq);
    let why = match read_file(fs.as_ref(), &path) {
        Ok(None) => None,
        Ok(Some(bytes)) => match decode(&bytes) {
            Ok(run) if run.first_seq == seg.first_seq && run.last_seq == last_seq && run.segment_len == len && run.volumes == volumes => {
                return Ok((run, false))
            }
            Ok(_) => Some("it belongs to another segment or volume list".to_string()),
            Err(e) => Some(match e {
                IndexFileError::Version(_) => e.to_string(),
                other => format!("it is damaged ({other})"),
            }),
        },
        Err(e) => Some(format!("it cannot be read ({e})")),
    };
    if let Some(why) = why {
        log::warn!("index of journal segment {} rebuilt from the journal: {why}", seg.first_seq);
    }
    let mut runs = build_runs(fs, journal_dir, volumes, seg.first_seq, last_seq)
        .map_err(|source| StoreError::Build { segment: seg.first_seq, source })?;
    let mut run = runs.pop().unwrap_or_else(|| Run::new(seg.first_seq, last_seq, 0, volumes.to_vec(), Vec::new()));
    debug_assert!(runs.is_empty(), "one segment makes one run");
    run.segment_len = len;
    Ok((run, true))
}

/// Writes the index file of every sealed segment (all but the last of `segments`) that has
/// none, or with `verify` none that checks out (the daemon verifies at start-up, then only
/// adds the files of newly sealed segments), and removes index files whose segment is gone.
/// A segment whose run is in `ready` (gathered as its records were committed) is written from
/// it without reading the segment; `ready` keeps only the runs still to be written. Returns
/// how many files it wrote.
pub fn write_sealed(
    fs: &Arc<dyn Storage>,
    journal_dir: &Path,
    index_dir: &Path,
    volumes: &[String],
    segments: &[Segment],
    ready: &mut Vec<Run>,
    verify: bool,
) -> Result<usize, StoreError> {
    fs.create_dir_all(index_dir).map_err(|source| StoreError::Io { step: "create", path: index_dir.to_owned(), source })?;
    let mut written = 0;
    ready.retain(|r| segments.iter().any(|s| s.first_seq == r.first_seq));
    for pair in segments.windows(2) {
        let (seg, next) = (&pair[0], &pair[1]);
        let path = index_path(index_dir, seg.first_seq);
        let gathered = ready.iter().position(|r| r.first_seq == seg.first_seq);
        if !verify && fs.exists(&path) {
            if let Some(i) = gathered {
                ready.swap_remove(i);
            }
            continue;
        }
        let last_seq = next.first_seq - 1;
        let gathered = gathered.map(|i| ready.swap_remove(i)).filter(|r| r.last_seq == last_seq && r.volumes == volumes);
        let (run, rebuilt) = match gathered {
            Some(mut run) if !fs.exists(&path) => {
                run.segment_len = file_len(fs.as_ref(), &seg.path)?;
                (run, true)
            }
            _ => sealed_run(fs, journal_dir, index_dir, volumes, seg, last_seq)?,
        };
        if !rebuilt {
            continue;
        }
        write_file_atomic(fs.as_ref(), &path, &encode(&run)).map_err(|source| StoreError::Io {
            step: "write",
            path: path.clone(),
            source,
        })?;
        written += 1;
    }
    let names = fs.list(index_dir).map_err(|source| StoreError::Io { step: "list", path: index_dir.to_owned(), source })?;
    for name in names {
        let stale = name.ends_with(".tmp")
            || name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<Seq>().ok())
                .is_some_and(|first| !segments.iter().any(|s| s.first_seq == first));
        if stale {
            let path = index_dir.join(&name);
            fs.remove_file(&path).map_err(|source| StoreError::Io { step: "remove", path, source })?;
        }
    }
    Ok(written)
}

fn file_len(fs: &dyn Storage, path: &Path) -> Result<u64, StoreError> {
    let f = fs.open(path, OpenMode::Read).map_err(|source| StoreError::Io { step: "open", path: path.to_owned(), source })?;
    f.len().map_err(|source| StoreError::Io { step: "stat", path: path.to_owned(), source })
}

/// The whole file, `None` if it does not exist.
fn read_file(fs: &dyn Storage, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match fs.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(f.len()?).map_err(|_| io::Error::other("too large"))?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use hindsight_consistency::journal::{list_segments, Journal, JournalOptions};
    use hindsight_consistency::record::RecordHeader;
    use hindsight_consistency::storage::StdStorage;
    use hindsight_consistency::WriteKind;

    fn journal(dir: &Path) -> Vec<Segment> {
        let fs = StdStorage::shared();
        let mut j = Journal::open(Arc::clone(&fs), dir, JournalOptions { segment_size: 64 << 10, direct: false }).unwrap();
        for seq in 1..=40u64 {
            let h = RecordHeader { seq, time_ns: seq, kind: WriteKind::Data, offset: seq * 4096, length: 4096 };
            j.append(&h, "db", &[seq as u8; 4096]).unwrap();
            j.commit().unwrap();
        }
        list_segments(fs.as_ref(), dir).unwrap().into_iter().map(|(first_seq, path)| Segment { first_seq, path }).collect()
    }

    #[test]
    fn sealed_segments_get_index_files_that_are_read_back_and_rebuilt_when_damaged() {
        let d = tempfile::tempdir().unwrap();
        let (jdir, idir) = (d.path().join("journal"), d.path().join("index"));
        let fs = StdStorage::shared();
        let segs = journal(&jdir);
        assert!(segs.len() >= 3);
        let volumes = vec!["db".to_string()];
        assert_eq!(
            write_sealed(&fs, &jdir, &idir, &volumes, &segs, &mut Vec::new(), false).unwrap(),
            segs.len() - 1,
            "every sealed segment, not the active one"
        );
        assert_eq!(write_sealed(&fs, &jdir, &idir, &volumes, &segs, &mut Vec::new(), true).unwrap(), 0, "nothing twice");
        let last = segs[1].first_seq - 1;
        let (run, rebuilt) = sealed_run(&fs, &jdir, &idir, &volumes, &segs[0], last).unwrap();
        assert!(!rebuilt);
        assert_eq!((run.first_seq, run.last_seq, run.extents().len() as u64), (1, last, last));

        // A flipped byte: rebuilt, and the same run as before.
        let path = index_path(&idir, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[80] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (again, rebuilt) = sealed_run(&fs, &jdir, &idir, &volumes, &segs[0], last).unwrap();
        assert!(rebuilt);
        assert_eq!(again, run);
        assert_eq!(write_sealed(&fs, &jdir, &idir, &volumes, &segs, &mut Vec::new(), false).unwrap(), 0, "only verified at start-up");
        assert_eq!(
            write_sealed(&fs, &jdir, &idir, &volumes, &segs, &mut Vec::new(), true).unwrap(),
            1,
            "the damaged file is written again"
        );
        assert!(!sealed_run(&fs, &jdir, &idir, &volumes, &segs[0], last).unwrap().1);

        // Once the segment is gone (folded by retention), so is its index file.
        write_sealed(&fs, &jdir, &idir, &volumes, &segs[1..], &mut Vec::new(), false).unwrap();
        assert!(!path.exists());
        assert!(index_path(&idir, segs[1].first_seq).exists());
    }
}
