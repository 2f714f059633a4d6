//! Journal-full policies (`on_journal_full`) with the real binaries: each does what it says,
//! says so in `hindsight status` and the logs, and no acknowledged write is lost.
//!
//! - engine journal full, `block`: the guest's writes wait until the target takes records;
//! - engine journal full, `pause_and_track`: the guest runs on, the agent tracks, and a
//!   resync follows with the point before the pause still recoverable;
//! - target journal full, `trim_history`: points inside retention are folded away, and said;
//! - target journal full, `block`: nothing inside retention is folded; the engine's journal
//!   absorbs the writes until it is full too, then they wait; once retention frees room all
//!   flows again;
//! - target journal full, `pause_and_track`: the group pauses at once, the agent tracks, and
//!   resyncs once retention frees room.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use hindsight_consistency::WriteKind;

const SIZE: u64 = 16 << 20;
const WRITE: u64 = 64 << 10;

/// `n` writes of 64 KiB, write `i` at `(i * 64 KiB) % SIZE` filled with `first + i`: the
/// model after each prefix is known.
struct Writes {
    first: u64,
    n: u64,
}

impl Writes {
    /// Applies write `i` to `img`.
    fn apply(&self, img: &mut [u8], i: u64) {
        let off = ((self.first + i) * WRITE % SIZE) as usize;
        img[off..off + WRITE as usize].fill(((self.first + i) % 250 + 1) as u8);
    }

    fn image_after(&self, base: &[u8], k: u64) -> Vec<u8> {
        let mut img = base.to_vec();
        for i in 0..k {
            self.apply(&mut img, i);
        }
        img
    }

    /// Runs them through one qemu-io session on another thread; the receiver gets how many
    /// were acknowledged, when done.
    fn spawn(&self, c: &Cluster) -> mpsc::Receiver<Result<u64, String>> {
        let (tx, rx) = mpsc::channel();
        let uri = c.uri("data");
        let (first, n) = (self.first, self.n);
        let dir = c.path("writes");
        std::fs::create_dir_all(&dir).unwrap();
        std::thread::spawn(move || {
            let mut s = QemuIoSession::start(&uri);
            for i in 0..n {
                let src = dir.join(format!("{}.bin", first + i));
                std::fs::write(&src, vec![((first + i) % 250 + 1) as u8; WRITE as usize]).unwrap();
                if let Err(e) = s.try_write_file(&src, (first + i) * WRITE % SIZE, WRITE, Duration::from_secs(120)) {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            s.finish();
            let _ = tx.send(Ok(n));
        });
        rx
    }

    fn run(&self, c: &Cluster, within: Duration) {
        let rx = self.spawn(c);
        match rx.recv_timeout(within) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("{} writes did not finish within {within:?}; engine log:\n{}", self.n, c.log("engine")),
        }
    }
}

/// A cluster with 1 MiB journal segments everywhere, the given group and target lines.
fn cluster(group_extra: &str, target_extra: &str) -> Cluster {
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], &format!("segment_size = \"1MiB\"\n{target_extra}"), "");
    c.engine_extra = "segment_size = \"1MiB\"".into();
    c.group_extra = group_extra.into();
    c.agent_extra = "engine_timeout = \"120s\"".into();
    c.launch();
    c.start_agents();
    c
}

/// The latest image equals the model and the source disk.
fn check_latest(c: &Cluster, model: &[u8]) {
    c.wait_shipped();
    let latest = c.recover("data", &["--latest"]);
    assert!(latest == model, "latest vs model: {}", first_difference(&latest, model));
    let source = std::fs::read(c.disk("data")).unwrap();
    assert!(latest == source, "replica vs source: {}", first_difference(&latest, &source));
}

/// After a pause and its resync: the point before the resync span is an image of a prefix of
/// the writes (at least `min_prefix` of them); returns that prefix length.
fn check_point_before_resync(c: &Cluster, w: &Writes, base: &[u8], min_prefix: u64) -> u64 {
    let h = c.history();
    let spans = h["inconsistent"].as_array().unwrap();
    let resync = spans.iter().find(|s| s["kind"] == "resync").unwrap_or_else(|| panic!("no resync span: {h:#}"));
    let from = resync["from"].as_u64().unwrap();
    let got = c.recover("data", &["--seq", &(from - 1).to_string()]);
    let mut img = base.to_vec();
    let mut k = 0;
    while img != got {
        assert!(k < w.n, "seq {} is no prefix of the writes", from - 1);
        w.apply(&mut img, k);
        k += 1;
    }
    assert!(k >= min_prefix, "only {k} writes before the pause");
    k
}

