//! The policies a group is configured with in engine.toml, and their defaults: replication
//! mode, what sync does when the target is lost, link compression, what a full journal does.

use std::time::Duration;

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
