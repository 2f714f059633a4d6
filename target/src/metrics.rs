//! The target's Prometheus metrics (`target.metrics_listen`): `GET /metrics` answers, in the
//! OpenMetrics text format, each group's journal, window and replicas as they are at the
//! scrape. Names follow Prometheus conventions (units in the name, `group` as the label); the
//! list is in docs/operations.md, "Monitoring". The HTTP side is
//! `hindsight_consistency::metrics_http`, shared with the engine.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::TargetError;
use crate::group::{Group, GroupGauges};

/// The label of every per-group series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

type IntFamily = Family<GroupLabel, Gauge>;
type FloatFamily = Family<GroupLabel, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// The text of one scrape of these groups.
pub(crate) fn render(groups: &[(String, GroupGauges)]) -> String {
    let mut registry = Registry::default();
    let int = |registry: &mut Registry, name: &str, help: &str| {
        let f = IntFamily::default();
        registry.register(name, help, f.clone());
        f
    };
    let float = |registry: &mut Registry, name: &str, help: &str| {
        let f = FloatFamily::default();
        registry.register(name, help, f.clone());
        f
    };
    let last = int(&mut registry, "hindsight_target_last_seq", "Sequence number of the newest record the target's journal holds");
    let applied = int(&mut registry, "hindsight_target_applied_seq", "The replicas hold every record up to this sequence number");
    let journal = int(&mut registry, "hindsight_target_journal_bytes", "Bytes of journal the target holds for the group");
    let limit = int(&mut registry, "hindsight_target_journal_size_limit_bytes", "The journal_size the target keeps at most (absent: none)");
    let oldest = float(&mut registry, "hindsight_target_oldest_point_timestamp_seconds", "Time of the oldest recoverable point");
    let newest = float(&mut registry, "hindsight_target_newest_point_timestamp_seconds", "Time of the newest recoverable point");
    let window = float(&mut registry, "hindsight_target_window_seconds", "Length of the recoverable window (newest point minus oldest)");
    let connected = int(&mut registry, "hindsight_target_engine_connected", "1 while the group's engine is connected and shipping");
    let stopped = int(&mut registry, "hindsight_target_group_stopped", "1 once the group stopped after an I/O failure (restart needed)");
    let secs = |ns: u64| ns as f64 / 1e9;
    for (name, g) in groups {
        let l = GroupLabel { group: name.clone() };
        last.get_or_create(&l).set(i64::try_from(g.last_seq).unwrap_or(i64::MAX));
        applied.get_or_create(&l).set(i64::try_from(g.applied_seq).unwrap_or(i64::MAX));
        journal.get_or_create(&l).set(i64::try_from(g.journal_bytes).unwrap_or(i64::MAX));
        if let Some(max) = g.journal_size {
            limit.get_or_create(&l).set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        oldest.get_or_create(&l).set(secs(g.oldest_ns));
        newest.get_or_create(&l).set(secs(g.newest_ns));
        window.get_or_create(&l).set(secs(g.newest_ns.saturating_sub(g.oldest_ns)));
        connected.get_or_create(&l).set(i64::from(g.engine_connected));
        stopped.get_or_create(&l).set(i64::from(g.stopped));
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Serves `/metrics` on `addr`, with the groups `groups` gives at each scrape. Returns the
/// address bound.
pub(crate) fn serve(addr: SocketAddr, groups: impl Fn() -> Vec<Arc<Group>> + Send + 'static) -> Result<SocketAddr, TargetError> {
    let bound = hindsight_consistency::metrics_http::serve(addr, "target-metrics", move || {
        let gauges: Vec<(String, GroupGauges)> = groups().iter().map(|g| (g.name.clone(), g.gauges())).collect();
        render(&gauges)
    })
    .map_err(|e| TargetError::MetricsBind { addr, reason: e.to_string() })?;
    log::info!("target metrics on http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let text = render(&[("erp".into(), g)]);
        for line in [
            "hindsight_target_last_seq{group=\"erp\"} 42",
            "hindsight_target_applied_seq{group=\"erp\"} 40",
            "hindsight_target_journal_bytes{group=\"erp\"} 1048576",
            "hindsight_target_journal_size_limit_bytes{group=\"erp\"} 8388608",
            "hindsight_target_window_seconds{group=\"erp\"} 60.0",
            "hindsight_target_engine_connected{group=\"erp\"} 1",
            "hindsight_target_group_stopped{group=\"erp\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("# HELP hindsight_target_window_seconds ") && text.trim_end().ends_with("# EOF"), "{text}");
    }
}
