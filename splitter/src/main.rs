//! `hindsight-agent --config agent.toml`: gives the guest a kernel block device (ublk or nbd)
//! and/or an NBD server for each configured local disk, and replicates every write to the
//! engine. Runs until SIGTERM or SIGINT, which remove the kernel devices (after the requests
//! in flight) and exit 0. Everything acknowledged to the guest is durable at the engine, so a
//! crash loses nothing acknowledged; a ublk device left by a crashed agent waits for the next
//! agent, which recovers it.
//!
//! Exit codes: 0 after `--check` succeeds or after a stop signal, 2 when the configuration or
//! a local disk is unusable, 1 when running fails (engine unreachable or refusing, a device
//! that cannot be created, listener failure), 3 when `--check` finds that this kernel lacks a
//! front end the configuration asks for (the start would fail until it is loaded).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use hindsight_consistency::config::EngineLoss;
use hindsight_consistency::config::{AgentConfig, DiskConfig};
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::wire::DiskHello;
use hindsight_splitter::block::BlockDevice;
use hindsight_splitter::dirty::DirtyMap;
use hindsight_splitter::engine_link::{EngineLink, LinkConfig};
use hindsight_splitter::frontend::{self, Attached};
use hindsight_splitter::nbd::{Listen, NbdServer};
use hindsight_splitter::replicated::Tracking;
use hindsight_splitter::replicated::{LocalDisk, ReplicatedDisk};
use hindsight_splitter::resync;
use log::{error, info};
use nix::sys::signal::{SigSet, Signal};

/// How long the agent waits at start for an engine that is not up yet.
const STARTUP_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// hindsight-agent: serves local disks over NBD and replicates every write to the engine.
#[derive(Parser)]
#[command(name = "hindsight-agent", version)]
struct Args {
    /// The agent configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Only check the configuration and the local disks, then exit.
    #[arg(long)]
    check: bool,
}

/// Why the agent stops; each kind has its exit code.
enum Failure {
    /// The configuration or a local disk is unusable (exit 2).
    Config(String),
    /// Running failed (exit 1).
    Runtime(String),
    /// `--check`: a kernel front end the configuration asks for is missing here (exit 3).
    Unavailable(String),
}

/// One configured disk, checked and opened.
struct Opened<'a> {
    config: &'a DiskConfig,
    listen: Option<Listen>,
    local: LocalDisk,
}

fn open_disks<'a>(file: &Path, config: &'a AgentConfig) -> Result<Vec<Opened<'a>>, Failure> {
    if config.disks.len() > usize::from(u16::MAX) {
        return Err(Failure::Config(format!(
            "{}: {} disks are configured; at most {} can be served",
            file.display(),
            config.disks.len(),
            u16::MAX
        )));
    }
    let mut opened = Vec::new();
    for d in &config.disks {
        let fail = |e: &dyn std::error::Error| {
            Failure::Config(format!("{}: disk {:?}: {}", file.display(), d.volume, hindsight_consistency::error_chain(e)))
        };
        let listen: Option<Listen> = d.listen.as_deref().map(str::parse).transpose().map_err(|e| fail(&e))?;
        let local = LocalDisk::open(&StdStorage, &d.path).map_err(|e| fail(&e))?;
        opened.push(Opened { config: d, listen, local });
    }
    Ok(opened)
}

type Exports = Vec<(String, Arc<dyn BlockDevice>)>;
/// Volume, group, size.
type Served = Vec<(String, String, u64)>;
/// One NBD server: its address, its exports, and what it serves (for the log).
type Server = (Listen, Exports, Served);

/// Gives one disk its kernel device (if configured) and its place on an NBD server (if it
/// listens). On failure every kernel device made so far is removed.
fn serve_disk(
    attached: &mut Vec<(String, Attached)>,
    servers: &mut Vec<Server>,
    config: &DiskConfig,
    listen: Option<Listen>,
    volume: &str,
    size: u64,
    device: Arc<dyn BlockDevice>,
) -> Result<(), Failure> {
    if let Some(frontend) = &config.frontend {
        match frontend::attach(frontend, Arc::clone(&device), volume) {
            Ok(a) => {
                info!("volume {volume} of group {} attached as {} ({}, size {size})", config.group, a.path().display(), a.kind());
                attached.push((volume.to_owned(), a));
            }
            Err(e) => {
                release(std::mem::take(attached));
                return Err(Failure::Runtime(format!("volume {volume}: cannot create its {} device: {e}", frontend.kind)));
            }
        }
    }
    let Some(listen) = listen else { return Ok(()) };
    let line = (volume.to_owned(), config.group.clone(), size);
    let export = (volume.to_owned(), device);
    match servers.iter_mut().find(|(l, _, _)| *l == listen) {
        Some((_, exports, lines)) => {
            exports.push(export);
            lines.push(line);
        }
        None => servers.push((listen, vec![export], vec![line])),
    }
    Ok(())
}

