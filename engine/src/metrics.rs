//! The engine's metrics address (`engine.metrics_listen`): `GET /metrics` answers, in the
//! OpenMetrics text format (or the classic one, by the request's `Accept`), what `hindsight
//! status` shows of each group, read at the scrape from the same place (`operator::status`):
//! lag, RPO, state, journal and link, and each volume's writes; `/` is the dashboard
//! ([`crate::dashboard`]). Names follow Prometheus conventions (units in the name, `_total` for
//! counters, `group`, `vm` and `volume` as labels); the list is in docs/operations.md,
//! "Monitoring". Counters start again at 0 when the engine restarts. The HTTP side is
//! `hindsight_consistency::metrics_http`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use hindsight_consistency::config::VolumeConfig;
use hindsight_consistency::dashboard::{self, LagHistory};
use hindsight_consistency::metrics_http::{encode, int as n, register as add, GroupLabel, Source, VolumeLabel};
use hindsight_consistency::time::now_ns;
use hindsight_consistency::wire::{GroupStatus, StatusRequest, PROTOCOL_VERSION};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::connection::Registry as Engine;

type Int = Family<GroupLabel, Gauge>;
type Float = Family<GroupLabel, Gauge<f64, AtomicU64>>;
type Total = Family<GroupLabel, Counter>;
type VolumeInt = Family<VolumeLabel, Gauge>;
type VolumeTotal = Family<VolumeLabel, Counter>;

/// One group at a scrape: what status says of it, and what only the engine's memory holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scrape {
    pub status: GroupStatus,
    /// Engine time of the newest write the target confirmed (0: none since start).
    pub confirmed_time_ns: u64,
    /// Each volume with its writes and bytes since start.
    pub volumes: Vec<(VolumeConfig, u64, u64)>,
}

/// The text of one scrape of these groups.
pub(crate) fn render(groups: &[Scrape]) -> String {
    let mut r = Registry::default();
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
    let confirmed_time: Float = add(
        &mut r,
        "hindsight_engine_last_confirmed_write_timestamp_seconds",
        "Engine time of the newest write the target confirmed (absent: none since the engine started)",
    );
    let journal: Int = add(&mut r, "hindsight_engine_journal_bytes", "Bytes in the engine's journal");
    let limit: Int = add(&mut r, "hindsight_engine_journal_size_limit_bytes", "The group's journal_size (absent: none)");
    let shipped: Total =
        add(&mut r, "hindsight_engine_shipped_record_bytes", "Record bytes shipped to the target since the engine started");
    let wire: Total = add(&mut r, "hindsight_engine_wire_bytes", "Bytes put on the wire to the target since the engine started");
    let attached: VolumeInt = add(&mut r, "hindsight_engine_volume_attached", "1 while the volume's agent is connected");
    let vol_writes: VolumeTotal = add(&mut r, "hindsight_engine_volume_writes", "Writes journaled for the volume since the engine started");
    let vol_bytes: VolumeTotal = add(&mut r, "hindsight_engine_volume_written_bytes", "Bytes those writes cover, since the engine started");
    let resync_done: VolumeInt =
        add(&mut r, "hindsight_engine_resync_done_regions", "Regions of 1 MiB re-sent and acknowledged in the volume's resync");
    let resync_total: VolumeInt = add(&mut r, "hindsight_engine_resync_total_regions", "Regions of 1 MiB in the volume's resync");
    for s in groups {
        let g = &s.status;
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
        if s.confirmed_time_ns > 0 {
            confirmed_time.get_or_create(&l).set(s.confirmed_time_ns as f64 / 1e9);
        }
        journal.get_or_create(&l).set(n(g.journal_bytes));
        if g.journal_size > 0 {
            limit.get_or_create(&l).set(n(g.journal_size));
        }
        shipped.get_or_create(&l).inc_by(g.shipped_bytes);
        wire.get_or_create(&l).inc_by(g.wire_bytes);
        for (v, writes, bytes) in &s.volumes {
            let vl = VolumeLabel { group: g.name.clone(), vm: v.vm.clone(), volume: v.name.clone() };
            attached.get_or_create(&vl).set(i64::from(g.attached.contains(&v.name)));
            vol_writes.get_or_create(&vl).inc_by(*writes);
            vol_bytes.get_or_create(&vl).inc_by(*bytes);
            if let Some(r) = g.resyncing.iter().find(|r| r.volume == v.name) {
                resync_done.get_or_create(&vl).set(n(r.done));
                resync_total.get_or_create(&vl).set(n(r.total));
            }
        }
    }
    encode(&r)
}

