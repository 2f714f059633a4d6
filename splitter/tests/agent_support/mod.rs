//! Shared pieces of the agent tests: a fake engine that speaks the wire protocol and records
//! every write it receives, and the agent run in-process or as the real binary.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fs;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use hindsight_consistency::region_hash::region_hash;
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::Security;
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, AgentHello, AgentWelcome, DiskHello, ErrorMessage, FrameType, HashReply,
    HashRequest, HashStatus, WriteAck, WriteMsg, PROTOCOL_VERSION,
};
use hindsight_consistency::WriteKind;
use hindsight_splitter::block::BlockDevice;
use hindsight_splitter::engine_link::{EngineLink, LinkConfig};
use hindsight_splitter::nbd::{Listen, NbdServer, ServerHandle};
use hindsight_splitter::replicated::{LocalDisk, ReplicatedDisk};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// One write as the fake engine received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which accepted connection (0 for the first) it came on.
    pub conn: usize,
    pub req_id: u64,
    pub disk: u16,
    pub kind: WriteKind,
    pub offset: u64,
    pub length: u32,
    pub data: Vec<u8>,
}

/// How the fake engine behaves; may be changed while it runs.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Answer every hello with this `Error` message.
    pub refuse: Option<String>,
    /// Delay each acknowledgement by this much.
    pub ack_delay: Duration,
    /// Vary each delay between zero and twice `ack_delay`, so acks go out of order.
    pub shuffle: bool,
    /// Status of every acknowledgement (0: success, else an errno).
    pub status: u32,
    /// Close the first connection as soon as it has brought this many writes, leaving the
    /// acknowledgements not yet sent unsent. Later connections are served normally.
    pub drop_after: Option<usize>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    writes: Mutex<Vec<Received>>,
    /// (connection, req_id) of every acknowledgement written to a socket.
    acked: Mutex<HashSet<(usize, u64)>>,
    hellos: Mutex<Vec<AgentHello>>,
    streams: Mutex<Vec<TcpStream>>,
    conns: AtomicUsize,
    dropped: AtomicBool,
    stopping: AtomicBool,
    /// Held while a frame is written to an agent (acknowledgements and hash replies come
    /// from two threads).
    sending: Mutex<()>,
}

/// An engine stand-in on 127.0.0.1: answers the hello, records every write in the order
/// received and acknowledges it as [`Behaviour`] says.
pub struct FakeEngine {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeEngine {
    /// Starts on a free port.
    pub fn start(behaviour: Behaviour) -> FakeEngine {
        FakeEngine::start_on("127.0.0.1:0".parse().unwrap(), behaviour)
    }

