//! What the receiver indexes from the records it commits, so that listing never reads the
//! journal: bookmarks ([`crate::bookmarks`]) and the spans that are not consistent points
//! ([`crate::spans`]). Both indexes are updated after the commit that holds the records and
//! before the replicas' applied sequence number passes them; the start-up replay repairs a
//! crash in between.

use hindsight_consistency::storage::Storage;
use hindsight_consistency::{RecordRef, Seq};

use crate::error::MarksError;
use crate::layout::GroupPaths;
use crate::model::Bookmark;
use crate::{bookmarks, spans};

/// The marks of a run of committed records.
#[derive(Default)]
pub(crate) struct Marks {
    bookmarks: Vec<Bookmark>,
    /// Each event with the time of its record.
    events: Vec<(spans::Event, u64)>,
    last: Seq,
}

impl Marks {
    /// Notes one record (in sequence order).
    pub(crate) fn see(&mut self, rec: &RecordRef<'_>) {
        self.bookmarks.extend(bookmarks::from_record(rec));
        self.events.extend(spans::event(rec).map(|e| (e, rec.header.time_ns)));
        self.last = self.last.max(rec.header.seq);
    }

    /// How many bookmarks were seen.
    pub(crate) fn bookmark_count(&self) -> usize {
        self.bookmarks.len()
    }

    /// Adds what was seen to the indexes.
    pub(crate) fn save(&self, fs: &dyn Storage, paths: &GroupPaths) -> Result<(), MarksError> {
        bookmarks::add(fs, &paths.bookmarks(), &self.bookmarks).map_err(|source| MarksError::BookmarkIndex { source })?;
        if self.last > 0 {
            spans::update(fs, &paths.spans(), &self.events, self.last).map_err(|source| MarksError::SpanIndex { source })?;
        }
        Ok(())
    }
}
