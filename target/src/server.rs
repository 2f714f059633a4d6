//! The daemon: the listener, one thread per engine connection, and the maintenance thread
//! that checkpoints replicas and applies retention.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hindsight_consistency::config::{check_name, EngineTrust, JournalFull, TargetConfig};
use hindsight_consistency::storage::Storage;
use hindsight_consistency::transport::{AcceptError, Peer, ReadHalf, Role, TransportError, WriteHalf};
use hindsight_consistency::wire::frame::whole_frame_buffered;
use hindsight_consistency::wire::{
    decode_message, decompress_records, encode_confirm, encode_message, read_frame, write_frame, ErrorMessage, FrameError, FrameType,
    TargetHashRequest, TargetHello, TargetWelcome, LZ4, PROTOCOL_VERSION,
};

use crate::error::{data_dir_err, TargetError};
use crate::group::{error_chain, Group, GroupOptions};
use crate::layout::{groups_dir, GroupPaths, DAEMON_LOCK};
use crate::lock::{lock_file, FileLock, LockKind};
use crate::meta::GroupMeta;
use crate::Volume;

/// How often the maintenance thread runs (checkpoints, retention).
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// Socket read buffer: big enough to see that several small frames are already waiting.
const READ_BUFFER: usize = 2 << 20;
/// Most frames and bytes journaled with one commit.
const MAX_BATCH_FRAMES: usize = 64;
const MAX_BATCH_BYTES: usize = 32 << 20;
/// A peer that takes longer than this to accept our bytes is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A group as the daemon holds it.
enum GroupEntry {
    Ready(Arc<Group>),
    /// It could not be loaded at start-up; engines are told why.
    Broken(String),
}

