//! The Hindsight replication engine.
//!
//! Agents connect over TLS (or loopback plaintext; `hindsight_consistency::transport`), are
//! authorised by the VM their certificate names, and send every write of their disks
//! ([`agents`]). Each write is
//! routed to its consistency group ([`group`]), whose journal task (run by a fixed pool of
//! threads shared by all groups) numbers it with
//! the group's next sequence number, timestamps it, appends it to the group's journal and,
//! after the group commit's fdatasync, acknowledges it to the agent (`cdp` mode). A shipper
//! per group ([`shipper`]) reads the journal in order and sends it to the target, resuming
//! where the target's journal ends; confirmed segments are deleted from the engine's journal.
//! The operator's requests (status, set-mode, bookmark) come in on the same port
//! ([`operator`]).
//!
//! ```text
//! agent ──Write──▶ session reader ──▶ group channel ──▶ journal task (seq, time, append,
//!   ▲                                                       commit = one fdatasync)
//!   └──WriteAck── ack writer ◀──────────────────────────────────┘
//!                                     journal files ──▶ shipper ──Records──▶ target
//!                                                         ▲                    │
//!                                     confirmed seq ◀─────┴──────Confirm───────┘
//! ```

// Casts in tests build fixtures from small literals.
#![cfg_attr(test, allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap))]

pub mod acks;
pub mod agents;
pub mod cluster;
pub mod confirms;
pub mod connection;
mod dashboard;
pub mod delta;
pub mod epoch;
pub mod error;
pub mod group;
pub mod hashes;
pub mod journal_watch;
pub mod limiter;
mod metrics;
pub mod operator;
pub mod policy;
pub mod resync;
pub mod shipper;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hindsight_consistency::config::EngineConfig;
use hindsight_consistency::journal::{Journal, JournalOptions};
use hindsight_consistency::storage::{StdStorage, Storage};
use hindsight_consistency::tasks;
use hindsight_consistency::transport::Role;

pub use error::EngineError;

/// A running engine.
pub struct EngineHandle {
    local_addr: SocketAddr,
    registry: Arc<connection::Registry>,
}

impl EngineHandle {
    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops shipping and journaling (agent sessions end when their sockets close).
    pub fn shutdown(self) {
        for g in self.registry.groups.values() {
            g.shared.stopping.store(true, Ordering::Relaxed);
            g.wake();
            g.shared.wake_shipper();
        }
    }
}

/// Opens every group's journal, starts the journal tasks and shippers, and accepts agents in
/// a background thread.
pub fn start(config: EngineConfig) -> Result<EngineHandle, EngineError> {
    start_with_storage(config, StdStorage::shared())
}

