//! Instant access: `hindsight export` serves a group's volumes at a point over NBD at once,
//! through the point-in-time index, while the group keeps replicating. Two VMs' volumes are
//! written at random (data, zero writes, trims) through their agents with qemu-io; at points
//! chosen by seq, time and bookmark the exported images, read with nbdcopy and qemu-img,
//! equal the model of the acknowledged writes and the image `recover` writes. A
//! read-only export refuses writes; a writable one keeps them in its overlay and leaves the
//! history and the replicas as they were.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{assert_same, have_tools, hindsight_bin, run_ok, run_timeout, Cluster, Model, Vol};
use hindsight_consistency::time::{format_rfc3339, now_ns};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;
const BLOCK: u64 = 4096;

/// A running `hindsight export`, stopped with SIGTERM when dropped.
struct Export {
    child: Child,
    sock: PathBuf,
    ready: String,
}

impl Export {
    fn start(c: &Cluster, name: &str, args: &[&str]) -> Export {
        let sock = c.path(&format!("{name}.sock"));
        let (child, ready) = common::spawn_until_line(
            Command::new(hindsight_bin())
                .args(["export", "--group", "erp", "--config"])
                .arg(c.target_toml())
                .args(args)
                .arg("--listen")
                .arg(format!("unix:{}", sock.display())),
            Duration::from_secs(30),
        );
        assert!(ready.starts_with("exporting group erp at seq "), "{ready}");
        Export { child, sock, ready }
    }

    fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.sock.display())
    }

    /// The seq the ready line names.
    fn seq(&self) -> u64 {
        self.ready["exporting group erp at seq ".len()..].split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Reads a whole export with nbdcopy.
    fn read(&self, dir: &Path, volume: &str) -> Vec<u8> {
        let out = dir.join(format!("read-{volume}.img"));
        let _ = std::fs::remove_file(&out);
        run_ok(Command::new("nbdcopy").arg(self.uri(volume)).arg(&out));
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        self.sock.clear();
        status
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if !self.sock.as_os_str().is_empty() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn random_ops(rng: &mut impl Rng, n: usize) -> Vec<(String, u64, u64, Option<u8>)> {
    (0..n)
        .map(|_| {
            let blocks = rng.gen_range(1..=32u64);
            let off = rng.gen_range(0..SIZE / BLOCK - blocks) * BLOCK;
            let len = blocks * BLOCK;
            match rng.gen_range(0..8) {
                0 => (format!("write -z {off} {len}"), off, len, None),
                1 => (format!("discard {off} {len}"), off, len, None),
                _ => {
                    let byte = rng.gen_range(1..=255u8);
                    (format!("write -P {byte} {off} {len}"), off, len, Some(byte))
                }
            }
        })
        .collect()
}

/// Runs the operations on `volume` with one qemu-io (acknowledged in order) and applies them
/// to its model.
fn write(c: &Cluster, volume: &str, model: &mut Model, ops: &[(String, u64, u64, Option<u8>)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &c.uri(volume)]);
    for (op, ..) in ops {
        cmd.arg("-c").arg(op);
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io: {out}");
    for &(_, off, len, byte) in ops {
        model.fill(off, len, byte.unwrap_or(0));
    }
}

#[test]
fn exported_points_equal_the_model_while_replication_goes_on() {
    if !have_tools(&["qemu-io", "qemu-img", "nbdcopy"]) {
        return;
    }
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Small segments, so that the points span sealed segments and the active one.
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm2", "app", SIZE)];
    let c = Cluster::start_with(&vols, "segment_size = \"1MiB\"\n");
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));

    // Point 1, by seq.
    for _ in 0..3 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 20));
        write(&c, "app", &mut app, &random_ops(&mut rng, 20));
    }
    let seq1 = c.settle();
    let (db1, app1) = (db.bytes.clone(), app.bytes.clone());
    // A bookmark right after: the point it names holds the same writes.
    run_ok(Command::new(hindsight_bin()).args(["bookmark", "before-more", "--group", "erp", "--config"]).arg(c.engine_toml()));
    let bookmarked = c.settle();
    assert_eq!(bookmarked, seq1 + 1, "the bookmark takes the next sequence number");
    std::thread::sleep(Duration::from_millis(20));
    let time1 = now_ns();
    std::thread::sleep(Duration::from_millis(20));

    // Point 2, by time (after more writes of both VMs).
    for _ in 0..3 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 25));
        write(&c, "app", &mut app, &random_ops(&mut rng, 25));
    }
    let seq2 = c.settle();
    assert!(seq2 > seq1);

    let dir = c.path("reads");
    std::fs::create_dir_all(&dir).unwrap();
    // The target indexes each sealed segment; a damaged index file is never trusted: the
    // export indexes that segment from the journal instead.
    let index_dir = c.path("target/groups/erp/index");
    let index_files = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&index_dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
        v.sort();
        v
    };
    let started = std::time::Instant::now();
    while index_files().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "the target wrote no index files: {:?}", index_files());
        std::thread::sleep(Duration::from_millis(100));
    }
    let damaged = index_files()[0].clone();
    let mut bytes = std::fs::read(&damaged).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&damaged, &bytes).unwrap();
    let e1 = Export::start(&c, "e1", &["--all", "--seq", &seq1.to_string()]);
    assert_eq!(e1.seq(), seq1);
    let e2 = Export::start(&c, "e2", &["--vm", "vm1", "--time", &format_rfc3339(time1)]);
    assert_eq!(e2.seq(), bookmarked, "the time between the two batches is seq {bookmarked}");
    let e3 = Export::start(&c, "e3", &["--vm", "vm2", "--bookmark", "before-more"]);
    assert_eq!(e3.seq(), bookmarked);

    // More writes stream in while the points are exported: they change nothing exported.
    for _ in 0..2 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 20));
        write(&c, "app", &mut app, &random_ops(&mut rng, 20));
    }
    assert_same("db at seq1 (nbdcopy)", &e1.read(&dir, "db"), &db1);
    // qemu-io reads blocks of the export and checks each one's pattern against the model
    // (every write fills whole 4 KiB blocks with one byte).
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-r", &e1.uri("db")]);
    for _ in 0..16 {
        let off = rng.gen_range(0..SIZE / BLOCK) * BLOCK;
        cmd.arg("-c").arg(format!("read -P {} {off} {BLOCK}", db1[off as usize]));
    }
    let out = run_ok(&mut cmd);
    assert!(out.matches("read 4096/4096 bytes").count() == 16 && !out.contains("Pattern verification failed"), "{out}");
    assert_same("app at seq1 (nbdcopy)", &e1.read(&dir, "app"), &app1);
    assert_same("db at time1 (nbdcopy)", &e2.read(&dir, "db"), &db1);
    assert_same("app at the bookmark (nbdcopy)", &e3.read(&dir, "app"), &app1);
    let seq3 = c.settle();

    // qemu-img compares the export with the image recover writes of the same point.
    let recovered = c.path("db-seq1.img");
    std::fs::write(&recovered, c.recover("db", &["--seq", &seq1.to_string()])).unwrap();
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&recovered).arg(e1.uri("db")));

    // The latest point: the source disks.
    let latest = Export::start(&c, "latest", &["--all", "--latest"]);
    assert_eq!(latest.seq(), seq3);
    assert_same("db latest", &latest.read(&dir, "db"), &db.bytes);
    assert_same("app latest", &latest.read(&dir, "app"), &app.bytes);
    assert_same("db latest = its source disk", &db.bytes, &std::fs::read(c.disk("db")).unwrap());

    // A read-only export refuses writes.
    let (_, out, err) =
        run_timeout(Command::new("qemu-io").args(["-f", "raw", &e1.uri("db"), "-c", "write -P 7 0 4096"]), Duration::from_secs(30));
    // The export says it is read-only (NBD_FLAG_READ_ONLY): qemu-io will not open it to write.
    let said = format!("{out}{err}");
    assert!(said.contains("Permission denied") || said.contains("read-only") || said.contains("not permitted"), "{said}");
    assert_same("db at seq1 after a refused write", &e1.read(&dir, "db"), &db1);

    for e in [e1, e2, e3, latest] {
        assert!(e.stop().success());
    }
}