/// State shared by the daemon's threads.
struct Shared {
    config: TargetConfig,
    fs: Arc<dyn Storage>,
    opts: GroupOptions,
    groups: Mutex<BTreeMap<String, GroupEntry>>,
    stop: AtomicBool,
    /// Open engine connections, so that shutdown can close them.
    conns: Mutex<HashMap<u64, TcpStream>>,
    conn_threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&shared.conn_threads));
        for t in threads {
            let _ = t.join();
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

impl Shared {
    fn ready_groups(&self) -> Vec<Arc<Group>> {
        lock(&self.groups)
            .values()
            .filter_map(|e| match e {
                GroupEntry::Ready(g) => Some(Arc::clone(g)),
                GroupEntry::Broken(_) => None,
            })
            .collect()
    }

    /// The group named in a hello, created if it is new.
    fn group_for_hello(&self, hello: &TargetHello, volumes: &[Volume]) -> Result<Arc<Group>, String> {
        let mut groups = lock(&self.groups);
        match groups.get(&hello.group) {
            Some(GroupEntry::Ready(g)) => return Ok(Arc::clone(g)),
            Some(GroupEntry::Broken(why)) => {
                return Err(format!("group {:?} could not be loaded at start-up ({why}); fix it and restart the target", hello.group))
            }
            None => {}
        }
        let paths = GroupPaths::new(&self.config.data_dir, &hello.group);
        let meta = GroupMeta::new(hello.engine.clone(), volumes.to_vec());
        match Group::create(Arc::clone(&self.fs), paths, &hello.group, meta, self.opts) {
            Ok(g) => {
                let g = Arc::new(g);
                groups.insert(hello.group.clone(), GroupEntry::Ready(Arc::clone(&g)));
                Ok(g)
            }
            Err(e) => {
                let why = error_chain(&e);
                log::error!("group {:?}: cannot be created: {why}", hello.group);
                Err(format!("group {:?} cannot be created at the target: {why}", hello.group))
            }
        }
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
    let mut out = BTreeMap::new();
    for name in names {
        if check_name("group", &name).is_err() {
            log::warn!("ignoring {}: not a group directory", gdir.join(&name).display());
            continue;
        }
        let paths = GroupPaths::new(&config.data_dir, &name);
        if !fs.exists(&paths.meta()) {
            log::warn!(
                "ignoring {}: its creation was interrupted (no group.toml); it holds nothing acknowledged and is recreated at the engine's next hello",
                paths.dir.display()
            );
            continue;
        }
        match Group::load(Arc::clone(fs), paths, &name, opts) {
            Ok(g) => {
                out.insert(name, GroupEntry::Ready(Arc::new(g)));
            }
            Err(e) => {
                let why = error_chain(&e);
                log::error!("group {name:?} cannot be loaded and will not be served: {why}");
                out.insert(name, GroupEntry::Broken(why));
            }
        }
    }
    Ok(out)
}

fn maintenance_loop(shared: &Shared, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(MAINTENANCE_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        for g in shared.ready_groups() {
            g.maintain(false);
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let registered = stream.try_clone().map(|c| lock(&shared.conns).insert(id, c));
                if let Err(e) = registered {
                    log::warn!("engine connection from {peer}: {e}; closing it");
                    continue;
                }
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new().name(format!("target-conn-{id}")).spawn(move || {
                    serve_connection(&s, stream, peer);
                    lock(&s.conns).remove(&id);
                });
                let mut threads = lock(&shared.conn_threads);
                threads.retain(|t| !t.is_finished());
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        log::error!("engine connection from {peer}: cannot start a thread ({e}); closing it");
                        if let Some(s) = lock(&shared.conns).remove(&id) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                log::warn!("accepting on {}: {e}", shared.config.listen);
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Sends an `Error` frame (best effort): the peer learns why before the connection closes.
fn send_error(stream: &mut impl Write, message: &str) {
    let mut scratch = Vec::new();
    let payload = encode_message(&ErrorMessage { message: message.to_owned() });
    let _ = write_frame(stream, FrameType::Error, &payload, &mut scratch);
    let _ = stream.flush();
}

/// Which engine a connection is, if its certificate lets it ship here: `Ok(None)` on
/// plaintext (nobody is authenticated), `Ok(Some(name))` for a trusted engine.
fn authorise_engine(peer: &Peer, trust: &EngineTrust) -> Result<Option<String>, String> {
    let Peer::Certified(id) = peer else { return Ok(None) };
    let mut names = id.names(Role::Engine);
    let Some(first) = names.next() else {
        return Err(format!("its certificate names {id}, not an engine (a name ending in .engine.hindsight); nothing was written"));
    };
    match trust {
        EngineTrust::AnyCertified => Ok(Some(first.to_owned())),
        EngineTrust::Named(allowed) => match std::iter::once(first).chain(names).find(|n| allowed.iter().any(|a| a == n)) {
            Some(n) => Ok(Some(n.to_owned())),
            None => Err(format!(
                "engine {first} is not trusted here: tls.engines in target.toml lists {}; add it there to let it ship \
                 (nothing was written)",
                allowed.join(", ")
            )),
        },
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    // Shuts the reading side to wake the receive loop if the group is poisoned meanwhile.
    let waker = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("engine connection from {peer}: {e}; closing it");
            return;
        }
    };
    let setup =
        stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true)).and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("engine connection from {peer}: socket setup failed: {e}");
        return;
    }
    let conn = match shared.config.security.accept(stream) {
        Ok(c) => c,
        Err(AcceptError::Plaintext(mut c)) => {
            log::warn!("engine connection from {peer} refused: it does not use TLS, and this target requires it; nothing it sent is read");
            send_error(&mut c, "this target requires TLS: give [tls] ca, cert and key in engine.toml (docs/security.md)");
            c.close();
            return;
        }
        Err(AcceptError::Failed(TransportError::ClosedEarly)) => return,
        Err(AcceptError::Failed(e)) => {
            log::warn!("engine connection from {peer} refused: {e}; nothing is accepted from it");
            return;
        }
    };
    let certified = conn.peer().clone();
    let (read_half, mut writer) = conn.split();
    if let Err(e) = writer.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("engine connection from {peer}: socket setup failed: {e}");
        return;
    }
    let engine_name = match authorise_engine(&certified, &shared.config.engines) {
        Ok(n) => n,
        Err(why) => {
            log::warn!("engine connection from {peer} refused: {why}");
            send_error(&mut writer, &why);
            writer.close();
            return;
        }
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER, read_half);
    let mut payload = Vec::new();

    let hello = match read_frame(&mut reader, &mut payload) {
        Ok(FrameType::TargetHello) => match decode_message::<TargetHello>("TargetHello", &payload) {
            Ok(h) => h,
            Err(e) => {
                log::warn!("engine connection from {peer}: {e}");
                send_error(&mut writer, &e.to_string());
                return;
            }
        },
        Ok(other) => {
            let e = FrameError::Unexpected { got: other, expected: "TargetHello" };
            log::warn!("engine connection from {peer}: {e}");
            send_error(&mut writer, &e.to_string());
            return;
        }
        Err(FrameError::Closed) => return,
        Err(e) => {
            log::warn!("engine connection from {peer}: {e}");
            return;
        }
    };
    if let Some(name) = &engine_name {
        if &hello.engine != name {
            let why = format!("the hello names engine {:?} but its certificate names engine {name:?}; nothing was written", hello.engine);
            log::warn!("engine connection from {peer} refused: {why}");
            send_error(&mut writer, &why);
            return;
        }
    }
    let volumes = match check_hello(&hello) {
        Ok(v) => v,
        Err(why) => {
            log::warn!("engine {} at {peer}: hello refused: {why}", hello.engine);
            send_error(&mut writer, &why);
            return;
        }
    };
    let group = match shared.group_for_hello(&hello, &volumes) {
        Ok(g) => g,
        Err(why) => {
            send_error(&mut writer, &why);
            return;
        }
    };
    let _claim = match group.claim(&hello.engine) {
        Ok(c) => c,
        Err(why) => {
            log::warn!("engine {} at {peer}: {why}; refused", hello.engine);
            send_error(&mut writer, &why);
            return;
        }
    };
    // Cleared when the claim is dropped.
    group.on_poison(Some(Box::new(move || {
        let _ = waker.shutdown(Shutdown::Read);
    })));
    let policy = match JournalFull::parse(&hello.on_journal_full) {
        Some(p) => p,
        None => {
            let why = format!(
                "group {:?}: on_journal_full {:?} is not a policy this target knows; run matching hindsight versions",
                hello.group, hello.on_journal_full
            );
            log::warn!("engine {} at {peer}: hello refused: {why}", hello.engine);
            send_error(&mut writer, &why);
            return;
        }
    };
    let durable = match group.accept_hello(&hello.engine, &volumes, policy) {
        Ok(d) => d,
        Err(why) => {
            log::warn!("engine {} at {peer}: hello for group {:?} refused: {why}", hello.engine, hello.group);
            send_error(&mut writer, &why);
            return;
        }
    };
    let mut scratch = Vec::new();
    // The first compression offered that this target knows.
    let compression = hello.compression.iter().find(|c| c.as_str() == LZ4).cloned().unwrap_or_default();
    let welcome = encode_message(&TargetWelcome { protocol: PROTOCOL_VERSION, durable_seq: durable, compression: compression.clone() });
    if let Err(e) = write_frame(&mut writer, FrameType::TargetWelcome, &welcome, &mut scratch) {
        log::warn!("engine {} at {peer}: sending the welcome: {e}", hello.engine);
        return;
    }
    let how = if compression.is_empty() { String::new() } else { format!(", {compression}") };
    log::info!("engine {} at {peer} ({certified}) ships group {:?}; resuming after seq {durable}{how}", hello.engine, hello.group);

    let ctx = format!("engine {} at {peer}, group {:?}", hello.engine, hello.group);
    receive_loop(shared, &group, &mut reader, &mut writer, &ctx);
}