#[test]
fn engine_journal_full_with_block_holds_the_writes_until_the_target_takes_them() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = cluster("journal_size = \"3MiB\"\non_journal_full = \"block\"", "");
    c.kill_target();
    // 5 MiB of writes: the engine's journal holds 3 MiB, then the guest waits.
    let w = Writes { first: 0, n: 80 };
    let done = w.spawn(&c);
    let g = c.wait_status("writes held", Duration::from_secs(60), |g| g["journal_state"].as_str().unwrap_or("").contains("writes held"));
    assert!(g["journal_bytes"].as_u64().unwrap() >= 3 << 20 && !g["paused"].as_bool().unwrap(), "{g:#}");
    assert_eq!(g["on_journal_full"], "block");
    std::thread::sleep(Duration::from_secs(1));
    assert!(done.try_recv().is_err(), "the writes finished although the journal was full");
    c.wait_log_within("engine", "on_journal_full = \"block\"", Duration::from_secs(5));

    c.start_target();
    match done.recv_timeout(Duration::from_secs(120)) {
        Ok(r) => assert_eq!(r, Ok(80)),
        Err(_) => panic!("the writes never finished after the target came back"),
    }
    c.wait_log_within("engine", "has room again", Duration::from_secs(30));
    let model = w.image_after(&vec![0; SIZE as usize], 80);
    check_latest(&c, &model);
    assert!(!c.target_records().iter().any(|r| r.1 == WriteKind::Resync), "block never tracks, so nothing is resynced");
    assert_eq!(c.status()["journal_state"], "");
}

#[test]
fn engine_journal_full_with_pause_and_track_keeps_the_guest_running_then_resyncs() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = cluster("journal_size = \"3MiB\"\non_journal_full = \"pause_and_track\"", "");
    c.kill_target();
    let base = vec![0u8; SIZE as usize];
    let w = Writes { first: 0, n: 80 };
    // The guest is never held: the writes past the journal's room are tracked.
    w.run(&c, Duration::from_secs(60));
    let g = c.wait_status("paused", Duration::from_secs(10), |g| g["paused"] == true);
    assert!(g["journal_state"].as_str().unwrap().contains("engine's journal is full"), "{g:#}");
    c.wait_log_within("agent-vm1", "paused the group of volume data", Duration::from_secs(5));
    // A bookmark now would not hold the tracked writes.
    let (code, _, err) = run_code(
        Command::new(hindsight_bin()).args(["bookmark", "during-pause", "--group", "erp", "--config"]).arg(c.engine_toml()),
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0), "a bookmark was placed in a paused group");
    assert!(err.contains("paused"), "{err}");

    c.start_target();
    c.wait_log_within("engine", "taking writes after a pause", Duration::from_secs(60));
    c.wait_log_within("engine", "resync of volume(s) data complete", Duration::from_secs(60));
    let model = w.image_after(&base, 80);
    check_latest(&c, &model);
    let k = check_point_before_resync(&c, &w, &base, 40);
    assert!(k < 80, "every write made it before the pause: the journal never filled");
    assert_eq!(c.status()["paused"], false);
}

#[test]
fn target_journal_full_with_trim_history_folds_points_inside_retention_and_says_so() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let c = cluster("", "journal_size = \"2MiB\"\nretention = \"1h\"");
    let w = Writes { first: 0, n: 96 };
    w.run(&c, Duration::from_secs(60));
    let model = w.image_after(&vec![0; SIZE as usize], 96);
    check_latest(&c, &model);
    // The target says it folded history with its next confirmation: one more write.
    c.wait_log_within("target", "younger than the retention", Duration::from_secs(10));
    let more = Writes { first: 96, n: 1 };
    more.run(&c, Duration::from_secs(30));
    let g = c.wait_status("the trim", Duration::from_secs(30), |g| {
        g["journal_state"].as_str().unwrap_or("").contains("target trimmed history inside its retention")
    });
    assert_eq!(g["on_journal_full"], "trim_history");
    c.wait_log_within("target", "younger than the retention", Duration::from_secs(5));
    c.wait_log_within("engine", "trimmed history inside its retention", Duration::from_secs(5));
    let h = c.history();
    assert!(h["first_seq"].as_u64().unwrap() > 0, "history was not trimmed: {h:#}");
    // `status --watch` reports again and again (here twice), each with the journal's state.
    let out = run_ok(Command::new(hindsight_bin()).args(["status", "--watch", "1", "--count", "2", "--config"]).arg(c.engine_toml()));
    assert_eq!(out.matches("\n-- ").count() + usize::from(out.starts_with("-- ")), 2, "{out}");
    assert_eq!(out.matches("target trimmed history inside its retention").count(), 2, "{out}");
}

