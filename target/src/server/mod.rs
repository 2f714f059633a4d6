//! The daemon: its handle, start-up (every stored group loaded before engines are accepted),
//! shutdown, and the maintenance thread that checkpoints replicas and applies retention.
//!
//! - `shared`: the state the daemon's threads share (its groups, its connections);
//! - `accept`: the listener's thread, one thread per engine connection;
//! - `connection`: a connection's handshake: TLS, the engine's certificate, its hello, the
//!   group claimed;
//! - `stream`: the records that follow, journaled and confirmed batch by batch;
//! - `release`: a group whose failover is asked for, fenced and released.

mod accept;
mod connection;
mod release;
mod shared;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hindsight_consistency::config::{check_name, EngineTrust, TargetConfig};
use hindsight_consistency::error_chain;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::sync::lock;

use self::accept::accept_loop;
use self::shared::{GroupEntry, Shared};
use crate::error::{data_dir_err, TargetError};
use crate::failover::{self, Stage};
use crate::group::{Group, GroupOptions};
use crate::layout::{groups_dir, GroupPaths, DAEMON_LOCK, FAILOVER_ASKED};
use crate::lock::{lock_file, FileLock, LockKind};

/// How often the maintenance thread runs (checkpoints, retention).
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often it looks whether a failover was asked for (one `stat` of the data directory's
/// `failover-asked`; each group's `failover.toml` is looked for only then, and at every
/// maintenance pass): the release starts within this, and a failover's time is mostly this wait.
const FAILOVER_LOOK: Duration = Duration::from_millis(100);

/// A running target daemon, started by [`start`](crate::start). Dropping it shuts it down
/// like [`TargetHandle::shutdown`].
pub struct TargetHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    maintenance: Option<JoinHandle<()>>,
    stop_maintenance: Option<Sender<()>>,
    daemon_lock: Option<FileLock>,
}

impl std::fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHandle").field("local_addr", &self.local_addr).finish()
    }
}

/// Threads that load the groups at start.
const LOAD_THREADS: usize = 4;

/// How long a stop waits for the engine connections to end once their sockets are shut.
const CONNECTIONS_END: std::time::Duration = std::time::Duration::from_secs(30);

impl TargetHandle {
    /// The address engines connect to (useful when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes engine connections, waits for their threads, checkpoints every
    /// group (replicas synced, state written) and releases the data directory.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the daemon stops (it stops only on shutdown from another thread or a
    /// fatal error of the listener).
    pub(crate) fn wait(mut self) {
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.stop();
    }

