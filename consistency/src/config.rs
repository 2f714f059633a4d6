//! Configuration files of the three daemons (TOML), parsed and validated.
//!
//! Every error names the file, the key and the fix, e.g.
//! `engine.toml: group "erp": volume "db" has size 0; give size = "100GiB"`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::record::MAX_NAME_LEN;
use crate::transport::identity::{check_identity_name, check_server_name, server_name_of};
use crate::transport::{Role, Security, TlsEndpoint, TlsFiles};

/// A configuration problem.
#[derive(Debug, Error)]
#[error("{}: {message}", file.display())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, naming the key, and what to do.
    pub message: String,
}

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

/// Parses a size such as `1GiB`, `512MiB`, `20G`, `4096`. Binary units (KiB, MiB, GiB, TiB
/// and the short K, M, G, T) are powers of 1024; KB, MB, GB, TB are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size; write e.g. \"100GiB\" or \"512MiB\""))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use B, KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration such as `24h`, `30s`, `7d`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. \"24h\" or \"30s\""))
}

/// Checks a group, volume or VM name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} is not valid; use 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-'"))
    }
}

fn check_host_port(key: &str, s: &str) -> Result<(), String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(format!("{key} = {s:?} is not an address; write host:port, e.g. \"127.0.0.1:7500\"")),
    }
}

fn parse_socket_addr(key: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{key} = {s:?} is not an address; write ip:port, e.g. \"127.0.0.1:7400\""))
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError { file: path.to_owned(), message: format!("cannot read the file: {e}") })?;
    toml::from_str(&text).map_err(|e| ConfigError { file: path.to_owned(), message: e.to_string().trim_end().replace('\n', "\n  ") })
}

// ---------------------------------------------------------------- tls

/// The keys every `[tls]` section has.
struct TlsKeys {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure_plaintext: bool,
}

/// True for `localhost` and loopback IP addresses.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What `hindsight certs issue` needs for this daemon's certificate.
fn issue_command(role: Role, name: &str, host: Option<&str>) -> String {
    let host = host.map(|h| format!(" --host {h}")).unwrap_or_default();
    format!("hindsight certs issue --dir /etc/hindsight/pki --role {role} --name {name}{host}")
}

/// Validates a `[tls]` section and loads its files. `addresses` are the (key, address) pairs
/// of every link of this daemon, all of which must be loopback for `insecure_plaintext`;
/// `name` is the name the certificate must carry, if fixed (an agent's VM).
fn link_security(tls: Option<TlsKeys>, role: Role, name: Option<&str>, addresses: &[(String, String)]) -> Result<Security, String> {
    let own_host = addresses.first().map(|(_, a)| server_name_of(a));
    let issue = issue_command(role, name.unwrap_or("NAME"), own_host.as_deref().filter(|_| role.serves()));
    let Some(tls) = tls else {
        return Err(format!(
            "no [tls] section: the links between agents, engines and targets are authenticated with certificates \
             (docs/security.md). Make them with `hindsight certs init --dir /etc/hindsight/pki` and `{issue}`, then add \
             [tls] with ca, cert and key; on one machine, with every address on loopback, `insecure_plaintext = true` in \
             [tls] is allowed instead"
        ));
    };
    let given = [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)];
    if tls.insecure_plaintext {
        if let Some((key, _)) = given.iter().find(|(_, v)| v.is_some()) {
            return Err(format!(
                "tls.insecure_plaintext = true cannot go with tls.{key}: remove insecure_plaintext to use TLS, or remove ca, cert and key"
            ));
        }
        if let Some((key, addr)) = addresses.iter().find(|(_, a)| !is_loopback_host(&server_name_of(a))) {
            return Err(format!(
                "tls.insecure_plaintext = true is only allowed when every address is loopback, and {key} = {addr:?} is not; \
                 remove insecure_plaintext and give ca, cert and key (`{issue}`, docs/security.md)"
            ));
        }
        return Ok(Security::InsecurePlaintext);
    }
    if let Some((key, _)) = given.iter().find(|(_, v)| v.is_none()) {
        return Err(format!(
            "tls.{key} is missing: give ca, cert and key together (made by `hindsight certs init` and `{issue}`), or \
             insecure_plaintext = true when every address is loopback"
        ));
    }
    let files = TlsFiles { ca: tls.ca.unwrap_or_default(), cert: tls.cert.unwrap_or_default(), key: tls.key.unwrap_or_default() };
    let endpoint = TlsEndpoint::load(&files, role, name).map_err(|e| e.to_string())?;
    Ok(Security::Tls(Arc::new(endpoint)))
}

