//! `agent.toml`: the engine an agent connects to, the VM it runs in, the disks it serves
//! (front end, NBD socket, dirty map), how it quiesces and what it does when the engine is lost.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use thiserror::Error;

use super::parse::{check_host_port, note, parse_duration, parse_socket_addr, ValueError};
use super::tls::{link_security, server_name_key, TlsKeys, TlsMistake};
use crate::transport::identity::{check_identity_name, check_name, server_name_of, NameError};
use crate::transport::{Role, Security};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentFile {
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
    engine: Option<String>,
    engines: Option<Vec<String>>,
    vm: String,
    #[serde(default)]
    freeze: Vec<PathBuf>,
    pre_quiesce: Option<PathBuf>,
    post_quiesce: Option<PathBuf>,
    on_engine_loss: Option<String>,
    engine_timeout: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    start_offline: bool,
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
    /// The site's other engines (`agent.engines` after the first; docs/ha.md).
    pub more_engines: Vec<String>,
    /// `tls.server_name` was given: every engine's certificate carries it.
    pub fixed_server_name: bool,
    /// What happens to writes the engine does not take.
    pub on_engine_loss: EngineLoss,
    /// How long writes wait for an unreachable engine before `on_engine_loss` applies.
    pub engine_timeout: Duration,
    /// Where the agent serves its Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the disks even when the engine cannot be reached at start (as with a kernel
    /// front end): the volumes at a recovery site after a failover, before any engine
    /// replicates them.
    pub start_offline: bool,
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
    /// Checks every key of an agent file and gives the configuration, or every mistake found
    /// (in the order of the checks).
    pub(super) fn validate(raw: AgentFile) -> Result<AgentConfig, Vec<AgentMistake>> {
        let mut mistakes: Vec<AgentMistake> = Vec::new();
        let m = &mut mistakes;
        // `engine`, or the site's clustered engines as `engines` (docs/ha.md).
        let engines = match (raw.agent.engine, raw.agent.engines) {
            (Some(e), None) => vec![e],
            (None, Some(list)) if !list.is_empty() => list,
            (Some(_), Some(_)) => {
                m.push(AgentMistake::EngineAndEngines);
                Vec::new()
            }
            (None, _) => {
                m.push(AgentMistake::NoEngine);
                Vec::new()
            }
        };
        let key = if engines.len() > 1 { "agent.engines" } else { "agent.engine" };
        let engine_ok = !engines.is_empty()
            && engines.iter().all(|e| note(m, check_host_port(key, e).map_err(|source| AgentMistake::Engine { source })).is_some());
        let engine = engines.first().cloned().unwrap_or_default();
        let vm_ok = note(m, check_name("vm", &raw.agent.vm).map_err(|source| AgentMistake::VmName { source })).is_some();
        if raw.disk.is_empty() {
            m.push(AgentMistake::NoDisks);
        }
        let mut seen = HashSet::new();
        let mut disks = Vec::new();
        for d in raw.disk {
            let volume = || d.volume.clone();
            note(m, check_name("group", &d.group).map_err(|source| AgentMistake::GroupName { volume: volume(), source }));
            note(m, check_name("volume", &d.volume).map_err(|source| AgentMistake::VolumeName { source }));
            if !seen.insert(d.volume.clone()) {
                m.push(AgentMistake::DiskTwice { volume: volume() });
                continue;
            }
            if let Some(l) = d.listen.as_deref() {
                let listen_ok = match l.split_once(':') {
                    Some(("unix", p)) => p.starts_with('/'),
                    Some(("tcp", a)) => check_host_port("listen", a).is_ok(),
                    _ => false,
                };
                if !listen_ok {
                    m.push(AgentMistake::Listen { volume: volume(), listen: l.to_owned() });
                }
            }
            let frontend = note(m, frontend_config(&d.volume, d.listen.is_some(), d.frontend.as_deref(), d.device)).flatten();
            disks.push(DiskConfig { group: d.group, volume: d.volume, path: d.path, listen: d.listen, frontend, dirty_map: d.dirty_map });
        }
        for mount in &raw.agent.freeze {
            if !mount.is_absolute() {
                m.push(AgentMistake::FreezeNotAbsolute { mount: mount.clone() });
            }
        }
        if raw.agent.pre_quiesce.is_some() != raw.agent.post_quiesce.is_some() {
            m.push(AgentMistake::QuiesceScriptAlone);
        }
        let quiesce = QuiesceConfig { freeze: raw.agent.freeze, pre: raw.agent.pre_quiesce, post: raw.agent.post_quiesce };
        let engine_server_name = match raw.tls.as_ref().and_then(|t| t.server_name.as_deref()) {
            Some(n) => note(m, server_name_key("tls.server_name", n).map_err(|source| AgentMistake::Tls { source })),
            None => Some(server_name_of(&engine)),
        };
        let fixed_server_name = raw.tls.as_ref().is_some_and(|t| t.server_name.is_some());
        let tls = raw.tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        if vm_ok && tls.as_ref().is_some_and(|t| !t.insecure_plaintext) {
            note(m, check_identity_name("vm", &raw.agent.vm).map_err(|source| AgentMistake::VmIdentity { source }));
        }
        let addresses = if engine_ok { engines.iter().map(|e| (key.to_owned(), e.clone())).collect() } else { Vec::new() };
        let security = link_security(tls, Role::Agent, Some(&raw.agent.vm), None, &addresses);
        let security = note(m, security.map_err(|source| AgentMistake::Tls { source }));
        let on_engine_loss = match raw.agent.on_engine_loss.as_deref().unwrap_or("track") {
            "track" => Some(EngineLoss::Track),
            "fail" => Some(EngineLoss::Fail),
            other => {
                m.push(AgentMistake::OnEngineLoss { policy: other.to_owned() });
                None
            }
        };
        let engine_timeout = match raw.agent.engine_timeout.as_deref() {
            Some(t) => note(m, parse_duration(t).map_err(|source| AgentMistake::EngineTimeout { source })),
            None => Some(DEFAULT_ENGINE_TIMEOUT),
        };
        if engine_timeout.is_some_and(|t| t.is_zero()) {
            m.push(AgentMistake::EngineTimeoutZero);
        }
        let metrics_listen = note(
            m,
            raw.agent
                .metrics_listen
                .as_deref()
                .map(|a| parse_socket_addr("agent.metrics_listen", a))
                .transpose()
                .map_err(|source| AgentMistake::MetricsListen { source }),
        );
        match (security, engine_server_name, on_engine_loss, engine_timeout, metrics_listen) {
            (Some(security), Some(engine_server_name), Some(on_engine_loss), Some(engine_timeout), Some(metrics_listen))
                if mistakes.is_empty() =>
            {
                Ok(AgentConfig {
                    more_engines: engines[1..].to_vec(),
                    engine,
                    fixed_server_name,
                    vm: raw.agent.vm,
                    disks,
                    quiesce,
                    security,
                    engine_server_name,
                    on_engine_loss,
                    engine_timeout,
                    metrics_listen,
                    start_offline: raw.agent.start_offline,
                })
            }
            _ => {
                debug_assert!(!mistakes.is_empty(), "a value is missing only after its mistake was noted");
                Err(mistakes)
            }
        }
    }
}

