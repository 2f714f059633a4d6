//! What a group counts for the metrics endpoint and the dashboard: records and bytes taken
//! from the engine, each volume's writes, and how late the newest records arrived. In memory:
//! the counters start again at 0 when the target restarts (Prometheus's `rate()` and
//! `increase()` take such resets in their stride).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hindsight_consistency::sync::lock;
use hindsight_consistency::time::now_ns;
use hindsight_consistency::RecordRef;

/// One volume's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VolumeCounts {
    /// Records that change the volume (data, zeroes, trims, resync data) taken.
    pub writes: u64,
    /// Bytes they cover.
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    records: AtomicU64,
    record_bytes: AtomicU64,
    /// How old the newest record of the last batch was when it was committed.
    arrival_delay_ns: AtomicU64,
    /// When the engine's connection went (0 while it is up, or before any).
    left_at_ns: AtomicU64,
    volumes: Mutex<BTreeMap<String, VolumeCounts>>,
}

/// One batch's counts, added to the group's once the batch is committed.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    records: u64,
    record_bytes: u64,
    newest_ns: u64,
    volumes: Vec<(String, VolumeCounts)>,
}

impl Tally {
    pub fn see(&mut self, rec: &RecordRef<'_>) {
        self.records += 1;
        self.record_bytes += rec.encoded_len() as u64;
        self.newest_ns = self.newest_ns.max(rec.header.time_ns);
        if !rec.header.kind.changes_volume() {
            return;
        }
        let v = match self.volumes.iter_mut().find(|(name, _)| name == rec.volume) {
            Some((_, v)) => v,
            None => {
                self.volumes.push((rec.volume.to_owned(), VolumeCounts::default()));
                &mut self.volumes.last_mut().expect("just pushed").1
            }
        };
        v.writes += 1;
        v.bytes += u64::from(rec.header.length);
    }
}

impl Counters {
    /// Adds a committed batch.
    pub fn add(&self, tally: Tally) {
        self.records.fetch_add(tally.records, Ordering::Relaxed);
        self.record_bytes.fetch_add(tally.record_bytes, Ordering::Relaxed);
        if tally.newest_ns > 0 {
            self.arrival_delay_ns.store(now_ns().saturating_sub(tally.newest_ns), Ordering::Relaxed);
        }
        let mut volumes = lock(&self.volumes);
        for (name, c) in tally.volumes {
            let v = volumes.entry(name).or_default();
            v.writes += c.writes;
            v.bytes += c.bytes;
        }
    }

    /// The engine connected (`true`) or went.
    pub fn engine(&self, connected: bool) {
        self.left_at_ns.store(if connected { 0 } else { now_ns() }, Ordering::Relaxed);
    }

    /// Records and record bytes taken since start.
    pub fn taken(&self) -> (u64, u64) {
        (self.records.load(Ordering::Relaxed), self.record_bytes.load(Ordering::Relaxed))
    }

    /// Each volume's counts since start.
    pub fn volumes(&self) -> BTreeMap<String, VolumeCounts> {
        lock(&self.volumes).clone()
    }

    /// The lag as the recovery site alone can know it (docs/dashboard.md): how late the newest
    /// records arrived, plus, while the engine is away, the time since it went. `None` before
    /// the engine ever connected since start.
    pub fn lag_ns(&self, connected: bool) -> Option<u64> {
        let delay = self.arrival_delay_ns.load(Ordering::Relaxed);
        let left = self.left_at_ns.load(Ordering::Relaxed);
        match (connected, left) {
            (true, _) => Some(delay),
            (false, 0) => None,
            (false, left) => Some(delay + now_ns().saturating_sub(left)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::record::RecordHeader;
    use hindsight_consistency::WriteKind;

    fn rec(volume: &str, kind: WriteKind, length: u32, time_ns: u64) -> RecordRef<'_> {
        RecordRef { header: RecordHeader { seq: 1, time_ns, kind, offset: 0, length }, volume, data: &[] }
    }

    #[test]
    fn a_batch_counts_writes_per_volume_and_points_only_as_records() {
        let c = Counters::default();
        let mut t = Tally::default();
        t.see(&rec("db", WriteKind::Zeroes, 4096, 10));
        t.see(&rec("log", WriteKind::Trim, 8192, 11));
        t.see(&rec("db", WriteKind::Zeroes, 4096, 12));
        t.see(&rec("", WriteKind::Point, 0, 13));
        c.add(t);
        assert_eq!(c.taken().0, 4);
        let v = c.volumes();
        assert_eq!(v["db"], VolumeCounts { writes: 2, bytes: 8192 });
        assert_eq!(v["log"], VolumeCounts { writes: 1, bytes: 8192 });
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn the_lag_grows_while_the_engine_is_away() {
        let c = Counters::default();
        assert_eq!(c.lag_ns(false), None, "never connected: unknown");
        c.engine(true);
        assert_eq!(c.lag_ns(true), Some(0));
        c.engine(false);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(c.lag_ns(false).unwrap() >= 20_000_000);
    }
}