#[test]
fn target_journal_full_with_block_keeps_history_and_backs_up_into_the_engine() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    const RETENTION: u64 = 8;
    let c =
        cluster("journal_size = \"3MiB\"\non_journal_full = \"block\"", &format!("journal_size = \"2MiB\"\nretention = \"{RETENTION}s\""));
    let started = Instant::now();
    // 6 MiB: the target takes 2 MiB and the engine 3 MiB; then the guest waits for the
    // retention to free room at the target.
    let w = Writes { first: 0, n: 96 };
    let done = w.spawn(&c);
    let g = c.wait_status("the target full", Duration::from_secs(60), |g| {
        g["journal_state"].as_str().unwrap_or("").contains("target journal full")
    });
    assert!(!g["paused"].as_bool().unwrap(), "{g:#}");
    let h = c.history();
    if started.elapsed() < Duration::from_secs(RETENTION - 2) {
        assert_eq!(h["first_seq"].as_u64().unwrap(), 0, "a point inside the retention was folded away: {h:#}");
    }
    c.wait_log_within("target", "no more records are taken", Duration::from_secs(5));
    match done.recv_timeout(Duration::from_secs(120)) {
        Ok(r) => assert_eq!(r, Ok(96)),
        Err(_) => panic!("the writes never finished; engine log:\n{}", c.log("engine")),
    }
    assert!(started.elapsed() >= Duration::from_secs(RETENTION - 1), "the writes did not wait for the retention");
    let model = w.image_after(&vec![0; SIZE as usize], 96);
    check_latest(&c, &model);
    assert!(!c.target_records().iter().any(|r| r.1 == WriteKind::Resync), "block never tracks");
    c.wait_log_within("engine", "the target's journal takes records again", Duration::from_secs(5));
}

#[test]
fn target_journal_full_with_pause_and_track_pauses_at_once_and_resyncs_after_retention() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let c = cluster("on_journal_full = \"pause_and_track\"", "journal_size = \"2MiB\"\nretention = \"8s\"");
    let base = vec![0u8; SIZE as usize];
    let w = Writes { first: 0, n: 96 };
    w.run(&c, Duration::from_secs(60));
    let g = c.wait_status("paused", Duration::from_secs(30), |g| g["paused"] == true);
    assert!(g["journal_state"].as_str().unwrap().contains("target journal full"), "{g:#}");
    // Meanwhile the target's newest point is an image of a prefix of the writes.
    let paused_at = c.recover("data", &["--latest"]);
    let mut img = base.clone();
    let mut k = 0;
    while img != paused_at {
        assert!(k < w.n, "the target's newest point during the pause is no prefix of the writes");
        w.apply(&mut img, k);
        k += 1;
    }
    assert!((16..96).contains(&k), "{k} writes at the target when it paused");
    // The retention frees room; the group takes writes again and the agent resyncs.
    c.wait_log_within("engine", "taking writes after a pause", Duration::from_secs(60));
    c.wait_log_within("engine", "resync of volume(s) data complete", Duration::from_secs(60));
    let model = w.image_after(&base, 96);
    check_latest(&c, &model);
    assert!(c.target_records().iter().any(|r| r.1 == WriteKind::Resync) || c.history()["first_seq"].as_u64().unwrap() > 0);
}

#[test]
fn a_pause_ends_once_the_target_holds_the_active_segment_that_kept_the_journal_full() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // First with the default 64 MiB segments and no journal_size: 10 MiB in the active segment.
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "segment_size = \"1MiB\"\n", "");
    c.agent_extra = "engine_timeout = \"120s\"".into();
    c.launch();
    c.start_agents();
    let w = Writes { first: 0, n: 160 };
    w.run(&c, Duration::from_secs(60));
    c.wait_shipped();
    // Then restarted with a journal of 4 MiB in 1 MiB segments: full at once, and everything
    // in it is at the target already.
    assert!(c.stop("engine").success());
    c.engine_extra = "segment_size = \"1MiB\"".into();
    c.group_extra = "journal_size = \"4MiB\"\non_journal_full = \"pause_and_track\"".into();
    c.write_configs();
    c.start_engine();
    c.wait_log_within("engine", "sealing it to remove it", Duration::from_secs(30));
    c.wait_status("the end of the pause", Duration::from_secs(30), |g| g["paused"] == false && g["journal_bytes"].as_u64() < Some(3 << 20));
    // It takes writes again, and they reach the target.
    let more = Writes { first: 160, n: 4 };
    more.run(&c, Duration::from_secs(60));
    let mut model = w.image_after(&vec![0u8; SIZE as usize], 160);
    for i in 0..4 {
        more.apply(&mut model, i);
    }
    check_latest(&c, &model);
}