/// Checks a disk's `frontend` and `device`. With neither `frontend` nor `listen` the disk gets
/// `auto`: a disk nothing serves would be useless.
fn frontend_config(
    volume: &str,
    has_listen: bool,
    kind: Option<&str>,
    device: Option<PathBuf>,
) -> Result<Option<FrontendConfig>, AgentMistake> {
    let kind = match kind {
        None if has_listen && device.is_none() => return Ok(None),
        None | Some("auto") => FrontendKind::Auto,
        Some("ublk") => FrontendKind::Ublk,
        Some("nbd") => FrontendKind::Nbd,
        Some(other) => return Err(AgentMistake::Frontend { volume: volume.to_owned(), frontend: other.to_owned() }),
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
            return Err(AgentMistake::Device { volume: volume.to_owned(), device: dev.display().to_string(), kind });
        }
    }
    Ok(Some(FrontendConfig { kind, device }))
}

/// What to write instead of a device that does not fit the front end.
fn device_hint(kind: &FrontendKind) -> &'static str {
    match kind {
        FrontendKind::Ublk => "write e.g. device = \"/dev/ublkb0\"",
        FrontendKind::Nbd => "write e.g. device = \"/dev/nbd0\"",
        FrontendKind::Auto => "a device can only be named with frontend = \"ublk\" or \"nbd\"",
    }
}

