//! Restarts between batches of writes: the target, the engine, an agent, and all three, each
//! killed with SIGKILL and started again. Afterwards the sequence has neither gaps nor
//! duplicates, and every batch boundary recovers to the model of the acknowledged writes.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use common::{first_difference, have_tools, qemu_io, seeded_rng, Cluster, Model, Vol};
use rand::Rng;

const SIZE: u64 = 4 << 20;
const BLOCK: u64 = 4096;

/// The volume of every test here, on VM "vm1".
const VOL: &str = "disk1";

/// One acknowledged write: `byte` over `len` bytes at `off` (0 is a write-zeroes).
#[derive(Clone, Copy)]
struct Op {
    off: u64,
    len: u64,
    byte: u8,
}

/// Every write sent so far, in acknowledged order: write `k` (from 0) has sequence number
/// `k + 1`, as long as this is the only writer of the group.
#[derive(Default)]
struct History {
    ops: Vec<Op>,
}

impl History {
    fn count(&self) -> u64 {
        self.ops.len() as u64
    }

    /// The model of the volume after the first `seq` writes.
    fn model_at(&self, seq: u64) -> Model {
        let mut m = Model::new(SIZE);
        for op in &self.ops[..seq as usize] {
            m.fill(op.off, op.len, op.byte);
        }
        m
    }

    /// Writes one batch of random writes and write-zeroes to the volume with one qemu-io run
    /// and records them; returns the number of writes so far.
    fn write_batch(&mut self, c: &Cluster, rng: &mut impl Rng) -> u64 {
        let n = rng.gen_range(15..30);
        let mut cmds = Vec::with_capacity(n);
        for _ in 0..n {
            let blocks = rng.gen_range(1..=32u64);
            let off = rng.gen_range(0..SIZE / BLOCK - blocks) * BLOCK;
            let len = blocks * BLOCK;
            let byte: u8 = if rng.gen_range(0..8) == 0 { 0 } else { rng.gen_range(1..=255) };
            cmds.push(if byte == 0 { format!("write -z {off} {len}") } else { format!("write -P {byte} {off} {len}") });
            self.ops.push(Op { off, len, byte });
        }
        qemu_io(&c.uri(VOL), &cmds);
        self.count()
    }

    /// Checks that the point after `seq` is the model after `seq` writes.
    fn assert_point(&self, c: &Cluster, seq: u64, what: &str) {
        let expected = self.model_at(seq);
        let img = c.recover(VOL, &["--seq", &seq.to_string()]);
        assert!(
            img == expected.bytes,
            "{what} (seq {seq}): recovered image differs from the model: {}",
            first_difference(&img, &expected.bytes)
        );
    }

    /// Checks `points` and a few random sequence numbers.
    fn assert_points(&self, c: &Cluster, rng: &mut impl Rng, points: &[(u64, &str)]) {
        for &(seq, what) in points {
            self.assert_point(c, seq, what);
        }
        for _ in 0..4 {
            self.assert_point(c, rng.gen_range(0..=self.count()), "random point");
        }
    }
}

/// Checks that the latest point and the agent's local disk both equal the model.
fn assert_latest(c: &Cluster, expected: &Model, what: &str) {
    let source = std::fs::read(c.disk(VOL)).unwrap();
    assert!(source == expected.bytes, "{what}: the source disk differs from the model: {}", first_difference(&source, &expected.bytes));
    let latest = c.recover(VOL, &["--latest"]);
    assert!(latest == source, "{what}: latest point differs from the source disk: {}", first_difference(&latest, &source));
}

/// Checks that the target holds exactly seq 1..=`last`, from the empty image on.
fn assert_whole_history(c: &Cluster, last: u64) {
    let h = c.history();
    assert_eq!(h["first_seq"].as_u64(), Some(0), "history lost its start: {h}");
    assert_eq!(h["last_seq"].as_u64(), Some(last), "{h}");
}

#[test]
fn target_killed_between_batches_catches_up_without_a_gap() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let mut c = Cluster::start(&[Vol::new("vm1", VOL, SIZE)]);
    let mut h = History::default();

    let a = h.write_batch(&c, &mut rng);
    assert_eq!(c.wait_target_seq_settled(a), a);

    c.kill_target();
    // The engine journals while the target is away: the writes are acknowledged.
    let ab = h.write_batch(&c, &mut rng);
    let source = std::fs::read(c.disk(VOL)).unwrap();
    let model = h.model_at(ab);
    assert!(source == model.bytes, "batch B did not reach the source disk: {}", first_difference(&source, &model.bytes));
    c.start_target();

    let last = c.wait_target_seq_settled(ab);
    assert_eq!(last, ab, "the target holds {last} records for {ab} writes");
    assert_whole_history(&c, ab);
    h.assert_points(&c, &mut rng, &[(a, "end of batch A"), (a + 1, "first write of batch B"), (ab, "end of batch B")]);
    assert_latest(&c, &model, "after batch B");
}

