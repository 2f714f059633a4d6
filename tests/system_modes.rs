//! Replication modes with the real binaries, the target behind a WAN emulator: sync survives
//! losing the source site, a cut link degrades sync to cdp and back, a mode change under load
//! keeps the write order, and status reports the lag and the RPO.
//!
//! One qemu-io writes 4 KiB blocks one at a time, so the group's sequence numbers follow its
//! writes one to one: the image at seq k is the model after the first k acknowledged writes.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::wan::WanProxy;
use common::*;
use rand::{Rng, SeedableRng};

const VOLUME_SIZE: u64 = 2 << 20;
const BLOCK: u64 = 4096;

/// One writer's acknowledged writes, in order, and the image they make.
struct Writes {
    acked: Vec<(u64, Vec<u8>)>,
    /// Writes that reached the target only inside a resync (the write in flight when the
    /// agent died, found on its local disk): (the resync point's seq, its index in `acked`).
    via_resync: Vec<(u64, usize)>,
}

impl Writes {
    fn image_after(&self, n: usize) -> Vec<u8> {
        let mut img = vec![0u8; VOLUME_SIZE as usize];
        for (off, data) in &self.acked[..n] {
            img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        img
    }
}

type Write = (u64, Vec<u8>);

/// Writes up to `count` random blocks (from `seed`) with one qemu-io, one at a time, and says
/// on `progress` once `n` are acknowledged. Returns the acknowledged writes, and the write in
/// flight if one failed (then it stops).
fn write_blocks_from(
    uri: &str,
    src: &Path,
    seed: u64,
    count: usize,
    progress: Option<(usize, std::sync::mpsc::Sender<()>)>,
) -> (Vec<Write>, Option<Write>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut session = QemuIoSession::start(uri);
    let mut acked = Vec::new();
    for _ in 0..count {
        let off = rng.gen_range(0..VOLUME_SIZE / BLOCK) * BLOCK;
        let data = random_bytes(&mut rng, BLOCK as usize);
        std::fs::write(src, &data).unwrap();
        if let Err(e) = session.try_write_file(src, off, BLOCK, Duration::from_secs(30)) {
            eprintln!("write stopped: {e}");
            return (acked, Some((off, data)));
        }
        acked.push((off, data));
        if let Some((n, tx)) = &progress {
            if acked.len() == *n {
                let _ = tx.send(());
            }
        }
    }
    session.finish();
    (acked, None)
}

/// Writes `count` blocks in a background thread.
fn spawn_writer(
    c: &Cluster,
    seed: u64,
    count: usize,
    progress: Option<(usize, std::sync::mpsc::Sender<()>)>,
) -> std::thread::JoinHandle<(Vec<Write>, Option<Write>)> {
    let (uri, src) = (c.uri("data"), c.path(&format!("block-{seed}.bin")));
    std::thread::spawn(move || write_blocks_from(&uri, &src, seed, count, progress))
}

/// Writes `count` blocks; every one must be acknowledged.
fn write_blocks(c: &Cluster, rng: &mut impl Rng, count: usize, writes: &mut Writes) {
    let (acked, failed) = write_blocks_from(&c.uri("data"), &c.path("block.bin"), rng.gen(), count, None);
    assert!(failed.is_none(), "a write failed");
    writes.acked.extend(acked);
}

/// A cluster with one volume whose engine ships through a WAN proxy.
fn cluster(group_extra: &str) -> (Cluster, WanProxy) {
    cluster_via_wan(VOLUME_SIZE, |c| c.group_extra = group_extra.to_string())
}

/// The target holds every acknowledged write: its latest image is the model, or the model
/// plus the one write that was in flight.
fn assert_target_holds(c: &Cluster, writes: &Writes, in_flight: Option<&(u64, Vec<u8>)>) {
    let got = c.recover("data", &["--latest"]);
    let want = writes.image_after(writes.acked.len());
    if got == want {
        return;
    }
    let (off, data) = in_flight.unwrap_or_else(|| panic!("the target lacks acknowledged writes: {}", first_difference(&got, &want)));
    let mut with = want;
    with[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    assert!(got == with, "the target lacks acknowledged writes: {}", first_difference(&got, &with));
}

/// Recovers random consistent sequence numbers (outside the spans history calls
/// inconsistent) and compares each with the model after the writes before it. Interval points
/// and superseded records come from the target's journal.
fn assert_prefixes(c: &Cluster, writes: &Writes, rng: &mut impl Rng, points: usize) {
    c.settle();
    let records: Vec<_> = c.target_records().into_iter().map(|(seq, kind, _)| (seq, kind)).collect();
    use hindsight_consistency::WriteKind;
    // Guest writes (a resync's records re-send what is on the local disk; they are not).
    let is_write = |k: &WriteKind| matches!(k, WriteKind::Data | WriteKind::Zeroes | WriteKind::Trim | WriteKind::Superseded);
    let guest_writes = records.iter().filter(|(_, k)| is_write(k)).count();
    assert!(guest_writes <= writes.acked.len(), "more guest write records ({guest_writes}) than acknowledged writes");
    let h = c.history();
    let spans: Vec<(u64, u64)> =
        h["inconsistent"].as_array().unwrap().iter().map(|s| (s["from"].as_u64().unwrap(), s["to"].as_u64().unwrap_or(u64::MAX))).collect();
    let consistent: Vec<u64> = records.iter().map(|(s, _)| *s).filter(|s| !spans.iter().any(|(f, t)| s >= f && s < t)).collect();
    for _ in 0..points {
        let k = consistent[rng.gen_range(0..consistent.len())];
        let before = records.iter().filter(|(s, kind)| *s <= k && is_write(kind)).count()
            + writes.via_resync.iter().filter(|(point, _)| *point <= k).count();
        let got = c.recover("data", &["--seq", &k.to_string()]);
        assert!(got == writes.image_after(before), "seq {k}: {}", first_difference(&got, &writes.image_after(before)));
    }
}

#[test]
fn sync_acknowledged_writes_survive_losing_the_source_site() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (mut c, proxy) = cluster("mode = \"sync\"\non_sync_loss = \"block\"\nsync_timeout = \"60s\"");
    proxy.set_delay(Duration::from_millis(5));
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut writes = Writes { acked: Vec::new(), via_resync: Vec::new() };
    for round in 0..3 {
        // The target dies under load and comes back: sync writes wait for it (block).
        let writer = spawn_writer(&c, rng.gen(), 20, None);
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..600)));
        c.kill_target();
        std::thread::sleep(Duration::from_millis(300));
        c.start_target();
        let (acked, failed) = writer.join().unwrap();
        assert!(failed.is_none() && acked.len() == 20, "round {round}: a write failed while the target restarted");
        writes.acked.extend(acked);

        // The whole source site dies in the middle of the writes: agent and engine, kill -9.
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = spawn_writer(&c, rng.gen(), 1000, Some((rng.gen_range(5..30), tx)));
        rx.recv_timeout(Duration::from_secs(60)).expect("writes under load");
        c.kill_engine();
        c.kill_agent("vm1");
        let (acked, in_flight) = writer.join().unwrap();
        assert!(in_flight.is_some(), "the writer kept writing with the source site gone");
        writes.acked.extend(acked);
        // Every acknowledged write is at the target, with the engine gone.
        assert_target_holds(&c, &writes, in_flight.as_ref());
        // The write that was in flight may have reached the engine's journal or the local disk
        // (the agent resyncs its dirty regions when it comes back): then the model takes it.
        c.start_engine();
        c.start_agent("vm1");
        // The agent died with a write in flight: it resyncs that region when it is back.
        let start = Instant::now();
        while c.log("agent-vm1").matches("resync sent").count() <= round {
            assert!(start.elapsed() < Duration::from_secs(60), "round {round}: the agent's resync never completed");
            std::thread::sleep(Duration::from_millis(100));
        }
        c.settle();
        let latest = c.recover("data", &["--latest"]);
        if latest != writes.image_after(writes.acked.len()) {
            let guest_records = c.target_records().iter().filter(|(_, k, _)| matches!(k, hindsight_consistency::WriteKind::Data)).count();
            // Each earlier write that came with a resync has no record of its own.
            if guest_records == writes.acked.len() - writes.via_resync.len() {
                // Not numbered as a guest write: it came with the resync, before its point.
                let point = c.history()["inconsistent"].as_array().unwrap().iter().rev().find(|s| s["kind"] == "resync").unwrap()["to"]
                    .as_u64()
                    .unwrap();
                writes.via_resync.push((point, writes.acked.len()));
            }
            writes.acked.push(in_flight.expect("the target differs from the acknowledged writes"));
            assert!(
                latest == writes.image_after(writes.acked.len()),
                "round {round}: the target is neither with nor without the write in flight"
            );
        }
    }
    assert_prefixes(&c, &writes, &mut rng, 5);
    let s = c.status();
    assert_eq!((s["mode"].as_str(), s["effective_mode"].as_str()), (Some("sync"), Some("sync")), "{s:#}");
}

