//! Which volumes of a group are resyncing, so that the group's journal task knows when a
//! resync point is due (docs/journal-format.md, "Resync (kind 7) and resync points").
//!
//! A volume starts resyncing with its first resync record (kind 7) and stops when its agent
//! sends `ResyncDone` for it. The group's resync point goes in once no volume is left: while
//! one still re-sends its dirty regions, no image of the group is consistent, whatever the
//! others have finished. The state lives in memory only: after an engine restart the first
//! `ResyncDone` places its point at once, with an unknown start (0).

use std::collections::BTreeSet;
use std::sync::Arc;

use hindsight_consistency::Seq;

/// The resync in progress in one group.
#[derive(Debug, Default)]
pub struct Resyncs {
    /// Sequence number of the first resync record since the last resync point.
    first: Option<Seq>,
    /// Volumes that sent resync records and no `ResyncDone` since.
    volumes: BTreeSet<Arc<str>>,
}

/// What a `ResyncDone` leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncOutcome {
    /// Place the resync point now; its data is `first` (0 if unknown).
    Point {
        /// The first resync record of the resync the point ends.
        first: Seq,
    },
    /// Other volumes are still resyncing: their `ResyncDone` will place the point.
    Waiting {
        /// Those volumes.
        others: Vec<Arc<str>>,
    },
}

impl Resyncs {
    /// A resync record of `volume` was numbered `seq`.
    pub fn record(&mut self, volume: &Arc<str>, seq: Seq) {
        self.first.get_or_insert(seq);
        if !self.volumes.contains(volume) {
            self.volumes.insert(Arc::clone(volume));
        }
    }

    /// `volumes` resync from now on although none of them sent a resync record yet (a
    /// takeover): the resync point waits for each.
    pub fn expect(&mut self, volumes: impl IntoIterator<Item = Arc<str>>) {
        self.volumes.extend(volumes);
    }

    /// The resync of `volumes` completed.
    pub fn done(&mut self, volumes: &[Arc<str>]) -> ResyncOutcome {
        for v in volumes {
            self.volumes.remove(v);
        }
        if self.volumes.is_empty() {
            ResyncOutcome::Point { first: self.first.take().unwrap_or(0) }
        } else {
            ResyncOutcome::Waiting { others: self.volumes.iter().cloned().collect() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn the_point_waits_for_every_resyncing_volume_and_names_the_first_record() {
        let mut r = Resyncs::default();
        r.record(&v("db"), 11);
        r.record(&v("logs"), 12);
        r.record(&v("db"), 13);
        assert_eq!(r.done(&[v("db")]), ResyncOutcome::Waiting { others: vec![v("logs")] });
        r.record(&v("logs"), 15);
        assert_eq!(r.done(&[v("logs")]), ResyncOutcome::Point { first: 11 });
        // The next resync starts afresh.
        r.record(&v("logs"), 30);
        assert_eq!(r.done(&[v("logs"), v("db")]), ResyncOutcome::Point { first: 30 });
    }

    #[test]
    fn a_done_without_known_records_places_a_point_from_zero() {
        let mut r = Resyncs::default();
        assert_eq!(r.done(&[v("db")]), ResyncOutcome::Point { first: 0 });
    }
}
