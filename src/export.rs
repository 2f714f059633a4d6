//! `hindsight export`: serves volumes of a group as they were at one point over NBD. The point
//! is opened through the target's point-in-time index ([`PointView`]), so it is ready at once
//! whatever the volume size and the journal length, and the group goes on receiving and
//! applying records meanwhile. The export holds the group's lock shared while it runs: the
//! point is pinned, and retention folds nothing until the export stops.
//!
//! Read-only by default (`NBD_FLAG_READ_ONLY`; a write gets EPERM). With `--writable`, writes
//! go to a scratch [`Overlay`] per volume under the group's `exports/` directory, deleted when
//! the export stops; with `--overlay DIR`, to an overlay kept in DIR and reused by a later
//! export of the same point. The NBD server is the agent's own ([`hindsight_splitter::nbd`]): the same
//! handshake, block sizes and checks of every request.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::time::format_rfc3339;
use hindsight_splitter::block::{BlockDevice, BlockError, Completion, WriteOp};
use hindsight_splitter::nbd::{Listen, NbdServer};
use hindsight_target::{PointView, Volume};

use crate::failure::Failure;
use crate::overlay::Overlay;
use crate::point_args::PointArgs;
use crate::signals;

/// How often the registration is brought up to date (clients, overlay size).
const REGISTRATION_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `hindsight export` options.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["volume", "vm", "all"])))]
pub struct ExportArgs {
    /// target.toml of the target holding the data
    #[arg(long)]
    pub config: PathBuf,
    /// Consistency group
    #[arg(long)]
    pub group: String,
    /// One volume
    #[arg(long)]
    pub volume: Option<String>,
    /// Every volume of this VM
    #[arg(long)]
    pub vm: Option<String>,
    /// Every volume of the group
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub point: PointArgs,
    /// Where to serve: unix:/path/to.sock or tcp:127.0.0.1:10809. Every volume is an export
    /// named after it
    #[arg(long)]
    pub listen: String,
    /// Accept writes, into a scratch overlay deleted when the export stops (never into the
    /// history or the replicas)
    #[arg(long)]
    pub writable: bool,
    /// Accept writes into an overlay kept in DIR when the export stops, and reused by a later
    /// export of the same point with the same DIR
    #[arg(long, value_name = "DIR")]
    pub overlay: Option<PathBuf>,
}

/// What a kept overlay's directory says it belongs to (`overlay.json`).
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct OverlayManifest {
    group: String,
    seq: u64,
}

/// The overlay of one volume: scratch (in `scratch`), kept in `--overlay DIR`, or none.
fn overlay_for(args: &ExportArgs, scratch: &std::path::Path, volume: &Volume) -> Result<Option<Overlay>, Failure> {
    if let Some(dir) = &args.overlay {
        let data = dir.join(format!("{}.overlay", volume.name));
        let map = dir.join(format!("{}.map", volume.name));
        if data.exists() {
            let o = Overlay::reopen(&data, volume.size, map).with_context(|| format!("reuse the overlay in {}", dir.display()))?;
            log::info!(
                "export: volume {}: overlay reused from {} ({} written)",
                volume.name,
                dir.display(),
                crate::progress::human(o.bytes())
            );
            return Ok(Some(o));
        }
        return Ok(Some(Overlay::create(&data, volume.size, Some(map)).with_context(|| format!("create the overlay {}", data.display()))?));
    }
    if !args.writable {
        return Ok(None);
    }
    std::fs::create_dir_all(scratch).with_context(|| format!("create the overlay directory {}", scratch.display()))?;
    let path = scratch.join(format!("{}.overlay", volume.name));
    Ok(Some(Overlay::create(&path, volume.size, None).with_context(|| format!("create the overlay {}", path.display()))?))
}

