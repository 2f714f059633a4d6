//! Retention tiers with the real binaries, compressed to seconds: random writes through the
//! agent with qemu-io, bookmarks, an export that pins history, and kill -9 of the target
//! (seeded) while history is being thinned; at the end every point `history` lists, in every
//! tier, recovers equal to a model of the acknowledged writes, a point between two kept ones
//! is refused with both named, and the bookmarks inside the tiers' span recover.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{first_difference, have_tools, hindsight_bin, run_ok, run_timeout, Cluster, Vol};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 2 << 20;
const BLOCK: u64 = 4096;
/// Every write for 4 s, a point per 2 s to 20 s, a point per 4 s to 40 s.
const TIERS: &str = "segment_size = \"1MiB\"\n\
    [[target.tier]]\nevery = \"write\"\nfor = \"4s\"\n\
    [[target.tier]]\nevery = \"2s\"\nfor = \"20s\"\n\
    [[target.tier]]\nevery = \"4s\"\nfor = \"40s\"\n";

/// What each record did, by sequence number (index 0 is seq 1); a bookmark changes nothing.
#[derive(Clone, Copy)]
enum Rec {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
    Bookmark,
}

/// The volume after record `seq`.
fn model(log: &[Rec], seq: u64) -> Vec<u8> {
    let mut img = vec![0u8; SIZE as usize];
    for r in &log[..seq as usize] {
        match *r {
            Rec::Write { off, len, byte } => img[off as usize..(off + len) as usize].fill(byte),
            Rec::Zero { off, len } => img[off as usize..(off + len) as usize].fill(0),
            Rec::Bookmark => {}
        }
    }
    img
}

fn qemu_io(c: &Cluster, ops: &[Rec]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &c.uri("disk1")]);
    for op in ops {
        cmd.arg("-c").arg(match *op {
            Rec::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Rec::Zero { off, len } => format!("write -z {off} {len}"),
            Rec::Bookmark => unreachable!(),
        });
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io reported a failure: {out}");
}

fn random_op(rng: &mut impl Rng) -> Rec {
    let blocks = rng.gen_range(1..=8u64);
    let off = rng.gen_range(0..SIZE / BLOCK - blocks) * BLOCK;
    if rng.gen_range(0..12) == 0 {
        Rec::Zero { off, len: blocks * BLOCK }
    } else {
        Rec::Write { off, len: blocks * BLOCK, byte: rng.gen_range(1..=255) }
    }
}

fn export(c: &Cluster, seq: u64) -> (Child, String) {
    let sock = c.path("tiers-export.sock");
    let (child, ready) = common::spawn_until_line(
        Command::new(hindsight_bin())
            .args(["export", "--group", "erp", "--volume", "disk1", "--seq", &seq.to_string(), "--config"])
            .arg(c.target_toml())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display())),
        Duration::from_secs(30),
    );
    assert!(ready.starts_with(&format!("exporting group erp at seq {seq} ")), "{ready}");
    (child, format!("nbd+unix:///disk1?socket={}", sock.display()))
}

