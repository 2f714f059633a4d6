//! Failover at the recovery site (docs/failover.md). Two VMs of one group write raw patterns
//! with qemu-io and an ext4 file system (made with mkfs.ext4 and written through the agent
//! with qemu-img); the source site is then lost (kill -9) or left running, and `hindsight
//! failover` makes the target's copy the production volumes at a point: they equal the model
//! of the acknowledged writes at that point, e2fsck finds the file system clean and debugfs
//! reads its files back; the old engine is refused with a message naming the failover,
//! before and after a restart of the target; the history stays recoverable. A test failover
//! serves a point writable while replication goes on and leaves the history as it was.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{first_difference, have_tools, hindsight_bin, run_code, run_ok, Cluster, Model, Vol};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random pattern writes, zero writes and trims of whole blocks on `volume` through its agent
/// (one qemu-io: acknowledged in order), applied to `model`.
fn write_random(c: &Cluster, volume: &str, model: &mut Model, rng: &mut impl Rng, n: usize) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &c.uri(volume)]);
    let mut ops = Vec::new();
    for _ in 0..n {
        let blocks = rng.gen_range(1..=16u64);
        let off = rng.gen_range(0..SIZE / BLOCK - blocks) * BLOCK;
        let len = blocks * BLOCK;
        let (op, byte) = match rng.gen_range(0..8) {
            0 => (format!("write -z {off} {len}"), 0),
            1 => (format!("discard {off} {len}"), 0),
            _ => {
                let b = rng.gen_range(1..=255u8);
                (format!("write -P {b} {off} {len}"), b)
            }
        };
        cmd.arg("-c").arg(op);
        ops.push((off, len, byte));
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io: {out}");
    for (off, len, byte) in ops {
        model.fill(off, len, byte);
    }
}

/// An ext4 image holding `files`, made with mkfs.ext4 -d, written whole onto `volume` through
/// its agent with qemu-img; the model takes its bytes.
fn write_ext4(c: &Cluster, volume: &str, model: &mut Model, files: &[(&str, Vec<u8>)]) {
    let src = c.path(&format!("{volume}-files"));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    for (name, bytes) in files {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let img = c.path(&format!("{volume}-fs.img"));
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"]).arg(&src).arg(&img));
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(c.uri(volume)));
    model.bytes = std::fs::read(&img).unwrap();
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert!(got == want, "{what}: {}", first_difference(got, want));
}

/// `hindsight failover` on the cluster's target with `args`: its exit code and output.
fn failover(c: &Cluster, args: &[&str]) -> (Option<i32>, String, String) {
    run_code(
        Command::new(hindsight_bin()).args(["failover", "--group", "erp", "--config"]).arg(c.target_toml()).args(args),
        Duration::from_secs(120),
    )
}

/// A successful failover's JSON report.
fn failover_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = failover(c, &all);
    assert_eq!(code, Some(0), "failover {args:?}: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("failover {args:?}: {report}");
    report
}

/// A process of the test, killed if the test ends first.
struct Running(std::process::Child);