/// Like [`start`], with every journal file going through `fs` (tests use a
/// `FaultyStorage` of `hindsight_consistency::faults` to inject I/O errors).
pub fn start_with_storage(config: EngineConfig, fs: Arc<dyn Storage>) -> Result<EngineHandle, EngineError> {
    // With TLS the engine is who its certificate says; targets check that name.
    let own_name = config.security.tls().and_then(|t| t.own().name(Role::Engine)).map(str::to_owned);
    let engine_name = own_name.clone().unwrap_or_else(|| format!("engine@{}", config.listen));
    let mut groups = HashMap::new();
    let mut hash_brokers = HashMap::new();
    // Every group's journal task runs on these threads, however many groups there are.
    let journal_pool = tasks::Pool::new("journal", tasks::io_threads())
        .map_err(|source| EngineError::Spawn { what: "the journal threads".into(), source })?;
    // Freed buffers of idle groups and connections go back to the system.
    journal_pool.add("give memory back", hindsight_consistency::memory::TrimTask::default());
    // And every group's shipper on these.
    let ship_pool = tasks::Pool::new("ship", tasks::io_threads())
        .map_err(|source| EngineError::Spawn { what: "the shipping threads".into(), source })?;
    // One connection gate per target address, shared by the groups shipping there.
    let mut gates: HashMap<String, Arc<shipper::ConnectGate>> = HashMap::new();
    // One limiter per target address, shared by the groups shipping there.
    let mut limiters: HashMap<String, Arc<limiter::Limiter>> = HashMap::new();
    // With [cluster], every group is owned by nobody here from the start, before its shipper
    // first runs, until the cluster thread claims it (docs/ha.md).
    let lease = config.cluster.as_ref().map(|_| Arc::new(cluster::ownership::LeaseClock::default()));
    for g in &config.groups {
        let group_dir = config.data_dir.join("groups").join(&g.name);
        epoch::enter(fs.as_ref(), &g.name, &group_dir, g.epoch)?;
        let dir = group_dir.join("journal");
        let mut journal = Journal::open(fs.clone(), &dir, JournalOptions { segment_size: config.segment_size, direct: config.direct_io })
            .map_err(|source| EngineError::OpenJournal { group: g.name.clone(), source })?;
        let tail = journal.keep_tail(shipper::SHIP_FROM_MEMORY);
        log::info!(
            "group {} ({}, {} volumes): journal at {} holds seq {}..={}",
            g.name,
            g.mode.as_str(),
            g.volumes.len(),
            dir.display(),
            journal.first_seq(),
            journal.durable_seq()
        );
        let handle = group::start(g.clone(), journal, &journal_pool);
        if let Some(lease) = &lease {
            handle.shared.ownership.join_cluster(Arc::clone(lease));
        }
        let limiter = config
            .max_bandwidth
            .map(|rate| Arc::clone(limiters.entry(g.target.clone()).or_insert_with(|| Arc::new(limiter::Limiter::new(rate)))));
        let gate = Arc::clone(gates.entry(g.target.clone()).or_default());
        let broker = Arc::new(hashes::HashBroker::default());
        hash_brokers.insert(g.name.clone(), Arc::clone(&broker));
        let shipper = shipper::Shipper {
            group: handle.clone(),
            journal_dir: dir,
            tail,
            fs: fs.clone(),
            engine_name: engine_name.clone(),
            security: config.security.clone(),
            limiter,
            hashes: Arc::clone(&broker),
            gate,
        };
        let waker = ship_pool.add(&format!("ship-{}", g.name), shipper::ShipTask::new(shipper));
        let _ = broker.shipper.set(waker.clone());
        let _ = handle.shared.shipper.set(waker);
        groups.insert(g.name.clone(), handle);
    }
    let listener = TcpListener::bind(config.listen).map_err(|source| EngineError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| EngineError::Bind { addr: config.listen, source })?;
    let registry = Arc::new(connection::Registry {
        groups,
        attached: Mutex::new(HashSet::new()),
        detached: std::sync::Condvar::new(),
        sessions: Mutex::new(HashMap::new()),
        next_id: std::sync::atomic::AtomicU64::new(1),
        quiesce_waits: Mutex::new(HashMap::new()),
        name: engine_name,
        resync_progress: Mutex::new(HashMap::new()),
        hashes: hash_brokers,
        own_name,
        security: config.security.clone(),
        journal_pool,
        ship_pool,
        cluster: std::sync::OnceLock::new(),
    });
    if let (Some(c), Some(lease)) = (config.cluster.clone(), lease) {
        let _ = registry.cluster.set(cluster::start(c, lease, &registry)?);
    }
    let reg = registry.clone();
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        let peer = s.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                        let reg = reg.clone();
                        let _ = std::thread::Builder::new().name(format!("agent-{peer}")).spawn(move || agents::serve(s, peer, reg));
                    }
                    Err(e) => log::warn!("accepting an agent connection: {e}"),
                }
            }
        })
        .map_err(|source| EngineError::Spawn { what: "accept".into(), source })?;
    if let Some(addr) = config.metrics_listen {
        metrics::serve(addr, Arc::clone(&registry)).map_err(|source| EngineError::Bind { addr, source })?;
    }
    match config.security.tls() {
        Some(t) => {
            log::info!("engine listening on {local_addr} (TLS as {}, peers must be certified by {})", t.own(), t.files().ca.display())
        }
        None => log::warn!("engine listening on {local_addr} in plaintext (tls.insecure_plaintext = true): nobody is authenticated"),
    }
    Ok(EngineHandle { local_addr, registry })
}

/// Runs the engine until the process is killed. Every acknowledged write is durable in the
/// journal, so stopping by signal loses nothing.
pub fn run(config: EngineConfig) -> Result<(), EngineError> {
    let _handle = start(config)?;
    loop {
        std::thread::park();
    }
}
