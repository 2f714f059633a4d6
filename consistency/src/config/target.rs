//! `target.toml`: where the target listens and keeps journals and replicas, how much history
//! it retains, and which engines may ship to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use thiserror::Error;

use super::parse::{note, parse_duration, parse_size, parse_socket_addr, yes, ValueError};
use super::tiers::{validate_plan, TierGroupSection, TierMistake, TierPlan, TierSection};
use super::tls::{link_security, TlsKeys, TlsMistake};
use crate::transport::identity::{check_identity_name, NameError};
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
    metrics_listen: Option<String>,
    #[serde(default)]
    tier: Vec<TierSection>,
    #[serde(default)]
    group: Vec<TierGroupSection>,
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
    /// Where Prometheus scrapes the target's metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Retention tiers (`[[target.tier]]`, `[[target.group]]`; docs/retention-tiers.md).
    pub tiers: TierPlan,
}

/// Retention applied when a target config names neither `retention` nor `journal_size`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl TargetConfig {
    /// Checks every key of a target file and gives the configuration, or every mistake found
    /// (in the order of the checks).
    pub(super) fn validate(t: TargetSection, tls: Option<TargetTlsSection>) -> Result<TargetConfig, Vec<TargetMistake>> {
        let mut mistakes: Vec<TargetMistake> = Vec::new();
        let m = &mut mistakes;
        let listen = note(m, parse_socket_addr("target.listen", &t.listen).map_err(|source| TargetMistake::Listen { source }));
        let retention =
            note(m, t.retention.as_deref().map(parse_duration).transpose().map_err(|source| TargetMistake::Retention { source }));
        let journal_size =
            note(m, t.journal_size.as_deref().map(parse_size).transpose().map_err(|source| TargetMistake::JournalSize { source }));
        let metrics_listen = note(
            m,
            t.metrics_listen
                .as_deref()
                .map(|a| parse_socket_addr("target.metrics_listen", a))
                .transpose()
                .map_err(|source| TargetMistake::MetricsListen { source }),
        );
        let segment_size = match &t.segment_size {
            Some(s) => note(m, parse_size(s).map_err(|source| TargetMistake::SegmentSize { source })),
            None => Some(crate::journal::DEFAULT_SEGMENT_SIZE),
        };
        if segment_size.is_some_and(|s| s < (1 << 20)) {
            m.push(TargetMistake::SegmentSizeTooSmall);
        }
        if let (Some(Some(js)), Some(segment_size)) = (journal_size, segment_size) {
            if js < 2 * segment_size {
                m.push(TargetMistake::JournalSizeTooSmall { least: 2 * segment_size });
            }
        }
        let tiers = note(m, validate_plan(&t.tier, &t.group).map_err(|mistakes| TargetMistake::Tiers { mistakes }));
        let tiered = tiers.as_ref().is_some_and(|p| !p.is_empty());
        if tiered && retention.is_some_and(|r| r.is_some()) {
            m.push(TargetMistake::RetentionAndTiers);
        }
        let retention = match (retention, journal_size) {
            (Some(None), Some(None)) if !tiered => Some(Some(DEFAULT_RETENTION)),
            (r, _) => r,
        };
        let engines = match tls.as_ref().and_then(|t| t.engines.clone()) {
            None => EngineTrust::AnyCertified,
            Some(names) => {
                if tls.as_ref().is_some_and(|t| t.insecure_plaintext) {
                    m.push(TargetMistake::EnginesWithoutTls);
                }
                if names.is_empty() {
                    m.push(TargetMistake::NoEngines);
                }
                for n in &names {
                    note(m, check_identity_name("engine", n).map_err(|source| TargetMistake::EngineName { source }));
                }
                EngineTrust::Named(names)
            }
        };
        let tls = tls.map(|t| TlsKeys { ca: t.ca, cert: t.cert, key: t.key, insecure_plaintext: t.insecure_plaintext });
        let addresses = if listen.is_some() { vec![("target.listen".to_owned(), t.listen.clone())] } else { Vec::new() };
        let security = link_security(tls, Role::Target, None, Some(&t.listen), &addresses);
        let security = note(m, security.map_err(|source| TargetMistake::Tls { source }));
        match (listen, retention, journal_size, segment_size, security, metrics_listen, tiers) {
            (Some(listen), Some(retention), Some(journal_size), Some(segment_size), Some(security), Some(metrics_listen), Some(tiers))
                if mistakes.is_empty() =>
            {
                Ok(TargetConfig {
                    listen,
                    data_dir: t.data_dir,
                    retention,
                    journal_size,
                    segment_size,
                    direct_io: t.direct_io,
                    security,
                    engines,
                    metrics_listen,
                    tiers,
                })
            }
            _ => {
                debug_assert!(!mistakes.is_empty(), "a value is missing only after its mistake was noted");
                Err(mistakes)
            }
        }
    }
}

