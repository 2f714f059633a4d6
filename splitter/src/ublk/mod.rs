//! The ublk front end: a `/dev/ublkbN` block device in the guest whose every request is served
//! by the agent, through `/dev/ublk-control` and io_uring (the io-uring crate, used directly;
//! docs/decisions.md says why not libublk).
//!
//! Core type: [`UblkDisk`], made by [`UblkDisk::attach`] over any
//! [`BlockDevice`] and released by [`UblkDisk::stop`].
//!
//! How a guest write flows through the front end:
//!
//! 1. `attach` adds the device (`ADD_DEV`: queues, depth, largest request, and the flags for
//!    user recovery), sets its parameters (`SET_PARAMS`: size, 512-byte logical and 4 KiB
//!    physical blocks, a volatile cache with FUA so the kernel sends flushes, discard and
//!    write-zeroes limits), starts one thread per queue and then `START_DEV`.
//! 2. Each queue thread fetches all its tags (`queue`). The kernel puts a write's data in
//!    the tag's buffer and completes the tag's fetch.
//! 3. The thread submits the write to the device (the splitter core: engine, then local
//!    disk), whose completion wakes the thread, which commits the result and fetches again.
//!
//! A dead agent: the device is created with `UBLK_F_USER_RECOVERY | ..._REISSUE`, so when the
//! agent dies the kernel holds the guest's I/O (it does not fail it) and, when an agent starts
//! again for the same device, `attach` recovers it (`START_USER_RECOVERY`, new queues,
//! `END_USER_RECOVERY`) and the kernel issues the held and in-flight requests again. A stop
//! (`STOP_DEV`, `DEL_DEV`) removes the device.

mod abi;
mod queue;
mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use thiserror::Error;

use crate::block::BlockDevice;
use abi::DevInfo;
use sys::{Control, DescArea, QueueIo};

pub use sys::CONTROL_PATH;

/// Tags (requests in flight) per queue.
pub const QUEUE_DEPTH: u16 = 64;
/// Largest request, bytes (also each tag's buffer size).
pub const MAX_IO_BYTES: u32 = 512 * 1024;
/// Largest discard or write-zeroes request, in 512-byte sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// How long to wait for a device node or a dying server's device to become recoverable.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Why a ublk device could not be created, recovered or removed.
#[derive(Debug, Error)]
pub enum UblkError {
    #[error("this kernel offers no ublk ({CONTROL_PATH} is missing; load it with `modprobe ublk_drv`)")]
    NotAvailable,
    #[error("ublk device {dev_id} is in use by process {pid}; stop that agent first or name another device")]
    InUse { dev_id: u32, pid: i32 },
    #[error("ublk device {dev_id}: {what}: {source}")]
    Command { dev_id: u32, what: &'static str, source: io::Error },
    #[error("ublk: {0}")]
    Setup(String),
}

/// Numbers of a device's block and char device nodes.
pub fn block_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

fn char_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{dev_id}"))
}

/// True when the kernel offers ublk.
pub fn available() -> bool {
    Path::new(CONTROL_PATH).exists()
}

/// A live ublk device served by this process.
pub struct UblkDisk {
    dev_id: u32,
    control: Control,
    queues: Vec<JoinHandle<io::Result<()>>>,
    recovered: bool,
}

impl UblkDisk {
    /// Creates `/dev/ublkb<want>` (any free number when `None`), or recovers it when a
    /// previous agent left it waiting, and serves it with `device`.
    pub fn attach(device: Arc<dyn BlockDevice>, want: Option<u32>, name: &str) -> Result<UblkDisk, UblkError> {
        let mut control = Control::open().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => UblkError::NotAvailable,
            _ => UblkError::Command { dev_id: want.unwrap_or(u32::MAX), what: "open the control device", source: e },
        })?;
        if let Some(dev_id) = want {
            if let Some(existing) = wait_recoverable(&mut control, dev_id)? {
                return Self::recover(control, existing, device, name);
            }
        }
        Self::create(control, want, device, name)
    }

    fn create(mut control: Control, want: Option<u32>, device: Arc<dyn BlockDevice>, name: &str) -> Result<UblkDisk, UblkError> {
        let size = device.size();
        if !size.is_multiple_of(512) || size == 0 {
            return Err(UblkError::Setup(format!("{name}: the disk's size ({size} bytes) is not a positive multiple of 512")));
        }
        let queues = u16::try_from(thread::available_parallelism().map_or(1, usize::from).min(4)).unwrap_or(1);
        let wanted = DevInfo {
            nr_hw_queues: queues,
            queue_depth: QUEUE_DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: want.unwrap_or(u32::MAX),
            ublksrv_pid: pid(),
            flags: abi::F_USER_RECOVERY | abi::F_USER_RECOVERY_REISSUE | abi::F_CMD_IOCTL_ENCODE,
            ..DevInfo::default()
        };
        let info = control.add(&wanted).map_err(|source| UblkError::Command { dev_id: wanted.dev_id, what: "add the device", source })?;
        let dev_id = info.dev_id;
        let physical_shift = if size.is_multiple_of(4096) { 12 } else { 9 };
        let params = abi::Params {
            dev_sectors: size / 512,
            logical_bs_shift: 9,
            physical_bs_shift: physical_shift,
            max_sectors: info.max_io_buf_bytes / 512,
            max_discard_sectors: MAX_DISCARD_SECTORS,
        };
        if let Err(source) = control.set_params(dev_id, &params) {
            let _ = control.delete(dev_id);
            return Err(UblkError::Command { dev_id, what: "set its parameters", source });
        }
        let queues = match spawn_queues(dev_id, &info, &device, name) {
            Ok(q) => q,
            Err(e) => {
                // Deleting the device ends the queues already started.
                let _ = control.delete(dev_id);
                return Err(e);
            }
        };
        if let Err(source) = control.start(dev_id, pid()) {
            let _ = control.delete(dev_id);
            join(queues, name);
            return Err(UblkError::Command { dev_id, what: "start it", source });
        }
        info!("{name}: ublk device {} started ({} queue(s), depth {QUEUE_DEPTH})", block_path(dev_id).display(), queues.len());
        Ok(UblkDisk { dev_id, control, queues, recovered: false })
    }

    fn recover(mut control: Control, info: DevInfo, device: Arc<dyn BlockDevice>, name: &str) -> Result<UblkDisk, UblkError> {
        let dev_id = info.dev_id;
        control.start_recovery(dev_id).map_err(|source| UblkError::Command { dev_id, what: "start recovering it", source })?;
        let queues = spawn_queues(dev_id, &info, &device, name)?;
        if let Err(source) = control.end_recovery(dev_id, pid()) {
            let _ = control.stop(dev_id);
            let _ = control.delete(dev_id);
            join(queues, name);
            return Err(UblkError::Command { dev_id, what: "end its recovery", source });
        }
        info!("{name}: recovered ublk device {} left by a previous agent; held I/O resumes", block_path(dev_id).display());
        Ok(UblkDisk { dev_id, control, queues, recovered: true })
    }

    /// The block device the guest uses.
    pub fn path(&self) -> PathBuf {
        block_path(self.dev_id)
    }

    /// The device number.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// True when this device was taken over from a previous agent.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Stops and removes the device. The kernel finishes the requests in flight first (the
    /// queues keep serving until it ends their tags).
    pub fn stop(mut self, name: &str) -> Result<(), UblkError> {
        let dev_id = self.dev_id;
        let stopped = self.control.stop(dev_id).map_err(|source| UblkError::Command { dev_id, what: "stop it", source });
        join(std::mem::take(&mut self.queues), name);
        stopped?;
        self.control.delete(dev_id).map_err(|source| UblkError::Command { dev_id, what: "delete it", source })?;
        info!("{name}: ublk device {} removed", block_path(dev_id).display());
        Ok(())
    }
}

