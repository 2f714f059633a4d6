//! `engine.toml`: where the engine listens and keeps its journals, and the consistency groups
//! it replicates, each with its volumes, mode, target and policies.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use thiserror::Error;

use super::cluster::{ClusterConfig, ClusterMistake, ClusterSection};
use super::parse::{check_host_port, note, parse_duration, parse_size, parse_socket_addr, yes, ValueError};
use super::policy::{
    Compression, JournalFull, ReplicationMode, SyncLoss, DEFAULT_BLOCK_TIMEOUT, DEFAULT_DEGRADE_TIMEOUT, DEFAULT_INTERVAL,
};
use super::tls::{link_security, server_name_key, TlsKeys, TlsMistake};
use crate::transport::identity::{check_identity_name, check_name, server_name_of, NameError};
use crate::transport::{Role, Security};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EngineFile {
    engine: EngineSection,
    tls: Option<EngineTlsSection>,
    cluster: Option<ClusterSection>,
    #[serde(default)]
    group: Vec<GroupSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineTlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    insecure_plaintext: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineSection {
    listen: String,
    data_dir: PathBuf,
    segment_size: Option<String>,
    max_bandwidth: Option<String>,
    #[serde(default = "yes")]
    direct_io: bool,
    metrics_listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSection {
    name: String,
    mode: Option<String>,
    target: String,
    target_server_name: Option<String>,
    on_sync_loss: Option<String>,
    sync_timeout: Option<String>,
    rpo: Option<String>,
    #[serde(default)]
    regulate: bool,
    interval: Option<String>,
    compression: Option<String>,
    journal_size: Option<String>,
    on_journal_full: Option<String>,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    volume: Vec<VolumeSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeSection {
    name: String,
    vm: String,
    size: Option<String>,
}

/// A validated engine configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where agents connect.
    pub listen: SocketAddr,
    /// Where the engine keeps its journals.
    pub data_dir: PathBuf,
    /// Journal segment size.
    pub segment_size: u64,
    /// Write the journals with direct I/O where the file system allows it (default true).
    pub direct_io: bool,
    /// Most bytes per second shipped to each target address, shared fairly by the groups
    /// that ship there (`None`: no limit).
    pub max_bandwidth: Option<u64>,
    /// The consistency groups.
    pub groups: Vec<GroupConfig>,
    /// How the links to agents and targets are protected (`[tls]`).
    pub security: Security,
    /// Where Prometheus scrapes the engine's metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The engine cluster this engine belongs to (`[cluster]`, docs/ha.md), if any.
    pub cluster: Option<ClusterConfig>,
}

/// One consistency group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Group name.
    pub name: String,
    /// Replication mode.
    pub mode: ReplicationMode,
    /// Target address, host:port.
    pub target: String,
    /// The name the target's certificate must be valid for: `target_server_name`, or the
    /// host of `target`.
    pub target_server_name: String,
    /// The group's volumes.
    pub volumes: Vec<VolumeConfig>,
    /// What sync mode does when the target cannot keep up.
    pub on_sync_loss: SyncLoss,
    /// How long a sync write may wait for the target before the group degrades to cdp.
    pub sync_timeout: Duration,
    /// The recovery point objective: how far the target may lag (`None`: not watched).
    pub rpo: Option<Duration>,
    /// Slow the agents' acknowledgements so that the lag stays inside the RPO.
    pub regulate: bool,
    /// Async mode: how often a delta is shipped.
    pub interval: Duration,
    /// Whether the link to the target is compressed.
    pub compression: Compression,
    /// The most bytes the engine's journal of this group may hold (`None`: what the file
    /// system has).
    pub journal_size: Option<u64>,
    /// What happens when a journal of the group (the engine's or the target's) is full.
    pub on_journal_full: JournalFull,
    /// The group's epoch, sent in the hello: the target takes records only from an engine at
    /// the group's epoch, which each failover raises (docs/failover.md, "Fencing").
    pub epoch: u64,
}

/// One volume of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Volume name.
    pub name: String,
    /// The VM whose agent serves it.
    pub vm: String,
    /// Size in bytes.
    pub size: u64,
}