    /// Starts on `addr` (to come back on the port of an engine that was stopped).
    pub fn start_on(addr: SocketAddr, behaviour: Behaviour) -> FakeEngine {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            writes: Mutex::new(Vec::new()),
            acked: Mutex::new(HashSet::new()),
            hellos: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            sending: Mutex::new(()),
        });
        let s = Arc::clone(&shared);
        let accept = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = Arc::clone(&s);
                thread::spawn(move || serve(&s, stream));
            }
        });
        FakeEngine { addr, shared, accept: Some(accept) }
    }

    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut lock(&self.shared.behaviour));
    }

    /// Every write received so far, in order.
    pub fn writes(&self) -> Vec<Received> {
        lock(&self.shared.writes).clone()
    }

    pub fn write_count(&self) -> usize {
        lock(&self.shared.writes).len()
    }

    pub fn acked(&self) -> HashSet<(usize, u64)> {
        lock(&self.shared.acked).clone()
    }

    pub fn hellos(&self) -> Vec<AgentHello> {
        lock(&self.shared.hellos).clone()
    }

    /// Connections that sent a hello.
    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// Closes every open connection (the listener stays).
    pub fn drop_connections(&self) {
        for s in lock(&self.shared.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Applies every received write of `disk`, in order, to a zeroed image of `size` bytes.
    pub fn replay(&self, disk: u16, size: u64) -> Vec<u8> {
        replay(&lock(&self.shared.writes), disk, size)
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_connections();
    }
}

/// Mixes a number into a well-spread value (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn serve(s: &Arc<Shared>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    let Ok(FrameType::AgentHello) = read_frame(&mut stream, &mut payload) else {
        return;
    };
    let hello: AgentHello = decode_message("AgentHello", &payload).unwrap();
    let sizes: Vec<u64> = hello.disks.iter().map(|d| d.size).collect();
    lock(&s.hellos).push(hello);
    let behaviour = lock(&s.behaviour).clone();
    if let Some(message) = behaviour.refuse {
        let msg = encode_message(&ErrorMessage { message });
        let _ = write_frame(&mut stream, FrameType::Error, &msg, &mut scratch);
        return;
    }
    let welcome = encode_message(&AgentWelcome { protocol: PROTOCOL_VERSION, engine: "fake".into(), resync: Vec::new() });
    if write_frame(&mut stream, FrameType::AgentWelcome, &welcome, &mut scratch).is_err() {
        return;
    }
    let conn = s.conns.fetch_add(1, Ordering::SeqCst);
    lock(&s.streams).push(stream.try_clone().unwrap());
    let (tx, rx) = crossbeam_channel::unbounded();
    let acker = {
        let s = Arc::clone(s);
        let w = stream.try_clone().unwrap();
        thread::spawn(move || send_acks(&s, w, &rx, conn))
    };
    let mut count = 0;
    while let Ok(ftype) = read_frame(&mut stream, &mut payload) {
        if ftype == FrameType::HashRequest {
            // Answered as a target would: the hashes of what this engine holds, which is
            // shipped at once.
            let req: HashRequest = decode_message("HashRequest", &payload).unwrap();
            let size = sizes[usize::from(req.disk)];
            let image = replay(&lock(&s.writes), req.disk, size);
            let hashes = req
                .regions
                .iter()
                .map(|&r| {
                    let start = usize::try_from(r << req.region_shift).unwrap();
                    let end = usize::try_from(((r + 1) << req.region_shift).min(size)).unwrap();
                    region_hash(&image[start..end])
                })
                .collect();
            let reply = HashReply { id: req.id, status: HashStatus::Ok, seq: 0, hashes, message: String::new() };
            let _held = lock(&s.sending);
            let _ = write_frame(&mut stream, FrameType::HashReply, &encode_message(&reply), &mut scratch);
            continue;
        }
        if ftype == FrameType::ResyncProgress {
            continue;
        }
        assert_eq!(ftype, FrameType::Write, "agent sent a {ftype:?} frame");
        let (msg, data) = WriteMsg::decode(&payload).unwrap();
        let WriteMsg { req_id, offset, length, disk, kind } = msg;
        lock(&s.writes).push(Received { conn, req_id, disk, kind, offset, length, data: data.to_vec() });
        count += 1;
        let b = lock(&s.behaviour).clone();
        let delay = if b.shuffle { b.ack_delay * u32::try_from(mix(req_id) % 201).unwrap() / 100 } else { b.ack_delay };
        let ack = WriteAck { req_id, seq: if b.status == 0 { req_id } else { 0 }, status: b.status };
        let _ = tx.send((Instant::now() + delay, req_id, ack));
        if conn == 0 && b.drop_after.is_some_and(|n| count >= n) && !s.dropped.swap(true, Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
            break;
        }
    }
    drop(tx);
    let _ = acker.join();
}

/// The image of disk `disk` after `writes`, in order.
fn replay(writes: &[Received], disk: u16, size: u64) -> Vec<u8> {
    let mut image = vec![0u8; usize::try_from(size).unwrap()];
    for w in writes.iter().filter(|w| w.disk == disk) {
        let start = usize::try_from(w.offset).unwrap();
        let end = start + w.length as usize;
        match w.kind {
            WriteKind::Data | WriteKind::Resync => image[start..end].copy_from_slice(&w.data),
            WriteKind::Zeroes | WriteKind::Trim => image[start..end].fill(0),
            k => panic!("a Write message can never carry a {} record", k.as_str()),
        }
    }
    image
}

