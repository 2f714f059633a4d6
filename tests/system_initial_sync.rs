//! The initial sync with the real binaries: the agent compares each region's hash with the
//! target's replica and sends only the regions that differ. A disk with data against an empty
//! target sends exactly the regions holding data; the same disk changed behind the agent's
//! back (K regions changed, one region's data punched out) with its map deleted sends exactly
//! K + 1 regions, keeps the point before recoverable, and ends equal to the source; with the
//! target down the agent waits (sends nothing of the disk, serves the guest) and compares once
//! the target is there.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hindsight_consistency::WriteKind;

const MIB: u64 = 1 << 20;
/// What the compare sweep sends of a region that differs: its pieces of 64 KiB that differ.
const PIECE: u64 = 64 << 10;
const SIZE: u64 = 32 * MIB;
/// Regions given random data before the agent first starts.
const DATA_REGIONS: [u64; 8] = [0, 1, 2, 5, 8, 13, 21, 31];
/// A region written with zeroes (allocated, but blank): equal to a blank replica.
const ZERO_REGION: u64 = 20;

/// Bytes of resync records the target holds after `after`.
fn resync_bytes_after(c: &Cluster, after: u64) -> u64 {
    c.target_records().iter().filter(|r| r.0 > after && r.1 == WriteKind::Resync).map(|r| u64::from(r.2)).sum()
}

/// Writes `bytes` at `off` of the disk file directly (not through the agent).
fn write_at(c: &Cluster, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(c.disk("data")).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

/// Makes `len` bytes at `off` of the disk file a hole (`fallocate -p`), or zeroes where the
/// tool is missing.
fn punch(c: &Cluster, off: u64, len: u64) {
    let punched = Command::new("fallocate")
        .args(["-p", "-o", &off.to_string(), "-l", &len.to_string()])
        .arg(c.disk("data"))
        .status()
        .is_ok_and(|s| s.success());
    if !punched {
        write_at(c, off, &vec![0u8; len as usize]);
    }
}

/// The disk of test A: random data in `DATA_REGIONS`, zeroes written into `ZERO_REGION`,
/// holes elsewhere.
fn fill_disk(c: &Cluster) {
    let mut rng = seeded_rng();
    for r in DATA_REGIONS {
        write_at(c, r * MIB, &random_bytes(&mut rng, MIB as usize));
    }
    write_at(c, ZERO_REGION * MIB, &vec![0u8; MIB as usize]);
}

fn map_path(c: &Cluster) -> std::path::PathBuf {
    let mut p = c.disk("data").into_os_string();
    p.push(".hsmap");
    p.into()
}

/// A: a disk with data against an empty target. Returns the cluster, caught up.
fn initial_sync_sends_every_region_holding_data() -> Cluster {
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "", "");
    fill_disk(&c);
    c.launch();
    c.start_agents();
    c.wait_log_within("agent-vm1", "initial sync compared 32 region(s)", Duration::from_secs(60));
    c.wait_log_within("engine", "resync of volume(s) data complete", Duration::from_secs(30));
    c.wait_shipped();
    let n = DATA_REGIONS.len() as u64;
    assert!(
        c.log("agent-vm1").contains(&format!("{} equal, {n} differ, {n} sent", 32 - n)),
        "the agent did not compare as expected:\n{}",
        c.log("agent-vm1")
    );
    // Exactly the regions holding data went, whole.
    assert_eq!(resync_bytes_after(&c, 0), n * MIB, "bytes sent as resync data");
    let latest = c.recover("data", &["--latest"]);
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica and source differ: {}", first_difference(&latest, &source));
    // The sync is one stretch that is not consistent, ended by its resync point.
    let h = c.history();
    let spans = h["inconsistent"].as_array().unwrap();
    let span = spans.iter().find(|s| s["kind"] == "resync").unwrap_or_else(|| panic!("no resync span: {h:#}"));
    assert!(span["to"].as_u64().is_some(), "the resync span is not closed: {h:#}");
    c
}