/// Checks an expected server name (`key` names it in the error).
fn server_name_key(key: &str, name: &str) -> Result<String, String> {
    check_server_name(name).map_err(|e| format!("{key}: {e}; write e.g. \"site-a.engine.hindsight\" or an IP address"))?;
    Ok(name.to_owned())
}

// ---------------------------------------------------------------- engine

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineFile {
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

fn yes() -> bool {
    true
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
    /// Reads and validates an engine configuration file.
    pub fn load(path: &Path) -> Result<EngineConfig, ConfigError> {
        let raw: EngineFile = read_toml(path)?;
        Self::validate(raw).map_err(|message| ConfigError { file: path.to_owned(), message })
    }

    /// Parses and validates engine configuration text (`file` names it in errors).
    pub fn from_str(file: &Path, text: &str) -> Result<EngineConfig, ConfigError> {
        let raw: EngineFile =
            toml::from_str(text).map_err(|e| ConfigError { file: file.to_owned(), message: e.to_string().trim_end().to_owned() })?;
        Self::validate(raw).map_err(|message| ConfigError { file: file.to_owned(), message })
    }

    fn validate(raw: EngineFile) -> Result<EngineConfig, String> {
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
            check_name("group", &g.name)?;
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

// ---------------------------------------------------------------- target

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    target: TargetSection,
    tls: Option<TargetTlsSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetTlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    engines: Option<Vec<String>>,
    #[serde(default)]
    insecure_plaintext: bool,
}

/// Which engines a target takes groups from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineTrust {
    /// Every engine whose certificate the CA issued (plaintext: every connection).
    AnyCertified,
    /// Only these engine names (`tls.engines`).
    Named(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    listen: String,
    data_dir: PathBuf,
    retention: Option<String>,
    journal_size: Option<String>,
    segment_size: Option<String>,
    #[serde(default = "yes")]
    direct_io: bool,
}

/// A validated target configuration.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Where engines connect.
    pub listen: SocketAddr,
    /// Where journals and replicas live.
    pub data_dir: PathBuf,
    /// Keep every point in time at least this far back (when `journal_size` allows).
    pub retention: Option<Duration>,
    /// Keep at most this many bytes of journal per group.
    pub journal_size: Option<u64>,
    /// Journal segment size.
    pub segment_size: u64,
    /// Write the journals and large replica writes with direct I/O where the file system
    /// allows it (default true).
    pub direct_io: bool,
    /// How the links from engines are protected (`[tls]`).
    pub security: Security,
    /// Which engines may ship groups here.
    pub engines: EngineTrust,
}

/// Retention applied when a target config names neither `retention` nor `journal_size`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl TargetConfig {
    /// Reads and validates a target configuration file.
    pub fn load(path: &Path) -> Result<TargetConfig, ConfigError> {
        let raw: TargetFile = read_toml(path)?;
        Self::validate(raw.target, raw.tls).map_err(|message| ConfigError { file: path.to_owned(), message })
    }

    fn validate(t: TargetSection, tls: Option<TargetTlsSection>) -> Result<TargetConfig, String> {
        let listen = parse_socket_addr("target.listen", &t.listen)?;
        let retention = t.retention.as_deref().map(parse_duration).transpose().map_err(|e| format!("target.retention: {e}"))?;
        let journal_size = t.journal_size.as_deref().map(parse_size).transpose().map_err(|e| format!("target.journal_size: {e}"))?;
        let segment_size = match &t.segment_size {
            Some(s) => parse_size(s).map_err(|e| format!("target.segment_size: {e}"))?,
            None => crate::journal::DEFAULT_SEGMENT_SIZE,
        };
        if segment_size < (1 << 20) {
            return Err("target.segment_size must be at least \"1MiB\"".into());
        }
        if let Some(js) = journal_size {
            if js < 2 * segment_size {
                return Err(format!(
                    "target.journal_size must be at least two segments ({} bytes); give e.g. journal_size = \"20GiB\"",
                    2 * segment_size
                ));
            }
        }
        let retention = match (retention, journal_size) {
            (None, None) => Some(DEFAULT_RETENTION),
            (r, _) => r,
        };
        let engines = match tls.as_ref().and_then(|t| t.engines.clone()) {
            None => EngineTrust::AnyCertified,
            Some(names) => {
                if tls.as_ref().is_some_and(|t| t.insecure_plaintext) {
                    return Err(
                        "tls.engines needs TLS: with insecure_plaintext = true no engine is authenticated; remove one of them".into()
                    );
                }
                if names.is_empty() {
                    return Err("tls.engines is empty, so no engine could ship here; name them, e.g. engines = [\"site-a\"], or remove the key to trust every engine of the CA".into());
                }
                for n in &names {
                    check_identity_name("engine", n).map_err(|e| format!("tls.engines: {e}"))?;
                }
                EngineTrust::Named(names)
            }
        };
        let tls = tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        let security = link_security(tls, Role::Target, None, &[("target.listen".to_owned(), t.listen.clone())])?;
        Ok(TargetConfig { listen, data_dir: t.data_dir, retention, journal_size, segment_size, direct_io: t.direct_io, security, engines })
    }
}

