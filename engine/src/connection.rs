//! What every connection to the engine shares, an agent's session or an operator's request:
//! the [`Registry`] of groups, attached volumes and sessions, and `refuse`, which ends a
//! connection with an `Error` frame naming why.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use hindsight_consistency::tasks::Pool;

use hindsight_consistency::transport::{Security, WriteHalf};
use hindsight_consistency::wire::{encode_message, write_frame, ErrorMessage, FrameType, QuiescedMsg, ResyncStatus};

use crate::acks::AckTo;
use crate::group::GroupHandle;
use crate::hashes::HashBroker;

/// What every session needs: the groups and which volumes are attached right now.
pub struct Registry {
    /// Groups by name.
    pub groups: HashMap<String, GroupHandle>,
    /// Volumes currently served by a connected agent.
    pub attached: Mutex<HashSet<String>>,
    /// Signalled when a session detaches its volumes.
    pub detached: Condvar,
    /// Connected agent sessions, for quiesce requests.
    pub sessions: Mutex<HashMap<u64, Session>>,
    /// Numbers sessions and quiesce requests.
    pub next_id: AtomicU64,
    /// Where each quiesce request's answers go, by quiesce id.
    pub quiesce_waits: Mutex<HashMap<u64, crossbeam_channel::Sender<(String, QuiescedMsg)>>>,
    /// The engine's name for peers.
    pub name: String,
    /// Resyncs under way, by volume, as their agents report them.
    pub resync_progress: Mutex<HashMap<String, ResyncStatus>>,
    /// Each group's hash requests, by group name.
    pub hashes: HashMap<String, Arc<HashBroker>>,
    /// The engine name its certificate carries (TLS only).
    pub own_name: Option<String>,
    /// How connections are protected.
    pub security: Security,
    /// The threads that run every group's journal task; they stop when the engine is dropped.
    pub journal_pool: hindsight_consistency::tasks::Pool,
    /// The threads that run every group's shipper task.
    pub ship_pool: hindsight_consistency::tasks::Pool,
    /// The engine cluster, with `[cluster]` (docs/ha.md).
    pub cluster: OnceLock<Arc<crate::cluster::Cluster>>,
}

/// A connected agent, as quiesce requests see it.
pub struct Session {
    /// Its VM.
    pub vm: String,
    /// The groups of its volumes.
    pub groups: HashSet<String>,
    /// Frames to it (sent by its writer, in order with its acknowledgements).
    pub out: AckTo,
}

/// The threads that read and write every agent connection and every shipping connection's
/// target side in this process (tasks woken by their sockets and outboxes).
pub fn link_pool() -> std::io::Result<&'static Pool> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    // A reader waits a moment for the next frame before it parks: as many threads as the
    // others, so that busy connections do not hold up the rest.
    Pool::process_wide(&POOL, "link", hindsight_consistency::tasks::io_threads())
}

/// Refuses a connection: logs why, tells the peer in an `Error` frame and closes.
pub(crate) fn refuse(w: &mut WriteHalf, peer: SocketAddr, why: &str) {
    log::warn!("agent {peer} refused: {why}");
    let msg = encode_message(&ErrorMessage { message: why.to_owned() });
    let _ = write_frame(w, FrameType::Error, &msg, &mut Vec::new());
    w.close();
}