/// A mistake in a target file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TargetMistake {
    /// `target.listen` is not an address.
    #[error("{source}")]
    Listen {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target.metrics_listen` is not an address.
    #[error("{source}")]
    MetricsListen {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target.retention` is not a duration.
    #[error("target.retention: {source}")]
    Retention {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target.journal_size` is not a size.
    #[error("target.journal_size: {source}")]
    JournalSize {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target.segment_size` is not a size.
    #[error("target.segment_size: {source}")]
    SegmentSize {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `target.segment_size` is below 1 MiB.
    #[error("target.segment_size must be at least \"1MiB\"")]
    SegmentSizeTooSmall,
    /// `target.journal_size` holds fewer than two segments.
    #[error("target.journal_size must be at least two segments ({least} bytes); give e.g. journal_size = \"20GiB\"")]
    JournalSizeTooSmall {
        /// Two segments, in bytes.
        least: u64,
    },
    /// `[[target.tier]]` or `[[target.group]]`.
    #[error("{}", mistakes.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Tiers {
        /// Every mistake in them.
        mistakes: Vec<TierMistake>,
    },
    /// `retention` beside tiers.
    #[error(
        "target.retention and [[target.tier]] cannot both be given: the first tier is the retention of every write; \
         remove retention, or give the first tier as every = \"write\", for = \"24h\""
    )]
    RetentionAndTiers,
    /// `tls.engines` with `insecure_plaintext`.
    #[error("tls.engines needs TLS: with insecure_plaintext = true no engine is authenticated; remove one of them")]
    EnginesWithoutTls,
    /// `tls.engines = []`.
    #[error(
        "tls.engines is empty, so no engine could ship here; name them, e.g. engines = [\"site-a\"], or remove the key to trust every engine of the CA"
    )]
    NoEngines,
    /// A name in `tls.engines` that cannot be an engine's identity.
    #[error("tls.engines: {source}")]
    EngineName {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// The `[tls]` section.
    #[error("{source}")]
    Tls {
        /// The cause.
        #[source]
        source: TlsMistake,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse::lines;
    use crate::config::testing::{engine, ENGINE};

    #[test]
    fn target_engines_need_tls_and_valid_names() {
        let parse = |tls: &str| -> Result<TargetConfig, String> {
            let raw: TargetFile = toml::from_str(&format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\n[tls]\n{tls}"))
                .map_err(|e| e.to_string())?;
            TargetConfig::validate(raw.target, raw.tls).map_err(|m| lines(&m))
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
    fn engine_metrics_listen_is_optional_and_must_be_an_address() {
        assert_eq!(engine(ENGINE).unwrap().metrics_listen, None);
        let with = |a: &str| engine(&ENGINE.replace("[tls]", &format!("metrics_listen = \"{a}\"\n[tls]")));
        assert_eq!(with("127.0.0.1:9201").unwrap().metrics_listen, Some("127.0.0.1:9201".parse().unwrap()));
        let e = with("nowhere").unwrap_err();
        assert!(e.contains("engine.metrics_listen"), "{e}");
    }

    #[test]
    fn metrics_listen_is_optional_and_must_be_an_address() {
        let parse = |extra: &str| -> Result<TargetConfig, String> {
            let text = format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\n{extra}\n[tls]\ninsecure_plaintext = true");
            let raw: TargetFile = toml::from_str(&text).map_err(|e| e.to_string())?;
            TargetConfig::validate(raw.target, raw.tls).map_err(|m| lines(&m))
        };
        assert_eq!(parse("").unwrap().metrics_listen, None);
        assert_eq!(parse("metrics_listen = \"127.0.0.1:9200\"").unwrap().metrics_listen, Some("127.0.0.1:9200".parse().unwrap()));
        let e = parse("metrics_listen = \"nowhere\"").unwrap_err();
        assert!(e.contains("target.metrics_listen"), "{e}");
    }

    #[test]
    fn tiers_are_read_for_every_group_or_one_group_and_exclude_a_flat_retention() {
        use crate::config::Every;
        let parse = |extra: &str| -> Result<TargetConfig, String> {
            let text = format!("[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\n{extra}\n[tls]\ninsecure_plaintext = true");
            let raw: TargetFile = toml::from_str(&text).map_err(|e| e.to_string())?;
            TargetConfig::validate(raw.target, raw.tls).map_err(|m| lines(&m))
        };
        let tiers = "[[target.tier]]\nevery = \"write\"\nfor = \"1h\"\n[[target.tier]]\nevery = \"1m\"\nfor = \"24h\"\n";
        let erp = "[[target.group]]\nname = \"erp\"\n[[target.group.tier]]\nevery = \"write\"\nfor = \"4h\"\n";
        let c = parse(&format!("{tiers}{erp}")).unwrap();
        assert_eq!(c.retention, None, "no flat window beside the tiers");
        assert_eq!(c.tiers.of("crm").len(), 2);
        assert_eq!(c.tiers.of("crm")[1].every, Every::Interval(Duration::from_secs(60)));
        assert_eq!(c.tiers.of("erp").len(), 1);
        assert_eq!(c.tiers.of("erp")[0].until, Duration::from_secs(4 * 3600));
        assert_eq!(parse("").unwrap().retention, Some(DEFAULT_RETENTION), "without tiers the default window stays");
        let e = parse(&format!("retention = \"24h\"\n{tiers}")).unwrap_err();
        assert!(e.starts_with("target.retention and [[target.tier]] cannot both be given"), "{e}");
        let e = parse(&format!("{erp}{erp}")).unwrap_err();
        assert!(e.contains("target.group[1]: group \"erp\" has a [[target.group]] table already"), "{e}");
        let e = parse("[[target.tier]]\nevery = \"write\"\nfor = \"1h\"\n[[target.tier]]\nevery = \"write\"\nfor = \"2h\"\n").unwrap_err();
        assert!(e.starts_with("target.tier[1].every = \"write\" is only for the first tier"), "{e}");
    }

    #[test]
    fn every_mistake_of_a_file_is_reported() {
        let text = "[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"/d\"\nretention = \"soon\"\nsegment_size = \"1KiB\"\n\
                    [tls]\ninsecure_plaintext = true\nengines = []";
        let raw: TargetFile = toml::from_str(text).unwrap();
        let mistakes = TargetConfig::validate(raw.target, raw.tls).unwrap_err();
        assert!(
            matches!(
                mistakes[..],
                [
                    TargetMistake::Retention { .. },
                    TargetMistake::SegmentSizeTooSmall,
                    TargetMistake::EnginesWithoutTls,
                    TargetMistake::NoEngines
                ]
            ),
            "{mistakes:?}"
        );
        let e = lines(&mistakes);
        assert!(e.starts_with("target.retention: \"soon\" is not a duration"), "{e}");
        assert!(e.contains("\ntarget.segment_size must be at least \"1MiB\"\ntls.engines needs TLS"), "{e}");
        assert!(e.ends_with("\ntls.engines is empty, so no engine could ship here; name them, e.g. engines = [\"site-a\"], or remove the key to trust every engine of the CA"), "{e}");
    }
}
