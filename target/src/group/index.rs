//! The extents of the records a group commits, gathered as it commits them, so that the index
//! file of a sealed segment is written from memory instead of by reading the segment back
//! (docs/point-index.md, "The active segment").

use hindsight_consistency::journal::CommitPlace;
use hindsight_consistency::record::{RecordHeader, RecordRef};

use crate::point_index::build::{volume_number, RunBuilder};
use crate::point_index::Run;

/// A record appended to the journal and not yet committed.
struct Appended {
    header: RecordHeader,
    volume: Option<u16>,
    name_len: usize,
    /// [`Journal::pending_bytes`](hindsight_consistency::journal::Journal::pending_bytes) before it.
    at: usize,
}

/// The active segment's extents, and the runs of segments sealed since maintenance last took
/// them.
#[derive(Default)]
pub(super) struct CommitIndex {
    building: Option<RunBuilder>,
    sealed: Vec<Run>,
    appended: Vec<Appended>,
}

impl CommitIndex {
    /// A record appended at `at` bytes into the pending commit. `volumes` numbers the volumes.
    pub fn appended(&mut self, rec: &RecordRef<'_>, volumes: &[String], at: usize) {
        let header = rec.header;
        // Validated against the group's volumes already: an unknown one cannot come.
        let volume = volume_number(volumes, header.seq, header.kind, rec.volume).ok().flatten();
        self.appended.push(Appended { header, volume, name_len: rec.volume.len(), at });
    }

    /// The pending records were committed at `place` (or the commit failed, `None`: they are
    /// forgotten, and so is the segment's run, which can no longer be whole).
    pub fn committed(&mut self, place: Option<CommitPlace>, volumes: &[String]) {
        let Some(place) = place else {
            self.appended.clear();
            self.building = None;
            return;
        };
        let Some(first) = self.appended.first().map(|a| a.header.seq) else { return };
        if self.building.as_ref().is_some_and(|b| b.segment != place.segment) {
            let done = self.building.take().expect("checked");
            if done.whole() {
                self.sealed.push(done.finish(volumes));
            }
        }
        let b = self.building.get_or_insert_with(|| RunBuilder::new(place.segment, first));
        for a in self.appended.drain(..) {
            b.see(&a.header, a.volume, a.name_len, place.start + a.at as u64);
        }
    }

    /// The runs of the segments sealed since the last call, each whole from its first record.
    pub fn take_sealed(&mut self) -> Vec<Run> {
        std::mem::take(&mut self.sealed)
    }

    /// Memory given back while the group is idle; the active segment's run is kept.
    pub fn release_memory(&mut self) {
        self.appended = Vec::new();
    }
}