/// Prepares `--overlay DIR`: a new directory is claimed for this group and point; one that
/// holds an overlay of another point is refused.
fn claim_overlay_dir(dir: &std::path::Path, view: &PointView) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).with_context(|| format!("create the overlay directory {}", dir.display()))?;
    let path = dir.join("overlay.json");
    let mine = OverlayManifest { group: view.group().to_owned(), seq: view.seq() };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let theirs: OverlayManifest = serde_json::from_str(&text).map_err(|e| Failure::Config(format!("{}: {e}", path.display())))?;
            if theirs != mine {
                return Err(Failure::Config(format!(
                    "--overlay {}: it holds the overlay of group {:?} at seq {}; export that point (--seq {}) to reuse it, or give \
                     another directory",
                    dir.display(),
                    theirs.group,
                    theirs.seq,
                    theirs.seq
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::write(&path, serde_json::to_string_pretty(&mine).expect("serialises") + "\n")
                .with_context(|| format!("write {}", path.display()))?;
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("read {}: {e}", path.display()).into()),
    }
}

/// One exported volume: the point, and the overlay of a writable export.
struct PointDevice {
    view: Arc<PointView>,
    index: usize,
    size: u64,
    overlay: Option<Overlay>,
}

impl PointDevice {
    fn read_point(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.view.read(self.index, offset, buf)
    }
}

fn block_error(e: &io::Error) -> BlockError {
    if e.kind() == io::ErrorKind::InvalidInput {
        BlockError::Invalid
    } else {
        BlockError::from_io(e)
    }
}

impl BlockDevice for PointDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let result = match &self.overlay {
            Some(o) => o.read(offset, buf, &|at, out| self.read_point(at, out)),
            None => self.read_point(offset, buf),
        };
        result.map_err(|e| {
            log::warn!("export of group {:?}: read at {offset} length {} failed: {e}", self.view.group(), buf.len());
            block_error(&e)
        })
    }

    fn submit(&self, op: WriteOp, done: Completion) {
        match &self.overlay {
            Some(o) => done(o.write(&op, &|at, out| self.read_point(at, out))),
            None => done(Err(BlockError::ReadOnly)),
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        match &self.overlay {
            Some(o) => o.flush().map_err(|e| block_error(&e)),
            None => Ok(()),
        }
    }
}

/// The volumes the options name.
fn selected<'a>(args: &ExportArgs, view: &'a PointView) -> Result<Vec<(usize, &'a Volume)>, Failure> {
    let all: Vec<(usize, &Volume)> = view.volumes().enumerate().collect();
    let names = || all.iter().map(|(_, v)| v.name.as_str()).collect::<Vec<_>>().join(", ");
    let chosen: Vec<(usize, &Volume)> = match (&args.volume, &args.vm) {
        (Some(name), _) => all.iter().filter(|(_, v)| &v.name == name).copied().collect(),
        (_, Some(vm)) => all.iter().filter(|(_, v)| &v.vm == vm).copied().collect(),
        _ => all.clone(),
    };
    if chosen.is_empty() {
        let what = match (&args.volume, &args.vm) {
            (Some(name), _) => format!("no volume {name:?}"),
            (_, Some(vm)) => format!("no volume of vm {vm:?}"),
            _ => "no volumes".to_string(),
        };
        return Err(Failure::Config(format!("group {:?} has {what}; its volumes are: {}", args.group, names())));
    }
    Ok(chosen)
}