#[test]
fn every_point_of_every_tier_recovers_equal_to_the_model_through_thinning_exports_and_target_kills() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Cluster::start_with(&[Vol::new("vm1", "disk1", SIZE)], TIERS);
    let mut log: Vec<Rec> = Vec::new();
    let mut bookmarks: Vec<(String, u64)> = Vec::new();
    let kills: Vec<u64> = {
        let mut k: Vec<u64> = (0..3).map(|_| rng.gen_range(8..40)).collect();
        k.sort_unstable();
        k
    };
    let started = Instant::now();
    let mut exported = false;
    let mut next_kill = 0;
    while started.elapsed() < Duration::from_secs(46) {
        let ops: Vec<Rec> = (0..rng.gen_range(3..8)).map(|_| random_op(&mut rng)).collect();
        qemu_io(&c, &ops);
        log.extend(&ops);
        let secs = started.elapsed().as_secs();
        if bookmarks.len() < secs as usize / 7 {
            let name = format!("b{}", bookmarks.len());
            let out = run_ok(
                Command::new(hindsight_bin()).args(["bookmark", "--json", "--group", "erp", "--config"]).arg(c.engine_toml()).arg(&name),
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let seq = v[0]["seq"].as_u64().unwrap();
            assert_eq!(seq as usize, log.len() + 1, "the bookmark is the record after the writes acknowledged before it");
            log.push(Rec::Bookmark);
            bookmarks.push((name, seq));
        }
        if !exported && secs >= 14 {
            // An export pins history: thinning waits until it stops; its bytes are the model's.
            let seq = c.wait_target_seq_settled(log.len() as u64);
            let (mut child, uri) = export(&c, seq);
            std::thread::sleep(Duration::from_secs(3));
            let out = c.path("export-read.img");
            run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
            let got = std::fs::read(&out).unwrap();
            assert!(got == model(&log, seq), "export of seq {seq} differs from the model: {}", first_difference(&got, &model(&log, seq)));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
            child.wait().unwrap();
            exported = true;
        }
        if next_kill < kills.len() && secs >= kills[next_kill] {
            eprintln!("kill -9 of the target at {secs} s");
            c.kill_target();
            c.start_target();
            next_kill += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..200)));
    }
    let last = c.wait_target_seq_settled(log.len() as u64);
    assert_eq!(last as usize, log.len());
    // Let the last segments leave the first tier and be thinned.
    std::thread::sleep(Duration::from_secs(6));
    let h = c.history();
    let tiers = h["tiers"].as_array().unwrap_or_else(|| panic!("no tiers in the history: {h}"));
    assert_eq!(tiers.len(), 3, "{h}");
    let kept = |t: &serde_json::Value| -> Vec<u64> { t["kept"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect() };
    let (mid, coarse) = (kept(&tiers[1]), kept(&tiers[2]));
    assert!(mid.len() >= 5 && !coarse.is_empty(), "points per tier: {} and {}: {h}", mid.len(), coarse.len());
    let base = h["first_seq"].as_u64().unwrap();
    eprintln!(
        "{} records; base at seq {base}; {} and {} points in the thinned tiers; first tier from seq {}",
        log.len(),
        mid.len(),
        coarse.len(),
        tiers[0]["oldest"][0]
    );
    assert!(base > 0, "records past the last tier rolled into the base: {h}");
    assert!(c.log("target").contains("retention waits") || c.log("target").contains("pinned"), "the export pinned history");

    // Every kept point of the thinned tiers, the base, and a sample of the first tier.
    let first_tier = tiers[0]["oldest"][0].as_u64().unwrap();
    let mut points: Vec<u64> = coarse.iter().chain(&mid).copied().collect();
    points.extend([base, first_tier, (first_tier + last) / 2, last]);
    for seq in &points {
        let img = c.recover("disk1", &["--seq", &seq.to_string()]);
        let want = model(&log, *seq);
        assert!(img == want, "seq {seq}: recovered image differs from the model: {}", first_difference(&img, &want));
    }
    let source = std::fs::read(c.disk("disk1")).unwrap();
    assert!(source == model(&log, last), "the source disk differs from the model");

    // A point between two kept ones is refused, naming both.
    let all: Vec<u64> = {
        let mut v: Vec<u64> = coarse.iter().chain(&mid).copied().collect();
        v.sort_unstable();
        v
    };
    let (a, b) = all.windows(2).map(|w| (w[0], w[1])).find(|(a, b)| b - a > 1).expect("two kept points with writes between them");
    let out = c.path("refused.img");
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp", "--volume", "disk1", "--seq", &(a + 1).to_string(), "--config"])
            .arg(c.target_toml())
            .arg("--out")
            .arg(&out),
        Duration::from_secs(30),
    );
    assert!(!ok, "a point between kept points must be refused");
    assert!(
        err.contains(&format!("seq {} is not kept", a + 1)) && err.contains(&format!("seq {a} (")) && err.contains(&format!("seq {b} (")),
        "{err}"
    );

    // Bookmarks younger than the last tier survive every thinning.
    let listed: Vec<u64> = h["bookmarks"].as_array().unwrap().iter().map(|b| b["seq"].as_u64().unwrap()).collect();
    let mut checked = 0;
    for (name, seq) in bookmarks.iter().filter(|(_, s)| *s > base) {
        assert!(listed.contains(seq), "bookmark {name} (seq {seq}) is gone from the history: {h}");
        let img = c.recover("disk1", &["--bookmark", name]);
        assert!(img == model(&log, *seq), "bookmark {name} (seq {seq}) differs from the model");
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} bookmarks inside the tiers");

    // A failover to a point of thinned history promotes exactly that point.
    let point = mid[mid.len() / 2];
    let report = c.failover_json(&["--seq", &point.to_string()]);
    assert_eq!(report["seq"].as_u64(), Some(point), "{report}");
    let promoted = std::fs::read(c.promoted("disk1")).unwrap();
    let want = model(&log, point);
    assert!(promoted == want, "the volume promoted at seq {point} differs from the model: {}", first_difference(&promoted, &want));
}