/// Removes the kernel devices, each after its requests in flight.
fn release(attached: Vec<(String, Attached)>) {
    for (volume, device) in attached {
        let path = device.path();
        if let Err(e) = device.stop(&volume) {
            error!("volume {volume}: removing {}: {e}", path.display());
        }
    }
}

/// Blocks SIGTERM and SIGINT in every thread (call before starting any) and delivers them on
/// a channel instead, so a stop removes the kernel devices cleanly.
fn stop_signals() -> Result<crossbeam_channel::Receiver<Signal>, Failure> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(|e| Failure::Runtime(format!("cannot block stop signals: {e}")))?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Failure::Runtime(format!("cannot start a thread: {e}")))?;
    Ok(rx)
}

fn run(args: &Args) -> Result<(), Failure> {
    let file = &args.config;
    let config = AgentConfig::load(file).map_err(|e| Failure::Config(e.to_string()))?;
    let disks = open_disks(file, &config)?;
    if args.check {
        println!("{}: vm {:?}, engine {}, {} disk(s):", file.display(), config.vm, config.engine, disks.len());
        match config.security.tls() {
            Some(t) => println!(
                "  TLS as {}; the engine's certificate must be issued by {} and valid for {}",
                t.own(),
                t.files().ca.display(),
                config.engine_server_name
            ),
            None => println!("  plaintext (tls.insecure_plaintext = true): nothing is encrypted or authenticated"),
        }
        let mut unavailable = Vec::new();
        for d in &disks {
            let mut served = Vec::new();
            if let Some(f) = &d.config.frontend {
                let device = f.device.as_ref().map_or_else(|| "first free device".to_string(), |p| p.display().to_string());
                // What the start would do: a front end this kernel lacks stops it.
                match frontend::check_available(f.kind) {
                    Ok(()) => served.push(format!("{} device ({device})", frontend::resolve(f.kind))),
                    Err(e) => {
                        served.push(format!("{} device ({device}): NOT AVAILABLE on this kernel", f.kind));
                        unavailable.push(format!("volume {}: {e}", d.config.volume));
                    }
                }
            }
            if let Some(l) = &d.listen {
                served.push(format!("NBD on {l}"));
            }
            println!(
                "  volume {} of group {}: {} ({} bytes), served as {}",
                d.config.volume,
                d.config.group,
                d.local.path().display(),
                d.local.size(),
                served.join(" and ")
            );
        }
        if !unavailable.is_empty() {
            return Err(Failure::Unavailable(format!("the agent would not start here: {}", unavailable.join("; "))));
        }
        return Ok(());
    }

    // A front end the kernel lacks is known before anything starts.
    for d in &disks {
        if let Some(f) = &d.config.frontend {
            frontend::check_available(f.kind).map_err(|e| Failure::Runtime(format!("volume {}: {e}", d.config.volume)))?;
        }
    }
    hindsight_consistency::open_files::raise_limit();
    let signals = stop_signals()?;
    let link = EngineLink::connect(LinkConfig {
        engine: config.engine.clone(),
        more_engines: config.more_engines.clone(),
        fixed_server_name: config.fixed_server_name,
        security: config.security.clone(),
        server_name: config.engine_server_name.clone(),
        vm: config.vm.clone(),
        disks: disks
            .iter()
            .map(|d| DiskHello { group: d.config.group.clone(), volume: d.config.volume.clone(), size: d.local.size() })
            .collect(),
        connect_wait: STARTUP_CONNECT_WAIT,
        engine_timeout: config.engine_timeout,
        quiescer: Some(hindsight_splitter::quiesce::Quiescer::new(config.quiesce.clone())),
        // The guest's own devices must come up, or be recovered after a crash, even while the
        // engine is away; an NBD server alone waits for it unless told otherwise.
        start_offline: config.start_offline || disks.iter().any(|d| d.config.frontend.is_some()),
    })
    .map_err(|e| Failure::Runtime(hindsight_consistency::error_chain(&e)))?;
    let link = Arc::new(link);

    let mut tracked: Vec<Arc<ReplicatedDisk>> = Vec::new();
    // Every disk, by disk number, for what the engine says of them.
    let mut numbered: Vec<Arc<ReplicatedDisk>> = Vec::new();
    let mut measured: Vec<(String, Arc<ReplicatedDisk>)> = Vec::new();
    let mut fresh_disks: Vec<Arc<ReplicatedDisk>> = Vec::new();
    let mut to_serve = Vec::with_capacity(disks.len());
    for (number, d) in disks.into_iter().enumerate() {
        let number = u16::try_from(number).expect("disk count checked in open_disks");
        let size = d.local.size();
        let volume = d.config.volume.clone();
        let map_path = d.config.dirty_map_path();
        if map_path == std::path::Path::new("none") {
            // No tracking: writes the engine does not take fail, and nothing is resynced.
            let replicated = Arc::new(ReplicatedDisk::new(d.local, Arc::clone(&link), number, volume.clone()));
            numbered.push(Arc::clone(&replicated));
            measured.push((d.config.group.clone(), Arc::clone(&replicated)));
            to_serve.push((d.config, d.listen, volume, size, replicated));
            continue;
        }
        let (map, fresh) = DirtyMap::open(&StdStorage, &map_path, size)
            .map_err(|e| Failure::Runtime(format!("volume {volume}: cannot open its dirty map {}: {e}", map_path.display())))?;
        let tracking = Tracking { map: Arc::new(map), keep_serving: config.on_engine_loss == EngineLoss::Track };
        let replicated = Arc::new(ReplicatedDisk::with_tracking(d.local, Arc::clone(&link), number, volume.clone(), tracking));
        if fresh {
            fresh_disks.push(Arc::clone(&replicated));
        }
        tracked.push(Arc::clone(&replicated));
        numbered.push(Arc::clone(&replicated));
        measured.push((d.config.group.clone(), Arc::clone(&replicated)));
        to_serve.push((d.config, d.listen, volume, size, replicated));
    }
    link.set_events(Arc::new(DiskEvents(numbered)));
    // Disks this agent has never served here: compare them with their replicas and send what
    // differs, all of them at once and the start of it before any disk is served.
    let sweeps = resync::initial_sync(&fresh_disks, &link);

    // One server per distinct listen address, in the order first named; kernel devices
    // attached one by one.
    let mut servers: Vec<Server> = Vec::new();
    let mut attached: Vec<(String, Attached)> = Vec::new();
    for (disk_config, listen, volume, size, replicated) in to_serve {
        let device: Arc<dyn BlockDevice> = replicated;
        serve_disk(&mut attached, &mut servers, disk_config, listen, &volume, size, device)?;
    }

    if let Some(addr) = config.metrics_listen {
        hindsight_splitter::metrics::serve(addr, config.vm.clone(), Arc::clone(&link), measured)
            .map_err(|e| Failure::Runtime(format!("agent.metrics_listen {addr}: cannot serve metrics there: {e}")))?;
    }
    resync::spawn(tracked, Arc::clone(&link), sweeps).map_err(|e| Failure::Runtime(format!("cannot start the resync thread: {e}")))?;
    // Every NBD server from one accept thread; none is a thread of its own while no client is
    // connected.
    let mut nbd = Vec::with_capacity(servers.len());
    let mut lines = Vec::with_capacity(servers.len());
    for (listen, exports, served) in servers {
        let spec = listen.to_string();
        match NbdServer::new(listen, exports) {
            Ok(server) => nbd.push(server),
            Err(e) => {
                release(attached);
                return Err(Failure::Runtime(format!("NBD server on {spec}: {}", hindsight_consistency::error_chain(&e))));
            }
        }
        lines.push(served);
    }
    let handle = if nbd.is_empty() {
        None
    } else {
        match NbdServer::spawn_all(nbd) {
            Ok(h) => Some(h),
            Err(e) => {
                release(attached);
                return Err(Failure::Runtime(hindsight_consistency::error_chain(&e)));
            }
        }
    };
    if let Some(h) = &handle {
        for (bound, served) in h.listens().iter().zip(lines) {
            for (volume, group, size) in served {
                info!("serving volume {volume} of group {group} on {bound} (size {size})");
            }
        }
    }
    // With no NBD server, only a signal ends the agent.
    let ended = handle.as_ref().map_or_else(crossbeam_channel::never, |h| h.ended().clone());
    crossbeam_channel::select! {
        recv(signals) -> sig => {
            info!("{} received: removing the kernel devices and stopping", sig.map_or_else(|_| "signal".to_string(), |s| s.to_string()));
            release(attached);
            // The NBD servers let their clients' requests in flight finish, close the
            // connections and remove their sockets.
            drop(handle);
            Ok(())
        }
        recv(ended) -> _ => {
            release(attached);
            let stopped = handle.map_or(Ok(()), hindsight_splitter::nbd::ServerHandle::wait);
            match stopped {
                Err(e) => Err(Failure::Runtime(format!("NBD server stopped: {}", hindsight_consistency::error_chain(&e)))),
                Ok(()) => Err(Failure::Runtime("the NBD servers stopped".to_string())),
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unavailable(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(3)
        }
    }
}

/// What the engine says of the disks, passed on to each by its disk number.
struct DiskEvents(Vec<Arc<ReplicatedDisk>>);

impl hindsight_splitter::engine_link::LinkEvents for DiskEvents {
    fn target_confirmed(&self, disk: u16, seq: u64) {
        if let Some(d) = self.0.get(usize::from(disk)) {
            d.target_confirmed(seq);
        }
    }

    fn resync_whole(&self, disk: u16) {
        if let Some(d) = self.0.get(usize::from(disk)) {
            d.resync_whole();
        }
    }
}