impl EngineConfig {
    /// Checks every key of an engine file and gives the configuration, or every mistake found
    /// (in the order of the checks).
    pub(super) fn validate(raw: EngineFile) -> Result<EngineConfig, Vec<EngineMistake>> {
        let mut mistakes: Vec<EngineMistake> = Vec::new();
        let m = &mut mistakes;
        let listen = note(m, parse_socket_addr("engine.listen", &raw.engine.listen).map_err(|source| EngineMistake::Listen { source }));
        let metrics_listen = note(
            m,
            raw.engine
                .metrics_listen
                .as_deref()
                .map(|a| parse_socket_addr("engine.metrics_listen", a))
                .transpose()
                .map_err(|source| EngineMistake::MetricsListen { source }),
        );
        // The addresses the [tls] section must find loopback for insecure_plaintext: those
        // well formed (a malformed one has its own mistake).
        let mut addresses = Vec::new();
        if listen.is_some() {
            addresses.push(("engine.listen".to_owned(), raw.engine.listen.clone()));
        }
        let segment_size = match &raw.engine.segment_size {
            Some(s) => note(m, parse_size(s).map_err(|source| EngineMistake::SegmentSize { source })),
            None => Some(crate::journal::DEFAULT_SEGMENT_SIZE),
        };
        if segment_size.is_some_and(|s| s < (1 << 20)) {
            m.push(EngineMistake::SegmentSizeTooSmall);
        }
        let max_bandwidth = match &raw.engine.max_bandwidth {
            Some(s) => note(m, max_bandwidth(s)).map(Some),
            None => Some(None),
        };
        if raw.group.is_empty() {
            m.push(EngineMistake::NoGroups);
        }
        // Some(None): no [cluster]; None: a [cluster] with mistakes.
        let cluster = match raw.cluster {
            None => Some(None),
            Some(c) => {
                let mut found = Vec::new();
                let cluster = ClusterConfig::validate(c, &mut found);
                m.extend(found.into_iter().map(|source| EngineMistake::Cluster { source }));
                cluster.map(Some)
            }
        };
        let mut groups = Vec::new();
        let mut group_names = HashSet::new();
        let mut volume_owner: BTreeMap<String, String> = BTreeMap::new();
        // The (group, volume, vm) of every volume whose vm is a valid name.
        let mut vms: Vec<(String, String, String)> = Vec::new();
        // After a mistake a group goes on with a stand-in value, so that its other keys are
        // checked too; a group with mistakes is never returned.
        for g in raw.group {
            note(m, check_name("group", &g.name).map_err(|source| EngineMistake::GroupName { source }));
            if !group_names.insert(g.name.clone()) {
                m.push(EngineMistake::GroupTwice { group: g.name });
                continue;
            }
            let group = || g.name.clone();
            let mode = match g.mode.as_deref().unwrap_or("cdp") {
                "cdp" => ReplicationMode::Cdp,
                "sync" => ReplicationMode::Sync,
                "async" => ReplicationMode::Async,
                mode => {
                    m.push(EngineMistake::Mode { group: group(), mode: mode.to_owned() });
                    ReplicationMode::Cdp
                }
            };
            let on_sync_loss = match g.on_sync_loss.as_deref().unwrap_or("degrade") {
                "block" => SyncLoss::Block,
                "degrade" => SyncLoss::Degrade,
                policy => {
                    m.push(EngineMistake::OnSyncLoss { group: group(), policy: policy.to_owned() });
                    SyncLoss::Degrade
                }
            };
            // Some(None): not given; None: not a duration.
            let duration = |key: &'static str, value: &Option<String>| {
                value.as_deref().map(parse_duration).transpose().map_err(|source| EngineMistake::Duration { group: group(), key, source })
            };
            let sync_timeout = note(m, duration("sync_timeout", &g.sync_timeout)).flatten().unwrap_or(match on_sync_loss {
                SyncLoss::Block => DEFAULT_BLOCK_TIMEOUT,
                SyncLoss::Degrade => DEFAULT_DEGRADE_TIMEOUT,
            });
            if sync_timeout.is_zero() {
                m.push(EngineMistake::SyncTimeoutZero { group: group() });
            }
            let rpo = note(m, duration("rpo", &g.rpo));
            if rpo.flatten().is_some_and(|r| r.is_zero()) {
                m.push(EngineMistake::RpoZero { group: group() });
            }
            if g.regulate && rpo == Some(None) {
                m.push(EngineMistake::RegulateWithoutRpo { group: group() });
            }
            let compression = match g.compression.as_deref().unwrap_or("auto") {
                "auto" => Compression::Auto,
                "lz4" => Compression::Lz4,
                "off" => Compression::Off,
                other => {
                    m.push(EngineMistake::Compression { group: group(), compression: other.to_owned() });
                    Compression::Auto
                }
            };
            let interval = note(m, duration("interval", &g.interval)).flatten().unwrap_or(DEFAULT_INTERVAL);
            if interval < Duration::from_secs(1) {
                m.push(EngineMistake::IntervalTooShort { group: group() });
            }
            let on_journal_full = match g.on_journal_full.as_deref() {
                None => JournalFull::TrimHistory,
                Some(p) => JournalFull::parse(p).unwrap_or_else(|| {
                    m.push(EngineMistake::OnJournalFull { group: group(), policy: p.to_owned() });
                    JournalFull::TrimHistory
                }),
            };
            let journal_size = g.journal_size.as_deref().map(parse_size).transpose();
            let journal_size = note(m, journal_size.map_err(|source| EngineMistake::JournalSize { group: group(), source })).flatten();
            if let (Some(js), Some(segment_size)) = (journal_size, segment_size) {
                if js < 2 * segment_size {
                    m.push(EngineMistake::JournalSizeTooSmall { group: group(), least: 2 * segment_size });
                }
            }
            let target_key = format!("group {:?}: target", g.name);
            if note(m, check_host_port(&target_key, &g.target).map_err(|source| EngineMistake::Target { source })).is_some() {
                addresses.push((target_key, g.target.clone()));
            }
            let target_server_name = match &g.target_server_name {
                Some(n) => {
                    let key = format!("group {:?}: target_server_name", g.name);
                    note(m, server_name_key(&key, n).map_err(|source| EngineMistake::TargetServerName { source })).unwrap_or_default()
                }
                None => server_name_of(&g.target),
            };
            if g.volume.is_empty() {
                m.push(EngineMistake::NoVolumes { group: group() });
            }
            let mut volumes = Vec::new();
            for v in g.volume {
                let volume = || v.name.clone();
                note(m, check_name("volume", &v.name).map_err(|source| EngineMistake::VolumeName { group: group(), source }));
                let vm = check_name("vm", &v.vm).map_err(|source| EngineMistake::VmName { group: group(), volume: volume(), source });
                if note(m, vm).is_some() {
                    vms.push((group(), volume(), v.vm.clone()));
                }
                let size = match v.size.as_deref() {
                    None => {
                        m.push(EngineMistake::NoSize { group: group(), volume: volume() });
                        None
                    }
                    Some(size) => {
                        let size = parse_size(size).map_err(|source| EngineMistake::Size { group: group(), volume: volume(), source });
                        note(m, size)
                    }
                };
                if size == Some(0) {
                    m.push(EngineMistake::SizeZero { group: group(), volume: volume() });
                }
                if let Some(other) = volume_owner.insert(v.name.clone(), g.name.clone()) {
                    m.push(if other == g.name {
                        EngineMistake::VolumeTwice { group: group(), volume: volume() }
                    } else {
                        EngineMistake::VolumeInTwoGroups { volume: volume(), first: other, second: group() }
                    });
                }
                volumes.push(VolumeConfig { name: v.name, vm: v.vm, size: size.unwrap_or(0) });
            }
            groups.push(GroupConfig {
                name: g.name,
                mode,
                target: g.target,
                target_server_name,
                volumes,
                on_sync_loss,
                sync_timeout,
                rpo: rpo.flatten(),
                regulate: g.regulate,
                interval,
                compression,
                journal_size,
                on_journal_full,
                epoch: g.epoch,
            });
        }
        let tls = raw.tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        let security = note(
            m,
            link_security(tls, Role::Engine, None, Some(&raw.engine.listen), &addresses).map_err(|source| EngineMistake::Tls { source }),
        );
        if security.as_ref().is_some_and(Security::is_tls) {
            for (group, volume, vm) in vms {
                note(m, check_identity_name("agent", &vm).map_err(|source| EngineMistake::VmIdentity { group, volume, source }));
            }
        }
        match (listen, segment_size, max_bandwidth, security, metrics_listen, cluster) {
            (Some(listen), Some(segment_size), Some(max_bandwidth), Some(security), Some(metrics_listen), Some(cluster))
                if mistakes.is_empty() =>
            {
                Ok(EngineConfig {
                    listen,
                    data_dir: raw.engine.data_dir,
                    segment_size,
                    direct_io: raw.engine.direct_io,
                    max_bandwidth,
                    groups,
                    security,
                    metrics_listen,
                    cluster,
                })
            }
            _ => {
                debug_assert!(!mistakes.is_empty(), "a value is missing only after its mistake was noted");
                Err(mistakes)
            }
        }
    }
}

