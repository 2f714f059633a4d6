//! What the link is set up with, and why setting it up fails: [`LinkConfig`], [`LinkError`]
//! and the default engine timeout.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hindsight_consistency::transport::Security;
use hindsight_consistency::wire::{DiskHello, FrameError};
use thiserror::Error;

use crate::quiesce::Quiescer;

/// How long the engine may stay unreachable before pending and new writes fail with EIO.
/// (An `agent.toml` key in a later version.)
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the link needs to know to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Engine address, `host:port`.
    pub engine: String,
    /// The site's other engines (docs/ha.md): dialed in turn after `engine` fails, as is
    /// any engine a `Redirect` names.
    pub more_engines: Vec<String>,
    /// `server_name` was configured (`tls.server_name`): every engine's certificate carries
    /// it. Otherwise an engine other than `engine` must be valid for its own host.
    pub fixed_server_name: bool,
    /// How the link is protected (TLS, or plaintext on loopback).
    pub security: Security,
    /// The name the engine's certificate must be valid for.
    pub server_name: String,
    /// This VM's name, sent in the hello.
    pub vm: String,
    /// The disks, in disk-number order.
    pub disks: Vec<DiskHello>,
    /// How long [`EngineLink::connect`](super::EngineLink::connect) keeps trying while the engine is not up yet.
    pub connect_wait: Duration,
    /// How long the engine may stay unreachable before writes fail (normally
    /// [`ENGINE_TIMEOUT`]).
    pub engine_timeout: Duration,
    /// Answers the engine's quiesce requests (`None`: every request is refused).
    pub quiescer: Option<Arc<Quiescer>>,
    /// When the engine is still unreachable after `connect_wait`: start anyway, as if the
    /// connection had just been lost (writes wait up to `engine_timeout`, then fail, while
    /// the link keeps trying), instead of failing. A refusal still fails. Used when the guest
    /// depends on the agent's kernel devices, which must come up (or be recovered) even while
    /// the engine is away.
    pub start_offline: bool,
}

/// Why the link could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The engine did not accept a connection within the wait.
    #[error("cannot reach the engine at {engine} (tried for {waited:.1?}); start the engine, or fix `engine` in the [agent] section")]
    Unreachable {
        /// The address tried.
        engine: String,
        /// How long it was tried.
        waited: Duration,
        /// The last failure.
        #[source]
        source: io::Error,
    },
    /// The connection was made but the hello exchange failed.
    #[error("hello exchange with the engine at {engine} failed")]
    Handshake {
        /// The address.
        engine: String,
        /// What went wrong.
        #[source]
        source: FrameError,
    },
    /// TLS could not be set up: a certificate was refused, by the engine or by this agent.
    #[error("TLS with the engine at {engine} failed: {reason}; check [tls] in agent.toml (docs/security.md)")]
    Tls {
        /// The address.
        engine: String,
        /// Why.
        reason: String,
    },
    /// The engine refused this agent (its configuration does not match).
    #[error("the engine at {engine} refused this agent: {message}")]
    Refused {
        /// The address.
        engine: String,
        /// The engine's explanation.
        message: String,
    },
    /// More disks than a `Write` can number.
    #[error("{0} disks configured; at most 65535 can be served")]
    TooManyDisks(usize),
    /// The supervisor thread could not be started.
    #[error("cannot start the engine link thread")]
    Spawn(#[source] io::Error),
}
