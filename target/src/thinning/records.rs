//! The records a thinned segment still holds, read back in sequence order: what rolls the
//! base images forward past the last tier (and finishes that roll after a crash). Each
//! extent's data is checked against the CRC-32C its table keeps.

use hindsight_consistency::record::{RecordHeader, RecordRef};
use hindsight_consistency::storage::{OpenMode, Storage};

use super::segment::Found;
use crate::error::{data_dir_err, TargetError};

/// Hands the records of `found` whose sequence numbers are in `from..=through` to `f`, oldest
/// first (their times are not kept: 0).
pub fn for_each_thinned_record(
    fs: &dyn Storage,
    group: &str,
    found: &Found,
    from: u64,
    through: u64,
    mut f: impl FnMut(&RecordRef<'_>) -> Result<(), TargetError>,
) -> Result<(), TargetError> {
    let run = &found.table.run;
    let mut order: Vec<usize> = (0..run.extents().len()).filter(|&i| (from..=through).contains(&run.extents()[i].seq)).collect();
    order.sort_unstable_by_key(|&i| run.extents()[i].seq);
    let file = fs.open(&found.data, OpenMode::Read).map_err(data_dir_err(&found.data, "open thinned segment"))?;
    let mut data = Vec::new();
    for i in order {
        let (e, crc) = (run.extents()[i], found.table.crcs[i]);
        data.clear();
        if !e.reads_zero() {
            data.resize(e.length as usize, 0);
            file.read_exact_at(&mut data, e.data_pos).map_err(data_dir_err(&found.data, "read thinned segment"))?;
            if crc32c::crc32c(&data) != crc {
                return Err(TargetError::Inconsistent {
                    group: group.to_owned(),
                    reason: format!(
                        "thinned segment {}: the data of seq {} does not match its checksum; the file is damaged",
                        found.data.display(),
                        e.seq
                    ),
                });
            }
        }
        let header = RecordHeader { seq: e.seq, time_ns: 0, kind: e.kind, offset: e.offset, length: e.length };
        f(&RecordRef { header, volume: &run.volumes[usize::from(e.volume)], data: &data })?;
    }
    Ok(())
}