fn pid() -> i32 {
    nix::unistd::getpid().as_raw()
}

/// For a named device: `Some(info)` when it exists and waits for recovery, `None` when it
/// does not exist (or was dead and has been deleted). A device still served by a live
/// process is an error; one whose server just died is waited for until the kernel has
/// quiesced it.
fn wait_recoverable(control: &mut Control, dev_id: u32) -> Result<Option<DevInfo>, UblkError> {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let info = match control.info(dev_id) {
            Ok(info) => info,
            // ENODEV (or ENOENT): no such device yet.
            Err(e) if matches!(e.raw_os_error(), Some(19 | 2)) => return Ok(None),
            Err(source) => return Err(UblkError::Command { dev_id, what: "read its state", source }),
        };
        match info.state {
            abi::S_DEV_QUIESCED if info.flags & abi::F_USER_RECOVERY != 0 => return Ok(Some(info)),
            abi::S_DEV_DEAD => {
                warn!("ublk device {dev_id} exists but is not running; deleting it to create it anew");
                control.delete(dev_id).map_err(|source| UblkError::Command { dev_id, what: "delete the stale device", source })?;
                return Ok(None);
            }
            abi::S_DEV_LIVE if process_alive(info.ublksrv_pid) || Instant::now() >= deadline => {
                return Err(UblkError::InUse { dev_id, pid: info.ublksrv_pid });
            }
            _ if Instant::now() >= deadline => {
                return Err(UblkError::Setup(format!("device {dev_id} is in state {} and cannot be recovered", info.state)));
            }
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && pid != self::pid() && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Opens the char device, maps each queue and starts its thread.
fn spawn_queues(
    dev_id: u32,
    info: &DevInfo,
    device: &Arc<dyn BlockDevice>,
    name: &str,
) -> Result<Vec<JoinHandle<io::Result<()>>>, UblkError> {
    let cdev = open_char(dev_id)?;
    let cmd = |what| move |source| UblkError::Command { dev_id, what, source };
    let mut handles = Vec::new();
    for q in 0..info.nr_hw_queues {
        let io = QueueIo::new(&cdev, q, info.queue_depth, info.max_io_buf_bytes as usize).map_err(cmd("set up a queue ring"))?;
        let descs = DescArea::map(&cdev, q, usize::from(info.queue_depth)).map_err(cmd("map a queue's descriptors"))?;
        let (device, depth, label) = (Arc::clone(device), info.queue_depth, format!("{name} ublk queue {q}"));
        let handle = thread::Builder::new()
            .name(format!("ublk{dev_id}-q{q}"))
            .spawn(move || {
                let r = queue::run(io, descs, depth, device, label.clone());
                if let Err(e) = &r {
                    warn!("{label}: stopped serving: {e}");
                }
                r
            })
            .map_err(cmd("start a queue thread"))?;
        handles.push(handle);
    }
    Ok(handles)
}

fn open_char(dev_id: u32) -> Result<File, UblkError> {
    let path = char_path(dev_id);
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(source) => return Err(UblkError::Command { dev_id, what: "open its char device", source }),
        }
    }
}

fn join(handles: Vec<JoinHandle<io::Result<()>>>, name: &str) {
    for h in handles {
        if h.join().is_err() {
            warn!("{name}: a ublk queue thread panicked");
        }
    }
}
