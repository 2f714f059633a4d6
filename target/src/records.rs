//! Walking records in sequence order: those of a `Records` frame already validated, and those
//! of a stretch of the journal.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use hindsight_consistency::journal::JournalReader;
use hindsight_consistency::record::decode_record_trusted;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::{RecordRef, Seq};

use crate::error::TargetError;

/// Calls `f` with every record of a payload that `validate_frame` accepted.
pub(crate) fn each_record<E>(payload: &[u8], mut f: impl FnMut(&RecordRef<'_>, &[u8]) -> Result<(), E>) -> Result<(), E> {
    let mut at = 0;
    while at < payload.len() {
        // Checksums were verified by `validate_frame`: only the layout is decoded again.
        let (rec, used) = decode_record_trusted(&payload[at..]).expect("validated before");
        f(&rec, &payload[at..at + used])?;
        at += used;
    }
    Ok(())
}

/// Reads the journal from `from` through `through` (inclusive) in order and hands every record
/// to `f`, which may stop early (the record it stops at does not count as handed over).
/// Every record of the range must be present: a missing one is
/// an inconsistency between the journal and the state that asked for it. Returns the sequence
/// number and time of the last record handed over (or `(from - 1, 0)` if none).
pub(crate) fn for_each_record(
    fs: &Arc<dyn Storage>,
    group: &str,
    journal_dir: &Path,
    from: Seq,
    through: Seq,
    mut f: impl FnMut(&RecordRef<'_>) -> Result<ControlFlow<()>, TargetError>,
) -> Result<(Seq, u64), TargetError> {
    let mut last = (from.saturating_sub(1), 0);
    if from > through {
        return Ok(last);
    }
    let jerr = |step| move |source| TargetError::Journal { group: group.to_owned(), step, source };
    let mut reader = JournalReader::open(Arc::clone(fs), journal_dir, from).map_err(jerr("open a reader"))?;
    let mut expect = from;
    while expect <= through {
        let Some(rec) = reader.next().map_err(jerr("read"))? else {
            return Err(TargetError::Inconsistent {
                group: group.to_owned(),
                reason: format!(
                    "the journal ends before seq {expect}, but seq {from}..={through} is needed; a journal segment is damaged or was removed"
                ),
            });
        };
        if rec.header.seq != expect {
            return Err(TargetError::Inconsistent {
                group: group.to_owned(),
                reason: format!("the journal holds seq {} where seq {expect} was expected", rec.header.seq),
            });
        }
        if f(&rec)?.is_break() {
            break;
        }
        last = (rec.header.seq, rec.header.time_ns);
        expect += 1;
    }
    Ok(last)
}
