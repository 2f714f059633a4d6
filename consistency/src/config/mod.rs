//! Configuration files of the three daemons (TOML), parsed and validated.
//!
//! Every error names the file, the key and the fix, e.g.
//! `engine.toml: group "erp": volume "db-data" has size 0; give size = "100GiB"`.
//!
//! - `parse.rs` — sizes, durations and addresses, as every section writes them
//! - `engine.rs` — `engine.toml`: the engine, its groups and their volumes
//! - `target.rs` — `target.toml`
//! - `agent.rs` — `agent.toml`: the agent, its disks and its quiesce scripts
//! - `tls.rs` — the `[tls]` section every file has
//!
//! This module holds the entry points, which read a file and hand it to its section's
//! `validate`, and the error they return. Every public item is reached as `config::Item`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use agent::AgentFile;
use engine::EngineFile;
use target::TargetFile;

mod agent;
mod engine;
mod parse;
mod target;
mod tls;

pub use agent::{AgentConfig, DiskConfig, EngineLoss, FrontendConfig, FrontendKind, QuiesceConfig, DEFAULT_ENGINE_TIMEOUT};
pub use engine::{
    Compression, EngineConfig, GroupConfig, JournalFull, ReplicationMode, SyncLoss, VolumeConfig, DEFAULT_BLOCK_TIMEOUT,
    DEFAULT_DEGRADE_TIMEOUT, DEFAULT_INTERVAL,
};
pub use parse::{parse_duration, parse_size};
pub use target::{EngineTrust, TargetConfig, DEFAULT_RETENTION};
// Names are checked where certificate identities are (transport uses it, and config uses
// transport); config::check_name stays the path its callers know.
pub use crate::transport::identity::check_name;

/// A configuration problem.
#[derive(Debug, Error)]
#[error("{}: {message}", file.display())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, naming the key, and what to do.
    pub message: String,
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError { file: path.to_owned(), message: format!("cannot read the file: {e}") })?;
    toml::from_str(&text).map_err(|e| ConfigError { file: path.to_owned(), message: e.to_string().trim_end().replace('\n', "\n  ") })
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
}

impl TargetConfig {
    /// Reads and validates a target configuration file.
    pub fn load(path: &Path) -> Result<TargetConfig, ConfigError> {
        let raw: TargetFile = read_toml(path)?;
        Self::validate(raw.target, raw.tls).map_err(|message| ConfigError { file: path.to_owned(), message })
    }
}

impl AgentConfig {
    /// Reads and validates an agent configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: AgentFile = read_toml(path)?;
        Self::validate(raw).map_err(|message| ConfigError { file: path.to_owned(), message })
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