impl Running {
    /// SIGTERM, and waits for it to end.
    fn stop(&mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn promoted(c: &Cluster, volume: &str) -> PathBuf {
    c.path(&format!("target/groups/erp/promoted/{volume}.img"))
}

fn history_text(c: &Cluster) -> String {
    run_ok(Command::new(hindsight_bin()).args(["history", "--group", "erp", "--config"]).arg(c.target_toml()))
}

/// Checks the promoted ext4 volume: e2fsck clean, each file as written.
fn check_ext4(image: &Path, files: &[(&str, Vec<u8>)]) {
    let (code, out, err) = run_code(Command::new("e2fsck").args(["-f", "-n"]).arg(image), Duration::from_secs(60));
    assert_eq!(code, Some(0), "e2fsck of {}: {out}{err}", image.display());
    for (name, bytes) in files {
        let got = Command::new("debugfs").args(["-R", &format!("cat /{name}")]).arg(image).output().unwrap();
        assert!(got.stdout == *bytes, "file {name} of {}: {}", image.display(), first_difference(&got.stdout, bytes));
    }
}

#[test]
fn losing_the_source_site_fails_over_to_the_latest_point_and_fences_the_old_engine() {
    if !have_tools(&["qemu-io", "qemu-img", "mkfs.ext4", "e2fsck", "debugfs"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm2", "app", SIZE)];
    let mut c = Cluster::prepare(&vols, "segment_size = \"1MiB\"\n", "");
    c.group_extra = "mode = \"sync\"\n".into();
    c.launch();
    c.start_agents();
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    let files: Vec<(&str, Vec<u8>)> =
        vec![("orders.csv", (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect()), ("readme.txt", b"hindsight failover\n".to_vec())];
    write_ext4(&c, "db", &mut db, &files);
    write_random(&c, "app", &mut app, &mut rng, 40);
    let early = c.settle();
    let app_early = app.bytes.clone();
    for _ in 0..3 {
        write_random(&c, "app", &mut app, &mut rng, 30);
    }

    // The source site is lost: its agents and its engine die at once. In sync mode every
    // acknowledged write is at the target already.
    c.kill_agent("vm1");
    c.kill_agent("vm2");
    c.kill_engine();
    assert!(history_text(&c).contains("production: the source site"));
    let r = failover_json(&c, &["--latest"]);
    assert_eq!((r["epoch"].as_u64(), r["undone_bytes"].as_u64()), (Some(1), Some(0)), "{r}");
    assert_eq!(r["seq"], r["last_seq"]);
    assert_same("db promoted", &std::fs::read(promoted(&c, "db")).unwrap(), &db.bytes);
    assert_same("app promoted", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);
    check_ext4(&promoted(&c, "db"), &files);
    let text = history_text(&c);
    assert!(text.contains("production: THE RECOVERY SITE") && text.contains("epoch 1"), "{text}");
    assert!(!c.path("target/groups/erp/replica/db.img").exists(), "the replica became the production volume");

    // Production runs here now: an agent at the recovery site serves the promoted volume (no
    // engine to replicate to yet: it tracks what is written in its dirty map).
    let sock = c.path("recovery-app.sock");
    let agent_toml = c.path("recovery-agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\nengine = \"127.0.0.1:{}\"\nvm = \"vm2\"\nstart_offline = true\nengine_timeout = \"1s\"\n\n{}\n[[disk]]\ngroup = \"erp\"\nvolume = \"app\"\npath = \"{}\"\nlisten = \"unix:{}\"\n",
            common::free_port(),
            c.tls_section("agent", "vm2"),
            promoted(&c, "app").display(),
            sock.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(c.path("recovery-agent.log")).unwrap();
    let mut agent = Running(
        Command::new(common::agent_bin()).arg("--config").arg(&agent_toml).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap(),
    );
    common::wait_path(&sock, "the recovery site's agent");
    let uri = format!("nbd+unix:///app?socket={}", sock.display());
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 9 0 65536"]));
    app.fill(0, 65536, 9);
    agent.stop();
    assert_same("app after a write at the recovery site", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);
    let map = PathBuf::from(format!("{}.hsmap", promoted(&c, "app").display()));
    assert!(map.exists(), "the agent tracks the writes since promotion in {}", map.display());

    // The old engine comes back: the target refuses it, naming the failover, and takes
    // nothing; so after a restart of the target.
    c.start_engine();
    c.wait_log_within("engine", "was failed over at the recovery site", Duration::from_secs(30));
    c.kill_target();
    c.start_target();
    let refusals = c.log("engine").matches("was failed over at the recovery site").count();
    c.wait_log("engine", "was failed over at the recovery site", refusals + 1);
    assert_same("app after the old engine returned", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);

    // A second failover is refused; the history is untouched and still recovers.
    let (code, out, err) = failover(&c, &["--latest"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("was failed over already"), "{err}");
    assert_same("app recovered at an earlier point", &c.recover("app", &["--seq", &early.to_string()]), &app_early);
}

#[test]
fn failing_over_to_an_earlier_point_undoes_the_later_writes_while_the_engine_ships() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm2", "app", SIZE)];
    let metrics = common::free_port();
    let c = Cluster::start_with(&vols, &format!("segment_size = \"1MiB\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"));
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    for _ in 0..2 {
        write_random(&c, "db", &mut db, &mut rng, 30);
        write_random(&c, "app", &mut app, &mut rng, 30);
    }
    let point = c.settle();
    let (db_at, app_at) = (db.bytes.clone(), app.bytes.clone());
    for _ in 0..2 {
        write_random(&c, "db", &mut db, &mut rng, 30);
        write_random(&c, "app", &mut app, &mut rng, 30);
    }
    let last = c.settle();
    assert!(last > point);

    // The engine is connected and shipping: the failover fences it.
    let r = failover_json(&c, &["--seq", &point.to_string()]);
    assert_eq!((r["seq"].as_u64(), r["last_seq"].as_u64()), (Some(point), Some(last)), "{r}");
    assert!(r["undone_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_same("db promoted at the point", &std::fs::read(promoted(&c, "db")).unwrap(), &db_at);
    assert_same("app promoted at the point", &std::fs::read(promoted(&c, "app")).unwrap(), &app_at);
    c.wait_log_within("engine", "was failed over at the recovery site", Duration::from_secs(30));

    // The source keeps writing (cdp: its engine acknowledges into its own journal); none of it
    // reaches the promoted volumes.
    write_random(&c, "db", &mut db, &mut rng, 20);
    std::thread::sleep(Duration::from_secs(2));
    assert_same("db promoted, after the source wrote more", &std::fs::read(promoted(&c, "db")).unwrap(), &db_at);
    assert_eq!(c.target_last_seq(), last, "the target took nothing more");

    // Monitoring says so: the target's series and its dashboard, and the engine's status.
    let scrape = common::http_get(metrics, "/metrics", &[]).body;
    assert!(scrape.lines().any(|l| l == "hindsight_target_failed_over{group=\"erp\"} 1"), "{scrape}");
    let doc: serde_json::Value = serde_json::from_str(&common::http_get(metrics, "/api/dashboard", &[]).body).unwrap();
    let card = &doc["groups"][0];
    assert_eq!(card["state"], "failed-over", "{doc}");
    assert!(card["state_words"].as_str().unwrap().contains("production runs at this site since"), "{doc}");
    let g = c.wait_status("the refusal", Duration::from_secs(30), |g| g["target_refused"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(g["target_refused"].as_str().unwrap().contains("was failed over"), "{g}");
}

#[test]
fn a_failover_with_no_target_daemon_releases_the_group_itself() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE)];
    let mut c = Cluster::start(&vols);
    let mut db = Model::new(SIZE);
    for _ in 0..3 {
        write_random(&c, "db", &mut db, &mut rng, 40);
    }
    c.settle();
    // Both sites go down hard: the target's replicas may lag its journal (start-up replays
    // it; so does the failover's own release).
    c.kill_agent("vm1");
    c.kill_engine();
    c.kill_target();
    let r = failover_json(&c, &["--latest"]);
    assert_eq!(r["undone_bytes"].as_u64(), Some(0), "{r}");
    assert_same("db promoted", &std::fs::read(promoted(&c, "db")).unwrap(), &db.bytes);
    // The daemon, started again, does not serve the group: the engine is refused.
    c.start_target();
    c.start_engine();
    c.wait_log_within("engine", "was failed over at the recovery site", Duration::from_secs(30));
    assert!(c.log("target").contains("is not served: group \"erp\" was failed over"), "{}", c.log("target"));
}

/// A running `hindsight failover --test`.
struct TestFailover {
    child: std::process::Child,
    sock: PathBuf,
}

impl Drop for TestFailover {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_test_failover(c: &Cluster, point: &[&str]) -> (TestFailover, String) {
    let sock = c.path("test-failover.sock");
    let mut child = Command::new(hindsight_bin())
        .args(["failover", "--test", "--group", "erp", "--config"])
        .arg(c.target_toml())
        .args(point)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t = TestFailover { child, sock };
    let ready = rx.recv_timeout(Duration::from_secs(30)).expect("the test failover printed no ready line within 30 s");
    assert!(ready.starts_with("exporting group erp at seq "), "{ready}");
    // The record is written right after the ready line.
    let record = c.path("target/groups/erp/failover-test.toml");
    let started = std::time::Instant::now();
    while !record.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no failover-test.toml");
        std::thread::sleep(Duration::from_millis(20));
    }
    (t, ready)
}

#[test]
fn a_test_failover_serves_a_point_writable_while_replication_goes_on_and_leaves_no_trace() {
    if !have_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm2", "app", SIZE)];
    let c = Cluster::start(&vols);
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    write_random(&c, "db", &mut db, &mut rng, 40);
    write_random(&c, "app", &mut app, &mut rng, 40);
    let point = c.settle();
    let db_at = db.bytes.clone();
    let history_before = c.history();

    let (mut t, ready) = start_test_failover(&c, &["--latest"]);
    assert!(ready.starts_with(&format!("exporting group erp at seq {point} ")), "{ready}");
    let (code, out, err) = failover(&c, &["--test", "--latest", "--listen", "unix:/nonexistent/x.sock"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("runs already"), "{err}");
    // The test writes to its volumes; the source goes on writing and replicating.
    let uri = format!("nbd+unix:///db?socket={}", t.sock.display());
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 77 0 1048576"]));
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 77 0 1048576"]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    write_random(&c, "db", &mut db, &mut rng, 20);
    let after = c.settle();
    assert!(after > point, "replication went on during the test");

    let end = run_ok(Command::new(hindsight_bin()).args(["failover", "--end-test", "--group", "erp", "--config"]).arg(c.target_toml()));
    assert!(end.contains("test failover of group erp ended") && end.contains(&format!("seq {point} ")), "{end}");
    let status = t.child.wait().unwrap();
    assert!(status.success(), "the test failover exits cleanly: {status:?}");
    t.sock = PathBuf::new();

    // Nothing of the test is left: the history holds the source's writes only, the point
    // tested recovers as it was, the replica equals the source disk.
    let history_after = c.history();
    assert_eq!(history_after["first_seq"], history_before["first_seq"]);
    assert_eq!(history_after["bookmarks"], history_before["bookmarks"]);
    assert_eq!(history_after["last_seq"].as_u64(), Some(after));
    assert_same("db at the tested point", &c.recover("db", &["--seq", &point.to_string()]), &db_at);
    // The applier may still be a batch behind the journal.
    let started = std::time::Instant::now();
    while std::fs::read(c.path("target/groups/erp/replica/db.img")).unwrap() != db.bytes && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same("db replica", &std::fs::read(c.path("target/groups/erp/replica/db.img")).unwrap(), &db.bytes);
    assert!(!c.path("target/groups/erp/failover-test.toml").exists());
    assert!(history_text(&c).contains("production: the source site"));
    let (code, _, err) = run_code(
        Command::new(hindsight_bin()).args(["failover", "--end-test", "--group", "erp", "--config"]).arg(c.target_toml()),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no test failover of group \"erp\" is running"), "{err}");
}

#[test]
fn a_planned_failover_loses_no_acknowledged_write_while_the_source_writes() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // Async: the engine ships in deltas, so only the planned move's drain gives RPO 0.
    let vols = [Vol::new("vm1", "db", SIZE)];
    let mut c = Cluster::prepare(&vols, "", "");
    c.group_extra = "mode = \"async\"\ninterval = \"3s\"\n".into();
    c.launch();
    c.start_agents();
    c.issue(&["--role", "operator", "--name", "alice"]);
    // Writes go on during the move, one qemu-io each (block i gets the byte i % 250 + 1);
    // each that returns is acknowledged.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop, uri) = (acked.clone(), stop.clone(), c.uri("db"));
        std::thread::spawn(move || {
            for i in 0..SIZE / BLOCK {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let cmd = format!("write -P {} {} {BLOCK}", i % 250 + 1, i * BLOCK);
                let mut child = Command::new("qemu-io")
                    .args(["-f", "raw", &uri, "-c", &cmd])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let started = std::time::Instant::now();
                let status = loop {
                    if let Some(s) = child.try_wait().unwrap() {
                        break Some(s);
                    }
                    if started.elapsed() > Duration::from_secs(5) {
                        // Held at the engine after the hand-over: never acknowledged.
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                if !status.is_some_and(|s| s.success()) {
                    return;
                }
                acked.lock().unwrap().push(i);
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let pki = c.pki();
    let eport = c.eport.to_string();
    let engine = format!("127.0.0.1:{eport}");
    let (ca, cert, key) = (pki.join("ca.pem"), pki.join("operator-alice.pem"), pki.join("operator-alice-key.pem"));
    let args: Vec<&str> = vec![
        "--planned",
        "--engine",
        &engine,
        "--engine-ca",
        ca.to_str().unwrap(),
        "--engine-cert",
        cert.to_str().unwrap(),
        "--engine-key",
        key.to_str().unwrap(),
    ];
    let r = failover_json(&c, &args);
    // Whatever the writer still has in flight waits at the engine: stop it.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "the writer wrote during the move: {acked:?}");
    assert_eq!(r["seq"], r["last_seq"], "nothing after the bookmark reached the target: {r}");
    assert!(r["planned"]["bookmark"].as_str().unwrap().starts_with("planned-failover-"), "{r}");
    let image = std::fs::read(promoted(&c, "db")).unwrap();
    for i in &acked {
        let at = (i * BLOCK) as usize;
        assert!(
            image[at..at + BLOCK as usize].iter().all(|&b| u64::from(b) == i % 250 + 1),
            "acknowledged write {i} (of {}) is missing from the promoted volume",
            acked.len()
        );
    }
    let g = c.wait_status("the refusal", Duration::from_secs(30), |g| g["target_refused"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(g["handed_over"], true, "{g}");
    assert!(g["target_refused"].as_str().unwrap().contains("was failed over at the recovery site"), "{g}");
    let text = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(c.engine_toml()));
    assert!(text.contains("HANDED OVER for a planned failover") && text.contains("the target refuses the group"), "{text}");
}

/// Regions of 1 MiB (the agent's resync unit) in which two images differ.
fn differing_regions(a: &[u8], b: &[u8]) -> usize {
    a.chunks(1 << 20).zip(b.chunks(1 << 20)).filter(|(x, y)| x != y).count()
}

/// Bytes of resync records (kind 7) in a target's journal of group erp.
fn resync_bytes(data_dir: &Path) -> u64 {
    let dir = data_dir.join("groups/erp/journal");
    let fs = hindsight_consistency::storage::StdStorage::shared();
    let mut reader = hindsight_consistency::journal::JournalReader::open(fs, &dir, 1).unwrap();
    let mut bytes = 0;
    while let Some(rec) = reader.next().unwrap() {
        if rec.header.kind == hindsight_consistency::WriteKind::Resync {
            bytes += u64::from(rec.header.length);
        }
    }
    bytes
}

#[test]
fn failback_ships_only_the_regions_that_differ_and_brings_production_home() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm1", "app", SIZE)];
    let mut c = Cluster::prepare(&vols, "segment_size = \"1MiB\"\n", "");
    c.launch();
    c.start_agents();
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    write_random(&c, "db", &mut db, &mut rng, 30);
    write_random(&c, "app", &mut app, &mut rng, 30);
    let point = c.settle();
    let (db_at, app_at) = (db.bytes.clone(), app.bytes.clone());
    // The source writes more after the point the failover will take: those must be undone on
    // the original disks at failback.
    write_random(&c, "db", &mut db, &mut rng, 5);
    c.settle();
    c.kill_agent("vm1");
    c.kill_engine();
    let r = failover_json(&c, &["--seq", &point.to_string()]);
    assert_eq!(r["epoch"].as_u64(), Some(1));

    // Production at the recovery site, through an agent whose engine is not there yet.
    c.issue(&["--role", "engine", "--name", "recovery", "--host", "127.0.0.1"]);
    c.issue(&["--role", "target", "--name", "origin", "--host", "127.0.0.1"]);
    c.issue(&["--role", "operator", "--name", "alice"]);
    let (eb_port, ta_port) = (common::free_port(), common::free_port());
    let mut agent_b = format!(
        "[agent]\nengine = \"127.0.0.1:{eb_port}\"\nvm = \"vm1\"\nstart_offline = true\nengine_timeout = \"1s\"\n\n{}",
        c.tls_section("agent", "vm1")
    );
    for v in ["db", "app"] {
        agent_b += &format!(
            "\n[[disk]]\ngroup = \"erp\"\nvolume = \"{v}\"\npath = \"{}\"\nlisten = \"unix:{}\"\n",
            promoted(&c, v).display(),
            c.path(&format!("b-{v}.sock")).display()
        );
    }
    std::fs::write(c.path("agent-b.toml"), agent_b).unwrap();
    let spawn = |name: &str, cmd: &mut Command| {
        let log = std::fs::File::create(c.path(&format!("{name}.log"))).unwrap();
        Running(cmd.env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap())
    };
    let agent_b = spawn("agent-b", Command::new(common::agent_bin()).arg("--config").arg(c.path("agent-b.toml")));
    common::wait_path(&c.path("b-app.sock"), "the recovery site's agent");
    let (mut db_b, mut app_b) = (Model::new(SIZE), Model::new(SIZE));
    db_b.bytes = std::fs::read(promoted(&c, "db")).unwrap();
    app_b.bytes = std::fs::read(promoted(&c, "app")).unwrap();
    assert_same("db promoted at the point", &db_b.bytes, &db_at);
    assert_same("app promoted at the point", &app_b.bytes, &app_at);
    for (v, m) in [("db", &mut db_b), ("app", &mut app_b)] {
        let uri = format!("nbd+unix:///{v}?socket={}", c.path(&format!("b-{v}.sock")).display());
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for i in 0..3u64 {
            let off = rng.gen_range(0..SIZE / BLOCK - 4) * BLOCK;
            cmd.arg("-c").arg(format!("write -P {} {off} 16384", 200 + i));
            m.fill(off, 16384, (200 + i) as u8);
        }
        run_ok(&mut cmd);
    }

    // The original site returns: its disks become the replicas of its own target's group.
    let ta_dir = c.path("origin-target");
    std::fs::write(
        c.path("ta.toml"),
        format!("[target]\nlisten = \"127.0.0.1:{ta_port}\"\ndata_dir = \"{}\"\n\n{}", ta_dir.display(), c.tls_section("target", "origin")),
    )
    .unwrap();
    let differ = differing_regions(&std::fs::read(c.disk("db")).unwrap(), &db_b.bytes)
        + differing_regions(&std::fs::read(c.disk("app")).unwrap(), &app_b.bytes);
    assert!(differ > 0);
    let out = run_ok(
        Command::new(hindsight_bin())
            .args(["failback", "prepare", "--group", "erp", "--epoch", "1", "--config"])
            .arg(c.path("ta.toml"))
            .arg("--agent-config")
            .arg(c.agent_toml("vm1")),
    );
    assert!(out.contains("prepared for failback at epoch 1"), "{out}");
    let _ta = spawn("target-a", Command::new(hindsight_bin()).arg("target").arg("--config").arg(c.path("ta.toml")));
    common::wait_tcp(ta_port, "the original site's target");
    let mut eb = format!(
        "[engine]\nlisten = \"127.0.0.1:{eb_port}\"\ndata_dir = \"{}\"\n\n{}\n[[group]]\nname = \"erp\"\nmode = \"cdp\"\nepoch = 1\ntarget = \"127.0.0.1:{ta_port}\"\n",
        c.path("recovery-engine").display(),
        c.tls_section("engine", "recovery")
    );
    for v in ["db", "app"] {
        eb += &format!("\n[[group.volume]]\nname = \"{v}\"\nvm = \"vm1\"\nsize = \"{SIZE}\"\n");
    }
    std::fs::write(c.path("engine-b.toml"), eb).unwrap();
    let engine_b = spawn("engine-b", Command::new(hindsight_bin()).arg("engine").arg("--config").arg(c.path("engine-b.toml")));

    // The recovery site's agent compares every region with the original disks and ships only
    // those that differ: the original disks become the production volumes.
    let started = std::time::Instant::now();
    while std::fs::read(c.disk("db")).unwrap() != db_b.bytes || std::fs::read(c.disk("app")).unwrap() != app_b.bytes {
        assert!(started.elapsed() < Duration::from_secs(90), "the original disks never became equal:\n{}", c.log("agent-b"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let shipped = resync_bytes(&ta_dir);
    eprintln!("failback: {differ} regions of 1 MiB differ; {shipped} bytes of resync data shipped");
    assert_eq!(shipped, differ as u64 * (1 << 20), "only the regions that differ are shipped");

    // Production comes home: a planned move from the recovery site back to the original one.
    let uri = format!("nbd+unix:///db?socket={}", c.path("b-db.sock").display());
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 99 0 8192"]));
    db_b.fill(0, 8192, 99);
    let pki = c.pki();
    let engine = format!("127.0.0.1:{eb_port}");
    let out = run_ok(
        Command::new(hindsight_bin())
            .args(["failover", "--json", "--planned", "--group", "erp", "--config"])
            .arg(c.path("ta.toml"))
            .args(["--engine", &engine, "--engine-ca"])
            .arg(pki.join("ca.pem"))
            .arg("--engine-cert")
            .arg(pki.join("operator-alice.pem"))
            .arg("--engine-key")
            .arg(pki.join("operator-alice-key.pem")),
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["epoch"].as_u64(), Some(2), "{r}");
    assert_same("db: the original disk after failback", &std::fs::read(c.disk("db")).unwrap(), &db_b.bytes);
    assert_same("app: the original disk after failback", &std::fs::read(c.disk("app")).unwrap(), &app_b.bytes);

    // The recovery site shuts its VMs down; it protects the group again, from the volumes
    // production left there, at the new epoch; the original site's engine and agent start again.
    drop(agent_b);
    drop(engine_b);
    c.stop("target");
    let out = run_ok(
        Command::new(hindsight_bin()).args(["failback", "resume", "--group", "erp", "--epoch", "2", "--config"]).arg(c.target_toml()),
    );
    assert!(out.contains("protected again at epoch 2") && out.contains("erp.epoch-1"), "{out}");
    c.start_target();
    c.group_extra = "epoch = 2\n".into();
    c.write_configs();
    c.start_engine();
    c.start_agent("vm1");
    write_random(&c, "db", &mut db_b, &mut rng, 20);
    write_random(&c, "app", &mut app_b, &mut rng, 20);
    c.settle();
    assert!(c.log("engine").contains("journal of epoch 0 is set aside"), "{}", c.log("engine"));
    assert_same("db at the recovery site, protected again", &c.recover("db", &["--latest"]), &db_b.bytes);
    assert_same("app at the recovery site, protected again", &c.recover("app", &["--latest"]), &app_b.bytes);
    // The history before the failover is kept, and still recovers.
    let old = run_ok(Command::new(hindsight_bin()).args(["history", "--json", "--group", "erp.epoch-1", "--config"]).arg(c.target_toml()));
    assert!(old.contains("\"last_seq\""), "{old}");
    let out = c.path("old-db.img");
    run_ok(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp.epoch-1", "--volume", "db", "--seq", &point.to_string(), "--config"])
            .arg(c.target_toml())
            .arg("--out")
            .arg(&out),
    );
    assert_same("db at the failover point, from the kept history", &std::fs::read(&out).unwrap(), &db_at);
}