#[test]
fn a_full_budget_drops_the_coarsest_points_first_and_says_which_tier_lost_what() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // Tiers far longer than the run: only the budget (two segments of 1 MiB) thins history.
    let tiers = "segment_size = \"1MiB\"\njournal_size = \"2MiB\"\n\
        [[target.tier]]\nevery = \"write\"\nfor = \"1h\"\n\
        [[target.tier]]\nevery = \"1s\"\nfor = \"2h\"\n";
    let c = Cluster::start_with(&[Vol::new("vm1", "disk1", SIZE)], tiers);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut log: Vec<Rec> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(16) {
        let ops: Vec<Rec> = (0..6).map(|_| random_op(&mut rng)).collect();
        qemu_io(&c, &ops);
        log.extend(&ops);
        // A segment then spans a few seconds: several 1 s points each.
        std::thread::sleep(Duration::from_millis(150));
    }
    let last = c.wait_target_seq_settled(log.len() as u64);
    c.wait_log_within("target", "history reached journal_size", Duration::from_secs(20));
    let target_log = c.log("target");
    assert!(target_log.contains("is thinned to the next tier's points to stay within it"), "the first tier was thinned early, and said so");
    // Once thinned history itself is over the budget, its oldest points go, and the log says
    // how old and from which tier.
    c.wait_log_within("target", "points older than", Duration::from_secs(20));
    let target_log = c.log("target");
    let lines: Vec<&str> = target_log.lines().filter(|l| l.contains("points older than")).collect();
    assert!(lines.iter().all(|l| l.contains("were dropped to stay within it")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(" point(s) of the 1s tier")), "no drop named the tier it took points from: {lines:#?}");
    let h = c.history();
    let base = h["first_seq"].as_u64().unwrap();
    assert!(base > 0, "the oldest points were dropped into the base: {h}");
    let tiers = h["tiers"].as_array().unwrap();
    let history_bytes: u64 = tiers.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert!(history_bytes <= 3 << 20, "history takes {history_bytes} bytes over a 2 MiB budget (one segment of slack): {h}");
    // The estimate says how much of each tier the budget holds at the rate measured now.
    let text = run_ok(Command::new(hindsight_bin()).args(["history", "--estimate", "--group", "erp", "--config"]).arg(c.target_toml()));
    assert!(text.contains("  estimate within journal_size 2.0 MiB, at the rates measured now:\n"), "{text}");
    assert!(text.contains("    every write          needs ") && text.contains("covers "), "the budget holds far less than an hour: {text}");
    let kept: Vec<u64> = tiers[1]["kept"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    for seq in kept.iter().copied().chain([base, last]) {
        let img = c.recover("disk1", &["--seq", &seq.to_string()]);
        assert!(img == model(&log, seq), "seq {seq} differs from the model");
    }
}
