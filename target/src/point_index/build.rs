//! Building runs from the journal: one pass over a segment's records, an extent for each one
//! that changes a volume.

use std::path::Path;
use std::sync::Arc;

use hindsight_consistency::journal::{JournalError, JournalReader};
use hindsight_consistency::record::RECORD_HEADER_LEN;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::{Seq, WriteKind};
use thiserror::Error;

use super::{Extent, Run};

/// Why runs could not be built from the journal.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("reading the journal")]
    Journal(#[from] JournalError),
    #[error("record seq {seq} names volume {volume:?}, which the group does not have")]
    UnknownVolume { seq: Seq, volume: String },
    #[error("record seq {0} came from memory, not from a segment file")]
    NotInFile(Seq),
}

/// The runs of the journal in `dir` from record `from` through `through` (inclusive), one per
/// segment, oldest first. `segment_len` of each is left 0: the caller knows the file sizes.
/// `volumes` numbers the volumes (the group's order).
pub fn build_runs(fs: &Arc<dyn Storage>, dir: &Path, volumes: &[String], from: Seq, through: Seq) -> Result<Vec<Run>, BuildError> {
    let mut runs = Vec::new();
    if through < from {
        return Ok(runs);
    }
    let mut reader = JournalReader::open(Arc::clone(fs), dir, from)?;
    // (segment, first and last seq, first and last time, extents) of the run being built.
    let mut current: Option<(Seq, Seq, Seq, u64, u64, Vec<Extent>)> = None;
    let finish = |c: (Seq, Seq, Seq, u64, u64, Vec<Extent>)| {
        let mut run = Run::new(c.1, c.2, 0, volumes.to_vec(), c.5);
        (run.first_time_ns, run.last_time_ns) = (c.3, c.4);
        run
    };
    while reader.next_seq() <= through {
        let Some((rec, _)) = reader.next_raw()? else { break };
        let (h, name_len) = (rec.header, rec.volume.len());
        let found = volumes.iter().position(|name| name == rec.volume);
        if h.kind.changes_volume() && found.is_none() {
            return Err(BuildError::UnknownVolume { seq: h.seq, volume: rec.volume.to_owned() });
        }
        let (segment, pos) = reader.last_position().ok_or(BuildError::NotInFile(h.seq))?;
        if current.as_ref().is_some_and(|c| c.0 != segment) {
            runs.push(finish(current.take().expect("checked")));
        }
        let c = current.get_or_insert_with(|| (segment, h.seq, h.seq, h.time_ns, h.time_ns, Vec::new()));
        (c.2, c.4) = (h.seq, h.time_ns);
        let Some(v) = found.filter(|_| h.kind.changes_volume()) else { continue };
        let zero = matches!(h.kind, WriteKind::Zeroes | WriteKind::Trim);
        let data_pos = if zero { 0 } else { pos + (RECORD_HEADER_LEN + name_len) as u64 };
        let volume = u16::try_from(v).expect("a group has fewer than 65536 volumes");
        c.5.push(Extent { offset: h.offset, seq: h.seq, data_pos, length: h.length, volume, kind: h.kind });
    }
    runs.extend(current.map(finish));
    Ok(runs)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::point_index::resolve::{resolve, Source, Window};
    use hindsight_consistency::journal::{Journal, JournalOptions};
    use hindsight_consistency::record::RecordHeader;
    use hindsight_consistency::storage::StdStorage;

    #[test]
    fn runs_built_from_a_journal_point_at_each_records_data() {
        let d = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        let opts = JournalOptions { segment_size: 64 << 10, direct: true };
        let mut j = Journal::open(Arc::clone(&fs), d.path(), opts).unwrap();
        let mut want = vec![0u8; 256 << 10];
        for seq in 1..=60u64 {
            let offset = (seq * 7919) % 250 * 1024;
            let len = 512 * (1 + seq % 8) as u32;
            let (kind, data) = if seq % 9 == 0 {
                (WriteKind::Zeroes, Vec::new())
            } else {
                (WriteKind::Data, (0..len).map(|i| (seq as u8) ^ (i as u8)).collect::<Vec<u8>>())
            };
            let h = RecordHeader { seq, time_ns: 1000 + seq, kind, offset, length: len };
            let vol = if seq % 5 == 0 { "logs" } else { "db" };
            j.append(&h, vol, &data).unwrap();
            if seq % 4 == 0 {
                j.append(&RecordHeader { seq: seq + 100, ..h }, vol, &data).unwrap_err();
            }
            j.commit().unwrap();
            if vol == "db" {
                let at = usize::try_from(offset).unwrap();
                let n = len as usize;
                if kind == WriteKind::Zeroes {
                    want[at..at + n].fill(0);
                } else {
                    want[at..at + n].copy_from_slice(&data);
                }
            }
        }
        drop(j);
        let volumes = vec!["db".to_string(), "logs".to_string()];
        let runs = build_runs(&fs, d.path(), &volumes, 1, 60).unwrap();
        assert!(runs.len() > 2, "the journal spans several segments");
        assert_eq!((runs[0].first_seq, runs.last().unwrap().last_seq), (1, 60));
        assert!(runs.windows(2).all(|w| w[0].last_seq + 1 == w[1].first_seq));
        let refs: Vec<&Run> = runs.iter().collect();
        let mut got = vec![0u8; want.len()];
        for p in resolve(&refs, "db", 0, want.len() as u64, Window { after: 0, point: 60 }) {
            let at = usize::try_from(p.offset).unwrap();
            let n = usize::try_from(p.len).unwrap();
            match p.source {
                Source::Base | Source::Zero => got[at..at + n].fill(0),
                Source::Journal { segment, pos } => {
                    let file = std::fs::read(d.path().join(hindsight_consistency::journal::segment_name(segment))).unwrap();
                    let pos = usize::try_from(pos).unwrap();
                    got[at..at + n].copy_from_slice(&file[pos..pos + n]);
                }
            }
        }
        assert!(got == want, "the image resolved through the runs differs from the model");
    }
}
