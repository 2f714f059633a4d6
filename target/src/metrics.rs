//! The target's metrics address (`target.metrics_listen`): `GET /metrics` answers, in the
//! OpenMetrics text format (or the classic one, by the request's `Accept`), each group's
//! journal, window, lag and volumes as they are at the scrape; `/` is the dashboard
//! ([`crate::dashboard`]). Names follow Prometheus conventions (units in the name, `_total` for
//! counters, `group`, `volume` and `vm` as labels); the list is in docs/operations.md,
//! "Monitoring". Counters start again at 0 when the target restarts. The HTTP side is
//! `hindsight_consistency::metrics_http`, shared with the engine.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use hindsight_consistency::dashboard::{self, LagHistory};
use hindsight_consistency::metrics_http::{encode, int as n, register as add, GroupLabel, Source, VolumeLabel};
use hindsight_consistency::time::now_ns;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::TargetError;
use crate::group::{Group, GroupGauges, GroupMarks};

type Int = Family<GroupLabel, Gauge>;
type Float = Family<GroupLabel, Gauge<f64, AtomicU64>>;
type Total = Family<GroupLabel, Counter>;
type VolumeTotal = Family<VolumeLabel, Counter>;

/// One group at a scrape: its gauges and the marks of its window.
pub(crate) struct Scrape {
    pub name: String,
    pub gauges: GroupGauges,
    pub marks: GroupMarks,
}

/// A group failed over here: no longer served, its state as `failover.toml` says.
pub(crate) struct FailedOver {
    pub name: String,
    pub state: Option<crate::failover::FailoverState>,
}

