//! `engine.toml`: where the engine listens and keeps its journals, and the consistency groups
//! it replicates, each with its volumes, mode, target and policies.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::parse::{check_host_port, parse_duration, parse_size, parse_socket_addr, yes};
use super::tls::{link_security, server_name_key, TlsKeys};
use crate::transport::identity::{check_identity_name, check_name, server_name_of};
use crate::transport::{Role, Security};

/// How a group replicates (docs/modes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// The agent's ack waits for the target's journal.
    Sync,
    /// The agent's ack waits for the engine's journal; every write is kept.
    Cdp,
    /// Interval deltas.
    Async,
}

impl ReplicationMode {
    /// Lower-case name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Sync => "sync",
            ReplicationMode::Cdp => "cdp",
            ReplicationMode::Async => "async",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EngineFile {
    engine: EngineSection,
    tls: Option<EngineTlsSection>,
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
}

/// What a group does when a journal is full (docs/failure-handling.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalFull {
    /// The target folds its oldest points into the base images, even inside `retention`,
    /// and says so; the engine, which holds no history, pauses and tracks.
    TrimHistory,
    /// Nothing is dropped: the target takes no more records until retention frees room, and
    /// the engine, once its own journal is full, holds the guests' writes.
    Block,
    /// Nothing is dropped and the guests keep running: the group pauses, the agents track
    /// the regions written, and resync them once there is room again.
    PauseAndTrack,
}

impl JournalFull {
    /// The name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalFull::TrimHistory => "trim_history",
            JournalFull::Block => "block",
            JournalFull::PauseAndTrack => "pause_and_track",
        }
    }

    /// Parses the name written in config.
    pub fn parse(s: &str) -> Option<JournalFull> {
        [JournalFull::TrimHistory, JournalFull::Block, JournalFull::PauseAndTrack].into_iter().find(|p| p.as_str() == s)
    }
}

/// Compression of the engine → target link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// LZ4 unless the target is on this host (loopback), where the link is faster than the
    /// compressor.
    Auto,
    /// Always offer LZ4.
    Lz4,
    /// Never compress.
    Off,
}

impl Compression {
    /// Whether to offer LZ4 to a target at `target` (host:port).
    pub fn offer_lz4(self, target: &str) -> bool {
        match self {
            Compression::Lz4 => true,
            Compression::Off => false,
            Compression::Auto => {
                let host = target.rsplit_once(':').map_or(target, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
                !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
            }
        }
    }
}

/// What a sync group does when the target is unreachable or too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncLoss {
    /// The guest's writes wait for the target, up to `sync_timeout`; then the group degrades.
    Block,
    /// The group degrades to cdp at once (after `sync_timeout`, short by default) and returns
    /// to sync once the target has caught up.
    Degrade,
}

impl SyncLoss {
    /// The name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncLoss::Block => "block",
            SyncLoss::Degrade => "degrade",
        }
    }
}

