//! Application-consistent bookmarks: `hindsight bookmark --quiesce` makes every agent of the
//! group freeze its file systems (fsfreeze on the mount points named in agent.toml, here ext4
//! on nbdfuse + a loop device), places the bookmark after the last write before the freeze,
//! and thaws. A quiesce that takes too long thaws everything and records the bookmark as
//! crash-consistent, with the reason.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{have_tools, hindsight_bin, random_bytes, run_ok, seeded_rng, start_nbdfuse, Cluster, Vol};

const SIZE: u64 = 64 << 20;

/// Adds lines to the [agent] section of a VM's agent.toml.
fn add_agent_lines(c: &Cluster, vm: &str, lines: &str) {
    let path = c.agent_toml(vm);
    let text = std::fs::read_to_string(&path).unwrap();
    let vm_line = format!("vm = \"{vm}\"\n");
    assert!(text.contains(&vm_line));
    std::fs::write(&path, text.replacen(&vm_line, &format!("{vm_line}{lines}\n"), 1)).unwrap();
}

fn bookmark(c: &Cluster, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new(hindsight_bin())
            .args(["bookmark", "--json", "--group", "erp", "--config"])
            .arg(c.path("engine.toml"))
            .args(extra)
            .arg(name),
    );
    serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
}

fn debugfs_cat(img: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(img).output().unwrap();
    out.stdout
}

#[test]
fn quiesced_bookmark_on_two_vms_recovers_clean_file_systems_with_the_files_before_it() {
    if !have_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount", "fsfreeze"]) {
        return;
    }
    let mut rng = seeded_rng();
    let vols = [Vol::new("vm1", "disk1", SIZE), Vol::new("vm2", "disk2", SIZE)];
    let mut c = Cluster::start_servers(&vols);
    let mounts: Vec<PathBuf> = vols.iter().map(|v| c.path(&format!("mnt-{}", v.vm))).collect();
    for (v, m) in vols.iter().zip(&mounts) {
        std::fs::create_dir(m).unwrap();
        add_agent_lines(&c, &v.vm, &format!("freeze = [\"{}\"]", m.display()));
        c.start_agent(&v.vm);
    }
    let mut stacks = Vec::new();
    for (v, m) in vols.iter().zip(&mounts) {
        let dir = c.path(&format!("stack-{}", v.vm));
        std::fs::create_dir(&dir).unwrap();
        let Some(mut stack) = start_nbdfuse(&dir, &c.uri(&v.name)) else { return };
        let dev = run_ok(Command::new("losetup").arg("-f").arg("--show").arg(stack.fuse_dir.join("disk"))).trim().to_owned();
        stack.loop_dev = Some(dev.clone());
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
        run_ok(Command::new("mount").arg(&dev).arg(m));
        stack.mount_dir = Some(m.clone());
        stacks.push(stack);
    }

    // Files before the bookmark, on both VMs; more after it.
    let mut before = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        for f in 0..3 {
            let data = random_bytes(&mut rng, 256 << 10);
            let name = format!("/before-{f}.bin");
            std::fs::write(m.join(&name[1..]), &data).unwrap();
            before.push((i, name, data));
        }
        run_ok(Command::new("sync").arg("-f").arg(m));
    }
    let mark = bookmark(&c, "app-point", &["--quiesce"]);
    assert_eq!(mark["consistency"], "app-consistent", "{mark}");
    // Thawed: the file systems take writes again.
    for m in &mounts {
        std::fs::write(m.join("after.bin"), random_bytes(&mut rng, 128 << 10)).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(m));
    }
    for mut s in stacks {
        s.unmount();
        s.detach_loop();
        s.stop_nbdfuse();
    }
    c.settle();

    let h = c.history();
    assert_eq!(h["bookmarks"][0]["name"], "app-point");
    assert_eq!(h["bookmarks"][0]["consistency"], "app-consistent");

    // Both volumes at the bookmark: clean file systems (no journal replay needed: they were
    // frozen), the files written before it, nothing written after.
    let (manifest, images) = c.recover_all(&["--bookmark", "app-point"]);
    assert_eq!(manifest["seq"], mark["seq"]);
    assert_eq!(manifest["consistency"], "app-consistent", "the manifest shows the bookmark's kind");
    for (i, v) in vols.iter().enumerate() {
        let img = c.path(&format!("{}-at-bookmark.img", v.name));
        std::fs::write(&img, &images[&v.name]).unwrap();
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&img).output().unwrap();
        assert!(fsck.status.success(), "{}: e2fsck at the bookmark: {}", v.name, String::from_utf8_lossy(&fsck.stdout));
        for (_, name, data) in before.iter().filter(|(vm, ..)| *vm == i) {
            assert!(debugfs_cat(&img, name) == *data, "{}: {name} differs at the bookmark", v.name);
        }
        assert!(debugfs_cat(&img, "/after.bin").is_empty(), "{}: a file written after the bookmark is in it", v.name);
    }
}

#[test]
fn a_quiesce_that_takes_too_long_thaws_and_records_a_crash_consistent_bookmark() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let vols = [Vol::new("vm1", "disk1", 1 << 20)];
    let mut c = Cluster::start_servers(&vols);
    // A pre-quiesce script that needs 3 s, and a post-quiesce script that leaves a mark.
    let pre = c.path("pre.sh");
    let post = c.path("post.sh");
    let thawed = c.path("thawed");
    std::fs::write(&pre, "#!/bin/sh\nsleep 3\n").unwrap();
    std::fs::write(&post, format!("#!/bin/sh\necho \"$1\" > {}\n", thawed.display())).unwrap();
    for s in [&pre, &post] {
        run_ok(Command::new("chmod").arg("+x").arg(s));
    }
    add_agent_lines(&c, "vm1", &format!("pre_quiesce = \"{}\"\npost_quiesce = \"{}\"", pre.display(), post.display()));
    c.start_agent("vm1");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &c.uri("disk1"), "-c", "write -P 9 0 4096"]));

    let started = Instant::now();
    let mark = bookmark(&c, "too-slow", &["--quiesce", "--quiesce-timeout", "1s"]);
    assert!(started.elapsed() < Duration::from_secs(3), "the engine must not wait past its timeout");
    assert_eq!(mark["consistency"], "crash-consistent");
    assert!(mark["reason"].as_str().unwrap().contains("did not quiesce"), "{mark}");
    assert_eq!(mark["seq"], 2, "the bookmark still follows every acknowledged write");
    // The agent thaws as soon as its slow freeze has finished.
    let start = Instant::now();
    while std::fs::read_to_string(&thawed).map(|s| s.trim() != "thaw").unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(20), "the agent never ran its post_quiesce script");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.settle();
    let h = c.history();
    assert_eq!(h["bookmarks"][0]["consistency"], "crash-consistent");
    assert!(h["bookmarks"][0]["note"].as_str().unwrap().contains("quiesce failed"), "{h}");
}
