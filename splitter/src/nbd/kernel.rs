//! Kernel attach: the guest's own `/dev/nbdN`, connected to this agent without nbd-client.
//!
//! The agent makes a unix socket pair, configures the kernel's nbd driver with the ioctl
//! family (`NBD_SET_BLKSIZE`, `NBD_SET_SIZE`, `NBD_SET_FLAGS`, `NBD_SET_TIMEOUT`,
//! `NBD_SET_SOCK` with one end), and serves the other end with the same transmission code as
//! the NBD server (`connection::start`, a task of the process's NBD pool, which holds no thread
//! while the driver sends nothing), minus the handshake: the driver starts in the transmission
//! phase. The only thread of a device is the one that sits in `NBD_DO_IT` for as long as the
//! device runs: the driver runs the device from inside that ioctl.
//!
//! A dead agent: its sockets close with it, and the driver fails every request with EIO at
//! once; nothing hangs. A live agent that stops answering is cut off by the driver after
//! [`KERNEL_TIMEOUT`]. A new agent attaches the device again.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Receiver;
use hindsight_consistency::transport::ElasticReader;
use log::{info, warn};

use super::connection::{self, End};
use super::handshake::TRANSMISSION_FLAGS;
use super::stream::{ReadSide, Stream};
use super::sys;
use crate::block::BlockDevice;

/// How long the kernel waits for one request before it gives up on the connection. The
/// agent answers every request well within this (a write fails with EIO after the engine
/// timeout), so reaching it means the agent is stuck.
pub const KERNEL_TIMEOUT: Duration = Duration::from_secs(120);

/// How many /dev/nbdN are looked at when no device is named.
const MAX_SCAN: u32 = 256;

/// A `/dev/nbdN` served by this process.
pub struct KernelNbd {
    path: PathBuf,
    dev: Arc<File>,
    do_it: JoinHandle<io::Result<()>>,
    /// Gets how the connection ended, once it has (its task sends it last).
    ended: Receiver<End>,
}

/// True when the kernel offers nbd (after trying to load the module).
pub fn available() -> bool {
    if Path::new("/sys/block/nbd0").exists() {
        return true;
    }
    let _ = Command::new("modprobe").arg("nbd").status();
    Path::new("/sys/block/nbd0").exists()
}

/// True when nothing is connected to the device (the driver shows a `pid` while a process
/// runs it).
fn is_free(name: &str) -> bool {
    let sys = Path::new("/sys/block").join(name);
    sys.exists() && !sys.join("pid").exists()
}

/// The first free `/dev/nbdN`.
fn first_free() -> Option<PathBuf> {
    (0..MAX_SCAN).map(|n| format!("nbd{n}")).find(|name| is_free(name)).map(|name| Path::new("/dev").join(name))
}

impl KernelNbd {
    /// Connects `device` (the named `/dev/nbdN`, or the first free one) to `disk`.
    pub fn attach(disk: Arc<dyn BlockDevice>, device: Option<&Path>, name: &str) -> io::Result<KernelNbd> {
        if !available() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "this kernel offers no nbd driver (load it with `modprobe nbd`)"));
        }
        let path = match device {
            Some(p) => p.to_path_buf(),
            None => first_free().ok_or_else(|| io::Error::other("every /dev/nbdN is in use"))?,
        };
        let base = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !Path::new("/sys/block").join(&base).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist (load nbd with more devices: modprobe nbd nbds_max=N)", path.display()),
            ));
        }
        if !is_free(&base) {
            return Err(io::Error::other(format!("{} is in use by another process (its pid is in /sys/block/{base}/pid)", path.display())));
        }
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        let size = disk.size();
        let block = if size.is_multiple_of(4096) { 4096 } else { 512 };
        let shown = path.display().to_string();
        let ctx = |what: &'static str| {
            let shown = shown.clone();
            move |e: io::Error| io::Error::new(e.kind(), format!("{shown}: {what}: {e}"))
        };
        // A device left configured by a crashed process would refuse a new socket.
        let _ = sys::clear_sock(&dev);
        sys::set_blksize(&dev, block).map_err(ctx("set the block size"))?;
        sys::set_size(&dev, size).map_err(ctx("set the size"))?;
        sys::set_flags(&dev, TRANSMISSION_FLAGS).map_err(ctx("set the flags"))?;
        sys::set_timeout(&dev, KERNEL_TIMEOUT.as_secs()).map_err(ctx("set the timeout"))?;
        let (ours, kernels) = UnixStream::pair()?;
        sys::set_sock(&dev, kernels.as_raw_fd()).map_err(ctx("hand the socket to the driver"))?;

        let label = format!("{name} on {}", path.display());
        let ours = Arc::new(Stream::Unix(ours));
        let reader = ElasticReader::new(ReadSide::new(Arc::clone(&ours)), connection::REQUEST_READ_BUFFER);
        let (ended_tx, ended) = crossbeam_channel::bounded(1);
        let on_end = Box::new(move |end: End| {
            // The kernel's end of the pair stays open for as long as the connection is served.
            drop(kernels);
            let _ = ended_tx.send(end);
        });
        if let Err(e) = connection::start(reader, disk, &label, on_end) {
            let _ = sys::clear_sock(&dev);
            return Err(io::Error::new(e.kind(), format!("{shown}: serve the socket: {e}")));
        }
        let dev = Arc::new(dev);
        let runner = Arc::clone(&dev);
        let do_it = thread::Builder::new().name(format!("{base}-kernel")).spawn(move || {
            let r = sys::do_it(&runner);
            let _ = sys::clear_sock(&runner);
            r
        });
        let do_it = match do_it {
            Ok(t) => t,
            Err(e) => {
                // The connection's task ends once its socket is.
                let _ = ours.shutdown(Shutdown::Both);
                let _ = sys::clear_sock(&dev);
                return Err(e);
            }
        };
        info!("{name}: attached {} through the kernel nbd driver ({size} bytes, {block}-byte blocks)", path.display());
        Ok(KernelNbd { path, dev, do_it, ended })
    }

    /// The block device the guest uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while the kernel still runs the device.
    pub fn is_running(&self) -> bool {
        !self.do_it.is_finished()
    }

    /// Disconnects the device: the driver sends `NBD_CMD_DISC`, the server finishes the writes
    /// in flight and closes, and the device is released.
    pub fn stop(self, name: &str) -> io::Result<()> {
        if let Err(e) = sys::disconnect(&self.dev) {
            warn!("{name}: {}: disconnect: {e}", self.path.display());
        }
        let end = self.ended.recv().map_err(|_| io::Error::other("the nbd connection's task ended without closing it"))?;
        let ran = self.do_it.join().map_err(|_| io::Error::other("the nbd device thread panicked"))?;
        info!("{name}: released {} ({end:?})", self.path.display());
        match ran {
            // The driver reports a disconnect it was asked for as success or as EPIPE/ECONNRESET.
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(32 | 104)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