#[test]
fn a_writable_export_keeps_writes_in_its_overlay_and_changes_no_history() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let vols = [Vol::new("vm1", "db", SIZE)];
    let c = Cluster::start(&vols);
    let mut db = Model::new(SIZE);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    write(&c, "db", &mut db, &random_ops(&mut rng, 40));
    let seq = c.settle();
    let replica = std::fs::read(c.path("target/groups/erp/replica/db.img")).unwrap_or_default();
    let before = c.recover("db", &["--seq", &seq.to_string()]);
    assert_same("recovered = model", &before, &db.bytes);

    // A time before the group existed is not "no longer retained": there never was a point.
    let out = c.path("before-creation.img");
    let out = format!("{}", out.display());
    for cmd in ["recover", "export"] {
        let (ok, _, err) = run_timeout(
            Command::new(hindsight_bin())
                .args([cmd, "--group", "erp", "--volume", "db", "--time", "2025-01-01T00:00:00Z", "--config"])
                .arg(c.target_toml())
                .args(if cmd == "recover" { ["--out", out.as_str()] } else { ["--listen", "unix:/tmp/never.sock"] }),
            Duration::from_secs(30),
        );
        assert!(!ok && err.contains("is before the group was created at") && !err.contains("no longer retained"), "{cmd}: {err}");
    }
    let e = Export::start(&c, "w", &["--volume", "db", "--seq", &seq.to_string(), "--writable"]);
    // Writes of every shape: unaligned, crossing blocks, zeroes.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &e.uri("db"),
        "-c",
        "write -P 171 100 5000",
        "-c",
        "write -z 65536 8192",
        "-c",
        "write -P 172 1048575 2",
    ]));
    let mut written = Model::new(SIZE);
    written.bytes.copy_from_slice(&db.bytes);
    written.fill(100, 5000, 171);
    written.fill(65536, 8192, 0);
    written.fill(1_048_575, 2, 172);
    let dir = c.path("reads");
    std::fs::create_dir_all(&dir).unwrap();
    assert_same("the export after its writes", &e.read(&dir, "db"), &written.bytes);
    let overlay_dir = c.path("target/groups/erp/exports");
    assert!(overlay_dir.exists(), "the overlay lives beside the journal");
    assert!(e.stop().success());
    assert!(std::fs::read_dir(&overlay_dir).map(|d| d.count()).unwrap_or(0) == 0, "the overlay is discarded at the end");

    // The history and the replica are as they were.
    assert_same("the point after the writable export", &c.recover("db", &["--seq", &seq.to_string()]), &before);
    if !replica.is_empty() {
        assert_same("the replica", &std::fs::read(c.path("target/groups/erp/replica/db.img")).unwrap(), &replica);
    }
}

