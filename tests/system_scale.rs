//! Many groups on one engine and one target: a few hundred consistency groups of small
//! volumes, served by three agents (three VMs; some groups span two of them), under a light
//! random load while the target and then the engine are killed with SIGKILL and restarted.
//! Every group's latest point, and every group's point at a time before the kills, recover
//! equal to the model of the acknowledged writes.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hindsight_consistency::time::{format_rfc3339, now_ns};
use rand::{Rng, SeedableRng};

const GROUPS: usize = 200;
const VMS: [&str; 3] = ["vm1", "vm2", "vm3"];
const SIZE: u64 = 1 << 20;

/// Group `i`'s volumes: one on VM `i % 3`, and every tenth group a second one on the next VM.
fn volumes() -> Vec<Vol> {
    let mut vols = Vec::new();
    for i in 0..GROUPS {
        let g = format!("g{i}");
        vols.push(Vol::in_group(&g, VMS[i % 3], &format!("v{i}"), SIZE));
        if i % 10 == 0 {
            vols.push(Vol::in_group(&g, VMS[(i + 1) % 3], &format!("w{i}"), SIZE));
        }
    }
    // The agents are started per VM in the order the volumes name them.
    vols.sort_by(|a, b| a.vm.cmp(&b.vm));
    vols
}

/// What the acknowledged writes made of every volume.
type Models = BTreeMap<String, Model>;

/// `n` rounds of writes: each picks a volume and writes one to three random ranges with
/// qemu-io (each acknowledged before the next is sent), recording them in the model.
fn write_some(c: &Cluster, models: &Mutex<Models>, rng: &mut impl Rng, n: usize) {
    for _ in 0..n {
        let v = &c.vols[rng.gen_range(0..c.vols.len())];
        let mut cmds = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            let len = 4096 * rng.gen_range(1..=8u64);
            let off = 4096 * rng.gen_range(0..(SIZE - len) / 4096);
            let byte: u8 = rng.gen_range(1..=255);
            cmds.push(format!("write -P {byte} {off} {len}"));
            writes.push((off, len, byte));
        }
        qemu_io(&c.uri(&v.name), &cmds);
        let mut m = models.lock().unwrap();
        let model = m.get_mut(&v.name).expect("a model per volume");
        for (off, len, byte) in writes {
            model.fill(off, len, byte);
        }
    }
}

/// Waits until the engine says every group's target holds everything it acknowledged.
fn wait_all_shipped(c: &Cluster) {
    let start = Instant::now();
    let mut settled = 0;
    loop {
        let out = run_ok(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(c.engine_toml()));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
        let groups = v["groups"].as_array().expect("groups in the status");
        assert_eq!(groups.len(), GROUPS, "status lists every group");
        let behind: Vec<&str> = groups.iter().filter(|g| g["lag_writes"] != 0).map(|g| g["name"].as_str().unwrap_or("?")).collect();
        if behind.is_empty() {
            settled += 1;
            if settled >= 2 {
                return;
            }
        } else {
            settled = 0;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "groups never caught up: {behind:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until no group has a resync span open (the initial syncs, and the resyncs after the
/// engine came back, are complete): its last consistent point is its last record.
fn wait_all_consistent(c: &Cluster) {
    let start = Instant::now();
    let mut waiting: Vec<String> = c.groups();
    while !waiting.is_empty() {
        waiting.retain(|g| {
            let out = run_ok(Command::new(hindsight_bin()).args(["history", "--json", "--group", g, "--config"]).arg(c.target_toml()));
            let h: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("history is not JSON ({e}): {out}"));
            h["last_consistent_seq"] != h["last_seq"]
        });
        assert!(start.elapsed() < Duration::from_secs(180), "groups still resyncing after 180 s: {waiting:?}");
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Every group recovered whole at `point` equals `models`.
fn check_every_group(c: &Cluster, point: &[&str], models: &Models, what: &str) {
    for group in c.groups() {
        let dir = c.path(&format!("recovered-{group}"));
        let _ = std::fs::remove_dir_all(&dir);
        let out = run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--all", "--json", "--group", &group, "--config"])
                .arg(c.target_toml())
                .args(point)
                .arg("--out-dir")
                .arg(&dir),
        );
        let manifest: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("recover output is not JSON ({e}): {out}"));
        let listed = manifest["volumes"].as_array().unwrap_or_else(|| panic!("no volumes in {manifest}"));
        let mine: Vec<&Vol> = c.vols.iter().filter(|v| c.group_of(v) == group).collect();
        assert_eq!(listed.len(), mine.len(), "{what}: group {group} recovers every volume: {manifest}");
        for v in listed {
            let (name, file) = (v["name"].as_str().unwrap(), v["file"].as_str().unwrap());
            let got = std::fs::read(dir.join(file)).unwrap();
            let want = &models[name].bytes;
            assert!(&got == want, "{what}: group {group} volume {name}: {}", first_difference(&got, want));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn hundreds_of_groups_recover_equal_to_the_model_after_the_target_and_the_engine_are_killed() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::prepare(&volumes(), "", "");
    c.launch();
    let started = Instant::now();
    c.start_agents();
    eprintln!("{} volumes of {GROUPS} groups served by {} agents after {:?}", c.vols.len(), VMS.len(), started.elapsed());
    let models: Arc<Mutex<Models>> = Arc::new(Mutex::new(c.vols.iter().map(|v| (v.name.clone(), Model::new(SIZE))).collect()));
    let mut rng = seeded_rng();

    // Before the kills: a point in time to recover later.
    write_some(&c, &models, &mut rng, 120);
    wait_all_shipped(&c);
    wait_all_consistent(&c);
    std::thread::sleep(Duration::from_millis(20));
    let before = format_rfc3339(now_ns());
    let at_before = models.lock().unwrap().clone();
    std::thread::sleep(Duration::from_millis(20));

    // Writes go on while the target is killed and restarted, then the engine.
    let writer = {
        let uris: Vec<(String, String)> = c.vols.iter().map(|v| (v.name.clone(), c.uri(&v.name))).collect();
        let models = Arc::clone(&models);
        let mut rng = rand::rngs::StdRng::from_rng(&mut rng).unwrap();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(8) {
                let (name, uri) = &uris[rng.gen_range(0..uris.len())];
                let len = 4096 * rng.gen_range(1..=8u64);
                let off = 4096 * rng.gen_range(0..(SIZE - len) / 4096);
                let byte: u8 = rng.gen_range(1..=255);
                qemu_io(uri, &[format!("write -P {byte} {off} {len}")]);
                models.lock().unwrap().get_mut(name).unwrap().fill(off, len, byte);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    c.kill_target();
    c.start_target();
    std::thread::sleep(Duration::from_secs(2));
    c.kill_engine();
    c.start_engine();
    let n = writer.join().unwrap();
    eprintln!("{n} writes during the kills");
    write_some(&c, &models, &mut rng, 60);
    wait_all_shipped(&c);
    wait_all_consistent(&c);

    let models = models.lock().unwrap().clone();
    check_every_group(&c, &["--latest"], &models, "latest");
    check_every_group(&c, &["--time", &before], &at_before, &format!("time {before}, before the kills"));
}
