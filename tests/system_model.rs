//! The model test: random writes, write-zeroes and trims through the agent's NBD export with
//! qemu-io, a model recording each acknowledged write, then many points recovered at random
//! by sequence number and by time, each equal to the model byte for byte; the latest point
//! equals the source disk.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{first_difference, have_tools, run_ok, Cluster, Model, Vol};
use hindsight_consistency::time::{format_rfc3339, now_ns};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Trim { off, len } => format!("discard {off} {len}"),
        }
    }

    fn apply(&self, m: &mut Model) {
        match *self {
            Op::Write { off, len, byte } => m.fill(off, len, byte),
            Op::Zero { off, len } | Op::Trim { off, len } => m.fill(off, len, 0),
        }
    }
}

fn random_op(rng: &mut impl Rng) -> Op {
    let blocks = rng.gen_range(1..=64u64);
    let off = rng.gen_range(0..SIZE / BLOCK - blocks) * BLOCK;
    let len = blocks * BLOCK;
    match rng.gen_range(0..10) {
        0 => Op::Zero { off, len },
        1 => Op::Trim { off, len },
        _ => Op::Write { off, len, byte: rng.gen_range(1..=255) },
    }
}

#[test]
fn random_points_by_seq_and_time_equal_the_model() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = Cluster::start(&[Vol::new("vm1", "disk1", SIZE)]);
    let uri = c.uri("disk1");

    // Batches of operations, each one qemu-io run: qemu-io waits for every request's reply
    // before it sends the next, so the acknowledged order is the command order.
    let mut model = Model::new(SIZE);
    let mut states = vec![model.bytes.clone()]; // states[k] = after k operations
    let mut batch_times = Vec::new(); // (ops done, time after the batch was acknowledged)
    let mut ops_done = 0usize;
    for _batch in 0..6 {
        let ops: Vec<Op> = (0..rng.gen_range(15..40)).map(|_| random_op(&mut rng)).collect();
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for op in &ops {
            cmd.arg("-c").arg(op.qemu_io());
        }
        let out = run_ok(&mut cmd);
        assert!(!out.contains("failed"), "qemu-io reported a failure: {out}");
        for op in &ops {
            op.apply(&mut model);
            states.push(model.bytes.clone());
        }
        ops_done += ops.len();
        std::thread::sleep(Duration::from_millis(20));
        batch_times.push((ops_done, now_ns()));
        std::thread::sleep(Duration::from_millis(20));
    }

    let last = c.settle();
    let first = c.history()["first_seq"].as_u64().unwrap();
    assert_eq!(first, 0, "nothing should be trimmed yet");
    assert_eq!(
        last as usize, ops_done,
        "each qemu-io command must be exactly one replicated write (target holds {last} records for {ops_done} commands)"
    );

    // The source disk equals the model, and so does the latest point.
    let source = std::fs::read(c.disk("disk1")).unwrap();
    assert!(source == model.bytes, "source disk differs from the model: {}", first_difference(&source, &model.bytes));
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == source, "latest point differs from the source disk: {}", first_difference(&latest, &source));

    // Random points by sequence number, plus both ends.
    let mut points: Vec<usize> = (0..12).map(|_| rng.gen_range(0..=ops_done)).collect();
    points.extend([0, 1, ops_done - 1, ops_done]);
    for k in points {
        let img = c.recover("disk1", &["--seq", &k.to_string()]);
        assert!(img == states[k], "seq {k}: recovered image differs from the model: {}", first_difference(&img, &states[k]));
    }

    // Every batch boundary by time: all writes received at or before T, none after.
    for (k, t) in batch_times {
        let ts = format_rfc3339(t);
        let img = c.recover("disk1", &["--time", &ts]);
        assert!(
            img == states[k],
            "time {ts} (after {k} operations): recovered image differs from the model: {}",
            first_difference(&img, &states[k])
        );
    }
}

#[test]
fn point_out_of_the_window_is_a_clear_error() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let c = Cluster::start(&[Vol::new("vm1", "disk1", 1 << 20)]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", &c.uri("disk1"), "-c", "write -P 7 0 4096"]));
    c.wait_target_seq(1);
    let out = c.path("x.img");
    let (ok, _, err) = common::run_timeout(
        Command::new(common::hindsight_bin())
            .args(["recover", "--group", "erp", "--volume", "disk1", "--seq", "99", "--config"])
            .arg(c.target_toml())
            .arg("--out")
            .arg(&out),
        Duration::from_secs(30),
    );
    assert!(!ok, "recovering a point that was never written must fail");
    assert!(err.contains("99") && err.contains("latest"), "the error should name the point and the latest one: {err}");
    let (ok, _, err) = common::run_timeout(
        Command::new(common::hindsight_bin())
            .args(["recover", "--group", "erp", "--volume", "nope", "--latest", "--config"])
            .arg(c.target_toml())
            .arg("--out")
            .arg(&out),
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains("disk1"), "an unknown volume must fail and list the known ones: {err}");
}
