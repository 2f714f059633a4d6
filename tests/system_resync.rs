//! Dirty tracking and resync with the real binaries: an engine outage is served from the
//! local disk and tracked, the resync afterwards keeps the last consistent point recoverable
//! and ends with a replica equal to the source; an agent killed with writes in flight resends
//! only its dirty regions.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hindsight_consistency::WriteKind;
use rand::Rng;

const BLOCK: u64 = 4096;

/// Writes `count` random 4 KiB blocks inside the first `span` bytes; returns them in order.
fn write_blocks(c: &Cluster, rng: &mut impl Rng, count: usize, span: u64, model: &mut [u8]) {
    let mut session = QemuIoSession::start(&c.uri("data"));
    let src = c.path("block.bin");
    for _ in 0..count {
        let off = rng.gen_range(0..span / BLOCK) * BLOCK;
        let data = random_bytes(rng, BLOCK as usize);
        std::fs::write(&src, &data).unwrap();
        session.write_file(&src, off, BLOCK);
        model[off as usize..(off + BLOCK) as usize].copy_from_slice(&data);
    }
    session.finish();
}

#[test]
fn engine_outage_is_served_tracked_and_resynced_with_the_last_consistent_point_kept() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    const SIZE: u64 = 8 << 20;
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "", "");
    c.agent_extra = "engine_timeout = \"1s\"\non_engine_loss = \"track\"".into();
    c.launch();
    c.start_agents();
    let mut rng = seeded_rng();
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&c, &mut rng, 20, SIZE, &mut model);
    let before_outage = model.clone();
    assert_eq!(c.wait_shipped(), 20);

    // The engine goes away: the guest's writes go on, acknowledged from the local disk.
    c.kill_engine();
    let started = Instant::now();
    write_blocks(&c, &mut rng, 30, SIZE, &mut model);
    assert!(started.elapsed() < Duration::from_secs(20), "writes stalled during the outage: {:?}", started.elapsed());

    // It comes back: the agent resyncs the dirty regions, the guest writing all along.
    c.start_engine();
    write_blocks(&c, &mut rng, 10, SIZE, &mut model);
    c.wait_log_within("agent-vm1", "resync sent", Duration::from_secs(60));
    // The agent says what it knows: the engine holds the regions; the target's point comes later.
    let agent_log = c.log("agent-vm1");
    assert!(agent_log.contains("the engine holds every dirty region") && !agent_log.contains("resync complete"), "{agent_log}");
    c.wait_log_within("engine", "resync of volume(s) data complete", Duration::from_secs(30));
    write_blocks(&c, &mut rng, 5, SIZE, &mut model);
    c.wait_shipped();

    // The stretch from the first resync record to the resync point is not consistent; the
    // point before it is the image before the outage, the latest the source disk.
    let h = c.history();
    let spans = h["inconsistent"].as_array().unwrap();
    let resync = spans.iter().find(|s| s["kind"] == "resync").unwrap_or_else(|| panic!("no resync span: {h:#}"));
    let (from, to) = (resync["from"].as_u64().unwrap(), resync["to"].as_u64().unwrap());
    let got = c.recover("data", &["--seq", &(from - 1).to_string()]);
    assert!(got == before_outage, "the last point before the resync: {}", first_difference(&got, &before_outage));
    let (code, _, err) = run_code(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp", "--volume", "data", "--seq", &(from + 1).min(to - 1).to_string(), "--out"])
            .arg(c.path("inside.img"))
            .arg("--config")
            .arg(c.target_toml()),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("resync") && err.contains("not a consistent point"), "{err}");
    let latest = c.recover("data", &["--latest"]);
    assert!(latest == model, "latest: {}", first_difference(&latest, &model));
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica and source differ: {}", first_difference(&latest, &source));
    // Only the regions the outage dirtied were sent again.
    let resync_records = c.target_records().iter().filter(|r| r.1 == WriteKind::Resync).count();
    assert!(resync_records > 0 && resync_records < 30 + 10 + 8, "{resync_records} resync records");
}

#[test]
fn agent_killed_with_writes_in_flight_resends_only_its_dirty_regions() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    const SIZE: u64 = 64 << 20;
    const HOT: u64 = 6 << 20; // writes touch the first 6 of 64 regions
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "", "");
    c.launch();
    c.start_agents();
    let uri = c.uri("data");
    let src = c.path("kill.bin");
    let writer = std::thread::spawn(move || {
        let mut rng = seeded_rng();
        let mut session = QemuIoSession::start(&uri);
        for _ in 0..100_000 {
            let off = rng.gen_range(0..HOT / BLOCK) * BLOCK;
            std::fs::write(&src, random_bytes(&mut rng, BLOCK as usize)).unwrap();
            if session.try_write_file(&src, off, BLOCK, Duration::from_secs(30)).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    c.kill_agent("vm1");
    writer.join().unwrap();
    c.start_agent("vm1");
    c.wait_log_within("agent-vm1", "were dirty when the agent stopped", Duration::from_secs(10));
    c.wait_log_within("agent-vm1", "resync sent", Duration::from_secs(60));
    c.wait_shipped();
    let log = c.log("agent-vm1");
    let dirty: u64 = log
        .split("region(s) were dirty")
        .next()
        .and_then(|s| s.rsplit(' ').nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dirty count in the log:\n{log}"));
    assert!((1..=HOT >> 20).contains(&dirty), "{dirty} dirty regions; only {} were written", HOT >> 20);
    // Exactly those regions were sent again, nothing more.
    let resync_bytes: u64 = c.target_records().iter().filter(|r| r.1 == WriteKind::Resync).map(|r| u64::from(r.2)).sum();
    assert_eq!(resync_bytes, dirty << 20, "resync sent {resync_bytes} bytes for {dirty} dirty region(s)");
    let latest = c.recover("data", &["--latest"]);
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica and source differ: {}", first_difference(&latest, &source));
}