#[test]
fn engine_killed_between_batches_continues_the_sequence() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let mut c = Cluster::start(&[Vol::new("vm1", VOL, SIZE)]);
    let mut h = History::default();

    let a = h.write_batch(&c, &mut rng);
    assert_eq!(c.wait_target_seq_settled(a), a);

    c.kill_engine();
    c.start_engine();
    // The agent reconnects by itself; its hello shows in the engine's log a second time.
    c.wait_log("engine", "attached volumes", 2);

    let ab = h.write_batch(&c, &mut rng);
    // No write was in flight at the kill, so none is sent twice: the count is exact.
    let last = c.wait_target_seq_settled(ab);
    assert_eq!(last, ab, "the target holds {last} records for {ab} writes");
    assert_whole_history(&c, ab);
    // The numbering went on at a + 1, with the writes of batch B in their order.
    h.assert_points(&c, &mut rng, &[(a, "end of batch A"), (a + 1, "first write of batch B"), (ab, "end of batch B")]);
    assert_latest(&c, &h.model_at(ab), "after batch B");
}

/// A cluster of one volume with one batch of writes at the target; returns the last seq too.
fn one_batch_written() -> (Cluster, History, rand::rngs::StdRng, u64) {
    let mut rng = seeded_rng();
    let c = Cluster::start(&[Vol::new("vm1", VOL, SIZE)]);
    let mut h = History::default();
    let a = h.write_batch(&c, &mut rng);
    assert_eq!(c.wait_target_seq_settled(a), a);
    (c, h, rng, a)
}

/// Writes the next batch, waits until the target holds it, and checks the whole history
/// there; returns the last seq.
fn next_batch(c: &Cluster, h: &mut History, rng: &mut rand::rngs::StdRng) -> u64 {
    let ab = h.write_batch(c, rng);
    let last = c.wait_target_seq_settled(ab);
    assert_eq!(last, ab, "the target holds {last} records for {ab} writes");
    assert_whole_history(c, ab);
    ab
}

/// SIGTERM, as a service manager stops a daemon: the engine and the target say in their logs
/// that they stop and why, exit with status 0, and start again with nothing lost.
#[test]
fn engine_and_target_stopped_with_sigterm_say_so_and_lose_nothing() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (mut c, mut h, mut rng, a) = one_batch_written();
    for which in ["engine", "target"] {
        let status = c.stop(which);
        assert!(status.success(), "the {which} stopped on SIGTERM with {status}");
        let log = c.log(which);
        assert!(log.contains("SIGTERM received: stopping"), "the {which} logged nothing of its stop:\n{log}");
    }
    c.start_target();
    c.start_engine();
    c.wait_log("engine", "attached volumes", 2);
    let ab = next_batch(&c, &mut h, &mut rng);
    assert!(ab > a);
    assert_latest(&c, &h.model_at(ab), "after the restart");
}

#[test]
fn agent_killed_and_restarted_keeps_old_points_and_replicates_new_writes() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (mut c, mut h, mut rng, a) = one_batch_written();

    // Killed idle, once its dirty map is clean: nothing to resync (the resync after a kill
    // with writes in flight is tests/system_resync.rs).
    c.wait_map_clean(VOL);
    c.kill_agent("vm1");
    // Everything acknowledged before the kill is recoverable while the agent is gone.
    assert_latest(&c, &h.model_at(a), "agent down after batch A");

    c.start_agent("vm1");
    let ab = next_batch(&c, &mut h, &mut rng);
    h.assert_points(&c, &mut rng, &[(a, "end of batch A"), (a + 1, "first write after the restart")]);
    assert_latest(&c, &h.model_at(ab), "after batch B");
}

#[test]
fn every_process_restarted_between_batches_keeps_every_boundary() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let mut c = Cluster::start(&[Vol::new("vm1", VOL, SIZE)]);
    let mut h = History::default();
    let mut boundaries = vec![0];

    for round in 0..6 {
        let n = h.write_batch(&c, &mut rng);
        assert_eq!(c.wait_target_seq_settled(n), n, "round {round}");
        boundaries.push(n);
        // Killed idle, with a clean dirty map: the restarts add no resync records.
        c.wait_map_clean(VOL);

        // A different kill order each round; the start order is the one the agent needs
        // (its engine up before it serves).
        match round % 3 {
            0 => {
                c.kill_agent("vm1");
                c.kill_engine();
                c.kill_target();
            }
            1 => {
                c.kill_target();
                c.kill_engine();
                c.kill_agent("vm1");
            }
            _ => {
                c.kill_engine();
                c.kill_agent("vm1");
                c.kill_target();
            }
        }
        c.start_target();
        c.start_engine();
        c.start_agent("vm1");
    }

    let total = h.write_batch(&c, &mut rng);
    assert_eq!(c.wait_target_seq_settled(total), total);
    boundaries.push(total);

    assert_whole_history(&c, total);
    for &seq in &boundaries {
        h.assert_point(&c, seq, "batch boundary");
    }
    assert_latest(&c, &h.model_at(total), "after the last batch");
}