// ---------------------------------------------------------------- agent

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    agent: AgentSection,
    tls: Option<AgentTlsSection>,
    #[serde(default)]
    disk: Vec<DiskSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    insecure_plaintext: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    engine: String,
    vm: String,
    #[serde(default)]
    freeze: Vec<PathBuf>,
    pre_quiesce: Option<PathBuf>,
    post_quiesce: Option<PathBuf>,
    on_engine_loss: Option<String>,
    engine_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskSection {
    group: String,
    volume: String,
    path: PathBuf,
    listen: Option<String>,
    frontend: Option<String>,
    device: Option<PathBuf>,
    dirty_map: Option<PathBuf>,
}

/// What the agent does with guest writes when the engine does not take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineLoss {
    /// Complete them after the local write and mark their regions for a resync.
    Track,
    /// Fail them (EIO): no write is acknowledged that the engine does not hold.
    Fail,
}

/// Default `engine_timeout`: how long writes wait for an unreachable engine.
pub const DEFAULT_ENGINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Engine address, host:port.
    pub engine: String,
    /// This VM's name.
    pub vm: String,
    /// The disks the agent serves.
    pub disks: Vec<DiskConfig>,
    /// How the agent quiesces its VM for an application-consistent bookmark.
    pub quiesce: QuiesceConfig,
    /// How the link to the engine is protected (`[tls]`).
    pub security: Security,
    /// The name the engine's certificate must be valid for: `tls.server_name`, or the host of
    /// `engine`.
    pub engine_server_name: String,
    /// What happens to writes the engine does not take.
    pub on_engine_loss: EngineLoss,
    /// How long writes wait for an unreachable engine before `on_engine_loss` applies.
    pub engine_timeout: Duration,
}

/// How an agent quiesces its VM: a user script, or `fsfreeze` on mount points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuiesceConfig {
    /// Mount points frozen with `fsfreeze -f` (and thawed with `fsfreeze -u`) when no
    /// scripts are given.
    pub freeze: Vec<PathBuf>,
    /// Run instead of freezing (must exit 0 once the applications are quiesced).
    pub pre: Option<PathBuf>,
    /// Run instead of thawing.
    pub post: Option<PathBuf>,
}