/// A mistake in an agent file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AgentMistake {
    /// Neither `agent.engine` nor `agent.engines`.
    #[error("agent.engine is missing; give the engine's address, engine = \"10.0.0.5:7400\" (or the site's engines, engines = [...])")]
    NoEngine,
    /// Both `agent.engine` and `agent.engines`.
    #[error("agent.engine and agent.engines are both given; keep one (engines lists every engine of a clustered site)")]
    EngineAndEngines,
    /// `agent.engine` is not `host:port`.
    #[error("{source}")]
    Engine {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `agent.metrics_listen` is not an address.
    #[error("{source}")]
    MetricsListen {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `agent.vm` is not a valid name.
    #[error("agent.vm: {source}")]
    VmName {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// No `[[disk]]`.
    #[error("no [[disk]] is configured; add one with group, volume, path and frontend (or listen)")]
    NoDisks,
    /// A disk's `group` is not a valid name.
    #[error("disk {volume:?}: {source}")]
    GroupName {
        /// The disk's volume.
        volume: String,
        /// The cause.
        #[source]
        source: NameError,
    },
    /// A disk's `volume` is not a valid name.
    #[error("disk: {source}")]
    VolumeName {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// Two disks of one volume.
    #[error("disk {volume:?} is listed twice; each volume is served once")]
    DiskTwice {
        /// The volume.
        volume: String,
    },
    /// A disk's `listen` is neither `unix:/path` nor `tcp:host:port`.
    #[error("disk {volume:?}: listen = {listen:?} is not valid; write \"unix:/run/hindsight/{volume}.sock\" or \"tcp:127.0.0.1:10809\"")]
    Listen {
        /// The disk's volume.
        volume: String,
        /// The value.
        listen: String,
    },
    /// A disk's `frontend` is not known.
    #[error("disk {volume:?}: frontend = {frontend:?} is not known; write \"auto\", \"ublk\" or \"nbd\"")]
    Frontend {
        /// The disk's volume.
        volume: String,
        /// The value.
        frontend: String,
    },
    /// A disk's `device` does not fit its front end.
    #[error("disk {volume:?}: device = {device:?} does not fit frontend = \"{kind}\"; {}", device_hint(.kind))]
    Device {
        /// The disk's volume.
        volume: String,
        /// The device.
        device: String,
        /// The front end.
        kind: FrontendKind,
    },
    /// A mount point in `agent.freeze` that is not absolute.
    #[error("agent.freeze: {mount:?} is not an absolute mount point; write e.g. freeze = [\"/var/lib/db\"]")]
    FreezeNotAbsolute {
        /// The mount point.
        mount: PathBuf,
    },
    /// One of `pre_quiesce` and `post_quiesce` without the other.
    #[error("agent.pre_quiesce and agent.post_quiesce go together: give both scripts, or neither (to use freeze)")]
    QuiesceScriptAlone,
    /// With TLS, an `agent.vm` that cannot be written in the agent's certificate.
    #[error("agent.vm: {source} (the agent's certificate names it)")]
    VmIdentity {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// The `[tls]` section, or `tls.server_name`.
    #[error("{source}")]
    Tls {
        /// The cause.
        #[source]
        source: TlsMistake,
    },
    /// `agent.on_engine_loss` is not known.
    #[error("agent.on_engine_loss = {policy:?} is not known; use \"track\" or \"fail\"")]
    OnEngineLoss {
        /// The value.
        policy: String,
    },
    /// `agent.engine_timeout` is not a duration.
    #[error("agent.engine_timeout: {source}")]
    EngineTimeout {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `agent.engine_timeout` is 0.
    #[error("agent.engine_timeout must be more than 0, e.g. engine_timeout = \"30s\"")]
    EngineTimeoutZero,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse::lines;

    #[test]
    fn agent_quiesce_keys_are_checked() {
        let base = "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\n{}\n[tls]\ninsecure_plaintext = true\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\nlisten = \"unix:/run/db.sock\"\n";
        let parse = |extra: &str| -> Result<AgentConfig, String> {
            let raw: AgentFile = toml::from_str(&base.replace("{}", extra)).map_err(|e| e.to_string())?;
            AgentConfig::validate(raw).map_err(|m| lines(&m))
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
            AgentConfig::validate(raw).map(|c| c.disks[0].clone()).map_err(|m| lines(&m))
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
    fn agent_server_name_defaults_to_the_engine_host() {
        let base = "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\n[tls]\ninsecure_plaintext = true\n{}\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\n";
        let parse = |extra: &str| -> Result<AgentConfig, String> {
            let raw: AgentFile = toml::from_str(&base.replace("{}", extra)).map_err(|e| e.to_string())?;
            AgentConfig::validate(raw).map_err(|m| lines(&m))
        };
        assert_eq!(parse("").unwrap().engine_server_name, "127.0.0.1");
        assert_eq!(parse("server_name = \"site-a.engine.hindsight\"").unwrap().engine_server_name, "site-a.engine.hindsight");
        assert!(parse("server_name = \"a b\"").unwrap_err().contains("tls.server_name"));
        let far = base.replace("127.0.0.1:7400", "10.0.0.5:7400").replace("{}", "");
        let e = lines(&AgentConfig::validate(toml::from_str(&far).unwrap()).unwrap_err());
        assert!(e.contains("agent.engine = \"10.0.0.5:7400\"") && e.contains("--role agent --name erp-db"), "{e}");
    }

    #[test]
    fn every_mistake_of_a_file_is_reported() {
        let disk = "[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"/dev/vdb\"\n";
        let text = format!(
            "[agent]\nengine = \"127.0.0.1:7400\"\nvm = \"erp-db\"\nfreeze = [\"data\"]\non_engine_loss = \"panic\"\n\
             [tls]\ninsecure_plaintext = true\n{disk}{disk}"
        );
        let mistakes = AgentConfig::validate(toml::from_str(&text).unwrap()).unwrap_err();
        assert!(
            matches!(
                mistakes[..],
                [AgentMistake::DiskTwice { .. }, AgentMistake::FreezeNotAbsolute { .. }, AgentMistake::OnEngineLoss { .. }]
            ),
            "{mistakes:?}"
        );
        assert_eq!(
            lines(&mistakes),
            "disk \"db\" is listed twice; each volume is served once\n\
             agent.freeze: \"data\" is not an absolute mount point; write e.g. freeze = [\"/var/lib/db\"]\n\
             agent.on_engine_loss = \"panic\" is not known; use \"track\" or \"fail\""
        );
    }
}