#[test]
fn degrade_policy_switches_to_cdp_on_a_cut_and_back_to_sync_after_catching_up() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (c, proxy) = cluster("mode = \"sync\"\non_sync_loss = \"degrade\"\nsync_timeout = \"1s\"");
    let mut rng = seeded_rng();
    let mut writes = Writes { acked: Vec::new(), via_resync: Vec::new() };
    write_blocks(&c, &mut rng, 20, &mut writes);
    let s = c.status();
    assert_eq!(s["effective_mode"], "sync", "{s:#}");
    assert!(s["target_connected"].as_bool().unwrap(), "{s:#}");

    proxy.cut();
    // Writes go on, acknowledged by the engine alone.
    let started = Instant::now();
    write_blocks(&c, &mut rng, 30, &mut writes);
    assert!(started.elapsed() < Duration::from_secs(20), "writes stalled after the cut: {:?}", started.elapsed());
    let s = c.wait_status("degraded status", Duration::from_secs(10), |s| s["effective_mode"] == "cdp");
    assert_eq!(s["mode"], "sync");
    assert!(s["reason"].as_str().unwrap().contains("degraded to cdp"), "{s:#}");
    assert!(s["lag_writes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(c.log("engine").contains("degraded to cdp"), "the engine logs the degradation");

    proxy.restore();
    let s = c.wait_status("back to sync", Duration::from_secs(30), |s| s["effective_mode"] == "sync");
    assert_eq!(s["lag_writes"], 0, "{s:#}");
    write_blocks(&c, &mut rng, 10, &mut writes);
    assert_prefixes(&c, &writes, &mut rng, 6);
    assert_eq!(c.recover("data", &["--latest"]), writes.image_after(writes.acked.len()));
}

#[test]
fn mode_change_under_load_keeps_every_write_in_order() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (c, _proxy) = cluster("interval = \"1s\"");
    let mut rng = seeded_rng();
    let mut writes = Writes { acked: Vec::new(), via_resync: Vec::new() };
    let set_mode = |mode: &str| {
        let out =
            run_ok(Command::new(hindsight_bin()).args(["group", "set-mode", "--group", "erp", mode, "--config"]).arg(c.engine_toml()));
        assert!(out.contains(&format!("mode {mode}")), "{out}");
    };
    // A second writer changes the mode while the first keeps writing.
    let engine_toml = c.engine_toml();
    let changer = std::thread::spawn(move || {
        for mode in ["sync", "async", "cdp", "async", "sync", "cdp", "sync"] {
            std::thread::sleep(Duration::from_millis(400));
            run_ok(Command::new(hindsight_bin()).args(["group", "set-mode", "--group", "erp", mode, "--config"]).arg(&engine_toml));
        }
    });
    write_blocks(&c, &mut rng, 200, &mut writes);
    changer.join().unwrap();
    assert_eq!(c.status()["mode"], "sync");
    set_mode("cdp");
    write_blocks(&c, &mut rng, 10, &mut writes);
    assert_prefixes(&c, &writes, &mut rng, 8);
    let err = run_code(
        Command::new(hindsight_bin()).args(["group", "set-mode", "--group", "nope", "sync", "--config"]).arg(c.engine_toml()),
        Duration::from_secs(10),
    );
    assert_eq!(err.0, Some(1));
    assert!(err.2.contains("no group \"nope\""), "{}", err.2);
}