/// What the metrics address answers from: the running engine, and its groups' lag over time.
struct EngineSource {
    engine: Arc<Engine>,
    lag: LagHistory,
}

impl EngineSource {
    /// Each group as status sees it, with what only the engine's memory holds.
    fn scrape(&self) -> Result<Vec<Scrape>, String> {
        let req = StatusRequest { protocol: PROTOCOL_VERSION, groups: Vec::new() };
        let reply = crate::operator::status(&req, &self.engine).map_err(|e| e.to_string())?;
        Ok(reply
            .groups
            .into_iter()
            .map(|status| {
                let g = self.engine.groups.get(&status.name);
                Scrape {
                    confirmed_time_ns: g.map_or(0, |g| g.shared.policy.lag().confirmed_time_ns),
                    volumes: g.map_or_else(Vec::new, |g| {
                        g.config
                            .volumes
                            .iter()
                            .map(|v| {
                                let (writes, bytes) = g.shared.writes.of(&v.name);
                                (v.clone(), writes, bytes)
                            })
                            .collect()
                    }),
                    status,
                }
            })
            .collect())
    }
}

impl Source for EngineSource {
    fn metrics(&self) -> String {
        match self.scrape() {
            Ok(groups) => render(&groups),
            Err(e) => format!("# status failed: {e}\n# EOF\n"),
        }
    }

    fn dashboard(&self) -> Option<dashboard::Document> {
        Some(crate::dashboard::document(&self.engine.name, &self.scrape().unwrap_or_default(), &self.lag, now_ns()))
    }

    fn sample(&self) {
        let lags: Vec<(String, f64)> =
            self.engine.groups.iter().map(|(name, g)| (name.clone(), g.shared.policy.lag().age.as_secs_f64())).collect();
        self.lag.record(now_ns() as f64 / 1e9, &lags);
    }
}

/// Serves `/metrics` and the dashboard on `addr` for the running engine; returns the address
/// bound.
pub(crate) fn serve(addr: SocketAddr, engine: Arc<Engine>) -> std::io::Result<SocketAddr> {
    let source = Arc::new(EngineSource { engine, lag: LagHistory::default() });
    let bound = hindsight_consistency::metrics_http::serve(addr, "engine-metrics", source)?;
    log::info!("engine metrics on http://{bound}/metrics, dashboard on http://{bound}/");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::wire::ResyncStatus;

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
            attached: vec!["db".into()],
            resyncing: vec![ResyncStatus { volume: "db".into(), done: 3, total: 10, ..ResyncStatus::default() }],
            ..GroupStatus::default()
        };
        let db = VolumeConfig { name: "db".into(), vm: "vm1".into(), size: 1 << 20 };
        let text = render(&[Scrape { status: g, confirmed_time_ns: 1_500_000_000_000_000_000, volumes: vec![(db, 9, 36864)] }]);
        for line in [
            "hindsight_engine_lag_seconds{group=\"erp\"} 2.5",
            "hindsight_engine_lag_records{group=\"erp\"} 1",
            "hindsight_engine_rpo_seconds{group=\"erp\"} 10.0",
            "hindsight_engine_degraded{group=\"erp\"} 1",
            "hindsight_engine_target_connected{group=\"erp\"} 0",
            "hindsight_engine_shipped_record_bytes_total{group=\"erp\"} 1000",
            "hindsight_engine_wire_bytes_total{group=\"erp\"} 400",
            "hindsight_engine_last_confirmed_write_timestamp_seconds{group=\"erp\"} 1500000000.0",
            "hindsight_engine_volume_attached{group=\"erp\",vm=\"vm1\",volume=\"db\"} 1",
            "hindsight_engine_volume_writes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 9",
            "hindsight_engine_volume_written_bytes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 36864",
            "hindsight_engine_resync_done_regions{group=\"erp\",vm=\"vm1\",volume=\"db\"} 3",
            "hindsight_engine_resync_total_regions{group=\"erp\",vm=\"vm1\",volume=\"db\"} 10",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("hindsight_engine_journal_size_limit_bytes{"), "no journal_size, no series:\n{text}");
        assert!(text.contains("# TYPE hindsight_engine_wire_bytes counter\n") && text.ends_with("# EOF\n"), "{text}");
        let classic = hindsight_consistency::metrics_http::classic_text(&text);
        assert!(classic.contains("# TYPE hindsight_engine_wire_bytes_total counter\n") && !classic.contains("# EOF"), "{classic}");
    }
}
