//! Bookmarks: `hindsight bookmark` places a named point in the group's sequence; `history`
//! lists it with its sequence number, time and kind across restarts of every process, and
//! `recover --bookmark` gives every write before it and none after.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{first_difference, have_tools, hindsight_bin, run_ok, run_timeout, Cluster, Model, Vol};

const SIZE: u64 = 1 << 20;

fn bookmark(c: &Cluster, name: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new(hindsight_bin()).args(["bookmark", "--json", "--group", "erp", "--config"]).arg(c.path("engine.toml")).arg(name),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Writes blocks `from..to` with pattern `block % 250 + 1` and applies them to the model.
fn write_blocks(c: &Cluster, model: &mut Model, from: u64, to: u64) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &c.uri("disk1")]);
    for b in from..to {
        let byte = (b % 250 + 1) as u8;
        cmd.arg("-c").arg(format!("write -P {byte} {} 4096", (b % 256) * 4096));
        model.fill((b % 256) * 4096, 4096, byte);
    }
    run_ok(&mut cmd);
}

#[test]
fn bookmarks_survive_restarts_and_recover_exactly_the_writes_before_them() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start(&[Vol::new("vm1", "disk1", SIZE)]);
    let mut model = Model::new(SIZE);
    write_blocks(&c, &mut model, 0, 10);
    let before_first = model.clone();
    let first = bookmark(&c, "before-upgrade");
    assert_eq!(first["seq"], 11, "the bookmark takes the sequence number after the 10 acknowledged writes");

    // Every process is restarted between writes and bookmarks (the agent idle, its dirty map
    // clean, so that it has nothing to resync).
    c.wait_map_clean("disk1");
    c.kill_agent("vm1");
    c.kill_engine();
    c.kill_target();
    c.start_target();
    c.start_engine();
    c.start_agent("vm1");
    write_blocks(&c, &mut model, 10, 30);
    let before_second = model.clone();
    let second = bookmark(&c, "nightly");
    assert_eq!(second["seq"], 32);
    c.kill_engine();
    c.start_engine();
    c.wait_log("engine", "attached volumes", 3);
    write_blocks(&c, &mut model, 30, 40);
    c.kill_target();
    // The bookmark index is only an index: without it the target rebuilds it from the journal.
    let index = c.path("target").join("groups").join("erp").join("bookmarks.toml");
    assert!(std::fs::read_to_string(&index).unwrap().contains("before-upgrade"), "the receiver indexes bookmarks");
    std::fs::remove_file(&index).unwrap();
    c.start_target();
    assert_eq!(c.settle(), 42);

    let h = c.history();
    let marks = h["bookmarks"].as_array().unwrap();
    let listed: Vec<(&str, u64, &str)> =
        marks.iter().map(|b| (b["name"].as_str().unwrap(), b["seq"].as_u64().unwrap(), b["consistency"].as_str().unwrap())).collect();
    assert_eq!(listed, [("before-upgrade", 11, "crash-consistent"), ("nightly", 32, "crash-consistent")]);
    assert_eq!(marks[0]["time_ns"], first["time_ns"]);

    for (name, want) in [("before-upgrade", &before_first), ("nightly", &before_second)] {
        let img = c.recover("disk1", &["--bookmark", name]);
        assert!(img == want.bytes, "bookmark {name}: {}", first_difference(&img, &want.bytes));
    }
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == model.bytes, "latest: {}", first_difference(&latest, &model.bytes));

    // An unknown bookmark is refused, naming the ones there are.
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin())
            .args(["recover", "--group", "erp", "--volume", "disk1", "--bookmark", "nope", "--config"])
            .arg(c.target_toml())
            .arg("--out")
            .arg(c.path("x.img")),
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains("before-upgrade") && err.contains("nightly"), "{err}");
    // An invalid name is refused by the engine.
    let (ok, _, err) = run_timeout(
        Command::new(hindsight_bin()).args(["bookmark", "--group", "erp", "--config"]).arg(c.path("engine.toml")).arg("no spaces"),
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains("not valid"), "{err}");
}