#[test]
fn status_shows_the_lag_and_raises_the_rpo_alert() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (c, proxy) = cluster("rpo = \"1s\"");
    let mut rng = seeded_rng();
    let mut writes = Writes { acked: Vec::new(), via_resync: Vec::new() };
    write_blocks(&c, &mut rng, 5, &mut writes);
    let s = c.wait_status("caught up", Duration::from_secs(10), |s| s["lag_writes"] == 0);
    assert!(s["rpo_ok"].as_bool().unwrap() && s["rpo_ms"] == 1000, "{s:#}");

    proxy.stall(true);
    write_blocks(&c, &mut rng, 5, &mut writes);
    let s = c.wait_status("the RPO alert", Duration::from_secs(10), |s| s["rpo_ok"] == false);
    assert_eq!(s["lag_writes"], 5, "{s:#}");
    assert_eq!(s["lag_bytes"], 5 * BLOCK, "{s:#}");
    assert!(s["lag_ms"].as_u64().unwrap() >= 1000, "{s:#}");
    assert!(c.log("engine").contains("RPO 1s exceeded"), "the engine logs the alert");
    let human = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(c.engine_toml()));
    assert!(human.contains("EXCEEDED") && human.contains("5 records"), "{human}");

    proxy.stall(false);
    let s = c.wait_status("the RPO to hold again", Duration::from_secs(10), |s| s["rpo_ok"] == true);
    assert_eq!(s["lag_writes"], 0, "{s:#}");
    assert_eq!(c.recover("data", &["--latest"]), writes.image_after(writes.acked.len()));
}

