//! The agent's resync: re-sends the regions its disks' dirty maps say the replica may lack,
//! whenever the engine is reachable, and tells the engine when a disk's resync is complete
//! (which ends the stretch the recovery site marks as not consistent).
//!
//! One thread for the agent. Every half second it cleans the maps (idle regions are unmarked
//! on disk) and, with the link up, resyncs what needs it, in batches, logging progress
//! (regions, MB/s, what is left). At its start it runs the initial sync of disks the agent
//! has never served here: every region that holds data is sent once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::engine_link::EngineLink;
use crate::replicated::ReplicatedDisk;

/// Regions resynced between progress lines and link checks.
const BATCH: usize = 64;
const TICK: Duration = Duration::from_millis(500);
/// While the engine has paused a disk's group, how often one region is tried.
const PAUSE_PROBE: Duration = Duration::from_secs(2);

/// Starts the resync thread over the disks that track.
pub fn spawn(disks: Vec<Arc<ReplicatedDisk>>, link: Arc<EngineLink>) -> std::io::Result<()> {
    std::thread::Builder::new().name("resync".into()).spawn(move || loop {
        run_once(&disks, &link);
        std::thread::sleep(TICK);
    })?;
    Ok(())
}

/// Marks every region of a new disk that holds data (run before the disk is served, so that
/// no guest write can come before the scan has decided whether a resync is due).
pub fn initial_scan(d: &ReplicatedDisk) {
    let Some(map) = d.dirty_map() else { return };
    let started = Instant::now();
    // Holes of a sparse file are zeroes: skipped without reading. Regions read are dropped
    // from the page cache afterwards (the scan must not leave the disk's cache full of them).
    let file = std::fs::File::open(d.local_path()).ok();
    let may_hold_data = |start: u64, end: u64| match &file {
        Some(f) => holds_data(f, start, end),
        None => true,
    };
    let read = |off: u64, buf: &mut [u8]| {
        let r = d.read_region(off, buf);
        if let Some(f) = &file {
            drop_cache(f, off, buf.len() as u64);
        }
        r
    };
    match map.mark_nonzero(may_hold_data, read) {
        Ok(0) => info!("volume {}: initial sync: the disk holds no data; nothing to send", d.volume()),
        Ok(n) => info!(
            "volume {}: initial sync: {n} of {} region(s) hold data and will be sent (scanned in {:.1?})",
            d.volume(),
            map.regions(),
            started.elapsed()
        ),
        Err(e) => warn!("volume {}: initial sync: scanning the disk failed: {e}; every region will be sent", d.volume()),
    }
}

/// One pass: clean the maps, then resync what needs it while the link is up.
pub fn run_once(disks: &[Arc<ReplicatedDisk>], link: &EngineLink) {
    for d in disks {
        let Some(map) = d.dirty_map() else { continue };
        if let Err(e) = map.clean() {
            warn!("volume {}: cleaning the dirty map {}: {e}", d.volume(), map.path().display());
        }
        let mut todo = map.needing_resync();
        if todo.is_empty() && d.resyncing() && link.is_connected() {
            // Every region is back: writes go as plain data again, and, if resync data went
            // out, the engine places the resync point after the last of it.
            d.finish_resync(|| link.resync_done(&[d.disk_number()]));
            continue;
        }
        if todo.is_empty() || !link.is_connected() {
            continue;
        }
        if let Some(since) = link.paused_since(d.disk_number()) {
            // The engine paused the group (a full journal): one region now and then finds out
            // when it takes writes again, without reading the whole backlog each time.
            if since.elapsed() < PAUSE_PROBE {
                continue;
            }
            d.resync(&todo[..1]);
            if link.paused_since(d.disk_number()).is_some() {
                continue;
            }
            todo = map.needing_resync();
            if todo.is_empty() {
                continue; // the next pass ends the resync
            }
        }
        let total = todo.len();
        let bytes_per_region = map.region_size();
        info!("volume {}: resync of {total} region(s) ({} MiB) starts", d.volume(), (total as u64 * bytes_per_region) >> 20);
        let started = Instant::now();
        let mut sent = 0usize;
        link.resync_progress(d.disk_number(), 0, total as u64, 0);
        for batch in todo.chunks(BATCH) {
            if !link.is_connected() || link.paused_since(d.disk_number()).is_some() {
                break;
            }
            sent += d.resync(batch).len();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = sent as f64 * bytes_per_region as f64 / secs;
            let left = total - sent.min(total);
            let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
            link.resync_progress(d.disk_number(), sent as u64, total as u64, sent as u64 * bytes_per_region * 1000 / millis);
            info!(
                "volume {}: resync {:.0}% ({sent}/{total} regions, {:.1} MB/s, about {:.0}s left)",
                d.volume(),
                sent as f64 * 100.0 / total as f64,
                rate / 1e6,
                left as f64 * bytes_per_region as f64 / rate.max(1.0)
            );
        }
        if map.needing_resync().is_empty() {
            info!("volume {}: resync complete in {:.1?}", d.volume(), started.elapsed());
            d.finish_resync(|| link.resync_done(&[d.disk_number()]));
        }
    }
}

/// False when `start..end` of `f` is a hole (`SEEK_DATA` finds no data before `end`); true
/// when it may hold data, or when the file system cannot tell (a block device).
fn holds_data(f: &std::fs::File, start: u64, end: u64) -> bool {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let Ok(from) = i64::try_from(start) else { return true };
    match lseek(f.as_raw_fd(), from, Whence::SeekData) {
        Ok(data) => u64::try_from(data).map_or(true, |d| d < end),
        // ENXIO: no data at or after `start`.
        Err(nix::errno::Errno::ENXIO) => false,
        Err(_) => true,
    }
}

/// Asks the kernel to drop `len` bytes at `off` of `f` from the page cache.
fn drop_cache(f: &std::fs::File, off: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    if let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) {
        let _ = posix_fadvise(f.as_raw_fd(), off, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}