    fn stop(&mut self) {
        if self.daemon_lock.is_none() {
            return; // already stopped
        }
        let shared = &self.shared;
        shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in lock(&shared.conns).values() {
            s.shutdown();
        }
        let threads = std::mem::take(&mut *lock(&shared.conn_threads));
        for t in threads {
            let _ = t.join();
        }
        // The receive pool ends each connection once it sees its socket shut.
        let deadline = std::time::Instant::now() + CONNECTIONS_END;
        while !lock(&shared.conns).is_empty() {
            if std::time::Instant::now() > deadline {
                log::warn!("{} engine connection(s) did not end within {CONNECTIONS_END:?} of the stop", lock(&shared.conns).len());
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(self.stop_maintenance.take());
        if let Some(t) = self.maintenance.take() {
            let _ = t.join();
        }
        for g in shared.ready_groups() {
            g.maintain(true);
        }
        log::info!("target on {} stopped", self.local_addr);
        self.daemon_lock = None;
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the daemon in background threads.
pub(crate) fn start(config: TargetConfig, fs: Arc<dyn Storage>) -> Result<TargetHandle, TargetError> {
    let gdir = groups_dir(&config.data_dir);
    fs.create_dir_all(&gdir).map_err(data_dir_err(&gdir, "create directory"))?;
    let lock_path = config.data_dir.join(DAEMON_LOCK);
    let daemon_lock = lock_file(&lock_path, LockKind::Exclusive, false, true)
        .map_err(data_dir_err(&lock_path, "lock"))?
        .ok_or_else(|| TargetError::DataDirInUse { data_dir: config.data_dir.clone() })?;
    let listener = TcpListener::bind(config.listen).map_err(|source| TargetError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| TargetError::Bind { addr: config.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| TargetError::Bind { addr: config.listen, source })?;

    let opts = GroupOptions {
        segment_size: config.segment_size,
        retention: config.retention,
        journal_size: config.journal_size,
        direct_io: config.direct_io,
        // Read by every group for as long as the process runs.
        tiers: Box::leak(Box::new(config.tiers.clone())),
    };
    let groups = load_groups(&fs, &config, opts)?;
    let shared = Arc::new(Shared {
        config,
        fs,
        opts,
        groups: Mutex::new(groups),
        stop: AtomicBool::new(false),
        conns: Mutex::new(HashMap::new()),
        conn_threads: Mutex::new(Vec::new()),
        next_conn: AtomicU64::new(1),
    });

    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let s = Arc::clone(&shared);
    let maintenance = std::thread::Builder::new()
        .name("target-maint".into())
        .spawn(move || maintenance_loop(&s, &stop_rx))
        .map_err(|source| TargetError::Spawn { what: "maintenance", source })?;
    let s = Arc::clone(&shared);
    let accept = std::thread::Builder::new()
        .name("target-accept".into())
        .spawn(move || accept_loop(&s, &listener))
        .map_err(|source| TargetError::Spawn { what: "accept", source })?;
    if let Some(addr) = shared.config.metrics_listen {
        let s = Arc::clone(&shared);
        crate::metrics::serve(addr, local_addr.to_string(), move || (s.ready_groups(), s.failed_over_groups()))?;
    }
    log::info!("target listening on {local_addr}, data in {}", shared.config.data_dir.display());
    match (shared.config.security.tls(), &shared.config.engines) {
        (Some(t), EngineTrust::AnyCertified) => {
            log::info!("TLS as {}; every engine certified by {} may ship here", t.own(), t.files().ca.display())
        }
        (Some(t), EngineTrust::Named(names)) => log::info!("TLS as {}; engines allowed to ship here: {}", t.own(), names.join(", ")),
        (None, _) => log::warn!("plaintext (tls.insecure_plaintext = true): engines are not authenticated"),
    }
    Ok(TargetHandle {
        shared,
        local_addr,
        accept: Some(accept),
        maintenance: Some(maintenance),
        stop_maintenance: Some(stop_tx),
        daemon_lock: Some(daemon_lock),
    })
}

/// Loads every group of the data directory. A group that fails to load is kept as broken
/// (logged, and engines shipping it are told why); the others are served.
fn load_groups(fs: &Arc<dyn Storage>, config: &TargetConfig, opts: GroupOptions) -> Result<BTreeMap<String, GroupEntry>, TargetError> {
    let gdir = groups_dir(&config.data_dir);
    let mut names = fs.list(&gdir).map_err(data_dir_err(&gdir, "list groups"))?;
    names.sort();
    // Loading is mostly waiting for the file system (a journal's tail scanned, the replicas
    // opened): a few threads load the groups side by side.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let loaded: Mutex<Vec<(String, GroupEntry)>> = Mutex::new(Vec::with_capacity(names.len()));
    std::thread::scope(|scope| {
        for _ in 0..LOAD_THREADS.min(names.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { return };
                if let Some(entry) = load_group(fs, config, opts, &gdir, name.clone()) {
                    lock(&loaded).push(entry);
                }
            });
        }
    });
    Ok(loaded.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner).into_iter().collect())
}

/// Loads one group of the data directory: `None` if the directory is not a group.
fn load_group(
    fs: &Arc<dyn Storage>,
    config: &TargetConfig,
    opts: GroupOptions,
    gdir: &std::path::Path,
    name: String,
) -> Option<(String, GroupEntry)> {
    if check_name("group", &name).is_err() {
        log::warn!("ignoring {}: not a group directory", gdir.join(&name).display());
        return None;
    }
    let paths = GroupPaths::new(&config.data_dir, &name);
    if !fs.exists(&paths.meta()) {
        log::warn!(
            "ignoring {}: its creation was interrupted (no group.toml); it holds nothing acknowledged and is recreated at the engine's next hello",
            paths.dir.display()
        );
        return None;
    }
    match failover::load(fs.as_ref(), &name, &paths) {
        Ok(None) => {}
        Ok(Some(state)) => {
            let why = state.refusal(&name);
            if state.state == Stage::Requested {
                // Asked for while no daemon ran, or the daemon stopped before it released
                // the group: release it now, before anything is served.
                if let Err(e) = failover::release_offline(fs, paths, &name, opts, state) {
                    let why = error_chain(&e);
                    log::error!("group {name:?} cannot be released for its failover and will not be served: {why}");
                    return Some((name, GroupEntry::Broken(why)));
                }
            }
            log::info!("group {name:?} is not served: {why}");
            return Some((name, GroupEntry::FailedOver(why)));
        }
        Err(e) => {
            let why = error_chain(&e);
            log::error!("group {name:?} will not be served: {why}");
            return Some((name, GroupEntry::Broken(why)));
        }
    }
    match Group::load(Arc::clone(fs), paths, &name, opts) {
        Ok(g) => Some((name, GroupEntry::Ready(Arc::new(g)))),
        Err(e) => {
            let why = error_chain(&e);
            log::error!("group {name:?} cannot be loaded and will not be served: {why}");
            Some((name, GroupEntry::Broken(why)))
        }
    }
}

fn maintenance_loop(shared: &Arc<Shared>, stop: &Receiver<()>) {
    let mut last = std::time::Instant::now();
    // Freed buffers of idle groups and connections go back to the system.
    let mut trimmer = hindsight_consistency::memory::Trimmer::default();
    loop {
        match stop.recv_timeout(FAILOVER_LOOK) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let asked = shared.config.data_dir.join(FAILOVER_ASKED);
        let due = last.elapsed() >= MAINTENANCE_INTERVAL;
        if shared.fs.exists(&asked) {
            // Removed first: a request made while the groups are looked at leaves it again.
            let _ = shared.fs.remove_file(&asked);
            release::look_for_failovers(shared);
        } else if due {
            release::look_for_failovers(shared);
        }
        if !due {
            continue;
        }
        last = std::time::Instant::now();
        for g in shared.ready_groups() {
            g.maintain(false);
        }
        trimmer.tick();
    }
}
