//! The stretches of a group's sequence that are not consistent points, `spans.toml`.
//!
//! Two things make a stretch inconsistent:
//!
//! - an async delta that left a write out (a superseded record, journal kind 6): every
//!   sequence number from that record up to the interval point, resync point or bookmark that
//!   ends the delta may lack a write that a later one overwrites (a *delta* span);
//! - a resync (resync records, kind 7): the agent re-sends its dirty regions in no guest
//!   order, so every sequence number from the first resync record up to the resync point (a
//!   point record named `resync`) is a mix of old and new content (a *resync* span). Only the
//!   resync point ends it: a bookmark or an interval point inside it is not consistent.
//!
//! Spans of the two kinds may overlap; the inconsistent sequence numbers are their union. The
//! receiver keeps the spans in an index, updated with the bookmark index after each commit
//! (and repaired by the same start-up replay), so history and recovery never scan the journal
//! for them.
//!
//! ```toml
//! through = 1234          # the last sequence number whose record was looked at
//! [[span]]
//! from = 1100             # first superseded (or resync) record
//! to = 1180               # the point that ends it (consistent); absent while it is open
//! kind = "delta"          # "delta" or "resync"; absent (files written before resyncs): "delta"
//! from_time_ns = 1764...  # times of the records `from` and `to` (ns since the epoch), for
//! to_time_ns = 1764...    # the dashboard; absent in files written before them
//! ```

use std::fmt;
use std::path::Path;

use hindsight_consistency::record::RESYNC_POINT_NAME;
use hindsight_consistency::storage::{write_file_atomic, Storage};
use hindsight_consistency::{RecordRef, Seq, WriteKind};
use serde::{Deserialize, Serialize};

use crate::index_file::{read_text, IndexError};

/// Why a span is not consistent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpanKind {
    /// An async delta left writes out; ended by an interval point, a resync point or a bookmark.
    #[default]
    Delta,
    /// An agent re-sent dirty regions; ended only by a resync point.
    Resync,
}

impl SpanKind {
    /// As shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Delta => "async delta",
            SpanKind::Resync => "resync",
        }
    }
}

/// Sequence numbers `from..to` are not consistent points (`to` itself is, unless another span
/// holds it); `to` is `None` while the span is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The first record that made the images inconsistent.
    pub from: Seq,
    /// The point that ends the span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Seq>,
    /// What made it inconsistent.
    #[serde(default)]
    pub kind: SpanKind,
    /// Time of the record `from` (ns since the epoch; 0: not recorded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from_time_ns: u64,
    /// Time of the point `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_time_ns: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// A write left out of a delta: a delta span opens here if none is open.
    Superseded(Seq),
    /// Resync data: a resync span opens here if none is open.
    Resync(Seq),
    /// An interval point or a bookmark: an open delta span ends here.
    Point(Seq),
    /// A resync point: an open resync span ends here, and an open delta span (the shipper ends
    /// a delta at any point).
    ResyncPoint(Seq),
}

impl Event {
    fn seq(self) -> Seq {
        match self {
            Event::Superseded(s) | Event::Resync(s) | Event::Point(s) | Event::ResyncPoint(s) => s,
        }
    }
}

/// The event a record is, if any.
pub(crate) fn event(rec: &RecordRef<'_>) -> Option<Event> {
    let seq = rec.header.seq;
    match rec.header.kind {
        WriteKind::Superseded => Some(Event::Superseded(seq)),
        WriteKind::Resync => Some(Event::Resync(seq)),
        WriteKind::Point if rec.volume == RESYNC_POINT_NAME => Some(Event::ResyncPoint(seq)),
        WriteKind::Point | WriteKind::Bookmark => Some(Event::Point(seq)),
        WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim => None,
    }
}

