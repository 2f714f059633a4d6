//! `[cluster]` of engine.toml: the etcd endpoints, this engine's name and the address agents
//! reach it at, the lease TTL and the site (docs/ha.md, "Configuration").

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::parse::{check_host_port, note, parse_duration, ValueError};
use crate::transport::identity::{check_name, NameError};

/// Default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// Shortest and longest lease TTL accepted.
const LEASE_TTLS: std::ops::RangeInclusive<Duration> = Duration::from_secs(2)..=Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    #[serde(default)]
    endpoints: Vec<String>,
    name: Option<String>,
    advertise: Option<String>,
    lease_ttl: Option<String>,
    site: Option<String>,
}

/// A validated `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd's client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    /// This engine's name, unique among the site's engines.
    pub name: String,
    /// The address agents reach this engine at (`host:port`).
    pub advertise: String,
    /// The TTL of the engine's lease.
    pub lease_ttl: Duration,
    /// The site: every key lives under `/hindsight/<site>/`.
    pub site: String,
}

impl ClusterConfig {
    /// Checks the section, noting each mistake in `m`.
    pub(super) fn validate(raw: ClusterSection, m: &mut Vec<ClusterMistake>) -> Option<ClusterConfig> {
        if raw.endpoints.is_empty() {
            m.push(ClusterMistake::NoEndpoints);
        }
        for e in &raw.endpoints {
            let hostport = e.strip_prefix("http://").map(|s| s.trim_end_matches('/'));
            match hostport {
                Some(hp) => {
                    note(m, check_host_port("cluster.endpoints", hp).map_err(|source| ClusterMistake::Endpoint { source }));
                }
                None => m.push(ClusterMistake::EndpointScheme { endpoint: e.clone() }),
            }
        }
        let name = match raw.name {
            Some(n) => note(m, check_name("cluster.name", &n).map(|()| n).map_err(|source| ClusterMistake::Name { source })),
            None => {
                m.push(ClusterMistake::Missing { key: "name", example: "name = \"engine-a\"" });
                None
            }
        };
        let advertise = match raw.advertise {
            Some(a) => note(m, check_host_port("cluster.advertise", &a).map(|()| a).map_err(|source| ClusterMistake::Advertise { source })),
            None => {
                m.push(ClusterMistake::Missing { key: "advertise", example: "advertise = \"10.0.1.21:7100\"" });
                None
            }
        };
        let lease_ttl = match raw.lease_ttl.as_deref() {
            None => Some(DEFAULT_LEASE_TTL),
            Some(t) => note(m, parse_duration(t).map_err(|source| ClusterMistake::LeaseTtl { source })),
        };
        if lease_ttl.is_some_and(|t| !LEASE_TTLS.contains(&t)) {
            m.push(ClusterMistake::LeaseTtlRange);
        }
        let site = raw.site.unwrap_or_else(|| "default".to_owned());
        note(m, check_name("cluster.site", &site).map_err(|source| ClusterMistake::Site { source }));
        match (name, advertise, lease_ttl) {
            (Some(name), Some(advertise), Some(lease_ttl)) if m.is_empty() => {
                Some(ClusterConfig { endpoints: raw.endpoints, name, advertise, lease_ttl, site })
            }
            _ => None,
        }
    }
}

/// A mistake in `[cluster]`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterMistake {
    /// No endpoint.
    #[error("cluster.endpoints is empty; list etcd's client URLs, e.g. endpoints = [\"http://10.0.0.11:2379\"]")]
    NoEndpoints,
    /// An endpoint that is not `http://`.
    #[error("cluster.endpoints: {endpoint:?} is not an http:// URL; write e.g. \"http://10.0.0.11:2379\" (etcd over TLS is not supported in this version)")]
    EndpointScheme {
        /// The value.
        endpoint: String,
    },
    /// An endpoint whose host:port is malformed.
    #[error("{source}")]
    Endpoint {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// A required key is absent.
    #[error("cluster.{key} is missing; add {example}")]
    Missing {
        /// The key.
        key: &'static str,
        /// What to write.
        example: &'static str,
    },
    /// `cluster.name` is not a valid name.
    #[error("{source}")]
    Name {
        /// The cause.
        #[source]
        source: NameError,
    },
    /// `cluster.advertise` is not host:port.
    #[error("{source}")]
    Advertise {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `cluster.lease_ttl` is not a duration.
    #[error("cluster.lease_ttl: {source}")]
    LeaseTtl {
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `cluster.lease_ttl` outside 2 s to 60 s.
    #[error("cluster.lease_ttl must be between \"2s\" and \"60s\" (default \"5s\"): a takeover waits for it to run out")]
    LeaseTtlRange,
    /// `cluster.site` is not a valid name.
    #[error("{source}")]
    Site {
        /// The cause.
        #[source]
        source: NameError,
    },
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::EngineConfig;

    const GROUP: &str =
        "[[group]]\nname = \"erp\"\ntarget = \"127.0.0.1:7500\"\n[[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"1GiB\"\n";

    fn engine(cluster: &str) -> Result<EngineConfig, String> {
        let text = format!(
            "[engine]\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"/var/lib/hindsight\"\n[tls]\ninsecure_plaintext = true\n{cluster}\n{GROUP}"
        );
        EngineConfig::from_str(Path::new("engine.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_cluster_section_gives_defaults_and_without_one_there_is_no_cluster() {
        assert_eq!(engine("").unwrap().cluster, None);
        let c = engine("[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nname = \"engine-a\"\nadvertise = \"127.0.0.1:7400\"\n")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:2379".to_owned()]);
        assert_eq!(
            (c.name.as_str(), c.advertise.as_str(), c.lease_ttl, c.site.as_str()),
            ("engine-a", "127.0.0.1:7400", super::DEFAULT_LEASE_TTL, "default")
        );
    }

    #[test]
    fn each_mistake_names_the_key_and_the_fix() {
        let e = engine("[cluster]\n").unwrap_err();
        assert!(
            e.contains("cluster.endpoints is empty") && e.contains("cluster.name is missing") && e.contains("cluster.advertise is missing"),
            "{e}"
        );
        let e = engine(
            "[cluster]\nendpoints = [\"https://a:2379\", \"http://nohost\"]\nname = \"a b\"\nadvertise = \"x\"\nlease_ttl = \"1s\"\nsite = \"\"\n",
        )
        .unwrap_err();
        for want in [
            "\"https://a:2379\" is not an http:// URL",
            "\"nohost\" is not an address",
            "cluster.name",
            "cluster.advertise",
            "between \"2s\" and \"60s\"",
            "cluster.site",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = engine("[cluster]\nendpoints = [\"http://a:2379\"]\nname = \"a\"\nadvertise = \"a:1\"\nlease = \"5s\"\n").unwrap_err();
        assert!(e.contains("lease"), "an unknown key is named: {e}");
    }
}