/// Writes `count` blocks picked from the first `hot` blocks of the volume (an overwrite-heavy
/// workload), all acknowledged.
fn write_hot_blocks(c: &Cluster, rng: &mut impl Rng, count: usize, hot: u64, writes: &mut Writes) {
    let mut session = QemuIoSession::start(&c.uri("data"));
    let src = c.path("hot.bin");
    for _ in 0..count {
        let off = rng.gen_range(0..hot) * BLOCK;
        let data = random_bytes(rng, BLOCK as usize);
        std::fs::write(&src, &data).unwrap();
        session.write_file(&src, off, BLOCK);
        writes.acked.push((off, data));
    }
    session.finish();
}

#[test]
fn async_sends_far_fewer_bytes_and_every_interval_point_recovers_its_image() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut bytes = Vec::new();
    for mode in ["cdp", "async"] {
        let (c, proxy) = cluster(&format!("mode = \"{mode}\"\ninterval = \"1s\"\ncompression = \"off\""));
        let mut rng = seeded_rng();
        let mut writes = Writes { acked: Vec::new(), via_resync: Vec::new() };
        // Three intervals of overwrites of 8 hot blocks.
        for _ in 0..3 {
            write_hot_blocks(&c, &mut rng, 120, 8, &mut writes);
            std::thread::sleep(Duration::from_millis(1200));
        }
        let last = c.wait_shipped();
        let sent = proxy.bytes_up();
        eprintln!("{mode}: {} writes, {sent} bytes to the target, last seq {last}", writes.acked.len());
        bytes.push(sent);
        if mode == "cdp" {
            continue;
        }
        // Every interval point recovers to the model after the writes before it.
        let records: Vec<_> = c.target_records().into_iter().map(|(seq, kind, _)| (seq, kind)).collect();
        let points: Vec<u64> = records.iter().filter(|(_, k)| *k == hindsight_consistency::WriteKind::Point).map(|(s, _)| *s).collect();
        let superseded = records.iter().filter(|(_, k)| *k == hindsight_consistency::WriteKind::Superseded).count();
        assert!(points.len() >= 3, "interval points: {points:?}");
        assert!(superseded > 300, "only {superseded} writes were left out of the deltas");
        for &p in &points {
            let before = records
                .iter()
                .filter(|(s, k)| *s < p && (k.changes_volume() || *k == hindsight_consistency::WriteKind::Superseded))
                .count();
            let got = c.recover("data", &["--seq", &p.to_string()]);
            assert!(got == writes.image_after(before), "point seq {p}: {}", first_difference(&got, &writes.image_after(before)));
        }
        // Inside a delta there is no consistent image: recovery says where the points are.
        let inside = records.iter().find(|(_, k)| *k == hindsight_consistency::WriteKind::Superseded).unwrap().0;
        let (code, _, err) = run_code(
            Command::new(hindsight_bin())
                .args(["recover", "--group", "erp", "--volume", "data", "--seq", &inside.to_string(), "--out"])
                .arg(c.path("x.img"))
                .arg("--config")
                .arg(c.target_toml()),
            Duration::from_secs(30),
        );
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("not a consistent point") && err.contains("async delta"), "{err}");
        // --latest is the last point, which is the model after every write.
        assert_eq!(c.recover("data", &["--latest"]), writes.image_after(writes.acked.len()));
        let h = c.history();
        assert!(!h["inconsistent"].as_array().unwrap().is_empty(), "{h:#}");
        let s = c.status();
        assert_eq!(s["mode"], "async", "{s:#}");
    }
    assert!(bytes[1] * 5 <= bytes[0], "async sent {} bytes, cdp {}: not 5x fewer", bytes[1], bytes[0]);
}