/// One disk the agent serves.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Consistency group.
    pub group: String,
    /// Volume name (also the NBD export name).
    pub volume: String,
    /// The local disk: a block device or a file.
    pub path: PathBuf,
    /// Where an NBD server for outside clients (qemu, nbdcopy) listens: `unix:/path` or
    /// `tcp:127.0.0.1:10809`. Optional once a kernel front end is configured.
    pub listen: Option<String>,
    /// The kernel block device the agent creates for this disk, if any.
    pub frontend: Option<FrontendConfig>,
    /// Where the disk's dirty map is kept (`None`: the default place, see
    /// [`DiskConfig::dirty_map_path`]).
    pub dirty_map: Option<PathBuf>,
}

impl DiskConfig {
    /// The dirty map's file: `dirty_map`, else next to a disk that is a regular file
    /// (`<path>.hsmap`), else `/var/lib/hindsight-agent/<volume>.hsmap`.
    pub fn dirty_map_path(&self) -> PathBuf {
        if let Some(p) = &self.dirty_map {
            return p.clone();
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.is_file()) {
            let mut s = self.path.as_os_str().to_owned();
            s.push(".hsmap");
            return s.into();
        }
        Path::new("/var/lib/hindsight-agent").join(format!("{}.hsmap", self.volume))
    }
}

/// Which kernel block device the agent creates for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendKind {
    /// ublk when the kernel offers it, NBD otherwise.
    Auto,
    /// A ublk device (`/dev/ublkbN`), served through io_uring.
    Ublk,
    /// The kernel's nbd driver (`/dev/nbdN`), connected to the agent over a socket pair.
    Nbd,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::Auto => "auto",
            FrontendKind::Ublk => "ublk",
            FrontendKind::Nbd => "nbd",
        })
    }
}

/// A disk's kernel front end: its kind and, optionally, the device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConfig {
    /// ublk, nbd, or auto.
    pub kind: FrontendKind,
    /// `/dev/ublkbN` or `/dev/nbdN`; `None` takes the first free one.
    pub device: Option<PathBuf>,
}

