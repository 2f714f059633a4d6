//! Configuration files of the three daemons (TOML), parsed and validated.
//!
//! Every error names the file, the key and the fix, e.g.
//! `engine.toml: group "erp": volume "db-data" has size 0; give size = "100GiB"`.
//!
//! - `parse.rs` — sizes, durations and addresses, as every section writes them
//! - `engine.rs` — `engine.toml`: the engine, its groups and their volumes
//! - `cluster.rs` — `[cluster]` of `engine.toml`: etcd, the engine's name and lease
//! - `policy.rs` — a group's mode and policies (sync loss, compression, full journal)
//! - `target.rs` — `target.toml`
//! - `agent.rs` — `agent.toml`: the agent, its disks and its quiesce scripts
//! - `tls.rs` — the `[tls]` section every file has
//!
//! This module holds the entry points, which read a file and hand it to its section's
//! `validate`, and the error they return. Every public item is reached as `config::Item`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use agent::AgentFile;
use engine::EngineFile;
use target::TargetFile;

mod agent;
mod cluster;
mod engine;
mod parse;
mod policy;
mod target;
mod tiers;
mod tls;

pub use agent::{AgentConfig, AgentMistake, DiskConfig, EngineLoss, FrontendConfig, FrontendKind, QuiesceConfig, DEFAULT_ENGINE_TIMEOUT};
pub use cluster::{ClusterConfig, ClusterMistake, DEFAULT_LEASE_TTL};
pub use engine::{EngineConfig, EngineMistake, GroupConfig, VolumeConfig};
pub use parse::{parse_duration, parse_size, ValueError};
pub use policy::{Compression, JournalFull, ReplicationMode, SyncLoss, DEFAULT_BLOCK_TIMEOUT, DEFAULT_DEGRADE_TIMEOUT, DEFAULT_INTERVAL};
pub use target::{EngineTrust, TargetConfig, TargetMistake, DEFAULT_RETENTION};
pub use tiers::{validate_plan, validate_tiers, Every, Tier, TierGroupSection, TierMistake, TierPlan, TierSection, NO_TIERS};
pub use tls::TlsMistake;
// Names are checked where certificate identities are (transport uses it, and config uses
// transport); config::check_name stays the path its callers know.
pub use crate::transport::identity::check_name;

/// A configuration file that cannot be used. Shown as `file: what is wrong`, naming the key
/// and what to write; a file with several mistakes shows each on its own line.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the file: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or has a key of the wrong type or an unknown key (the first
    /// such problem only: the parser stops there).
    #[error("{}: {message}", file.display())]
    Toml {
        /// The file.
        file: PathBuf,
        /// The parser's message, as shown.
        message: String,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The file parses, but keys have values that cannot be used: every one found.
    #[error("{}", Lines(file, mistakes))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Each mistake, in the order of the checks (never empty).
        mistakes: Vec<Mistake>,
    },
}

/// One mistake in a file: a key, and what to write.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Mistake {
    /// In an engine file.
    #[error(transparent)]
    Engine(#[from] EngineMistake),
    /// In a target file.
    #[error(transparent)]
    Target(#[from] TargetMistake),
    /// In an agent file.
    #[error(transparent)]
    Agent(#[from] AgentMistake),
}

/// `file: mistake`, one a line.
struct Lines<'a>(&'a Path, &'a [Mistake]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, mistake) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {mistake}", self.0.display())?;
        }
        Ok(())
    }
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Toml {
        file: path.to_owned(),
        message: source.to_string().trim_end().replace('\n', "\n  "),
        source: Box::new(source),
    })
}

fn invalid<M: Into<Mistake>>(file: &Path, mistakes: Vec<M>) -> ConfigError {
    debug_assert!(!mistakes.is_empty(), "a file is invalid for at least one mistake");
    ConfigError::Invalid { file: file.to_owned(), mistakes: mistakes.into_iter().map(Into::into).collect() }
}

impl EngineConfig {
    /// Reads and validates an engine configuration file.
    pub fn load(path: &Path) -> Result<EngineConfig, ConfigError> {
        let raw: EngineFile = read_toml(path)?;
        Self::validate(raw).map_err(|mistakes| invalid(path, mistakes))
    }

    /// Parses and validates engine configuration text (`file` names it in errors).
    pub fn from_str(file: &Path, text: &str) -> Result<EngineConfig, ConfigError> {
        let raw: EngineFile = toml::from_str(text).map_err(|source| ConfigError::Toml {
            file: file.to_owned(),
            message: source.to_string().trim_end().to_owned(),
            source: Box::new(source),
        })?;
        Self::validate(raw).map_err(|mistakes| invalid(file, mistakes))
    }
}

impl TargetConfig {
    /// Reads and validates a target configuration file.
    pub fn load(path: &Path) -> Result<TargetConfig, ConfigError> {
        let raw: TargetFile = read_toml(path)?;
        Self::validate(raw.target, raw.tls).map_err(|mistakes| invalid(path, mistakes))
    }
}

impl AgentConfig {
    /// Reads and validates an agent configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: AgentFile = read_toml(path)?;
        Self::validate(raw).map_err(|mistakes| invalid(path, mistakes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_cannot_be_read_says_so() {
        let e = AgentConfig::load(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/agent.toml: cannot read the file: "), "{e}");
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    }
}

#[cfg(test)]
mod testing {
    //! The engine file the tests of every section start from.

    use std::path::Path;

    use super::EngineConfig;

    pub(super) const ENGINE: &str = r#"
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

    pub(super) fn engine(text: &str) -> Result<EngineConfig, String> {
        EngineConfig::from_str(Path::new("engine.toml"), text).map_err(|e| e.to_string())
    }
}