/// The text of one scrape of these groups, at `now_ns`.
pub(crate) fn render(groups: &[Scrape], failed_over: &[FailedOver], now_ns: u64) -> String {
    let mut r = Registry::default();
    let failed: Int = add(
        &mut r,
        "hindsight_target_failed_over",
        "1 once the group is failed over (or a failover is under way): production runs at this site and the group's other series end",
    );
    for f in failed_over {
        failed.get_or_create(&GroupLabel { group: f.name.clone() }).set(1);
    }
    let last: Int = add(&mut r, "hindsight_target_last_seq", "Sequence number of the newest record the target's journal holds");
    let applied: Int = add(&mut r, "hindsight_target_applied_seq", "The replicas hold every record up to this sequence number");
    let journal: Int = add(&mut r, "hindsight_target_journal_bytes", "Bytes of journal the target holds for the group");
    let limit: Int = add(&mut r, "hindsight_target_journal_size_limit_bytes", "The journal_size the target keeps at most (absent: none)");
    let oldest: Float = add(&mut r, "hindsight_target_oldest_point_timestamp_seconds", "Time of the oldest recoverable point");
    let newest: Float = add(
        &mut r,
        "hindsight_target_newest_point_timestamp_seconds",
        "Time of the newest recoverable point: the last write the target confirmed",
    );
    let window: Float = add(&mut r, "hindsight_target_window_seconds", "Length of the recoverable window (newest point minus oldest)");
    let lag: Float = add(
        &mut r,
        "hindsight_target_lag_seconds",
        "How late the newest records arrived, plus the time since the engine went while it is away (absent: not known yet)",
    );
    let connected: Int = add(&mut r, "hindsight_target_engine_connected", "1 while the group's engine is connected and shipping");
    let stopped: Int = add(&mut r, "hindsight_target_group_stopped", "1 once the group stopped after an I/O failure (restart needed)");
    let inconsistent: Int =
        add(&mut r, "hindsight_target_inconsistent", "1 while the newest point is inside a resync or async delta (not a consistent point)");
    let bookmark_time: Float =
        add(&mut r, "hindsight_target_last_bookmark_timestamp_seconds", "Time of the newest bookmark in the window (absent: none)");
    let bookmark_age: Float = add(&mut r, "hindsight_target_last_bookmark_age_seconds", "Age of the newest bookmark in the window");
    let bookmarks: Int = add(&mut r, "hindsight_target_bookmarks", "Bookmarks in the recoverable window");
    let exports: Int = add(&mut r, "hindsight_target_exports", "Running exports of points of the group");
    let records: Total = add(&mut r, "hindsight_target_received_records", "Records taken from the engine since the target started");
    let bytes: Total =
        add(&mut r, "hindsight_target_received_record_bytes", "Bytes of records taken from the engine since the target started");
    let vol_writes: VolumeTotal =
        add(&mut r, "hindsight_target_volume_writes", "Writes (data, zeroes, trims, resync data) to the volume since the target started");
    let vol_bytes: VolumeTotal = add(&mut r, "hindsight_target_volume_written_bytes", "Bytes those writes cover, since the target started");
    let vol_size: Family<VolumeLabel, Gauge> = add(&mut r, "hindsight_target_volume_size_bytes", "Size of the volume");
    let secs = |ns: u64| ns as f64 / 1e9;
    for Scrape { name, gauges: g, marks } in groups {
        let l = GroupLabel { group: name.clone() };
        failed.get_or_create(&l).set(0);
        last.get_or_create(&l).set(n(g.last_seq));
        applied.get_or_create(&l).set(n(g.applied_seq));
        journal.get_or_create(&l).set(n(g.journal_bytes));
        if let Some(max) = g.journal_size {
            limit.get_or_create(&l).set(n(max));
        }
        oldest.get_or_create(&l).set(secs(g.oldest_ns));
        newest.get_or_create(&l).set(secs(g.newest_ns));
        window.get_or_create(&l).set(secs(g.newest_ns.saturating_sub(g.oldest_ns)));
        if let Some(ns) = g.lag_ns {
            lag.get_or_create(&l).set(secs(ns));
        }
        connected.get_or_create(&l).set(i64::from(g.engine_connected));
        stopped.get_or_create(&l).set(i64::from(g.stopped));
        inconsistent.get_or_create(&l).set(i64::from(marks.spans.iter().any(|s| s.contains(g.last_seq))));
        if let Some(b) = marks.bookmarks.iter().max_by_key(|b| b.seq) {
            bookmark_time.get_or_create(&l).set(secs(b.time_ns));
            bookmark_age.get_or_create(&l).set(secs(now_ns.saturating_sub(b.time_ns)));
        }
        bookmarks.get_or_create(&l).set(n(marks.bookmarks.len() as u64));
        exports.get_or_create(&l).set(n(marks.exports.len() as u64));
        records.get_or_create(&l).inc_by(g.received_records);
        bytes.get_or_create(&l).inc_by(g.received_bytes);
        for (v, c) in &g.volumes {
            let vl = VolumeLabel { group: name.clone(), vm: v.vm.clone(), volume: v.name.clone() };
            vol_writes.get_or_create(&vl).inc_by(c.writes);
            vol_bytes.get_or_create(&vl).inc_by(c.bytes);
            vol_size.get_or_create(&vl).set(n(v.size));
        }
    }
    encode(&r)
}

/// What the metrics address answers from: the daemon's groups, and their lag over time.
struct TargetSource<F> {
    groups: F,
    name: String,
    lag: LagHistory,
}

/// What the daemon serves: its groups, and those failed over here.
type Served = (Vec<Arc<Group>>, Vec<FailedOver>);

impl<F: Fn() -> Served + Send + Sync + 'static> TargetSource<F> {
    fn scrape(&self) -> (Vec<Scrape>, Vec<FailedOver>) {
        let (ready, failed) = (self.groups)();
        let scrapes = ready
            .iter()
            .map(|g| {
                let gauges = g.gauges();
                let marks = g.marks(gauges.oldest_ns);
                Scrape { name: g.name.clone(), gauges, marks }
            })
            .collect();
        (scrapes, failed)
    }
}