#[test]
fn bad_exports_are_refused_with_what_to_do() {
    let vols = [Vol::new("vm1", "db", SIZE)];
    let c = Cluster::start_servers(&vols);
    let export = |args: &[&str]| {
        run_timeout(
            Command::new(hindsight_bin())
                .args(["export", "--group", "erp", "--config"])
                .arg(c.target_toml())
                .args(args)
                .args(["--listen", &format!("unix:{}", c.path("bad.sock").display())]),
            Duration::from_secs(30),
        )
    };
    // The engine's first hello creates the group at the target.
    let started = std::time::Instant::now();
    while !run_timeout(
        Command::new(hindsight_bin()).args(["history", "--group", "erp", "--config"]).arg(c.target_toml()),
        Duration::from_secs(30),
    )
    .0
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the group never appeared at the target");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = export(&["--all", "--seq", "999"]);
    assert!(!ok && err.contains("seq 999 is not received yet"), "{err}");
    let (ok, _, err) = export(&["--volume", "nope", "--latest"]);
    assert!(!ok && err.contains("no volume \"nope\"; its volumes are: db"), "{err}");
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["export", "--group", "erp", "--all", "--latest", "--listen", "nowhere", "--config"])
            .arg(c.target_toml()),
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains("unix:"), "{err}");
}

/// The group's history as JSON.
fn history(c: &Cluster) -> serde_json::Value {
    let out = run_ok(Command::new(hindsight_bin()).args(["history", "--json", "--group", "erp", "--config"]).arg(c.target_toml()));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn an_export_pins_its_point_until_it_stops() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    // Retention of 2 s over 1 MiB segments: without the export, everything sealed is folded.
    let c = Cluster::start_with(&[Vol::new("vm1", "db", SIZE)], "segment_size = \"1MiB\"\nretention = \"2s\"\n");
    let mut db = Model::new(SIZE);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    write(&c, "db", &mut db, &random_ops(&mut rng, 30));
    let seq = c.settle();
    let at_seq = db.bytes.clone();
    let e = Export::start(&c, "pinned", &["--all", "--seq", &seq.to_string()]);
    let first = history(&c)["first_seq"].as_u64().unwrap();
    // Several segments more, all older than the retention soon.
    for _ in 0..4 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 30));
    }
    c.settle();
    std::thread::sleep(Duration::from_secs(4));
    c.wait_log_within("target", &format!("retention waits: seq {seq} is exported on unix:"), Duration::from_secs(20));
    let h = history(&c);
    assert_eq!(h["first_seq"].as_u64().unwrap(), first, "retention folded history an export pins");
    let exports = h["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{h}");
    assert_eq!(exports[0]["seq"].as_u64().unwrap(), seq);
    let human = run_ok(Command::new(hindsight_bin()).args(["history", "--group", "erp", "--config"]).arg(c.target_toml()));
    assert!(human.contains(&format!("exported: seq {seq} (")) && human.contains("pinned"), "{human}");
    // `status` at the recovery site shows the same.
    let status = run_ok(Command::new(hindsight_bin()).args(["status", "--group", "erp", "--config"]).arg(c.target_toml()));
    assert!(status.contains(&format!("exported: seq {seq} (")), "{status}");
    let dir = c.path("reads");
    std::fs::create_dir_all(&dir).unwrap();
    assert_same("the pinned point", &e.read(&dir, "db"), &at_seq);

    assert!(e.stop().success());
    let started = std::time::Instant::now();
    loop {
        let h = history(&c);
        if h["first_seq"].as_u64().unwrap() > first && h["exports"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "retention did not go on after the export stopped: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_log_within("target", "that pinned the history has stopped; retention goes on", Duration::from_secs(10));
}

#[test]
fn an_export_keeps_serving_its_point_across_a_kill_of_the_target() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let mut c = Cluster::start_with(&[Vol::new("vm1", "db", SIZE)], "segment_size = \"1MiB\"\n");
    let mut db = Model::new(SIZE);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..3 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 30));
    }
    let seq = c.settle();
    let at_seq = db.bytes.clone();
    let e = Export::start(&c, "k9", &["--volume", "db", "--seq", &seq.to_string()]);
    let dir = c.path("reads");
    std::fs::create_dir_all(&dir).unwrap();
    c.kill_target();
    assert_same("the point with the target killed", &e.read(&dir, "db"), &at_seq);
    c.start_target();
    for _ in 0..2 {
        write(&c, "db", &mut db, &random_ops(&mut rng, 30));
    }
    assert!(c.settle() > seq);
    assert_same("the point after the target's restart", &e.read(&dir, "db"), &at_seq);
    assert!(e.stop().success());
    // A new export of the same point after the restart reads the same.
    let again = Export::start(&c, "k9-again", &["--volume", "db", "--seq", &seq.to_string()]);
    assert_same("the point exported again", &again.read(&dir, "db"), &at_seq);
    assert!(again.stop().success());
}