/// Default `sync_timeout` with `on_sync_loss = "block"`.
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `sync_timeout` with `on_sync_loss = "degrade"`.
pub const DEFAULT_DEGRADE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default async `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

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
    pub(super) fn validate(raw: EngineFile) -> Result<EngineConfig, String> {
        let listen = parse_socket_addr("engine.listen", &raw.engine.listen)?;
        let segment_size = match &raw.engine.segment_size {
            Some(s) => parse_size(s).map_err(|e| format!("engine.segment_size: {e}"))?,
            None => crate::journal::DEFAULT_SEGMENT_SIZE,
        };
        if segment_size < (1 << 20) {
            return Err("engine.segment_size must be at least \"1MiB\"".into());
        }
        let max_bandwidth = match &raw.engine.max_bandwidth {
            Some(s) => {
                let per_second =
                    s.strip_suffix("/s").ok_or_else(|| format!("engine.max_bandwidth = {s:?}: write a rate such as \"50MiB/s\""))?;
                let rate = parse_size(per_second).map_err(|e| format!("engine.max_bandwidth: {e}"))?;
                if rate < 64 << 10 {
                    return Err(format!("engine.max_bandwidth = {s:?} is below the smallest rate, \"64KiB/s\""));
                }
                Some(rate)
            }
            None => None,
        };
        if raw.group.is_empty() {
            return Err("no [[group]] is configured; add one with name, mode, target and [[group.volume]] entries".into());
        }
        let mut groups = Vec::new();
        let mut group_names = HashSet::new();
        let mut volume_owner: BTreeMap<String, String> = BTreeMap::new();
        for g in raw.group {
            check_name("group", &g.name).map_err(|e| e.to_string())?;
            if !group_names.insert(g.name.clone()) {
                return Err(format!("group {:?} is defined twice; group names must be unique", g.name));
            }
            let ctx = format!("group {:?}", g.name);
            let mode = match g.mode.as_deref().unwrap_or("cdp") {
                "cdp" => ReplicationMode::Cdp,
                "sync" => ReplicationMode::Sync,
                "async" => ReplicationMode::Async,
                m => return Err(format!("{ctx}: mode = {m:?} is not a mode; use \"sync\", \"cdp\" or \"async\"")),
            };
            let on_sync_loss = match g.on_sync_loss.as_deref().unwrap_or("degrade") {
                "block" => SyncLoss::Block,
                "degrade" => SyncLoss::Degrade,
                other => return Err(format!("{ctx}: on_sync_loss = {other:?} is not a policy; use \"block\" or \"degrade\"")),
            };
            let duration = |key: &str, value: &Option<String>| -> Result<Option<Duration>, String> {
                value.as_deref().map(|v| parse_duration(v).map_err(|e| format!("{ctx}: {key}: {e}"))).transpose()
            };
            let sync_timeout = duration("sync_timeout", &g.sync_timeout)?.unwrap_or(match on_sync_loss {
                SyncLoss::Block => DEFAULT_BLOCK_TIMEOUT,
                SyncLoss::Degrade => DEFAULT_DEGRADE_TIMEOUT,
            });
            if sync_timeout.is_zero() {
                return Err(format!("{ctx}: sync_timeout must be more than 0, e.g. sync_timeout = \"30s\""));
            }
            let rpo = duration("rpo", &g.rpo)?;
            if rpo.is_some_and(|r| r.is_zero()) {
                return Err(format!("{ctx}: rpo must be more than 0 (for no data loss at all use mode = \"sync\"), e.g. rpo = \"10s\""));
            }
            if g.regulate && rpo.is_none() {
                return Err(format!("{ctx}: regulate = true needs an rpo to regulate to, e.g. rpo = \"10s\""));
            }
            let compression = match g.compression.as_deref().unwrap_or("auto") {
                "auto" => Compression::Auto,
                "lz4" => Compression::Lz4,
                "off" => Compression::Off,
                other => return Err(format!("{ctx}: compression = {other:?} is not known; use \"auto\", \"lz4\" or \"off\"")),
            };
            let interval = duration("interval", &g.interval)?.unwrap_or(DEFAULT_INTERVAL);
            if interval < Duration::from_secs(1) {
                return Err(format!("{ctx}: interval must be at least 1s, e.g. interval = \"30s\""));
            }
            let on_journal_full = match g.on_journal_full.as_deref() {
                None => JournalFull::TrimHistory,
                Some(p) => JournalFull::parse(p).ok_or_else(|| {
                    format!("{ctx}: on_journal_full = {p:?} is not a policy; use \"trim_history\", \"block\" or \"pause_and_track\"")
                })?,
            };
            let journal_size = g.journal_size.as_deref().map(parse_size).transpose().map_err(|e| format!("{ctx}: journal_size: {e}"))?;
            if let Some(js) = journal_size {
                if js < 2 * segment_size {
                    return Err(format!(
                        "{ctx}: journal_size must be at least two journal segments ({} bytes, engine.segment_size twice); give e.g. journal_size = \"20GiB\"",
                        2 * segment_size
                    ));
                }
            }
            check_host_port(&format!("{ctx}: target"), &g.target)?;
            let target_server_name = match &g.target_server_name {
                Some(n) => server_name_key(&format!("{ctx}: target_server_name"), n)?,
                None => server_name_of(&g.target),
            };
            if g.volume.is_empty() {
                return Err(format!("{ctx} has no volumes; add [[group.volume]] with name, vm and size"));
            }
            let mut volumes = Vec::new();
            for v in g.volume {
                check_name("volume", &v.name).map_err(|e| format!("{ctx}: {e}"))?;
                check_name("vm", &v.vm).map_err(|e| format!("{ctx}: volume {:?}: {e}", v.name))?;
                let Some(size) = v.size.as_deref() else {
                    return Err(format!("{ctx}: volume {:?} has no size; give size = \"100GiB\"", v.name));
                };
                let size = parse_size(size).map_err(|e| format!("{ctx}: volume {:?}: size: {e}", v.name))?;
                if size == 0 {
                    return Err(format!("{ctx}: volume {:?} has size 0; give size = \"100GiB\"", v.name));
                }
                if let Some(other) = volume_owner.insert(v.name.clone(), g.name.clone()) {
                    return Err(if other == g.name {
                        format!("{ctx}: volume {:?} is listed twice; volume names must be unique", v.name)
                    } else {
                        format!("volume {:?} is in group {other:?} and group {:?}; a volume belongs to one group", v.name, g.name)
                    });
                }
                volumes.push(VolumeConfig { name: v.name, vm: v.vm, size });
            }
            groups.push(GroupConfig {
                name: g.name,
                mode,
                target: g.target,
                target_server_name,
                volumes,
                on_sync_loss,
                sync_timeout,
                rpo,
                regulate: g.regulate,
                interval,
                compression,
                journal_size,
                on_journal_full,
            });
        }
        let mut addresses = vec![("engine.listen".to_owned(), raw.engine.listen.clone())];
        addresses.extend(groups.iter().map(|g| (format!("group {:?}: target", g.name), g.target.clone())));
        let tls = raw.tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        let security = link_security(tls, Role::Engine, None, &addresses)?;
        if security.is_tls() {
            for g in &groups {
                for v in &g.volumes {
                    check_identity_name("agent", &v.vm)
                        .map_err(|e| format!("group {:?}: volume {:?}: vm: {e} (its agent's certificate names it)", g.name, v.name))?;
                }
            }
        }
        Ok(EngineConfig {
            listen,
            data_dir: raw.engine.data_dir,
            segment_size,
            direct_io: raw.engine.direct_io,
            max_bandwidth,
            groups,
            security,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{engine, ENGINE};

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
}