#[test]
fn initial_sync_sends_only_regions_that_differ_from_the_replica() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // A.
    let mut c = initial_sync_sends_every_region_holding_data();
    let before = c.settle();
    let image_before = std::fs::read(c.disk("data")).unwrap();

    // B: behind the agent's back, K regions change (two with data, one hole) and one region's
    // data is punched out; the map is gone, so the agent starts an initial sync again.
    c.kill_agent("vm1");
    let mut rng = seeded_rng();
    let changed = [2u64, 13, 7];
    for r in changed {
        write_at(&c, r * MIB + 4096 * 3, &random_bytes(&mut rng, 4096));
    }
    let punched = 21u64;
    punch(&c, punched * MIB, MIB);
    std::fs::remove_file(map_path(&c)).unwrap();
    c.start_agent("vm1");
    let start = Instant::now();
    while c.log("agent-vm1").matches("initial sync compared 32 region(s)").count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(60), "the second initial sync never completed:\n{}", c.log("agent-vm1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let k = changed.len() as u64;
    assert!(
        c.log("agent-vm1").contains(&format!("{} equal, {} differ, {} sent", 32 - k - 1, k + 1, k + 1)),
        "the agent did not compare as expected:\n{}",
        c.log("agent-vm1")
    );
    c.wait_log("engine", "resync of volume(s) data complete", 2);
    c.wait_shipped();
    // Of a changed region only its piece of 64 KiB that differs; the punched region whole (all
    // its pieces held data).
    assert_eq!(resync_bytes_after(&c, before), k * PIECE + MIB, "exactly the K pieces and the punched region are sent");
    let latest = c.recover("data", &["--latest"]);
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica and source differ: {}", first_difference(&latest, &source));
    assert!(latest[(punched * MIB) as usize..((punched + 1) * MIB) as usize].iter().all(|&b| b == 0), "the punched region is blank");
    // The point before the second sync is still there, and still the earlier image.
    let earlier = c.recover("data", &["--seq", &before.to_string()]);
    assert!(earlier == image_before, "the point before the sync: {}", first_difference(&earlier, &image_before));
    let h = c.history();
    let spans: Vec<&serde_json::Value> = h["inconsistent"].as_array().unwrap().iter().filter(|s| s["kind"] == "resync").collect();
    assert_eq!(spans.len(), 2, "{h:#}");
    assert!(spans[1]["from"].as_u64().unwrap() > before, "{h:#}");
}

/// While the sweep waits, `status --watch` shows it: as a progress bar on a terminal (run under
/// `script`, which gives it a pseudo-terminal), as plain lines without escape codes otherwise.
fn watch_shows_the_waiting_sweep(c: &Cluster) {
    let g = c.wait_status("the initial sync waiting", Duration::from_secs(30), |g| g["resyncing"][0]["compare_total"] == 32);
    assert_eq!(g["resyncing"][0]["compared"], 0, "{g:#}");
    let watch = |bin: &std::path::Path| format!("{} status --config {} --watch 1 --count 2", bin.display(), c.engine_toml().display());
    let (code, plain, err) = run_code(Command::new("sh").args(["-c", &watch(&hindsight_bin())]), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{plain}{err}");
    assert!(plain.contains("initial sync of data: compared 0/32 regions") && !plain.contains('\x1b'), "{plain}");
    if !have_tools(&["script"]) {
        return;
    }
    let typescript = c.path("watch.typescript");
    let (code, out, err) = run_code(
        Command::new("script").args(["-qec", &watch(&hindsight_bin())]).arg(&typescript).env("TERM", "xterm"),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let screen = std::fs::read_to_string(&typescript).unwrap_or(out);
    assert!(screen.contains("initial sync, comparing erp/data [") && screen.contains("0/32 regions (0%)"), "no progress bar:\n{screen}");
}

#[test]
fn initial_sync_waits_for_an_absent_target_and_compares_when_it_comes() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "", "");
    fill_disk(&c);
    // The engine without its target.
    c.start_engine();
    c.start_agents();
    c.wait_log_within("agent-vm1", "initial sync of data waits for the target to compare chunk hashes", Duration::from_secs(30));
    // The guest is served meanwhile: its writes go (as resync data) and complete.
    let src = c.path("block.bin");
    let mut rng = seeded_rng();
    let mut session = QemuIoSession::start(&c.uri("data"));
    let guest_writes = 5;
    for i in 0..guest_writes {
        std::fs::write(&src, random_bytes(&mut rng, 4096)).unwrap();
        session.write_file(&src, (3 + i) * MIB + 8192, 4096);
    }
    session.finish();
    std::thread::sleep(Duration::from_secs(2));
    // Nothing of the disk was sent blindly: the engine holds the guest's writes alone.
    assert_eq!(c.engine_records(), guest_writes as usize, "records at the engine while the target is away");
    assert_eq!(c.log("agent-vm1").matches("waits for the target to compare").count(), 1, "the wait is logged once");
    watch_shows_the_waiting_sweep(&c);

    c.start_target();
    c.wait_log_within("agent-vm1", "initial sync compared 32 region(s)", Duration::from_secs(90));
    c.wait_log_within("engine", "resync of volume(s) data complete", Duration::from_secs(30));
    c.wait_shipped();
    // The regions with data differ. The guest's writes reached the replica before it was
    // hashed, so the blank regions they went to compare equal (region 5 held data: it
    // differs anyway).
    let data = DATA_REGIONS.len() as u64;
    assert_eq!(resync_bytes_after(&c, guest_writes), data * MIB, "bytes sent as whole regions");
    let latest = c.recover("data", &["--latest"]);
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica and source differ: {}", first_difference(&latest, &source));
}