/// Checks what a hello says before anything is created from it.
fn check_hello(h: &TargetHello) -> Result<Vec<Volume>, String> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "the engine speaks protocol version {}, this target speaks {PROTOCOL_VERSION}; run matching hindsight versions",
            h.protocol
        ));
    }
    check_name("group", &h.group).map_err(|e| e.to_string())?;
    if h.volumes.is_empty() {
        return Err(format!("group {:?}: the hello lists no volumes", h.group));
    }
    let mut out: Vec<Volume> = Vec::with_capacity(h.volumes.len());
    for v in &h.volumes {
        check_name("volume", &v.name).map_err(|e| format!("group {:?}: {e}", h.group))?;
        if v.size == 0 {
            return Err(format!("group {:?}: volume {:?} has size 0", h.group, v.name));
        }
        if out.iter().any(|o| o.name == v.name) {
            return Err(format!("group {:?}: volume {:?} is listed twice", h.group, v.name));
        }
        out.push(Volume { name: v.name.clone(), vm: v.vm.clone(), size: v.size });
    }
    Ok(out)
}

/// Reads `Records` frames, journals them in batches (one commit for the frames that have
/// already arrived together) and confirms each batch as soon as it is committed; the group's
/// applier applies it to the replicas meanwhile. A `TargetHashRequest` ends a batch and is
/// answered once every record before it is applied.
fn receive_loop(shared: &Shared, group: &Group, reader: &mut BufReader<ReadHalf>, writer: &mut WriteHalf, ctx: &str) {
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut scratch = Vec::new();
    let mut packed = Vec::new();
    loop {
        // One frame, waiting for it; then any that are already here.
        let mut pending_error: Option<(FrameError, bool)> = None;
        let mut hash_request: Option<Vec<u8>> = None;
        let mut bytes = 0;
        loop {
            let mut payload = group.buffer();
            match read_frame(reader, &mut payload) {
                Ok(FrameType::Records) => {
                    bytes += payload.len();
                    batch.push(payload);
                }
                Ok(FrameType::RecordsLz4) => {
                    std::mem::swap(&mut packed, &mut payload);
                    match decompress_records(&packed, &mut payload) {
                        Ok(()) => {
                            bytes += payload.len();
                            batch.push(payload);
                        }
                        Err(e) => pending_error = Some((e, true)),
                    }
                }
                Ok(FrameType::Error) => {
                    let msg = decode_message::<ErrorMessage>("Error", &payload).map(|m| m.message).unwrap_or_else(|e| e.to_string());
                    pending_error = Some((FrameError::Peer(msg), false));
                }
                Ok(FrameType::TargetHashRequest) => hash_request = Some(payload),
                Ok(other) => pending_error = Some((FrameError::Unexpected { got: other, expected: "Records" }, true)),
                Err(e) => pending_error = Some((e, false)),
            }
            if pending_error.is_some()
                || hash_request.is_some()
                || batch.len() >= MAX_BATCH_FRAMES
                || bytes >= MAX_BATCH_BYTES
                || !whole_frame_buffered(reader.buffer())
            {
                break;
            }
        }
        if !batch.is_empty() {
            let receipt = group.receive(&mut batch);
            if let Err(e) = write_frame(writer, FrameType::Confirm, &encode_confirm(receipt.durable_seq), &mut scratch) {
                log::warn!("{ctx}: sending Confirm({}): {e}; closing", receipt.durable_seq);
                return;
            }
            if let Some(why) = receipt.error {
                log::error!("{ctx}: {why}; closing the connection");
                send_error(writer, &why);
                return;
            }
            if let Some(full) = receipt.full {
                // The engine keeps the records and tries again later.
                let _ = write_frame(writer, FrameType::JournalState, &encode_message(&full), &mut scratch);
                let _ = writer.flush();
                log::debug!("{ctx}: journal full; told the engine and closed the connection");
                return;
            }
            if let Some(notice) = group.take_notice() {
                if let Err(e) = write_frame(writer, FrameType::JournalState, &encode_message(&notice), &mut scratch) {
                    log::warn!("{ctx}: sending JournalState: {e}; closing");
                    return;
                }
            }
        }
        if let Some(payload) = hash_request.take() {
            // Answered once every record sent before the request is applied (`with_replicas`
            // waits for the applier): the hashes are of that prefix.
            let reply = match decode_message::<TargetHashRequest>("TargetHashRequest", &payload) {
                Ok(req) => crate::hashes::answer(group, &req),
                Err(e) => {
                    log::warn!("{ctx}: {e}; closing the connection");
                    send_error(writer, &e.to_string());
                    return;
                }
            };
            if let Err(e) = write_frame(writer, FrameType::TargetHashReply, &encode_message(&reply), &mut scratch) {
                log::warn!("{ctx}: sending TargetHashReply: {e}; closing");
                return;
            }
        }
        if let (Some(_), Some(why)) = (&pending_error, group.stopped()) {
            // The applier failed while the loop waited for frames (and woke it).
            log::error!("{ctx}: {why}; closing the connection");
            send_error(writer, &why);
            return;
        }
        match pending_error {
            None => {}
            Some((FrameError::Closed, _)) => {
                log::info!("{ctx}: the engine closed the connection");
                return;
            }
            Some((FrameError::Peer(msg), _)) => {
                log::warn!("{ctx}: the engine reported: {msg}; closing");
                return;
            }
            Some((e, tell)) => {
                if shared.stop.load(Ordering::SeqCst) {
                    log::info!("{ctx}: closed for shutdown");
                } else {
                    log::warn!("{ctx}: {e}; closing the connection, nothing of the bad frame is kept");
                    if tell || matches!(e, FrameError::Malformed(_)) {
                        send_error(writer, &format!("{e}"));
                    }
                }
                return;
            }
        }
    }
}