impl AgentConfig {
    /// Reads and validates an agent configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: AgentFile = read_toml(path)?;
        Self::validate(raw).map_err(|message| ConfigError { file: path.to_owned(), message })
    }

    fn validate(raw: AgentFile) -> Result<AgentConfig, String> {
        check_host_port("agent.engine", &raw.agent.engine)?;
        check_name("vm", &raw.agent.vm).map_err(|e| format!("agent.vm: {e}"))?;
        if raw.disk.is_empty() {
            return Err("no [[disk]] is configured; add one with group, volume, path and frontend (or listen)".into());
        }
        let mut seen = HashSet::new();
        let mut disks = Vec::new();
        for d in raw.disk {
            check_name("group", &d.group).map_err(|e| format!("disk {:?}: {e}", d.volume))?;
            check_name("volume", &d.volume).map_err(|e| format!("disk: {e}"))?;
            if !seen.insert(d.volume.clone()) {
                return Err(format!("disk {:?} is listed twice; each volume is served once", d.volume));
            }
            if let Some(l) = d.listen.as_deref() {
                let listen_ok = match l.split_once(':') {
                    Some(("unix", p)) => p.starts_with('/'),
                    Some(("tcp", a)) => check_host_port("listen", a).is_ok(),
                    _ => false,
                };
                if !listen_ok {
                    return Err(format!(
                        "disk {:?}: listen = {l:?} is not valid; write \"unix:/run/hindsight/{}.sock\" or \"tcp:127.0.0.1:10809\"",
                        d.volume, d.volume
                    ));
                }
            }
            let frontend = frontend_config(&d.volume, d.listen.is_some(), d.frontend.as_deref(), d.device)?;
            disks.push(DiskConfig { group: d.group, volume: d.volume, path: d.path, listen: d.listen, frontend, dirty_map: d.dirty_map });
        }
        for m in &raw.agent.freeze {
            if !m.is_absolute() {
                return Err(format!("agent.freeze: {:?} is not an absolute mount point; write e.g. freeze = [\"/var/lib/db\"]", m));
            }
        }
        if raw.agent.pre_quiesce.is_some() != raw.agent.post_quiesce.is_some() {
            return Err("agent.pre_quiesce and agent.post_quiesce go together: give both scripts, or neither (to use freeze)".into());
        }
        let quiesce = QuiesceConfig { freeze: raw.agent.freeze, pre: raw.agent.pre_quiesce, post: raw.agent.post_quiesce };
        let engine_server_name = match raw.tls.as_ref().and_then(|t| t.server_name.as_deref()) {
            Some(n) => server_name_key("tls.server_name", n)?,
            None => server_name_of(&raw.agent.engine),
        };
        let tls = raw.tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        if tls.as_ref().is_some_and(|t| !t.insecure_plaintext) {
            check_identity_name("vm", &raw.agent.vm).map_err(|e| format!("agent.vm: {e} (the agent's certificate names it)"))?;
        }
        let security = link_security(tls, Role::Agent, Some(&raw.agent.vm), &[("agent.engine".to_owned(), raw.agent.engine.clone())])?;
        let on_engine_loss = match raw.agent.on_engine_loss.as_deref().unwrap_or("track") {
            "track" => EngineLoss::Track,
            "fail" => EngineLoss::Fail,
            other => return Err(format!("agent.on_engine_loss = {other:?} is not known; use \"track\" or \"fail\"")),
        };
        let engine_timeout = match raw.agent.engine_timeout.as_deref() {
            Some(t) => parse_duration(t).map_err(|e| format!("agent.engine_timeout: {e}"))?,
            None => DEFAULT_ENGINE_TIMEOUT,
        };
        if engine_timeout.is_zero() {
            return Err("agent.engine_timeout must be more than 0, e.g. engine_timeout = \"30s\"".into());
        }
        Ok(AgentConfig {
            engine: raw.agent.engine,
            vm: raw.agent.vm,
            disks,
            quiesce,
            security,
            engine_server_name,
            on_engine_loss,
            engine_timeout,
        })
    }
}