/// nbdfuse on `uri`, a loop device on its file and, unless `mkfs` is false, a fresh ext4 on
/// it, mounted; `None` where FUSE or loop devices are not available here.
fn ext4_on(dir: &Path, uri: &str, mkfs: bool) -> Option<(common::Ext4Stack, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut stack = common::start_nbdfuse(dir, uri)?;
    let (ok, out, err) =
        run_timeout(Command::new("losetup").args(["-f", "--show"]).arg(stack.fuse_dir.join("disk")), Duration::from_secs(30));
    if !ok && (err.contains("No such device") || err.contains("cannot find an unused loop device")) {
        eprintln!("SKIPPED: no loop device available: {err}");
        return None;
    }
    assert!(ok, "losetup failed: {err}");
    let dev = out.trim().to_owned();
    stack.loop_dev = Some(dev.clone());
    if mkfs {
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&dev));
    }
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").args(["-t", "ext4"]).arg(&dev).arg(&mnt));
    stack.mount_dir = Some(mnt.clone());
    Some((stack, mnt))
}

fn unmount(mut stack: common::Ext4Stack) {
    stack.unmount();
    stack.detach_loop();
    stack.stop_nbdfuse();
}

fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn ext4_on_a_writable_export_takes_new_files_and_leaves_history_and_replica_as_they_were() {
    if !have_tools(&["nbdfuse", "mkfs.ext4", "losetup", "sha256sum"]) {
        return;
    }
    let c = Cluster::start(&[Vol::new("vm1", "db", 32 << 20)]);
    // ext4 with a file, through the agent.
    let Some((stack, mnt)) = ext4_on(&c.path("source"), &c.uri("db"), true) else { return };
    std::fs::write(mnt.join("before.txt"), b"written before the point\n").unwrap();
    unmount(stack);
    let seq = c.settle();
    let recovered = c.path("point.img");
    std::fs::write(&recovered, c.recover("db", &["--seq", &seq.to_string()])).unwrap();
    let (point_hash, replica) = (sha(&recovered), c.path("target/groups/erp/replica/db.img"));
    let replica_hash = sha(&replica);

    let e = Export::start(&c, "ext4", &["--volume", "db", "--seq", &seq.to_string(), "--writable"]);
    let Some((stack, mnt)) = ext4_on(&c.path("exported"), &e.uri("db"), false) else { return };
    assert_eq!(std::fs::read(mnt.join("before.txt")).unwrap(), b"written before the point\n");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(mnt.join("tested.bin"), &big).unwrap();
    std::fs::remove_file(mnt.join("before.txt")).unwrap();
    unmount(stack);
    let h = history(&c);
    assert!(h["exports"][0]["overlay_bytes"].as_u64().unwrap_or(0) > 0 || h["exports"][0]["writable"] == true, "{h}");
    assert!(e.stop().success());

    // The history and the replica are as they were.
    std::fs::write(&recovered, c.recover("db", &["--seq", &seq.to_string()])).unwrap();
    assert_eq!(sha(&recovered), point_hash, "the point changed");
    assert_eq!(sha(&replica), replica_hash, "the replica changed");
}