impl<F: Fn() -> Served + Send + Sync + 'static> Source for TargetSource<F> {
    fn metrics(&self) -> String {
        let (groups, failed) = self.scrape();
        render(&groups, &failed, now_ns())
    }

    fn dashboard(&self) -> Option<dashboard::Document> {
        let (groups, failed) = self.scrape();
        Some(crate::dashboard::document(&self.name, &groups, &failed, &self.lag, now_ns()))
    }

    fn sample(&self) {
        let lags: Vec<(String, f64)> = (self.groups)()
            .0
            .iter()
            .filter_map(|g| {
                let connected = g.gauges().engine_connected;
                g.counters.lag_ns(connected).map(|ns| (g.name.clone(), ns as f64 / 1e9))
            })
            .collect();
        self.lag.record(now_ns() as f64 / 1e9, &lags);
    }
}

/// Serves `/metrics` and the dashboard on `addr`, with the groups `groups` gives at each
/// request; `name` names this target on the page (its listen address). Returns the address
/// bound.
pub(crate) fn serve(
    addr: SocketAddr,
    name: String,
    groups: impl Fn() -> Served + Send + Sync + 'static,
) -> Result<SocketAddr, TargetError> {
    let source = Arc::new(TargetSource { groups, name, lag: LagHistory::default() });
    let bound = hindsight_consistency::metrics_http::serve(addr, "target-metrics", source)
        .map_err(|e| TargetError::MetricsBind { addr, reason: e.to_string() })?;
    log::info!("target metrics on http://{bound}/metrics, dashboard on http://{bound}/");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::VolumeCounts;
    use crate::model::{Bookmark, Volume};

    #[test]
    fn a_scrape_names_every_series_with_its_group_and_value() {
        let g = GroupGauges {
            last_seq: 42,
            applied_seq: 40,
            journal_bytes: 1 << 20,
            journal_size: Some(8 << 20),
            oldest_ns: 1_000_000_000_000,
            newest_ns: 1_060_000_000_000,
            engine_connected: true,
            stopped: false,
            lag_ns: Some(250_000_000),
            received_records: 7,
            received_bytes: 9000,
            volumes: vec![(Volume { name: "db".into(), vm: "vm1".into(), size: 1 << 30 }, VolumeCounts { writes: 5, bytes: 20480 })],
        };
        let marks = GroupMarks {
            bookmarks: vec![Bookmark {
                name: "b".into(),
                seq: 30,
                time_ns: 1_050_000_000_000,
                consistency: "crash-consistent".into(),
                note: String::new(),
            }],
            ..GroupMarks::default()
        };
        let text = render(
            &[Scrape { name: "erp".into(), gauges: g, marks }],
            &[FailedOver { name: "crm".into(), state: None }],
            1_070_000_000_000,
        );
        for line in [
            "hindsight_target_last_seq{group=\"erp\"} 42",
            "hindsight_target_failed_over{group=\"erp\"} 0",
            "hindsight_target_failed_over{group=\"crm\"} 1",
            "hindsight_target_applied_seq{group=\"erp\"} 40",
            "hindsight_target_journal_bytes{group=\"erp\"} 1048576",
            "hindsight_target_journal_size_limit_bytes{group=\"erp\"} 8388608",
            "hindsight_target_window_seconds{group=\"erp\"} 60.0",
            "hindsight_target_lag_seconds{group=\"erp\"} 0.25",
            "hindsight_target_engine_connected{group=\"erp\"} 1",
            "hindsight_target_group_stopped{group=\"erp\"} 0",
            "hindsight_target_inconsistent{group=\"erp\"} 0",
            "hindsight_target_last_bookmark_age_seconds{group=\"erp\"} 20.0",
            "hindsight_target_bookmarks{group=\"erp\"} 1",
            "hindsight_target_received_records_total{group=\"erp\"} 7",
            "hindsight_target_volume_writes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 5",
            "hindsight_target_volume_written_bytes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 20480",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("# HELP hindsight_target_window_seconds ") && text.trim_end().ends_with("# EOF"), "{text}");
        let classic = hindsight_consistency::metrics_http::classic_text(&text);
        assert!(classic.contains("# TYPE hindsight_target_volume_writes_total counter\n") && !classic.contains("# EOF"), "{classic}");
    }
}
