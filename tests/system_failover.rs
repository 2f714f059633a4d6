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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_same, differing_pieces, first_difference, have_tools, hindsight_bin, resync_bytes, run_code, run_ok, write_random_to, Cluster,
    Model, Vol,
};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
/// The agent's compare sweep sends the pieces of 64 KiB that differ.
const PIECE: usize = 64 << 10;

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    rand::rngs::StdRng::seed_from_u64(seed)
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

/// Random writes of up to 16 blocks on a volume through its agent at the source site.
fn write_random(c: &Cluster, volume: &str, model: &mut Model, rng: &mut impl Rng, n: usize) {
    write_random_to(&c.uri(volume), model, rng, n, 16);
}

fn promoted(c: &Cluster, volume: &str) -> PathBuf {
    c.promoted(volume)
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
    assert!(c.history_text().contains("production: the source site"));
    let r = c.failover_json(&["--latest"]);
    assert_eq!((r["epoch"].as_u64(), r["undone_bytes"].as_u64()), (Some(1), Some(0)), "{r}");
    assert_eq!(r["seq"], r["last_seq"]);
    assert_same("db promoted", &std::fs::read(promoted(&c, "db")).unwrap(), &db.bytes);
    assert_same("app promoted", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);
    check_ext4(&promoted(&c, "db"), &files);
    let text = c.history_text();
    assert!(text.contains("production: THE RECOVERY SITE") && text.contains("epoch 1"), "{text}");
    assert!(!c.path("target/groups/erp/replica/db.img").exists(), "the replica became the production volume");

    // Production runs here now: agents at the recovery site serve the promoted volumes (no
    // engine to replicate to yet: they track what is written in their dirty maps).
    let mut site = c.serve_promoted();
    run_ok(Command::new("qemu-io").args(["-f", "raw", &site.uri(&c, "app"), "-c", "write -P 9 0 65536"]));
    app.fill(0, 65536, 9);
    for a in &mut site.agents {
        a.stop();
    }
    assert_same("app after a write at the recovery site", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);
    let map = PathBuf::from(format!("{}.hsmap", promoted(&c, "app").display()));
    assert!(map.exists(), "the agent tracks the writes since promotion in {}", map.display());

    // The old engine comes back: the target refuses it, naming the failover, and takes
    // nothing; so after a restart of the target.
    c.start_engine();
    c.wait_log_within("engine", "was failed over at the recovery site", Duration::from_secs(30));
    // The engine says a repeated refusal once; the restarted target logs each one it makes.
    let refusal = "this engine may no longer ship it";
    let refusals = c.log("target").matches(refusal).count();
    c.kill_target();
    c.start_target();
    c.wait_log("target", refusal, refusals + 1);
    assert_same("app after the old engine returned", &std::fs::read(promoted(&c, "app")).unwrap(), &app.bytes);

    // A second failover is refused; the history is untouched and still recovers.
    let (code, out, err) = c.failover(&["--latest"]);
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
    let r = c.failover_json(&["--seq", &point.to_string()]);
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
    let r = c.failover_json(&["--latest"]);
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
    let (child, ready) = common::spawn_until_line(
        Command::new(hindsight_bin())
            .args(["failover", "--test", "--group", "erp", "--config"])
            .arg(c.target_toml())
            .args(point)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display())),
        Duration::from_secs(30),
    );
    let t = TestFailover { child, sock };
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
    let (code, out, err) = c.failover(&["--test", "--latest", "--listen", "unix:/nonexistent/x.sock"]);
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
    assert!(c.history_text().contains("production: the source site"));
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
    let args = c.planned_args(c.eport);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = c.failover_json(&args);
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

#[test]
fn failback_ships_only_the_regions_that_differ_and_brings_production_home() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut rng = rng();
    let vols = [Vol::new("vm1", "db", SIZE), Vol::new("vm2", "app", SIZE)];
    let mut c = Cluster::start_with(&vols, "segment_size = \"1MiB\"\n");
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    write_random(&c, "db", &mut db, &mut rng, 30);
    write_random(&c, "app", &mut app, &mut rng, 30);
    let point = c.settle();
    let (db_at, app_at) = (db.bytes.clone(), app.bytes.clone());
    // The source writes more after the point the failover will take: those must be undone on
    // the original disks at failback.
    write_random(&c, "db", &mut db, &mut rng, 5);
    c.settle();
    for vm in ["vm1", "vm2"] {
        c.kill_agent(vm);
    }
    c.kill_engine();
    let r = c.failover_json(&["--seq", &point.to_string()]);
    assert_eq!(r["epoch"].as_u64(), Some(1));

    // Production at the recovery site, through agents whose engine is not there yet.
    let mut site = c.serve_promoted();
    let (mut db_b, mut app_b) = (Model::new(SIZE), Model::new(SIZE));
    db_b.bytes = std::fs::read(promoted(&c, "db")).unwrap();
    app_b.bytes = std::fs::read(promoted(&c, "app")).unwrap();
    assert_same("db promoted at the point", &db_b.bytes, &db_at);
    assert_same("app promoted at the point", &app_b.bytes, &app_at);
    write_random_to(&site.uri(&c, "db"), &mut db_b, &mut rng, 3, 4);
    write_random_to(&site.uri(&c, "app"), &mut app_b, &mut rng, 3, 4);

    // The original site returns: its disks become the replicas of its own target's group, and
    // the recovery site's engine ships to it. Its agents compare every region and ship only
    // those that differ: the original disks become the production volumes.
    let differ =
        differing_pieces(&c.disk("db"), &promoted(&c, "db"), PIECE) + differing_pieces(&c.disk("app"), &promoted(&c, "app"), PIECE);
    assert!(differ > 0);
    site.fail_back(&c, 1);
    site.wait_disks_equal(&c, Duration::from_secs(90));
    let origin = site.origin.as_ref().unwrap();
    let shipped = resync_bytes(&origin.dir, "erp");
    eprintln!("failback: {differ} pieces of 64 KiB differ; {shipped} bytes of resync data shipped");
    assert_eq!(shipped, (differ * PIECE) as u64, "only the pieces that differ are shipped");

    // Production comes home: a planned move from the recovery site back to the original one.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &site.uri(&c, "db"), "-c", "write -P 99 0 8192"]));
    db_b.fill(0, 8192, 99);
    let mut args = vec!["--json".to_owned(), "--group".into(), "erp".into(), "--config".into(), origin.toml.display().to_string()];
    args.extend(c.planned_args(site.engine_port));
    let out = run_ok(Command::new(hindsight_bin()).arg("failover").args(&args));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["epoch"].as_u64(), Some(2), "{r}");
    assert_same("db: the original disk after failback", &std::fs::read(c.disk("db")).unwrap(), &db_b.bytes);
    assert_same("app: the original disk after failback", &std::fs::read(c.disk("app")).unwrap(), &app_b.bytes);

    // The recovery site shuts its VMs down; it protects the group again, from the volumes
    // production left there, at the new epoch; the original site's engine and agent start again.
    drop(site);
    c.stop("target");
    let out = run_ok(
        Command::new(hindsight_bin()).args(["failback", "resume", "--group", "erp", "--epoch", "2", "--config"]).arg(c.target_toml()),
    );
    assert!(out.contains("protected again at epoch 2") && out.contains("erp.epoch-1"), "{out}");
    c.start_target();
    c.group_extra = "epoch = 2\n".into();
    c.write_configs();
    c.start_engine();
    c.start_agents();
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