fn load_index(fs: &dyn Storage, path: &Path) -> Result<Index, IndexError> {
    match read_text(fs, path) {
        Ok(Some(text)) => toml::from_str(&text).map_err(|source| IndexError::Parse { path: path.to_owned(), source }),
        Ok(None) => Ok(Index::default()),
        Err(source) => Err(IndexError::Read { path: path.to_owned(), source }),
    }
}

/// Every span of the index, by `from`.
pub(crate) fn load(fs: &dyn Storage, path: &Path) -> Result<Vec<Span>, IndexError> {
    load_index(fs, path).map(|i| i.span)
}

/// Applies one event, its record's time `time_ns`, to the spans; true if a span opened or
/// closed.
fn apply(spans: &mut Vec<Span>, e: Event, time_ns: u64) -> bool {
    let mut close = |kind: SpanKind, at: Seq| match spans.iter_mut().rev().find(|s| s.kind == kind && s.to.is_none()) {
        Some(open) => {
            open.to = Some(at);
            open.to_time_ns = Some(time_ns);
            true
        }
        None => false,
    };
    match e {
        Event::Point(p) => close(SpanKind::Delta, p),
        Event::ResyncPoint(p) => {
            let delta = close(SpanKind::Delta, p);
            close(SpanKind::Resync, p) || delta
        }
        Event::Superseded(s) | Event::Resync(s) => {
            let kind = if matches!(e, Event::Resync(_)) { SpanKind::Resync } else { SpanKind::Delta };
            if spans.iter().any(|o| o.kind == kind && o.to.is_none()) {
                return false;
            }
            spans.push(Span { from: s, to: None, kind, from_time_ns: time_ns, to_time_ns: None });
            true
        }
    }
}

/// Applies the events of newly committed records up to `last` (in sequence order; those at or
/// below the index's `through` were seen before and are skipped) and replaces the file
/// atomically when a span opened or closed.
pub(crate) fn update(fs: &dyn Storage, path: &Path, events: &[(Event, u64)], last: Seq) -> Result<(), IndexError> {
    if events.is_empty() && fs.exists(path) {
        return Ok(());
    }
    let mut index = load_index(fs, path)?;
    let mut changed = false;
    for (e, time_ns) in events.iter().filter(|(e, _)| e.seq() > index.through) {
        changed |= apply(&mut index.span, *e, *time_ns);
    }
    if !changed && fs.exists(path) {
        // Only `through` moved: rewriting the file for that alone would cost a write per
        // commit; a replay of these records finds no event either.
        return Ok(());
    }
    index.through = index.through.max(last);
    let text = toml::to_string(&index).map_err(|source| IndexError::Encode { source })?;
    write_file_atomic(fs, path, text.as_bytes()).map_err(|source| IndexError::Write { path: path.to_owned(), source })
}

/// The consistent point for a request that lands on `seq`: `seq` itself, or the last point
/// before every span that holds it (spans may overlap: the point before one may lie in
/// another).
pub fn consistent_at_or_before(spans: &[Span], seq: Seq) -> Seq {
    let mut at = seq;
    while let Some(first) = spans.iter().filter(|s| s.contains(at)).map(|s| s.from).min() {
        if first == 0 {
            return 0;
        }
        at = first - 1;
    }
    at
}

/// Why a sequence number is not a consistent point, and the consistent points around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inconsistency {
    /// The kinds of the spans between `before` and `after`.
    pub kinds: Vec<SpanKind>,
    /// The last consistent point before it.
    pub before: Seq,
    /// The first consistent point after it, if the spans have ended.
    pub after: Option<Seq>,
    /// The kind of the span that ends at `after`, or of the one still open.
    pub ending: SpanKind,
}