#[test]
fn regulation_slows_acknowledgements_to_keep_the_lag_near_the_rpo() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // A 256 KiB/s link and a writer that could go much faster: without regulation the lag
    // would grow for as long as it writes.
    let (c, proxy) = cluster("rpo = \"1s\"\nregulate = true\ncompression = \"off\"");
    proxy.set_rate(256 << 10);
    let uri = c.uri("data");
    let src = c.path("big.bin");
    std::fs::write(&src, random_bytes(&mut seeded_rng(), 64 << 10)).unwrap();
    let writer = std::thread::spawn(move || {
        let mut session = QemuIoSession::start(&uri);
        // First a light load, below the link's rate, while the engine learns that rate from
        // the target's confirmations; then as fast as the acknowledgements allow.
        for n in 0..8 {
            session.write_file(&src, n * (64 << 10), 64 << 10);
            std::thread::sleep(Duration::from_millis(400));
        }
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(8) {
            session.write_file(&src, (n % 16) * (64 << 10), 64 << 10);
            n += 1;
        }
        session.finish();
        n
    });
    std::thread::sleep(Duration::from_millis(3200));
    let mut regulating = false;
    let mut worst = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let s = c.status();
        regulating |= s["regulating"] == true;
        if started.elapsed() > Duration::from_secs(4) {
            worst = worst.max(s["lag_ms"].as_u64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let writes = writer.join().unwrap();
    eprintln!("{writes} writes of 64 KiB in 8 s; worst lag after 4 s: {worst} ms");
    assert!(regulating, "status never showed regulation");
    assert!(c.log("engine").contains("slowing acknowledgements"), "the engine logs it");
    // Unregulated, 8 s of writes at local speed would leave tens of seconds of lag on this link.
    assert!(worst < 4000, "the lag reached {worst} ms with a 1 s RPO");
}
