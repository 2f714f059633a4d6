//! `target.toml`: where the target listens and keeps journals and replicas, how much history
//! it retains, and which engines may ship to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::parse::{parse_duration, parse_size, parse_socket_addr, yes};
use super::tls::{link_security, TlsKeys};
use crate::transport::identity::check_identity_name;
use crate::transport::{Role, Security};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetFile {
    pub(super) target: TargetSection,
    pub(super) tls: Option<TargetTlsSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetTlsSection {
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
pub(super) struct TargetSection {
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
    pub(super) fn validate(t: TargetSection, tls: Option<TargetTlsSection>) -> Result<TargetConfig, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{engine, ENGINE};

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
}
