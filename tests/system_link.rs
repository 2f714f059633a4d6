//! The engine → target link with the real binaries, through the WAN emulator: LZ4 compression
//! cuts the bytes of real file-system data and does not grow random data, status reports the
//! ratio, and `max_bandwidth` caps the rate.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_precision_loss)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::wan::WanProxy;
use common::*;

const VOLUME_SIZE: u64 = 32 << 20;

/// A cluster of one volume shipping through a proxy, with extra lines for the group and the
/// engine sections.
fn cluster(group_extra: &str, engine_extra: &str) -> (Cluster, WanProxy) {
    cluster_via_wan(VOLUME_SIZE, |c| {
        c.group_extra = group_extra.to_string();
        c.engine_extra = engine_extra.to_string();
    })
}

/// Writes `image` to the volume with qemu-img (a real NBD client), waits until the target
/// holds it all, checks the replica, and returns the bytes the proxy carried to the target.
fn ship_image(c: &Cluster, proxy: &WanProxy, image: &Path) -> u64 {
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(image).arg(c.uri("data")));
    c.wait_shipped();
    let want = std::fs::read(image).unwrap();
    let got = c.recover("data", &["--latest"]);
    assert!(got[..want.len()] == want[..], "replica differs: {}", first_difference(&got[..want.len()], &want));
    proxy.bytes_up()
}

/// An ext4 image of `size` bytes holding real files of this machine (documentation, licences,
/// configuration; files that are already compressed are left out, as a database or a source
/// tree would mostly hold uncompressed data).
fn ext4_with_real_files(dir: &Path, size: u64) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut copied = 0u64;
    for src in ["/usr/share/common-licenses", "/usr/share/doc", "/etc"] {
        let Ok(walk) = std::fs::read_dir(src) else { continue };
        let mut stack: Vec<std::path::PathBuf> = walk.filter_map(|e| e.ok().map(|e| e.path())).collect();
        while let Some(p) = stack.pop() {
            if copied > size / 3 {
                break;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
                }
            } else if meta.is_file() && meta.len() < (1 << 20) && !already_compressed(&p) {
                if let Ok(bytes) = std::fs::read(&p) {
                    let name = format!("f{copied}-{}", p.file_name().unwrap().to_string_lossy());
                    std::fs::write(tree.join(name), &bytes).unwrap();
                    copied += bytes.len() as u64;
                }
            }
        }
    }
    assert!(copied > 1 << 20, "found only {copied} bytes of real files to copy");
    let image = dir.join("ext4.img");
    std::fs::File::create(&image).unwrap().set_len(size).unwrap();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", "-d"]).arg(&tree).arg(&image));
    image
}

fn already_compressed(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "gz" | "xz" | "bz2" | "zst" | "lz4" | "zip" | "png" | "jpg" | "gif" | "deb" | "jar")
}

#[test]
fn lz4_cuts_the_bytes_of_real_files_and_does_not_grow_random_data() {
    if !have_tools(&["qemu-img", "mkfs.ext4"]) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let ext4 = ext4_with_real_files(scratch.path(), 16 << 20);
    let random = scratch.path().join("random.img");
    let mut rng = seeded_rng();
    std::fs::write(&random, random_bytes(&mut rng, 8 << 20)).unwrap();

    let mut bytes = Vec::new();
    for compression in ["off", "lz4"] {
        let (c, proxy) = cluster(&format!("compression = \"{compression}\""), "");
        let fs_bytes = ship_image(&c, &proxy, &ext4);
        let random_bytes = ship_image(&c, &proxy, &random) - fs_bytes;
        let s = c.status();
        eprintln!("compression {compression}: ext4 {fs_bytes} bytes on the wire, random {random_bytes}; status {s}");
        bytes.push((fs_bytes, random_bytes, s));
    }
    let ((off_fs, off_random, off_status), (lz4_fs, lz4_random, lz4_status)) = (&bytes[0], &bytes[1]);
    assert_eq!(off_status["compression"], "");
    assert_eq!(lz4_status["compression"], "lz4");
    assert!((*lz4_fs as f64) < *off_fs as f64 * 0.8, "lz4 sent {lz4_fs} bytes of the ext4 image, uncompressed {off_fs}");
    assert!((*lz4_random as f64) <= *off_random as f64 * 1.01, "lz4 grew random data: {lz4_random} vs {off_random}");
    // Status: records shipped vs wire bytes gives the ratio the proxy saw.
    let ratio = lz4_status["shipped_bytes"].as_f64().unwrap() / lz4_status["wire_bytes"].as_f64().unwrap();
    assert!(ratio > 1.2, "status ratio {ratio}: {lz4_status}");
    assert!(off_status["wire_bytes"].as_u64().unwrap() >= off_status["shipped_bytes"].as_u64().unwrap());
}

#[test]
fn max_bandwidth_caps_the_link() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("random.img");
    std::fs::write(&image, random_bytes(&mut seeded_rng(), 3 << 20)).unwrap();
    let (c, proxy) = cluster("compression = \"off\"", "max_bandwidth = \"1MiB/s\"");
    let started = Instant::now();
    let sent = ship_image(&c, &proxy, &image);
    let took = started.elapsed();
    let rate = sent as f64 / took.as_secs_f64();
    eprintln!("{sent} bytes in {took:?}: {rate:.0} B/s");
    // At 1 MiB/s, 3 MiB cannot arrive in much under 3 s (50 ms of burst allowed).
    assert!(rate < 1.25 * (1 << 20) as f64, "{rate:.0} B/s through a 1 MiB/s limit");
    assert!(took > Duration::from_millis(2500), "{took:?}");
}

#[test]
fn a_hung_target_is_seen_disconnected_and_shipping_resumes_when_it_answers() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    // A hung process (or host) keeps its connection open: the engine must not go on calling it
    // connected while nothing is confirmed.
    let c = Cluster::start(&[Vol::new("vm1", "data", VOLUME_SIZE)]);
    let mut model = Model::new(VOLUME_SIZE);
    let write = |model: &mut Model, byte: u8, off: u64| {
        run_ok(Command::new("qemu-io").args(["-f", "raw", &c.uri("data"), "-c", &format!("write -P {byte} {off} 65536")]));
        model.fill(off, 65536, byte);
    };
    write(&mut model, 1, 0);
    c.wait_shipped();
    let paused = c.pause("target");
    let started = Instant::now();
    for i in 0..8u64 {
        write(&mut model, 2 + i as u8, (i + 1) << 20);
    }
    let g = c.wait_status("the target disconnected", Duration::from_secs(60), |g| g["target_connected"] == false);
    println!("the hung target was seen disconnected after {:?}: {g}", started.elapsed());
    assert!(c.log("engine").contains("the target confirmed nothing for"), "{}", c.log("engine"));
    paused.resume();
    c.wait_status("the target back and caught up", Duration::from_secs(60), |g| g["target_connected"] == true && g["lag_writes"] == 0);
    c.wait_shipped();
    let got = c.recover("data", &["--latest"]);
    assert!(got == model.bytes, "after the target answered again: {}", first_difference(&got, &model.bytes));
}