/// Refuses a unix socket another export (or anything else) is serving on.
fn check_listen(listen: &Listen) -> Result<(), Failure> {
    if let Listen::Unix(path) = listen {
        if path.exists() && UnixStream::connect(path).is_ok() {
            return Err(Failure::Config(format!(
                "--listen unix:{}: another process is serving on this socket (a second export?); stop it or give another path",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs the export until SIGINT or SIGTERM.
pub fn run(args: &ExportArgs) -> Result<(), Failure> {
    run_with(args, |_, _| Ok(()))
}

/// Runs the export until SIGINT or SIGTERM; `ready` is called once it serves, with the point
/// and the address (a test failover records itself there).
pub fn run_with(args: &ExportArgs, on_ready: impl FnOnce(&PointView, &str) -> Result<(), Failure>) -> Result<(), Failure> {
    let cfg = TargetConfig::load(&args.config).map_err(|e| Failure::Config(e.to_string()))?;
    let listen: Listen = args.listen.parse().map_err(|e: hindsight_splitter::nbd::NbdError| Failure::Config(format!("--listen: {e}")))?;
    check_listen(&listen)?;
    let point = args.point.resolve(&cfg, &args.group)?;
    crate::init_logging();
    // Before any thread starts, so that only the waiting main thread takes the signals.
    let stop = signals::block_stop_signals()?;
    let view = Arc::new(PointView::open(&cfg, &args.group, &point)?);
    if view.rebuilt_runs() > 0 {
        log::info!("export: {} journal segment(s) had no index file that checked out and were read to index them", view.rebuilt_runs());
    }
    let scratch = view.scratch_dir().join(std::process::id().to_string());
    let mut exports: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    let mut devices = Vec::new();
    if let Some(dir) = &args.overlay {
        claim_overlay_dir(dir, &view)?;
    }
    let writable = args.writable || args.overlay.is_some();
    for (index, volume) in selected(args, &view)? {
        let overlay = overlay_for(args, &scratch, volume)?;
        let device = Arc::new(PointDevice { view: Arc::clone(&view), index, size: volume.size, overlay });
        devices.push(Arc::clone(&device));
        exports.push((volume.name.clone(), device));
    }
    let names: Vec<String> = exports.iter().map(|(n, _)| n.clone()).collect();
    let server = NbdServer::new(listen, exports).context("prepare the NBD server")?.spawn().context("start the NBD server")?;
    let mode = match &args.overlay {
        Some(dir) => format!("writable (writes go to the overlay kept in {})", dir.display()),
        None if args.writable => "writable (writes go to a scratch overlay, discarded at the end)".to_string(),
        None => "read-only".to_string(),
    };
    let ready = format!(
        "exporting group {} at seq {} ({}, {}) on {}: {} ({mode}); the point is pinned until the export stops (Ctrl-C)",
        view.group(),
        view.seq(),
        format_rfc3339(view.time_ns()),
        view.consistency(),
        server.listen(),
        names.iter().map(|n| format!("export {n:?}")).collect::<Vec<_>>().join(", "),
    );
    let mut registration = view
        .register(&server.listen().to_string(), names.clone(), writable)
        .context("register the export in the group's exports/ directory")?;
    log::info!("{ready}");
    println!("{ready}");
    on_ready(&view, &server.listen().to_string())?;
    let (tx, signals) = crossbeam_channel::bounded(1);
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let _ = tx.send(stop.wait());
    })?;
    let signal = loop {
        match signals.recv_timeout(REGISTRATION_EVERY) {
            Ok(signal) => break signal.context("wait for SIGINT or SIGTERM")?,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let overlay: u64 = devices.iter().filter_map(|d| d.overlay.as_ref()).map(Overlay::bytes).sum();
                if let Err(e) = registration.update(server.connections(), overlay) {
                    log::warn!("export: cannot update its registration: {e}");
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(anyhow::anyhow!("the signal thread ended").into()),
        }
    };
    log::info!("export of group {} at seq {}: {signal} received: stopping", view.group(), view.seq());
    drop(registration);
    server.shutdown().context("stop the NBD server")?;
    for device in devices {
        let device = Arc::into_inner(device).expect("the server has stopped: nothing else holds the device");
        if let Some(o) = device.overlay {
            let bytes = o.bytes();
            o.finish().context("finish the overlay")?;
            match &args.overlay {
                Some(dir) => log::info!("export: overlay of {} kept in {}", crate::progress::human(bytes), dir.display()),
                None => log::info!("export: overlay of {} discarded", crate::progress::human(bytes)),
            }
        }
    }
    if args.writable {
        let _ = std::fs::remove_dir(&scratch);
    }
    Ok(())
}