/// Sends acknowledgements when they fall due; on a closed connection the rest are dropped.
fn send_acks(s: &Shared, mut w: TcpStream, rx: &Receiver<(Instant, u64, WriteAck)>, conn: usize) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut acks = std::collections::HashMap::new();
    let mut scratch = Vec::new();
    loop {
        while let Some(&Reverse((due, req_id))) = heap.peek() {
            if due > Instant::now() {
                break;
            }
            heap.pop();
            let ack: WriteAck = acks.remove(&req_id).unwrap();
            let held = lock(&s.sending);
            if write_frame(&mut w, FrameType::WriteAck, &ack.encode(), &mut scratch).is_err() {
                return;
            }
            drop(held);
            lock(&s.acked).insert((conn, req_id));
        }
        let next = match heap.peek() {
            Some(Reverse((due, _))) => rx.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((due, req_id, ack)) => {
                heap.push(Reverse((due, req_id)));
                acks.insert(req_id, ack);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The agent's parts run in this process: replicated disks over zeroed files in a temporary
/// directory, served by one NBD server on a unix socket.
pub struct InProcessAgent {
    pub dir: tempfile::TempDir,
    pub link: Arc<EngineLink>,
    pub devices: Vec<Arc<ReplicatedDisk>>,
    server: Option<ServerHandle>,
}

impl InProcessAgent {
    /// Disk numbers follow the order of `volumes` (name, size), all in group "g".
    pub fn start(engine: SocketAddr, volumes: &[(&str, u64)], engine_timeout: Duration) -> InProcessAgent {
        Self::start_with(engine, volumes, engine_timeout, false)
    }

    /// As [`InProcessAgent::start`]; with `start_offline` an engine that is not up yet is not
    /// an error (the link starts disconnected and keeps trying).
    pub fn start_with(engine: SocketAddr, volumes: &[(&str, u64)], engine_timeout: Duration, start_offline: bool) -> InProcessAgent {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let mut locals = Vec::new();
        for (name, size) in volumes {
            let path = dir.path().join(format!("{name}.img"));
            fs::File::create(&path).unwrap().set_len(*size).unwrap();
            locals.push(LocalDisk::open(&StdStorage, &path).unwrap());
        }
        let link = Arc::new(
            EngineLink::connect(LinkConfig {
                engine: engine.to_string(),
                more_engines: Vec::new(),
                fixed_server_name: false,
                security: Security::InsecurePlaintext,
                server_name: engine.ip().to_string(),
                vm: "vm1".into(),
                disks: volumes.iter().map(|(name, size)| DiskHello { group: "g".into(), volume: (*name).into(), size: *size }).collect(),
                connect_wait: if start_offline { Duration::from_millis(300) } else { Duration::from_secs(5) },
                engine_timeout,
                quiescer: None,
                start_offline,
            })
            .unwrap(),
        );
        let mut devices = Vec::new();
        let mut exports: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
        for (number, (local, (name, _))) in locals.into_iter().zip(volumes).enumerate() {
            let number = u16::try_from(number).unwrap();
            let dev = Arc::new(ReplicatedDisk::new(local, Arc::clone(&link), number, (*name).into()));
            devices.push(Arc::clone(&dev));
            exports.push(((*name).into(), dev));
        }
        let listen = Listen::Unix(dir.path().join("nbd.sock"));
        let server = NbdServer::new(listen, exports).unwrap().spawn().unwrap();
        InProcessAgent { dir, link, devices, server: Some(server) }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket().display())
    }

    pub fn local(&self, volume: &str) -> Vec<u8> {
        fs::read(self.dir.path().join(format!("{volume}.img"))).unwrap()
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
    }
}

/// Writes an agent.toml serving `volumes` (name, path) of group "g" on one unix socket.
pub fn write_agent_toml(dir: &Path, engine: &str, volumes: &[(&str, &Path)], socket: &Path) -> PathBuf {
    let mut text = format!("[agent]\nengine = \"{engine}\"\nvm = \"vm1\"\n\n[tls]\ninsecure_plaintext = true\n");
    for (name, path) in volumes {
        text.push_str(&format!(
            "\n[[disk]]\ngroup = \"g\"\nvolume = \"{name}\"\npath = \"{}\"\nlisten = \"unix:{}\"\n",
            path.display(),
            socket.display()
        ));
    }
    let file = dir.join("agent.toml");
    fs::write(&file, text).unwrap();
    file
}

/// The real `hindsight-agent` binary running in the background; killed on drop. Its
/// standard error goes to `log`.
pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn spawn(config: &Path, log: &Path) -> AgentProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_hindsight-agent"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        AgentProcess { child, log: log.to_owned() }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says `needle`; panics if the agent exits first or it takes
    /// longer than `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "agent did not log {needle:?} within {timeout:?}:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on (bound, then released).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
