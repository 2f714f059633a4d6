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
//! This module holds what they share: the error, the file reading, the journal-full policy
//! that both engine and target apply. Every public item is reached as `config::Item`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

mod agent;
mod engine;
mod parse;
mod target;
mod tls;

pub use agent::{AgentConfig, DiskConfig, EngineLoss, FrontendConfig, FrontendKind, QuiesceConfig, DEFAULT_ENGINE_TIMEOUT};
pub use engine::{
    Compression, EngineConfig, GroupConfig, ReplicationMode, SyncLoss, VolumeConfig, DEFAULT_BLOCK_TIMEOUT, DEFAULT_DEGRADE_TIMEOUT,
    DEFAULT_INTERVAL,
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

fn yes() -> bool {
    true
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
