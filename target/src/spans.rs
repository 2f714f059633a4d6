//! The stretches of a group's sequence that are not consistent points, `spans.toml`.
//!
//! An async delta that left a write out (a superseded record, journal kind 6) makes every
//! sequence number from that record up to the interval point or bookmark that ends the delta
//! an inconsistent image: it may lack a write that a later one overwrites. The receiver keeps
//! these spans in an index, updated with the bookmark index after each commit (and repaired by
//! the same start-up replay), so history and recovery never scan the journal for them.
//!
//! ```toml
//! through = 1234          # the last sequence number whose record was looked at
//! [[span]]
//! from = 1100             # first superseded record
//! to = 1180               # the point that ends it (consistent); absent while the delta is open
//! ```

use std::path::Path;

use hindsight_consistency::storage::{write_file_atomic, Storage};
use hindsight_consistency::{RecordRef, Seq, WriteKind};
use serde::{Deserialize, Serialize};

/// Sequence numbers `from..to` are not consistent points (`to` itself is); `to` is `None`
/// while the delta is still arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from: Seq,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Seq>,
}

impl Span {
    /// True if the image at `seq` is inside the span (not a consistent point).
    pub fn contains(&self, seq: Seq) -> bool {
        seq >= self.from && self.to.is_none_or(|t| seq < t)
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Index {
    #[serde(default)]
    through: Seq,
    #[serde(default)]
    span: Vec<Span>,
}

/// What a record means for the spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A write left out of a delta: a span opens here if none is open.
    Superseded(Seq),
    /// An interval point or a bookmark: an open span ends here.
    Point(Seq),
}

/// The event a record is, if any.
pub(crate) fn event(rec: &RecordRef<'_>) -> Option<Event> {
    match rec.header.kind {
        WriteKind::Superseded => Some(Event::Superseded(rec.header.seq)),
        WriteKind::Point | WriteKind::Bookmark => Some(Event::Point(rec.header.seq)),
        _ => None,
    }
}

fn load_index(path: &Path) -> Result<Index, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Every span of the index, oldest first.
pub(crate) fn load(path: &Path) -> Result<Vec<Span>, String> {
    load_index(path).map(|i| i.span)
}

/// Applies the events of newly committed records up to `last` (in sequence order; those at or
/// below the index's `through` were seen before and are skipped) and replaces the file
/// atomically when a span opened or closed.
pub(crate) fn update(fs: &dyn Storage, path: &Path, events: &[Event], last: Seq) -> Result<(), String> {
    if events.is_empty() && fs.exists(path) {
        return Ok(());
    }
    let seq_of = |e: &Event| match *e {
        Event::Superseded(s) | Event::Point(s) => s,
    };
    let mut index = load_index(path)?;
    let mut changed = false;
    for e in events.iter().filter(|e| seq_of(e) > index.through) {
        let open = index.span.last_mut().filter(|s| s.to.is_none());
        match (*e, open) {
            (Event::Superseded(s), None) => {
                index.span.push(Span { from: s, to: None });
                changed = true;
            }
            (Event::Point(p), Some(span)) => {
                span.to = Some(p);
                changed = true;
            }
            _ => {}
        }
    }
    if !changed && fs.exists(path) {
        // Only `through` moved: rewriting the file for that alone would cost a write per
        // commit; a replay of these records finds no event either.
        return Ok(());
    }
    index.through = index.through.max(last);
    let text = toml::to_string(&index).map_err(|e| e.to_string())?;
    write_file_atomic(fs, path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The consistent point for a request that lands on `seq`: `seq` itself, or the last point
/// before the span that holds it.
pub fn consistent_at_or_before(spans: &[Span], seq: Seq) -> Seq {
    spans.iter().rev().find(|s| s.contains(seq)).map_or(seq, |s| s.from - 1)
}

/// The span holding `seq`, if it is not a consistent point.
pub fn holding(spans: &[Span], seq: Seq) -> Option<Span> {
    spans.iter().rev().find(|s| s.contains(seq)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    #[test]
    fn spans_open_at_a_superseded_record_and_close_at_a_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.toml");
        let fs = StdStorage;
        use Event::*;
        update(&fs, &path, &[Point(3)], 3).unwrap();
        assert_eq!(load(&path).unwrap(), vec![]);
        update(&fs, &path, &[Superseded(5), Superseded(6)], 7).unwrap();
        assert_eq!(load(&path).unwrap(), vec![Span { from: 5, to: None }]);
        // A replay of what was seen changes nothing; the point closes the span.
        update(&fs, &path, &[Superseded(5), Point(8)], 9).unwrap();
        let spans = load(&path).unwrap();
        assert_eq!(spans, vec![Span { from: 5, to: Some(8) }]);
        assert_eq!((consistent_at_or_before(&spans, 4), consistent_at_or_before(&spans, 5)), (4, 4));
        assert_eq!((consistent_at_or_before(&spans, 7), consistent_at_or_before(&spans, 8)), (4, 8));
        assert_eq!(holding(&spans, 6), Some(Span { from: 5, to: Some(8) }));
        assert_eq!(holding(&spans, 9), None);
    }
}
