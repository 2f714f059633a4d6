//! Recovering a whole VM or a whole group at one point: `hindsight recover --vm VM | --all
//! --out-dir DIR` writes one image per volume and a manifest, every image at the same group
//! sequence number.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{first_difference, have_tools, hindsight_bin, run_ok, run_timeout, Cluster, Vol};
use hindsight_consistency::time::{format_rfc3339, now_ns};

const SIZE: u64 = 2 << 20;

fn recover_dir(c: &Cluster, what: &[&str], point: &[&str], dir: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(hindsight_bin())
            .args(["recover", "--json", "--group", "erp", "--config"])
            .arg(c.target_toml())
            .args(what)
            .args(point)
            .arg("--out-dir")
            .arg(dir),
    );
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let on_disk: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(printed, on_disk, "the printed manifest and manifest.json differ");
    on_disk
}

fn write(c: &Cluster, volume: &str, byte: u8, block: u64) {
    run_ok(Command::new("qemu-io").args(["-f", "raw", &c.uri(volume), "-c", &format!("write -P {byte} {} 4096", block * 4096)]));
}

#[test]
fn whole_vm_and_whole_group_recover_at_one_sequence_number() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let vols = [Vol::new("vm1", "db-data", SIZE), Vol::new("vm1", "db-log", SIZE), Vol::new("vm2", "app", SIZE)];
    let c = Cluster::start(&vols);
    // Round-robin writes: write i goes to volume i % 3, so every point cuts all three.
    for i in 0..30u64 {
        write(&c, &vols[(i % 3) as usize].name, (i + 1) as u8, i);
    }
    let mid_time = now_ns();
    std::thread::sleep(std::time::Duration::from_millis(20));
    for i in 30..45u64 {
        write(&c, &vols[(i % 3) as usize].name, (i + 1) as u8, i);
    }
    assert_eq!(c.settle(), 45);

    // The whole group at seq 20: three images, each equal to its single-volume recovery.
    let all = c.path("all-20");
    let m = recover_dir(&c, &["--all"], &["--seq", "20"], &all);
    assert_eq!(m["seq"], 20);
    assert_eq!(m["consistency"], "crash-consistent");
    assert!(m["vm"].is_null());
    assert_eq!(m["volumes"].as_array().unwrap().len(), 3);
    for v in &vols {
        let img = std::fs::read(all.join(format!("{}.img", v.name))).unwrap();
        let single = c.recover(&v.name, &["--seq", "20"]);
        assert!(img == single, "{}: group recovery differs from single recovery: {}", v.name, first_difference(&img, &single));
        // Writes 0..20 are present (on their volume), 20..45 are not.
        for i in 0..45u64 {
            if vols[(i % 3) as usize].name != v.name {
                continue;
            }
            let b = img[(i * 4096) as usize];
            assert_eq!(b, if i < 20 { (i + 1) as u8 } else { 0 }, "{}: write {i}", v.name);
        }
    }

    // One VM at a time: only its volumes, resolved to the group sequence number of that time.
    let vm1 = c.path("vm1-mid");
    let m = recover_dir(&c, &["--vm", "vm1"], &["--time", &format_rfc3339(mid_time)], &vm1);
    assert_eq!(m["seq"], 30, "the time between the batches is seq 30");
    assert_eq!(m["vm"], "vm1");
    let names: Vec<&str> = m["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db-data", "db-log"]);
    assert!(!vm1.join("app.img").exists());

    // Latest: every image equals its source disk.
    let latest = c.path("latest");
    let m = recover_dir(&c, &["--all"], &["--latest"], &latest);
    assert_eq!(m["seq"], 45);
    for v in &vols {
        let img = std::fs::read(latest.join(format!("{}.img", v.name))).unwrap();
        let src = std::fs::read(c.disk(&v.name)).unwrap();
        assert!(img == src, "{}: latest differs from the source disk: {}", v.name, first_difference(&img, &src));
    }

    // Clear refusals: an unknown VM names the known ones; a non-empty directory is refused.
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp", "--vm", "nope", "--latest", "--config"])
            .arg(c.target_toml())
            .arg("--out-dir")
            .arg(c.path("nope")),
        std::time::Duration::from_secs(30),
    );
    assert!(!ok && err.contains("vm1") && err.contains("vm2"), "{err}");
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp", "--all", "--latest", "--config"])
            .arg(c.target_toml())
            .arg("--out-dir")
            .arg(&latest),
        std::time::Duration::from_secs(30),
    );
    assert!(!ok && err.contains("not empty"), "{err}");
}
