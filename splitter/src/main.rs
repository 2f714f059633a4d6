//! `hindsight-agent --config agent.toml`: serves the configured local disks over NBD and
//! replicates every write to the engine. Runs until killed; everything acknowledged to a
//! client is durable at the engine, so SIGTERM's default handling loses nothing.
//!
//! Exit codes: 0 after `--check` succeeds, 2 when the configuration or a local disk is
//! unusable, 1 when running fails (engine unreachable or refusing, listener failure).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use hindsight_consistency::config::{AgentConfig, DiskConfig};
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::wire::DiskHello;
use hindsight_splitter::block::BlockDevice;
use hindsight_splitter::engine_link::{EngineLink, LinkConfig, ENGINE_TIMEOUT};
use hindsight_splitter::nbd::{Listen, NbdServer};
use hindsight_splitter::replicated::{LocalDisk, ReplicatedDisk};
use log::info;

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
}

/// One configured disk, checked and opened.
struct Opened<'a> {
    config: &'a DiskConfig,
    listen: Listen,
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
        let listen: Listen = d.listen.parse().map_err(|e| fail(&e))?;
        let local = LocalDisk::open(&StdStorage, &d.path).map_err(|e| fail(&e))?;
        opened.push(Opened { config: d, listen, local });
    }
    Ok(opened)
}

fn run(args: &Args) -> Result<(), Failure> {
    let file = &args.config;
    let config = AgentConfig::load(file).map_err(|e| Failure::Config(e.to_string()))?;
    let disks = open_disks(file, &config)?;
    if args.check {
        println!("{}: vm {:?}, engine {}, {} disk(s):", file.display(), config.vm, config.engine, disks.len());
        for d in &disks {
            println!(
                "  volume {} of group {}: {} ({} bytes), served on {}",
                d.config.volume,
                d.config.group,
                d.local.path().display(),
                d.local.size(),
                d.listen
            );
        }
        return Ok(());
    }

    let link = EngineLink::connect(LinkConfig {
        engine: config.engine.clone(),
        vm: config.vm.clone(),
        disks: disks
            .iter()
            .map(|d| DiskHello { group: d.config.group.clone(), volume: d.config.volume.clone(), size: d.local.size() })
            .collect(),
        connect_wait: STARTUP_CONNECT_WAIT,
        engine_timeout: ENGINE_TIMEOUT,
        quiescer: Some(hindsight_splitter::quiesce::Quiescer::new(config.quiesce.clone())),
    })
    .map_err(|e| Failure::Runtime(hindsight_consistency::error_chain(&e)))?;
    let link = Arc::new(link);

    // One server per distinct listen address, in the order first named.
    type Exports = Vec<(String, Arc<dyn BlockDevice>)>;
    type Served = Vec<(String, String, u64)>; // volume, group, size
    let mut servers: Vec<(Listen, Exports, Served)> = Vec::new();
    for (number, d) in disks.into_iter().enumerate() {
        let number = u16::try_from(number).expect("disk count checked in open_disks");
        let size = d.local.size();
        let volume = d.config.volume.clone();
        let device = ReplicatedDisk::new(d.local, Arc::clone(&link), number, volume.clone());
        let line = (volume.clone(), d.config.group.clone(), size);
        let export: (String, Arc<dyn BlockDevice>) = (volume, Arc::new(device));
        match servers.iter_mut().find(|(l, _, _)| *l == d.listen) {
            Some((_, exports, lines)) => {
                exports.push(export);
                lines.push(line);
            }
            None => servers.push((d.listen, vec![export], vec![line])),
        }
    }

    let (stopped_tx, stopped_rx) = crossbeam_channel::unbounded();
    for (listen, exports, lines) in servers {
        let spec = listen.to_string();
        let handle = NbdServer::new(listen, exports)
            .and_then(NbdServer::spawn)
            .map_err(|e| Failure::Runtime(hindsight_consistency::error_chain(&e)))?;
        for (volume, group, size) in lines {
            info!("serving volume {volume} of group {group} on {} (size {size})", handle.listen());
        }
        let tx = stopped_tx.clone();
        thread::Builder::new()
            .name("nbd-wait".to_string())
            .spawn(move || {
                let _ = tx.send((spec, handle.wait()));
            })
            .map_err(|e| Failure::Runtime(format!("cannot start a thread: {e}")))?;
    }
    drop(stopped_tx);
    // A server's wait ends only when its accept loop fails.
    match stopped_rx.recv() {
        Ok((spec, Err(e))) => Err(Failure::Runtime(format!("NBD server on {spec} stopped: {}", hindsight_consistency::error_chain(&e)))),
        Ok((spec, Ok(()))) => Err(Failure::Runtime(format!("NBD server on {spec} stopped"))),
        Err(_) => Err(Failure::Runtime("every NBD server stopped".to_string())),
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
    }
}