#[test]
fn points_exported_after_the_target_was_killed_while_indexing_equal_the_model() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // 1 MiB segments: the target seals and indexes one every few batches.
    let mut c = Cluster::start_with(&[Vol::new("vm1", "db", SIZE)], "segment_size = \"1MiB\"\n");
    let mut model = Model::new(SIZE);
    let mut states = vec![model.bytes.clone()]; // states[k]: after k records
    for round in 0..4 {
        let ops = random_ops(&mut rng, 30);
        // The target is killed with SIGKILL while the batch streams in (its maintenance
        // thread writes index files as segments seal), and started again.
        let killer = {
            let delay = Duration::from_millis(rng.gen_range(0..300));
            std::thread::spawn(move || std::thread::sleep(delay))
        };
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &c.uri("db")]);
        for (op, ..) in &ops {
            cmd.arg("-c").arg(op);
        }
        let writer = std::thread::spawn(move || run_ok(&mut cmd));
        killer.join().unwrap();
        c.kill_target();
        c.start_target();
        let out = writer.join().unwrap();
        assert!(!out.contains("failed"), "round {round}: {out}");
        for &(_, off, len, byte) in &ops {
            model.fill(off, len, byte.unwrap_or(0));
            states.push(model.bytes.clone());
        }
    }
    let last = c.settle();
    assert_eq!(last as usize, states.len() - 1, "one record per write");
    // Every sealed segment is indexed again after the restarts, and no temporary is left.
    let index_dir = c.path("target/groups/erp/index");
    let started = std::time::Instant::now();
    let names = loop {
        // Not there at all until the first sealed segment is indexed.
        let names: Vec<String> = std::fs::read_dir(&index_dir)
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let segments = std::fs::read_dir(c.path("target/groups/erp/journal"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".hsj"))
            .count();
        if names.iter().filter(|n| n.ends_with(".hsx")).count() + 1 >= segments && !names.iter().any(|n| n.ends_with(".tmp")) {
            break names;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "index files {names:?} for {segments} segments");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(names.len() >= 2, "{names:?}");
    let dir = c.path("reads");
    std::fs::create_dir_all(&dir).unwrap();
    for _ in 0..4 {
        let k = rng.gen_range(0..=last);
        let e = Export::start(&c, &format!("k{k}"), &["--volume", "db", "--seq", &k.to_string()]);
        assert_same(&format!("seq {k}"), &e.read(&dir, "db"), &states[k as usize]);
        assert!(e.stop().success());
    }
}

#[test]
fn a_kept_overlay_is_reused_by_the_next_export_of_its_point_and_refused_for_another() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let c = Cluster::start(&[Vol::new("vm1", "db", SIZE)]);
    let mut db = Model::new(SIZE);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    write(&c, "db", &mut db, &random_ops(&mut rng, 20));
    let seq = c.settle();
    let dir = c.path("kept-overlay");
    let dir_arg = dir.display().to_string();
    let e = Export::start(&c, "kept", &["--volume", "db", "--seq", &seq.to_string(), "--overlay", &dir_arg]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", &e.uri("db"), "-c", "write -P 77 8192 12288", "-c", "flush"]));
    assert!(e.stop().success());
    let mut tested = db.bytes.clone();
    tested[8192..8192 + 12288].fill(77);

    // The next export of the same point with the same directory has those writes.
    let reads = c.path("reads");
    std::fs::create_dir_all(&reads).unwrap();
    let again = Export::start(&c, "kept-again", &["--volume", "db", "--seq", &seq.to_string(), "--overlay", &dir_arg]);
    assert_same("the kept overlay over its point", &again.read(&reads, "db"), &tested);
    assert!(again.stop().success());
    // The history is as it was, and another point does not take this overlay.
    assert_same("the point itself", &c.recover("db", &["--seq", &seq.to_string()]), &db.bytes);
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["export", "--group", "erp", "--volume", "db", "--seq", &(seq - 1).to_string(), "--overlay", &dir_arg, "--config"])
            .arg(c.target_toml())
            .args(["--listen", &format!("unix:{}", c.path("other.sock").display())]),
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains(&format!("holds the overlay of group \"erp\" at seq {seq}")), "{err}");
}