/// Why `seq` is not a consistent point, or `None` if it is one.
pub fn inconsistency(spans: &[Span], seq: Seq) -> Option<Inconsistency> {
    let holding = |at: Seq| spans.iter().filter(move |s| s.contains(at));
    holding(seq).next()?;
    let before = consistent_at_or_before(spans, seq);
    let mut at = seq;
    let (after, ending) = loop {
        let last = holding(at).max_by_key(|s| s.to.unwrap_or(Seq::MAX))?;
        match last.to {
            None => break (None, last.kind),
            Some(t) if holding(t).next().is_none() => break (Some(t), last.kind),
            Some(t) => at = t,
        }
    };
    // Every kind of span in the stretch between the two consistent points.
    let end = after.unwrap_or(Seq::MAX);
    let mut kinds: Vec<SpanKind> = spans.iter().filter(|s| s.from < end && s.to.is_none_or(|t| t > before + 1)).map(|s| s.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    Some(Inconsistency { kinds, before, after, ending })
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what: Vec<&str> = self
            .kinds
            .iter()
            .map(|k| match k {
                SpanKind::Delta => "an async delta",
                SpanKind::Resync => "a resync",
            })
            .collect();
        write!(f, "it lies inside {} (seq {} to ", what.join(" and "), self.before + 1)?;
        match self.after {
            Some(t) => write!(f, "{})", t - 1)?,
            None => f.write_str("now)")?,
        }
        write!(f, "; the last consistent point before it is seq {}, and ", self.before)?;
        match (self.after, self.ending) {
            (Some(t), SpanKind::Resync) => write!(f, "the resync point after it is seq {t}"),
            (Some(t), SpanKind::Delta) => write!(f, "the point that ends the delta is seq {t}"),
            (None, SpanKind::Resync) => f.write_str("the resync has not completed yet"),
            (None, SpanKind::Delta) => {
                f.write_str("the delta's interval point has not arrived yet (--latest gives the newest consistent point)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    // Record `n` is at time n * 1000 in these tests.
    fn delta(from: Seq, to: Option<Seq>) -> Span {
        Span { from, to, kind: SpanKind::Delta, from_time_ns: from * 1000, to_time_ns: to.map(|t| t * 1000) }
    }

    fn resync(from: Seq, to: Option<Seq>) -> Span {
        Span { kind: SpanKind::Resync, ..delta(from, to) }
    }

    fn timed(events: &[Event]) -> Vec<(Event, u64)> {
        events.iter().map(|e| (*e, e.seq() * 1000)).collect()
    }

    #[test]
    fn spans_open_at_a_superseded_record_and_close_at_a_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.toml");
        let fs = StdStorage;
        use Event::*;
        update(&fs, &path, &timed(&[Point(3)]), 3).unwrap();
        assert_eq!(load(&fs, &path).unwrap(), vec![]);
        update(&fs, &path, &timed(&[Superseded(5), Superseded(6)]), 7).unwrap();
        assert_eq!(load(&fs, &path).unwrap(), vec![delta(5, None)]);
        // A replay of what was seen changes nothing; the point closes the span.
        update(&fs, &path, &timed(&[Superseded(5), Point(8)]), 9).unwrap();
        let spans = load(&fs, &path).unwrap();
        assert_eq!(spans, vec![delta(5, Some(8))]);
        assert_eq!((consistent_at_or_before(&spans, 4), consistent_at_or_before(&spans, 5)), (4, 4));
        assert_eq!((consistent_at_or_before(&spans, 7), consistent_at_or_before(&spans, 8)), (4, 8));
        let i = inconsistency(&spans, 6).unwrap();
        assert_eq!((i.kinds, i.before, i.after, i.ending), (vec![SpanKind::Delta], 4, Some(8), SpanKind::Delta));
        assert_eq!(inconsistency(&spans, 8), None);
        assert_eq!(inconsistency(&spans, 9), None);
    }

    #[test]
    fn a_resync_span_ends_only_at_a_resync_point_and_spans_of_both_kinds_unite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.toml");
        let fs = StdStorage;
        use Event::*;
        // Resync records from 11; a bookmark at 15 and an interval point at 17 end nothing of
        // it; a delta that left a write out (16) opens inside it and ends at 17.
        update(&fs, &path, &timed(&[Resync(11), Resync(12), Point(15)]), 15).unwrap();
        assert_eq!(load(&fs, &path).unwrap(), vec![resync(11, None)]);
        update(&fs, &path, &timed(&[Superseded(16), Point(17)]), 17).unwrap();
        assert_eq!(load(&fs, &path).unwrap(), vec![resync(11, None), delta(16, Some(17))]);
        let spans = load(&fs, &path).unwrap();
        for seq in [11, 15, 16, 17, 30] {
            assert_eq!(consistent_at_or_before(&spans, seq), 10, "seq {seq}");
        }
        let open = inconsistency(&spans, 15).unwrap();
        assert_eq!((open.before, open.after, open.ending), (10, None, SpanKind::Resync));
        assert_eq!(
            open.to_string(),
            "it lies inside an async delta and a resync (seq 11 to now); the last consistent point before it is seq 10, and the resync has not completed yet"
        );
        // Another delta opens; the resync point ends both.
        update(&fs, &path, &timed(&[Superseded(19), ResyncPoint(20)]), 21).unwrap();
        let spans = load(&fs, &path).unwrap();
        assert_eq!(spans, vec![resync(11, Some(20)), delta(16, Some(17)), delta(19, Some(20))]);
        assert_eq!((consistent_at_or_before(&spans, 19), consistent_at_or_before(&spans, 20)), (10, 20));
        let i = inconsistency(&spans, 12).unwrap();
        assert_eq!(
            (i.kinds.clone(), i.before, i.after, i.ending),
            (vec![SpanKind::Delta, SpanKind::Resync], 10, Some(20), SpanKind::Resync)
        );
        assert!(i.to_string().ends_with("the resync point after it is seq 20"), "{i}");
        // A resync point with no resync open is harmless; a new resync opens a new span.
        update(&fs, &path, &timed(&[ResyncPoint(25), Resync(30)]), 30).unwrap();
        assert_eq!(load(&fs, &path).unwrap().last(), Some(&resync(30, None)));
    }

    #[test]
    fn overlapping_spans_chain_to_the_points_outside_all_of_them() {
        // A delta 5..10 overlaps a resync 8..20, and a delta opens at 20 before the resync point.
        let spans = [delta(5, Some(10)), resync(8, Some(20)), delta(20, None)];
        assert_eq!(consistent_at_or_before(&spans, 15), 4);
        assert_eq!(consistent_at_or_before(&spans, 9), 4);
        assert_eq!(consistent_at_or_before(&spans, 25), 4);
        let i = inconsistency(&spans, 6).unwrap();
        assert_eq!((i.before, i.after, i.ending), (4, None, SpanKind::Delta));
        let spans = [delta(5, Some(10)), resync(8, Some(20))];
        let i = inconsistency(&spans, 6).unwrap();
        assert_eq!(
            (i.kinds.clone(), i.before, i.after, i.ending),
            (vec![SpanKind::Delta, SpanKind::Resync], 4, Some(20), SpanKind::Resync)
        );
        assert_eq!(inconsistency(&spans, 20), None);
        assert_eq!(inconsistency(&spans, 4), None);
    }

    #[test]
    fn an_index_without_kinds_loads_as_delta_spans() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.toml");
        let fs = StdStorage;
        std::fs::write(&path, "through = 40\n\n[[span]]\nfrom = 5\nto = 8\n\n[[span]]\nfrom = 30\n").unwrap();
        let untimed = |s: Span| Span { from_time_ns: 0, to_time_ns: None, ..s };
        assert_eq!(load(&fs, &path).unwrap(), vec![untimed(delta(5, Some(8))), untimed(delta(30, None))]);
        // Written back with the kind.
        update(&fs, &path, &timed(&[Event::Resync(41)]), 41).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("kind = \"delta\"") && text.contains("kind = \"resync\""), "{text}");
    }
}