/// Parses `engine.max_bandwidth`, a rate such as `"50MiB/s"`.
fn max_bandwidth(s: &str) -> Result<u64, EngineMistake> {
    let per_second = s.strip_suffix("/s").ok_or_else(|| EngineMistake::MaxBandwidthNotARate { rate: s.to_owned() })?;
    let rate = parse_size(per_second).map_err(|source| EngineMistake::MaxBandwidth { source })?;
    if rate < 64 << 10 {
        return Err(EngineMistake::MaxBandwidthTooLow { rate: s.to_owned() });
    }
    Ok(rate)
}

/// A mistake in an engine file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineMistake {
    /// `engine.listen` is not an address.
    #[error("{source}")]
    Listen {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `engine.metrics_listen` is not an address.
    #[error("{source}")]
    MetricsListen {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `engine.segment_size` is not a size.
    #[error("engine.segment_size: {source}")]
    SegmentSize {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `engine.segment_size` is below 1 MiB.
    #[error("engine.segment_size must be at least \"1MiB\"")]
    SegmentSizeTooSmall,
    /// `engine.max_bandwidth` is not written as a rate.
    #[error("engine.max_bandwidth = {rate:?}: write a rate such as \"50MiB/s\"")]
    MaxBandwidthNotARate {
        /// The value.
        rate: String,
    },
    /// `engine.max_bandwidth` is not a size per second.
    #[error("engine.max_bandwidth: {source}")]
    MaxBandwidth {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `engine.max_bandwidth` is below 64 KiB/s.
    #[error("engine.max_bandwidth = {rate:?} is below the smallest rate, \"64KiB/s\"")]
    MaxBandwidthTooLow {
        /// The value.
        rate: String,
    },
    /// No `[[group]]`.
    #[error("no [[group]] is configured; add one with name, mode, target and [[group.volume]] entries")]
    NoGroups,
    /// A group's name is not valid.
    #[error("{source}")]
    GroupName {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// Two groups of one name.
    #[error("group {group:?} is defined twice; group names must be unique")]
    GroupTwice {
        /// The group.
        group: String,
    },
    /// `mode` is not a mode.
    #[error("group {group:?}: mode = {mode:?} is not a mode; use \"sync\", \"cdp\" or \"async\"")]
    Mode {
        /// The group.
        group: String,
        /// The value.
        mode: String,
    },
    /// `on_sync_loss` is not a policy.
    #[error("group {group:?}: on_sync_loss = {policy:?} is not a policy; use \"block\" or \"degrade\"")]
    OnSyncLoss {
        /// The group.
        group: String,
        /// The value.
        policy: String,
    },
    /// `sync_timeout`, `rpo` or `interval` is not a duration.
    #[error("group {group:?}: {key}: {source}")]
    Duration {
        /// The group.
        group: String,
        /// The key.
        key: &'static str,
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `sync_timeout` is 0.
    #[error("group {group:?}: sync_timeout must be more than 0, e.g. sync_timeout = \"30s\"")]
    SyncTimeoutZero {
        /// The group.
        group: String,
    },
    /// `rpo` is 0.
    #[error("group {group:?}: rpo must be more than 0 (for no data loss at all use mode = \"sync\"), e.g. rpo = \"10s\"")]
    RpoZero {
        /// The group.
        group: String,
    },
    /// `regulate = true` without an `rpo`.
    #[error("group {group:?}: regulate = true needs an rpo to regulate to, e.g. rpo = \"10s\"")]
    RegulateWithoutRpo {
        /// The group.
        group: String,
    },
    /// `compression` is not known.
    #[error("group {group:?}: compression = {compression:?} is not known; use \"auto\", \"lz4\" or \"off\"")]
    Compression {
        /// The group.
        group: String,
        /// The value.
        compression: String,
    },
    /// `interval` is below 1 s.
    #[error("group {group:?}: interval must be at least 1s, e.g. interval = \"30s\"")]
    IntervalTooShort {
        /// The group.
        group: String,
    },
    /// `on_journal_full` is not a policy.
    #[error("group {group:?}: on_journal_full = {policy:?} is not a policy; use \"trim_history\", \"block\" or \"pause_and_track\"")]
    OnJournalFull {
        /// The group.
        group: String,
        /// The value.
        policy: String,
    },
    /// `journal_size` is not a size.
    #[error("group {group:?}: journal_size: {source}")]
    JournalSize {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `journal_size` holds fewer than two segments.
    #[error(
        "group {group:?}: journal_size must be at least two journal segments ({least} bytes, engine.segment_size twice); give e.g. journal_size = \"20GiB\""
    )]
    JournalSizeTooSmall {
        /// The group.
        group: String,
        /// Two segments, in bytes.
        least: u64,
    },
    /// `target` is not `host:port`.
    #[error("{source}")]
    Target {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target_server_name` is not a server name.
    #[error("{source}")]
    TargetServerName {
        /// The cause.
        #[source]
        source: TlsMistake,
    },
    /// A group without volumes.
    #[error("group {group:?} has no volumes; add [[group.volume]] with name, vm and size")]
    NoVolumes {
        /// The group.
        group: String,
    },
    /// A volume's name is not valid.
    #[error("group {group:?}: {source}")]
    VolumeName {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: NameError,
    },
    /// A volume's `vm` is not a valid name.
    #[error("group {group:?}: volume {volume:?}: {source}")]
    VmName {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: NameError,
    },
    /// A volume without `size`.
    #[error("group {group:?}: volume {volume:?} has no size; give size = \"100GiB\"")]
    NoSize {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
    },
    /// A volume's `size` is not a size.
    #[error("group {group:?}: volume {volume:?}: size: {source}")]
    Size {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// A volume of size 0.
    #[error("group {group:?}: volume {volume:?} has size 0; give size = \"100GiB\"")]
    SizeZero {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
    },
    /// A volume listed twice in its group.
    #[error("group {group:?}: volume {volume:?} is listed twice; volume names must be unique")]
    VolumeTwice {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
    },
    /// A volume in two groups.
    #[error("volume {volume:?} is in group {first:?} and group {second:?}; a volume belongs to one group")]
    VolumeInTwoGroups {
        /// The volume.
        volume: String,
        /// The group that lists it first.
        first: String,
        /// The other group.
        second: String,
    },
    /// The `[cluster]` section.
    #[error("{source}")]
    Cluster {
        /// The cause.
        #[source]
        source: ClusterMistake,
    },
    /// The `[tls]` section.
    #[error("{source}")]
    Tls {
        /// The cause.
        #[source]
        source: TlsMistake,
    },
    /// With TLS, a volume's `vm` that cannot be written in an agent's certificate.
    #[error("group {group:?}: volume {volume:?}: vm: {source} (its agent's certificate names it)")]
    VmIdentity {
        /// The group.
        group: String,
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: NameError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{engine, ENGINE};
    use crate::config::{ConfigError, Mistake};

    #[test]
    fn example_engine_config_parses() {
        let c = engine(ENGINE).unwrap();
        assert_eq!(c.groups[0].volumes[0], VolumeConfig { name: "db-data".into(), vm: "erp-db".into(), size: 1 << 30 });
        assert_eq!(c.groups[0].mode, ReplicationMode::Cdp);
    }

    #[test]
    fn sync_and_rpo_keys() {
        let c =
            engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"sync\"\non_sync_loss = \"block\"\nrpo = \"10s\"\nregulate = true")).unwrap();
        let g = &c.groups[0];
        assert_eq!((g.mode, g.on_sync_loss, g.sync_timeout), (ReplicationMode::Sync, SyncLoss::Block, DEFAULT_BLOCK_TIMEOUT));
        assert_eq!((g.rpo, g.regulate), (Some(Duration::from_secs(10)), true));
        let g = &engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"sync\"")).unwrap().groups[0];
        assert_eq!((g.on_sync_loss, g.sync_timeout, g.rpo), (SyncLoss::Degrade, DEFAULT_DEGRADE_TIMEOUT, None));
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\non_sync_loss = \"wait\"")).unwrap_err();
        assert!(e.contains("on_sync_loss = \"wait\"") && e.contains("\"block\" or \"degrade\""), "{e}");
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\nregulate = true")).unwrap_err();
        assert!(e.contains("regulate = true needs an rpo"), "{e}");
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\nrpo = \"0s\"")).unwrap_err();
        assert!(e.contains("rpo must be more than 0"), "{e}");
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\nsync_timeout = \"soon\"")).unwrap_err();
        assert!(e.contains("sync_timeout"), "{e}");
    }

    #[test]
    fn compression_and_bandwidth_keys() {
        let c = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\ncompression = \"lz4\"")).unwrap();
        assert_eq!(c.groups[0].compression, Compression::Lz4);
        assert_eq!(engine(ENGINE).unwrap().groups[0].compression, Compression::Auto);
        assert!(Compression::Auto.offer_lz4("dr.example.com:7500") && Compression::Auto.offer_lz4("10.1.2.3:7500"));
        assert!(!Compression::Auto.offer_lz4("127.0.0.1:7500") && !Compression::Auto.offer_lz4("localhost:7500"));
        assert!(!Compression::Auto.offer_lz4("[::1]:7500") && !Compression::Off.offer_lz4("10.1.2.3:7500"));
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\ncompression = \"zip\"")).unwrap_err();
        assert!(e.contains("compression = \"zip\""), "{e}");
        let with = |bw: &str| engine(&ENGINE.replace("[tls]", &format!("max_bandwidth = \"{bw}\"\n[tls]")));
        assert_eq!(with("50MiB/s").unwrap().max_bandwidth, Some(50 << 20));
        assert!(with("50MiB").unwrap_err().contains("\"50MiB/s\""));
        assert!(with("1KiB/s").unwrap_err().contains("smallest rate"));
    }

    #[test]
    fn journal_full_keys() {
        let c = engine(ENGINE).unwrap();
        assert_eq!((c.groups[0].on_journal_full, c.groups[0].journal_size), (JournalFull::TrimHistory, None));
        let with = |extra: &str| engine(&ENGINE.replace("mode = \"cdp\"", &format!("mode = \"cdp\"\n{extra}")));
        let c = with("on_journal_full = \"pause_and_track\"\njournal_size = \"1GiB\"").unwrap();
        assert_eq!((c.groups[0].on_journal_full, c.groups[0].journal_size), (JournalFull::PauseAndTrack, Some(1 << 30)));
        assert_eq!(with("on_journal_full = \"block\"").unwrap().groups[0].on_journal_full, JournalFull::Block);
        let e = with("on_journal_full = \"drop\"").unwrap_err();
        assert!(e.contains("on_journal_full = \"drop\"") && e.contains("pause_and_track"), "{e}");
        let e = with("journal_size = \"64MiB\"").unwrap_err();
        assert!(e.contains("journal_size must be at least two journal segments"), "{e}");
        assert!(with("journal_size = \"lots\"").unwrap_err().contains("journal_size"));
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = engine(&ENGINE.replace("mode = \"cdp\"", "mode = \"cdp\"\ncolour = 1")).unwrap_err();
        assert!(e.starts_with("engine.toml:") && e.contains("colour"), "{e}");
    }

    #[test]
    fn missing_and_zero_sizes_say_what_to_write() {
        let e = engine(&ENGINE.replace("size = \"1GiB\"", "")).unwrap_err();
        assert!(e.contains("no size") && e.contains("size = \"100GiB\""), "{e}");
        let e = engine(&ENGINE.replace("\"1GiB\"", "\"0\"")).unwrap_err();
        assert_eq!(e, "engine.toml: group \"erp\": volume \"db-data\" has size 0; give size = \"100GiB\"");
    }

    #[test]
    fn duplicate_volume_and_bad_address_are_refused() {
        let dup = format!("{ENGINE}[[group.volume]]\nname = \"db-data\"\nvm = \"x\"\nsize = \"1G\"\n");
        assert!(engine(&dup).unwrap_err().contains("listed twice"));
        let e = engine(&ENGINE.replace("127.0.0.1:7400", "localhost")).unwrap_err();
        assert!(e.contains("engine.listen") && e.contains("not an address"), "{e}");
        let e = engine(&ENGINE.replace("\"127.0.0.1:7500\"", "\"nowhere\"")).unwrap_err();
        assert!(e.contains("target") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn a_volume_in_two_groups_and_a_group_twice_are_refused() {
        let second = ENGINE.replace(
            "[engine]\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"/var/lib/hindsight/engine\"\n[tls]\ninsecure_plaintext = true\n",
            "",
        );
        let e = engine(&format!("{ENGINE}{}", second.replace("name = \"erp\"", "name = \"crm\""))).unwrap_err();
        assert!(e.contains("\"db-data\"") && e.contains("\"erp\"") && e.contains("\"crm\""), "{e}");
        let e = engine(&format!("{ENGINE}{}", second.replace("name = \"db-data\"", "name = \"other\""))).unwrap_err();
        assert!(e.contains("group \"erp\" is defined twice"), "{e}");
    }

    #[test]
    fn every_mistake_of_a_file_is_reported() {
        let text = ENGINE.replace("mode = \"cdp\"", "mode = \"fast\"\ncompression = \"zip\"").replace("\"1GiB\"", "\"0\"");
        let e = EngineConfig::from_str(std::path::Path::new("engine.toml"), &text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "engine.toml: group \"erp\": mode = \"fast\" is not a mode; use \"sync\", \"cdp\" or \"async\"\n\
             engine.toml: group \"erp\": compression = \"zip\" is not known; use \"auto\", \"lz4\" or \"off\"\n\
             engine.toml: group \"erp\": volume \"db-data\" has size 0; give size = \"100GiB\""
        );
        let ConfigError::Invalid { mistakes, .. } = e else { panic!("{e}") };
        assert!(
            matches!(
                mistakes[..],
                [
                    Mistake::Engine(EngineMistake::Mode { .. }),
                    Mistake::Engine(EngineMistake::Compression { .. }),
                    Mistake::Engine(EngineMistake::SizeZero { .. })
                ]
            ),
            "{mistakes:?}"
        );
        // Across groups and sections: a second group's target and volume, the engine's segments.
        let crm = "[[group]]\nname = \"crm\"\ntarget = \"nowhere\"\n[[group.volume]]\nname = \"db-data\"\nvm = \"crm\"\nsize = \"1G\"\n";
        let text = format!("{}{crm}", ENGINE.replace("[tls]", "segment_size = \"1KiB\"\n[tls]"));
        let e = engine(&text).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].starts_with("engine.toml: engine.segment_size must be at least"), "{e}");
        assert!(lines[1].starts_with("engine.toml: group \"crm\": target = \"nowhere\" is not an address"), "{e}");
        assert!(lines[2].starts_with("engine.toml: volume \"db-data\" is in group \"erp\" and group \"crm\""), "{e}");
    }
}
