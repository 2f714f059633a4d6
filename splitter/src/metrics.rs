//! The agent's Prometheus metrics (`agent.metrics_listen`, best on a loopback address of the
//! VM): `GET /metrics` answers, in the OpenMetrics text format, whether the engine is
//! connected, the writes waiting for it, and each disk's guest writes, dirty regions and
//! resync. Names follow the engine's and the target's (`hindsight_agent_*`, labels `group`,
//! `vm`, `volume`); the list is in docs/operations.md, "Monitoring". Counters start again at 0
//! when the agent restarts. The agent serves no dashboard.

use std::net::SocketAddr;
use std::sync::Arc;

use hindsight_consistency::metrics_http::{encode, int, register, Source, VolumeLabel};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine_link::EngineLink;
use crate::replicated::ReplicatedDisk;

/// The label of the agent-wide series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

/// One disk at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskScrape {
    pub group: String,
    pub volume: String,
    pub size: u64,
    pub writes: u64,
    pub written_bytes: u64,
    /// Regions the replica may lack and their size in bytes (`None`: no dirty map).
    pub dirty: Option<(u64, u64)>,
    pub resyncing: bool,
    /// The engine refuses the disk's writes because its group is paused.
    pub paused: bool,
}

/// The agent at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentScrape {
    pub vm: String,
    pub engine_connected: bool,
    pub in_flight: u64,
    pub disks: Vec<DiskScrape>,
}

/// The text of one scrape.
pub fn render(a: &AgentScrape) -> String {
    let mut r = Registry::default();
    let connected: Family<VmLabel, Gauge> =
        register(&mut r, "hindsight_agent_engine_connected", "1 while the agent is connected to its engine");
    let in_flight: Family<VmLabel, Gauge> =
        register(&mut r, "hindsight_agent_writes_in_flight", "Writes sent or waiting to be sent that the engine has not acknowledged");
    let writes: Family<VolumeLabel, Counter> =
        register(&mut r, "hindsight_agent_guest_writes", "Guest writes (data, zeroes, trims) taken since the agent started");
    let bytes: Family<VolumeLabel, Counter> =
        register(&mut r, "hindsight_agent_guest_written_bytes", "Bytes those guest writes cover, since the agent started");
    let size: Family<VolumeLabel, Gauge> = register(&mut r, "hindsight_agent_volume_size_bytes", "Size of the disk");
    let dirty: Family<VolumeLabel, Gauge> = register(
        &mut r,
        "hindsight_agent_dirty_regions",
        "Regions of the dirty map the replica may lack (to be resynced); absent without a dirty map",
    );
    let dirty_bytes: Family<VolumeLabel, Gauge> = register(&mut r, "hindsight_agent_dirty_bytes", "Bytes of those regions");
    let resyncing: Family<VolumeLabel, Gauge> =
        register(&mut r, "hindsight_agent_resyncing", "1 while the disk's writes go as resync data (the replica lacks some)");
    let paused: Family<VolumeLabel, Gauge> =
        register(&mut r, "hindsight_agent_paused", "1 while the engine refuses the disk's writes because its group is paused");
    let vm = VmLabel { vm: a.vm.clone() };
    connected.get_or_create(&vm).set(i64::from(a.engine_connected));
    in_flight.get_or_create(&vm).set(int(a.in_flight));
    for d in &a.disks {
        let l = VolumeLabel { group: d.group.clone(), vm: a.vm.clone(), volume: d.volume.clone() };
        writes.get_or_create(&l).inc_by(d.writes);
        bytes.get_or_create(&l).inc_by(d.written_bytes);
        size.get_or_create(&l).set(int(d.size));
        if let Some((regions, region_bytes)) = d.dirty {
            dirty.get_or_create(&l).set(int(regions));
            dirty_bytes.get_or_create(&l).set(int(regions.saturating_mul(region_bytes)));
        }
        resyncing.get_or_create(&l).set(i64::from(d.resyncing));
        paused.get_or_create(&l).set(i64::from(d.paused));
    }
    encode(&r)
}

/// The running agent, as its metrics read it.
struct AgentSource {
    vm: String,
    link: Arc<EngineLink>,
    /// Each disk with its group.
    disks: Vec<(String, Arc<ReplicatedDisk>)>,
}

impl Source for AgentSource {
    fn metrics(&self) -> String {
        let disks = self
            .disks
            .iter()
            .map(|(group, d)| {
                let (writes, written_bytes) = d.written();
                DiskScrape {
                    group: group.clone(),
                    volume: d.volume().to_owned(),
                    size: crate::block::BlockDevice::size(d.as_ref()),
                    writes,
                    written_bytes,
                    dirty: d.dirty_map().map(|m| (m.needing_resync().len() as u64, m.region_size())),
                    resyncing: d.resyncing(),
                    paused: self.link.paused_since(d.disk_number()).is_some(),
                }
            })
            .collect();
        let scrape =
            AgentScrape { vm: self.vm.clone(), engine_connected: self.link.is_connected(), in_flight: self.link.in_flight() as u64, disks };
        render(&scrape)
    }
}

/// Serves `/metrics` on `addr` for the agent of VM `vm`; returns the address bound.
pub fn serve(
    addr: SocketAddr,
    vm: String,
    link: Arc<EngineLink>,
    disks: Vec<(String, Arc<ReplicatedDisk>)>,
) -> std::io::Result<SocketAddr> {
    let bound = hindsight_consistency::metrics_http::serve(addr, "agent-metrics", Arc::new(AgentSource { vm, link, disks }))?;
    log::info!("agent metrics on http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_gives_the_link_and_each_disk() {
        let a = AgentScrape {
            vm: "vm1".into(),
            engine_connected: true,
            in_flight: 3,
            disks: vec![
                DiskScrape {
                    group: "erp".into(),
                    volume: "db".into(),
                    size: 1 << 30,
                    writes: 10,
                    written_bytes: 40960,
                    dirty: Some((2, 1 << 20)),
                    resyncing: true,
                    paused: false,
                },
                DiskScrape { group: "erp".into(), volume: "log".into(), size: 1 << 20, ..DiskScrape::default() },
            ],
        };
        let text = render(&a);
        for line in [
            "hindsight_agent_engine_connected{vm=\"vm1\"} 1",
            "hindsight_agent_writes_in_flight{vm=\"vm1\"} 3",
            "hindsight_agent_guest_writes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 10",
            "hindsight_agent_guest_written_bytes_total{group=\"erp\",vm=\"vm1\",volume=\"db\"} 40960",
            "hindsight_agent_dirty_regions{group=\"erp\",vm=\"vm1\",volume=\"db\"} 2",
            "hindsight_agent_dirty_bytes{group=\"erp\",vm=\"vm1\",volume=\"db\"} 2097152",
            "hindsight_agent_resyncing{group=\"erp\",vm=\"vm1\",volume=\"db\"} 1",
            "hindsight_agent_volume_size_bytes{group=\"erp\",vm=\"vm1\",volume=\"log\"} 1048576",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("hindsight_agent_dirty_regions{group=\"erp\",vm=\"vm1\",volume=\"log\"}"), "no map, no series:\n{text}");
    }
}
