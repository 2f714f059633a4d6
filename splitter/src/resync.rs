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
    match map.mark_nonzero(|off, buf| d.read_region(off, buf)) {
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
    let mut completed = Vec::new();
    for d in disks {
        let Some(map) = d.dirty_map() else { continue };
        if let Err(e) = map.clean() {
            warn!("volume {}: cleaning the dirty map {}: {e}", d.volume(), map.path().display());
        }
        let todo = map.needing_resync();
        if todo.is_empty() && d.resyncing() && link.is_connected() {
            // Every region is back: writes go as plain data again, and, if resync data went
            // out, the engine places the resync point after the last of it.
            d.set_resyncing(false);
            if d.take_sent_resync() {
                completed.push(d.disk_number());
            }
            continue;
        }
        if todo.is_empty() || !link.is_connected() {
            continue;
        }
        let total = todo.len();
        let bytes_per_region = map.region_size();
        info!("volume {}: resync of {total} region(s) ({} MiB) starts", d.volume(), (total as u64 * bytes_per_region) >> 20);
        let started = Instant::now();
        let mut sent = 0usize;
        for batch in todo.chunks(BATCH) {
            if !link.is_connected() {
                break;
            }
            sent += d.resync(batch).len();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = sent as f64 * bytes_per_region as f64 / secs;
            let left = total - sent.min(total);
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
            d.set_resyncing(false);
            if d.take_sent_resync() {
                completed.push(d.disk_number());
            }
        }
    }
    if !completed.is_empty() {
        link.resync_done(&completed);
    }
}
