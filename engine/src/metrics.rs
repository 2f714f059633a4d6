//! The engine's Prometheus metrics (`engine.metrics_listen`): `GET /metrics` answers, in the
//! OpenMetrics text format, what `hindsight status` shows of each group, read at the scrape
//! from the same place (`operator::status`): lag, RPO, state, journal and link. Names follow
//! Prometheus conventions (units in the name, `_total` for counters, `group` as the label);
//! the list is in docs/operations.md, "Monitoring". Counters start again at 0 when the engine
//! restarts. The HTTP side is `hindsight_consistency::metrics_http`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use hindsight_consistency::wire::{GroupStatus, StatusRequest, PROTOCOL_VERSION};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::connection::Registry as Engine;

/// The label of every per-group series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

type Int = Family<GroupLabel, Gauge>;
type Float = Family<GroupLabel, Gauge<f64, AtomicU64>>;
type Total = Family<GroupLabel, Counter>;

/// The text of one scrape of these groups.
pub(crate) fn render(groups: &[GroupStatus]) -> String {
    let mut r = Registry::default();
    fn add<
        M: prometheus_client::metrics::TypedMetric
            + prometheus_client::encoding::EncodeMetric
            + Clone
            + Default
            + Send
            + Sync
            + std::fmt::Debug
            + 'static,
    >(
        r: &mut Registry,
        name: &str,
        help: &str,
    ) -> M {
        let m = M::default();
        r.register(name, help, m.clone());
        m
    }
    let lag_s: Float = add(&mut r, "hindsight_engine_lag_seconds", "Age of the oldest record the target has not confirmed");
    let lag_b: Int = add(&mut r, "hindsight_engine_lag_bytes", "Data bytes the target has not confirmed");
    let lag_r: Int = add(&mut r, "hindsight_engine_lag_records", "Records the target has not confirmed");
    let rpo: Float = add(&mut r, "hindsight_engine_rpo_seconds", "The group's RPO setting (absent: none)");
    let rpo_ok: Int = add(&mut r, "hindsight_engine_rpo_holds", "1 while the lag is inside the RPO (1 without an RPO)");
    let connected: Int = add(&mut r, "hindsight_engine_target_connected", "1 while the group ships to its target");
    let degraded: Int =
        add(&mut r, "hindsight_engine_degraded", "1 while the mode in force is not the configured one (a degraded sync group)");
    let regulating: Int = add(&mut r, "hindsight_engine_regulating", "1 while acknowledgements are slowed to keep the RPO");
    let paused: Int = add(&mut r, "hindsight_engine_paused", "1 while the group is paused (journal full): agents track writes");
    let stopped: Int = add(&mut r, "hindsight_engine_group_stopped", "1 once the group stopped after a journal failure");
    let resyncing: Int = add(&mut r, "hindsight_engine_resyncing_volumes", "Volumes of the group with a resync or initial sync under way");
    let durable: Int = add(&mut r, "hindsight_engine_durable_seq", "Newest sequence number durable in the engine's journal");
    let confirmed: Int = add(&mut r, "hindsight_engine_confirmed_seq", "Newest sequence number the target confirmed");
    let journal: Int = add(&mut r, "hindsight_engine_journal_bytes", "Bytes in the engine's journal");
    let limit: Int = add(&mut r, "hindsight_engine_journal_size_limit_bytes", "The group's journal_size (absent: none)");
    let shipped: Total =
        add(&mut r, "hindsight_engine_shipped_record_bytes", "Record bytes shipped to the target since the engine started");
    let wire: Total = add(&mut r, "hindsight_engine_wire_bytes", "Bytes put on the wire to the target since the engine started");
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for g in groups {
        let l = GroupLabel { group: g.name.clone() };
        lag_s.get_or_create(&l).set(g.lag_ms as f64 / 1e3);
        lag_b.get_or_create(&l).set(n(g.lag_bytes));
        lag_r.get_or_create(&l).set(n(g.lag_writes));
        if g.rpo_ms > 0 {
            rpo.get_or_create(&l).set(g.rpo_ms as f64 / 1e3);
        }
        rpo_ok.get_or_create(&l).set(i64::from(g.rpo_ok));
        connected.get_or_create(&l).set(i64::from(g.target_connected));
        degraded.get_or_create(&l).set(i64::from(g.mode != g.effective_mode));
        regulating.get_or_create(&l).set(i64::from(g.regulating));
        paused.get_or_create(&l).set(i64::from(g.paused));
        stopped.get_or_create(&l).set(i64::from(g.poisoned));
        resyncing.get_or_create(&l).set(n(g.resyncing.len() as u64));
        durable.get_or_create(&l).set(n(g.durable_seq));
        confirmed.get_or_create(&l).set(n(g.confirmed_seq));
        journal.get_or_create(&l).set(n(g.journal_bytes));
        if g.journal_size > 0 {
            limit.get_or_create(&l).set(n(g.journal_size));
        }
        shipped.get_or_create(&l).inc_by(g.shipped_bytes);
        wire.get_or_create(&l).inc_by(g.wire_bytes);
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Serves `/metrics` on `addr` for the running engine; returns the address bound.
pub(crate) fn serve(addr: SocketAddr, engine: Arc<Engine>) -> std::io::Result<SocketAddr> {
    let bound = hindsight_consistency::metrics_http::serve(addr, "engine-metrics", move || {
        let req = StatusRequest { protocol: PROTOCOL_VERSION, groups: Vec::new() };
        match crate::operator::status(&req, &engine) {
            Ok(reply) => render(&reply.groups),
            Err(e) => format!("# status failed: {e}\n# EOF\n"),
        }
    })?;
    log::info!("engine metrics on http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_gives_the_status_of_each_group_as_series() {
        let g = GroupStatus {
            name: "erp".into(),
            mode: "sync".into(),
            effective_mode: "cdp".into(),
            lag_ms: 2500,
            lag_bytes: 4096,
            lag_writes: 1,
            rpo_ms: 10_000,
            rpo_ok: true,
            target_connected: false,
            durable_seq: 12,
            confirmed_seq: 11,
            shipped_bytes: 1000,
            wire_bytes: 400,
            journal_bytes: 8192,
            journal_size: 0,
            ..GroupStatus::default()
        };
        let text = render(&[g]);
        for line in [
            "hindsight_engine_lag_seconds{group=\"erp\"} 2.5",
            "hindsight_engine_lag_records{group=\"erp\"} 1",
            "hindsight_engine_rpo_seconds{group=\"erp\"} 10.0",
            "hindsight_engine_degraded{group=\"erp\"} 1",
            "hindsight_engine_target_connected{group=\"erp\"} 0",
            "hindsight_engine_shipped_record_bytes_total{group=\"erp\"} 1000",
            "hindsight_engine_wire_bytes_total{group=\"erp\"} 400",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("hindsight_engine_journal_size_limit_bytes{"), "no journal_size, no series:\n{text}");
    }
}