/// Checks a disk's `frontend` and `device`. With neither `frontend` nor `listen` the disk gets
/// `auto`: a disk nothing serves would be useless.
fn frontend_config(volume: &str, has_listen: bool, kind: Option<&str>, device: Option<PathBuf>) -> Result<Option<FrontendConfig>, String> {
    let kind = match kind {
        None if has_listen && device.is_none() => return Ok(None),
        None | Some("auto") => FrontendKind::Auto,
        Some("ublk") => FrontendKind::Ublk,
        Some("nbd") => FrontendKind::Nbd,
        Some(other) => return Err(format!("disk {volume:?}: frontend = {other:?} is not known; write \"auto\", \"ublk\" or \"nbd\"")),
    };
    if let Some(dev) = &device {
        let name = dev.to_str().and_then(|s| s.strip_prefix("/dev/")).unwrap_or("");
        let number = |prefix: &str| name.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let ok = match kind {
            FrontendKind::Ublk => number("ublkb"),
            FrontendKind::Nbd => number("nbd"),
            FrontendKind::Auto => false,
        };
        if !ok {
            let hint = match kind {
                FrontendKind::Ublk => "write e.g. device = \"/dev/ublkb0\"".to_string(),
                FrontendKind::Nbd => "write e.g. device = \"/dev/nbd0\"".to_string(),
                FrontendKind::Auto => "a device can only be named with frontend = \"ublk\" or \"nbd\"".to_string(),
            };
            return Err(format!("disk {volume:?}: device = {:?} does not fit frontend = \"{kind}\"; {hint}", dev.display().to_string()));
        }
    }
    Ok(Some(FrontendConfig { kind, device }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: &str = r#"
[engine]
listen = "127.0.0.1:7400"
data_dir = "/var/lib/hindsight/engine"
[tls]
insecure_plaintext = true
[[group]]
name = "erp"
mode = "cdp"
target = "127.0.0.1:7500"
[[group.volume]]
name = "db-data"
vm = "erp-db"
size = "1GiB"
"#;

    fn engine(text: &str) -> Result<EngineConfig, String> {
        EngineConfig::from_str(Path::new("engine.toml"), text).map_err(|e| e.to_string())
    }

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
    fn agent_quiesce_keys_are_checked() {
        let base = "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\n{}\n[tls]\ninsecure_plaintext = true\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\nlisten = \"unix:/run/db.sock\"\n";
        let parse = |extra: &str| -> Result<AgentConfig, String> {
            let raw: AgentFile = toml::from_str(&base.replace("{}", extra)).map_err(|e| e.to_string())?;
            AgentConfig::validate(raw)
        };
        assert_eq!(parse("freeze = [\"/data\"]").unwrap().quiesce.freeze, vec![PathBuf::from("/data")]);
        assert!(parse("freeze = [\"data\"]").unwrap_err().contains("absolute"));
        assert!(parse("pre_quiesce = \"/bin/true\"").unwrap_err().contains("go together"));
        let c = parse("pre_quiesce = \"/a\"\npost_quiesce = \"/b\"").unwrap();
        assert_eq!((c.quiesce.pre.unwrap(), c.quiesce.post.unwrap()), (PathBuf::from("/a"), PathBuf::from("/b")));
    }

    #[test]
    fn agent_frontend_keys_are_checked() {
        let base =
            "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\n[tls]\ninsecure_plaintext = true\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\n";
        let parse = |extra: &str| -> Result<DiskConfig, String> {
            let raw: AgentFile = toml::from_str(&format!("{base}{extra}")).map_err(|e| e.to_string())?;
            AgentConfig::validate(raw).map(|c| c.disks[0].clone())
        };
        let auto = FrontendConfig { kind: FrontendKind::Auto, device: None };
        // Nothing named: the agent creates a device (auto); only a listen: NBD socket only.
        assert_eq!(parse("").unwrap().frontend, Some(auto.clone()));
        assert_eq!(parse("listen = \"unix:/run/db.sock\"").unwrap().frontend, None);
        let both = parse("listen = \"unix:/run/db.sock\"\nfrontend = \"auto\"").unwrap();
        assert_eq!((both.frontend, both.listen.as_deref()), (Some(auto), Some("unix:/run/db.sock")));
        let ublk = parse("frontend = \"ublk\"\ndevice = \"/dev/ublkb3\"").unwrap().frontend.unwrap();
        assert_eq!((ublk.kind, ublk.device), (FrontendKind::Ublk, Some(PathBuf::from("/dev/ublkb3"))));
        let nbd = parse("frontend = \"nbd\"\ndevice = \"/dev/nbd12\"").unwrap().frontend.unwrap();
        assert_eq!(nbd.kind, FrontendKind::Nbd);
        assert!(parse("frontend = \"scsi\"").unwrap_err().contains("\"auto\", \"ublk\" or \"nbd\""));
        assert!(parse("frontend = \"nbd\"\ndevice = \"/dev/ublkb0\"").unwrap_err().contains("/dev/nbd0"));
        assert!(parse("frontend = \"ublk\"\ndevice = \"/dev/ublkb\"").unwrap_err().contains("/dev/ublkb0"));
        assert!(parse("device = \"/dev/nbd0\"").unwrap_err().contains("only be named with"));
    }

    #[test]
    fn without_tls_the_error_says_how_to_make_certificates() {
        let e = engine(&ENGINE.replace("[tls]\ninsecure_plaintext = true\n", "")).unwrap_err();
        assert!(e.contains("no [tls] section") && e.contains("hindsight certs init") && e.contains("--role engine"), "{e}");
        assert!(e.contains("--host 127.0.0.1"), "{e}");
    }

    #[test]
    fn insecure_plaintext_is_only_for_loopback() {
        let e = engine(&ENGINE.replace("target = \"127.0.0.1:7500\"", "target = \"10.0.0.5:7500\"")).unwrap_err();
        assert!(e.contains("insecure_plaintext") && e.contains("\"10.0.0.5:7500\"") && e.contains("target"), "{e}");
        let e = engine(&ENGINE.replace("listen = \"127.0.0.1:7400\"", "listen = \"0.0.0.0:7400\"")).unwrap_err();
        assert!(e.contains("engine.listen") && e.contains("0.0.0.0:7400"), "{e}");
        let ok = engine(&ENGINE.replace("target = \"127.0.0.1:7500\"", "target = \"localhost:7500\"")).unwrap();
        assert!(!ok.security.is_tls());
        assert_eq!(ok.groups[0].target_server_name, "localhost");
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "insecure_plaintext = true\nca = \"/ca.pem\"")).unwrap_err();
        assert!(e.contains("cannot go with tls.ca"), "{e}");
    }

    #[test]
    fn tls_keys_go_together_and_name_missing_files() {
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "ca = \"/ca.pem\"\ncert = \"/e.pem\"")).unwrap_err();
        assert!(e.contains("tls.key is missing"), "{e}");
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "ca = \"/nonexistent/ca.pem\"\ncert = \"/e.pem\"\nkey = \"/k.pem\""))
            .unwrap_err();
        assert!(e.starts_with("engine.toml: tls.ca = \"/nonexistent/ca.pem\""), "{e}");
        let e = engine(&ENGINE.replace("[tls]", "[tls]\nengines = [\"a\"]")).unwrap_err();
        assert!(e.contains("unknown field `engines`"), "{e}");
    }

    #[test]
    fn target_engines_need_tls_and_valid_names() {
        let parse = |tls: &str| -> Result<TargetConfig, String> {
            let raw: TargetFile = toml::from_str(&format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\n[tls]\n{tls}"))
                .map_err(|e| e.to_string())?;
            TargetConfig::validate(raw.target, raw.tls)
        };
        assert_eq!(parse("insecure_plaintext = true").unwrap().engines, EngineTrust::AnyCertified);
        assert!(parse("insecure_plaintext = true\nengines = [\"a\"]").unwrap_err().contains("tls.engines needs TLS"));
        assert!(parse("engines = []").unwrap_err().contains("tls.engines is empty"));
        assert!(parse("engines = [\"-a\"]").unwrap_err().contains("tls.engines"));
    }

    #[test]
    fn direct_io_is_on_unless_turned_off() {
        assert!(engine(ENGINE).unwrap().direct_io);
        assert!(!engine(&ENGINE.replace("[tls]", "direct_io = false\n[tls]")).unwrap().direct_io);
        let target = |extra: &str| {
            let text = format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\n{extra}\n[tls]\ninsecure_plaintext = true");
            let raw: TargetFile = toml::from_str(&text).unwrap();
            TargetConfig::validate(raw.target, raw.tls).unwrap()
        };
        assert!(target("").direct_io);
        assert!(!target("direct_io = false").direct_io);
    }

    #[test]
    fn agent_server_name_defaults_to_the_engine_host() {
        let base = "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\n[tls]\ninsecure_plaintext = true\n{}\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\n";
        let parse = |extra: &str| -> Result<AgentConfig, String> {
            let raw: AgentFile = toml::from_str(&base.replace("{}", extra)).map_err(|e| e.to_string())?;
            AgentConfig::validate(raw)
        };
        assert_eq!(parse("").unwrap().engine_server_name, "127.0.0.1");
        assert_eq!(parse("server_name = \"site-a.engine.hindsight\"").unwrap().engine_server_name, "site-a.engine.hindsight");
        assert!(parse("server_name = \"a b\"").unwrap_err().contains("tls.server_name"));
        let far = base.replace("127.0.0.1:7400", "10.0.0.5:7400").replace("{}", "");
        let e = AgentConfig::validate(toml::from_str(&far).unwrap()).unwrap_err();
        assert!(e.contains("agent.engine = \"10.0.0.5:7400\"") && e.contains("--role agent --name erp-db"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert!(parse_size("1 XB").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("soon").is_err());
    }
}
