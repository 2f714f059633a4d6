//! Building runs from the journal: one pass over a segment's records, an extent for each one
//! that changes a volume.

use std::path::Path;
use std::sync::Arc;

use hindsight_consistency::journal::{JournalError, JournalReader};
use hindsight_consistency::record::{RecordHeader, RECORD_HEADER_LEN};
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

/// The extents of one segment's records, gathered one record at a time: by [`build_runs`]
/// from the file, and by the daemon as it commits them (so that a sealed segment's index file
/// is written without reading the segment back).
#[derive(Debug)]
pub struct RunBuilder {
    /// The segment's `first_seq`.
    pub segment: Seq,
    first_seq: Seq,
    last_seq: Seq,
    first_time_ns: u64,
    last_time_ns: u64,
    extents: Vec<Extent>,
}

impl RunBuilder {
    /// A builder for the segment starting at `segment`, whose next record is `first_seq`.
    pub fn new(segment: Seq, first_seq: Seq) -> RunBuilder {
        RunBuilder { segment, first_seq, last_seq: first_seq.saturating_sub(1), first_time_ns: 0, last_time_ns: 0, extents: Vec::new() }
    }

    /// True if it has seen every record of its segment from the first.
    pub fn whole(&self) -> bool {
        self.first_seq == self.segment
    }

    /// The next record: its header, its volume's number (`None` for a record that changes no
    /// volume), the length of its volume name and the position of the record in the segment.
    pub fn see(&mut self, h: &RecordHeader, volume: Option<u16>, name_len: usize, pos: u64) {
        debug_assert_eq!(h.seq, self.last_seq + 1, "records are seen in order");
        if self.last_seq < self.first_seq {
            self.first_time_ns = h.time_ns;
        }
        (self.last_seq, self.last_time_ns) = (h.seq, h.time_ns);
        let Some(volume) = volume.filter(|_| h.kind.changes_volume()) else { return };
        let zero = matches!(h.kind, WriteKind::Zeroes | WriteKind::Trim);
        let data_pos = if zero { 0 } else { pos + (RECORD_HEADER_LEN + name_len) as u64 };
        self.extents.push(Extent { offset: h.offset, seq: h.seq, data_pos, length: h.length, volume, kind: h.kind });
    }

    /// The run (`segment_len` 0: the caller knows the file's size). `volumes` numbers the
    /// volumes.
    pub fn finish(self, volumes: &[String]) -> Run {
        let mut run = Run::new(self.first_seq, self.last_seq, 0, volumes.to_vec(), self.extents);
        (run.first_time_ns, run.last_time_ns) = (self.first_time_ns, self.last_time_ns);
        run
    }
}

/// The number of volume `name` in `volumes`, for a record that changes a volume.
pub fn volume_number(volumes: &[String], seq: Seq, kind: WriteKind, name: &str) -> Result<Option<u16>, BuildError> {
    if !kind.changes_volume() {
        return Ok(None);
    }
    let found = volumes.iter().position(|v| v == name).ok_or_else(|| BuildError::UnknownVolume { seq, volume: name.to_owned() })?;
    Ok(Some(u16::try_from(found).expect("a group has fewer than 65536 volumes")))
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
    let mut current: Option<RunBuilder> = None;
    while reader.next_seq() <= through {
        let Some((rec, _)) = reader.next_raw()? else { break };
        let (h, name_len) = (rec.header, rec.volume.len());
        let volume = volume_number(volumes, h.seq, h.kind, rec.volume)?;
        let (segment, pos) = reader.last_position().ok_or(BuildError::NotInFile(h.seq))?;
        if current.as_ref().is_some_and(|c| c.segment != segment) {
            runs.push(current.take().expect("checked").finish(volumes));
        }
        current.get_or_insert_with(|| RunBuilder::new(segment, h.seq)).see(&h, volume, name_len, pos);
    }
    runs.extend(current.map(|c| c.finish(volumes)));
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
