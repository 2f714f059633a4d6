//! The kernel block devices the agent creates for its disks: ublk or the kernel nbd driver,
//! chosen per disk (`frontend = "auto" | "ublk" | "nbd"`). Both serve the same
//! [`BlockDevice`] (the splitter core), so every guarantee of the write path holds for both.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight_consistency::config::{FrontendConfig, FrontendKind};
use log::{info, warn};
use thiserror::Error;

use crate::block::BlockDevice;
use crate::nbd::kernel::{self, KernelNbd};
use crate::ublk::{self, UblkDisk};

/// Where the agent remembers the number of each ublk device it created without a configured
/// `device`, so that an agent started after a crash recovers the same device.
pub const RUN_DIR: &str = "/run/hindsight-agent";

/// A kernel block device being served.
pub enum Attached {
    Ublk(Box<UblkDisk>),
    Nbd(KernelNbd),
}

impl Attached {
    /// The block device node the guest uses.
    pub fn path(&self) -> PathBuf {
        match self {
            Attached::Ublk(d) => d.path(),
            Attached::Nbd(d) => d.path().to_path_buf(),
        }
    }

    /// `ublk` or `nbd`.
    pub fn kind(&self) -> FrontendKind {
        match self {
            Attached::Ublk(_) => FrontendKind::Ublk,
            Attached::Nbd(_) => FrontendKind::Nbd,
        }
    }

    /// Removes the device (in-flight requests finish first).
    pub fn stop(self, volume: &str) -> io::Result<()> {
        match self {
            Attached::Ublk(d) => {
                d.stop(volume).map_err(io::Error::other)?;
                let _ = fs::remove_file(run_file(volume));
                Ok(())
            }
            Attached::Nbd(d) => d.stop(volume),
        }
    }
}

/// What `auto` resolves to on this kernel: ublk when /dev/ublk-control exists (after trying
/// to load the module), NBD otherwise.
pub fn resolve(kind: FrontendKind) -> FrontendKind {
    match kind {
        FrontendKind::Auto => {
            if !ublk::available() {
                let _ = std::process::Command::new("modprobe").arg("ublk_drv").status();
            }
            if ublk::available() {
                FrontendKind::Ublk
            } else {
                FrontendKind::Nbd
            }
        }
        k => k,
    }
}

fn run_file(volume: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{volume}.ublk"))
}

/// The number in `/dev/ublkbN` or `/dev/nbdN`.
fn device_number(path: &Path, prefix: &str) -> Option<u32> {
    path.to_str()?.strip_prefix("/dev/")?.strip_prefix(prefix)?.parse().ok()
}

/// Creates (or, for ublk, recovers) the kernel device of one disk.
pub fn attach(config: &FrontendConfig, disk: Arc<dyn BlockDevice>, volume: &str) -> io::Result<Attached> {
    let kind = resolve(config.kind);
    if config.kind == FrontendKind::Auto {
        let why = if kind == FrontendKind::Ublk { "the kernel offers ublk" } else { "the kernel offers no ublk" };
        info!("{volume}: frontend auto: using {kind} ({why})");
    }
    match kind {
        FrontendKind::Ublk => {
            let want = match &config.device {
                Some(p) => device_number(p, "ublkb"),
                None => fs::read_to_string(run_file(volume)).ok().and_then(|s| s.trim().parse().ok()),
            };
            let d = UblkDisk::attach(disk, want, volume).map_err(io::Error::other)?;
            if config.device.is_none() {
                if let Err(e) = fs::create_dir_all(RUN_DIR).and_then(|()| fs::write(run_file(volume), format!("{}\n", d.dev_id()))) {
                    warn!("{volume}: cannot record the ublk device number in {RUN_DIR} ({e}); after a crash, name the device in the config to recover it");
                }
            }
            Ok(Attached::Ublk(Box::new(d)))
        }
        _ => KernelNbd::attach(disk, config.device.as_deref(), volume).map(Attached::Nbd),
    }
}

/// Why the front end a disk asks for cannot be had on this kernel.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UnavailableError {
    /// `frontend = "ublk"`, and the kernel has no ublk.
    #[error("frontend \"ublk\": this kernel offers no ublk ({} is missing; `modprobe ublk_drv`, Linux 6.0 or later)", ublk::CONTROL_PATH)]
    NoUblk,
    /// `frontend = "nbd"`, and the kernel has no nbd driver.
    #[error("frontend \"nbd\": this kernel offers no nbd driver (/sys/block/nbd0 is missing; `modprobe nbd`)")]
    NoNbd,
    /// `frontend = "auto"`, and the kernel has neither.
    #[error("frontend \"auto\": this kernel offers neither ublk nor nbd (`modprobe ublk_drv` or `modprobe nbd`)")]
    Neither,
}

/// Checks that the kernel offers the front end (`auto`: either), loading its module if
/// needed.
pub fn check_available(kind: FrontendKind) -> Result<(), UnavailableError> {
    match resolve(kind) {
        FrontendKind::Ublk if !ublk::available() => Err(UnavailableError::NoUblk),
        FrontendKind::Nbd if !kernel::available() => Err(match kind {
            FrontendKind::Auto => UnavailableError::Neither,
            _ => UnavailableError::NoNbd,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_front_ends_say_what_to_load() {
        assert_eq!(
            UnavailableError::NoUblk.to_string(),
            format!(
                "frontend \"ublk\": this kernel offers no ublk ({} is missing; `modprobe ublk_drv`, Linux 6.0 or later)",
                ublk::CONTROL_PATH
            )
        );
        assert_eq!(
            UnavailableError::NoNbd.to_string(),
            "frontend \"nbd\": this kernel offers no nbd driver (/sys/block/nbd0 is missing; `modprobe nbd`)"
        );
        assert_eq!(
            UnavailableError::Neither.to_string(),
            "frontend \"auto\": this kernel offers neither ublk nor nbd (`modprobe ublk_drv` or `modprobe nbd`)"
        );
    }
}
