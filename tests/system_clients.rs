//! Real NBD clients against the agent's export with the whole chain running (agent, engine,
//! target): nbdinfo, qemu-img, nbdcopy, fio with verification, an ext4 file system through
//! nbdfuse and a loop device, and two VMs writing at once. Every test compares the recovered
//! image with what the client wrote, byte for byte.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    first_difference, have_tools, qemu_io, random_bytes, run_ok, run_ok_bytes, run_timeout, seeded_rng, start_nbdfuse, Cluster, Vol,
};
use rand::Rng;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_reports_the_configured_size_name_block_sizes_and_flags() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let size = 12 * MIB;
    let c = Cluster::start(&[Vol::new("vm1", "disk1", size)]);
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(c.uri("disk1")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json is not JSON ({e}): {out}"));
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("no exports in {out}"));
    assert_eq!(exports.len(), 1, "{out}");
    let e = &exports[0];
    assert_eq!(e["export-name"], "disk1", "{out}");
    assert_eq!(e["export-size"].as_u64(), Some(size), "{out}");
    let min = e["block_size_minimum"].as_u64().unwrap_or_else(|| panic!("no block_size_minimum in {out}"));
    let pref = e["block_size_preferred"].as_u64().unwrap_or_else(|| panic!("no block_size_preferred in {out}"));
    let max = e["block_size_maximum"].as_u64().unwrap_or_else(|| panic!("no block_size_maximum in {out}"));
    assert!(min >= 1 && min <= pref && pref <= max, "block sizes out of order: {min} {pref} {max}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(e[flag], true, "{flag} should be true: {out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
}

/// Random data with zero runs, which clients send as write-zeroes or skip.
fn random_with_zero_runs(rng: &mut impl Rng, size: u64) -> Vec<u8> {
    let mut data = random_bytes(rng, size as usize);
    for _ in 0..4 {
        let len = rng.gen_range(1..=(MIB as usize));
        let off = rng.gen_range(0..data.len() - len);
        data[off..off + len].fill(0);
    }
    // One aligned run of whole megabytes, large enough for every client to notice.
    data[(3 * MIB) as usize..(5 * MIB) as usize].fill(0);
    data
}

#[test]
fn qemu_img_convert_into_the_export_recovers_the_same_bytes() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let size = 16 * MIB;
    let mut rng = seeded_rng();
    let c = Cluster::start(&[Vol::new("vm1", "disk1", size)]);
    let src = c.path("src.img");
    let data = random_with_zero_runs(&mut rng, size);
    std::fs::write(&src, &data).unwrap();
    let uri = c.uri("disk1");

    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    let last = c.settle();
    assert!(last > 0, "nothing reached the target");

    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == data, "latest point differs from the source image: {}", first_difference(&latest, &data));
    let local = std::fs::read(c.disk("disk1")).unwrap();
    assert!(local == data, "agent's local disk differs from the source image: {}", first_difference(&local, &data));

    let back = c.path("back.img");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&back));
    let read_back = std::fs::read(&back).unwrap();
    assert!(read_back == data, "image read back through the export differs: {}", first_difference(&read_back, &data));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
}

#[test]
fn nbdcopy_into_the_export_recovers_the_same_bytes() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let size = 16 * MIB;
    let mut rng = seeded_rng();
    let c = Cluster::start(&[Vol::new("vm1", "disk1", size)]);
    let src = c.path("src.img");
    let data = random_with_zero_runs(&mut rng, size);
    std::fs::write(&src, &data).unwrap();

    run_ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(c.uri("disk1")));
    c.settle();
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == data, "latest point differs from the copied file: {}", first_difference(&latest, &data));
    let local = std::fs::read(c.disk("disk1")).unwrap();
    assert!(local == data, "agent's local disk differs from the copied file: {}", first_difference(&local, &data));
}

/// Runs fio's nbd engine against the export with `extra` options; fio checks what it wrote.
fn fio(c: &Cluster, volume: &str, name: &str, extra: &[&str]) {
    let out = run_ok(
        Command::new("fio")
            .current_dir(c.dir.path())
            .arg(format!("--name={name}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", c.uri(volume)))
            .args(["--iodepth=32", "--size=32m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=7"])
            .args(extra),
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
}

#[test]
fn fio_random_writes_with_verify_recover_to_the_local_disk() {
    if !have_tools(&["fio"]) {
        return;
    }
    let c = Cluster::start(&[Vol::new("vm1", "disk1", 32 * MIB)]);
    fio(&c, "disk1", "randwrite", &["--rw=randwrite", "--bs=4k"]);
    let after_first = c.settle();
    // Every 4 KiB block written once, each write one record.
    assert_eq!(after_first, 8192, "fio wrote 8192 blocks of 4 KiB, the target holds {after_first} records");
    let local = std::fs::read(c.disk("disk1")).unwrap();
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == local, "after randwrite: latest point differs from the local disk: {}", first_difference(&latest, &local));

    fio(&c, "disk1", "randrw", &["--rw=randrw", "--bsrange=512-128k"]);
    let after_second = c.settle();
    assert!(after_second > after_first, "the second fio run replicated nothing");
    let local2 = std::fs::read(c.disk("disk1")).unwrap();
    assert!(local2 != local, "the second fio run changed nothing on the local disk");
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == local2, "after randrw: latest point differs from the local disk: {}", first_difference(&latest, &local2));
    // The point between the two runs is still the disk as the first run left it.
    let between = c.recover("disk1", &["--seq", &after_first.to_string()]);
    assert!(between == local, "the point after the first run differs from the disk then: {}", first_difference(&between, &local));
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device_recovers_clean_with_every_file() {
    if !have_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing, so nbdfuse cannot mount");
        return;
    }
    let mut rng = seeded_rng();
    let c = Cluster::start(&[Vol::new("vm1", "disk1", 64 * MIB)]);
    let Some(mut stack) = start_nbdfuse(c.dir.path(), &c.uri("disk1")) else { return };

    let (ok, out, err) =
        run_timeout(Command::new("losetup").args(["-f", "--show"]).arg(stack.fuse_dir.join("disk")), Duration::from_secs(30));
    if !ok && (err.contains("No such device") || err.contains("cannot find an unused loop device")) {
        eprintln!("SKIPPED: no loop device available: {err}");
        return;
    }
    assert!(ok, "losetup failed: {err}");
    let dev = out.trim().to_owned();
    stack.loop_dev = Some(dev.clone());

    // Inode tables and the journal initialised now, so that nothing writes in the background
    // after the mount.
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&dev));
    let mnt = c.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").args(["-t", "ext4"]).arg(&dev).arg(&mnt));
    stack.mount_dir = Some(mnt.clone());

    let files: Vec<(&str, Vec<u8>)> = vec![
        ("/big.bin", random_bytes(&mut rng, (5 * MIB + 12345) as usize)),
        ("/small.txt", b"hindsight keeps every write\n".to_vec()),
        ("/data/one.bin", random_bytes(&mut rng, 4096)),
        ("/data/two.bin", random_bytes(&mut rng, 300_001)),
        ("/data/deeper/three.bin", random_bytes(&mut rng, (MIB + 1) as usize)),
    ];
    std::fs::create_dir_all(mnt.join("data/deeper")).unwrap();
    for (name, bytes) in &files {
        std::fs::write(mnt.join(name.trim_start_matches('/')), bytes).unwrap();
    }
    run_ok(&mut Command::new("sync"));
    stack.unmount();
    run_ok(Command::new("e2fsck").arg("-fn").arg(&dev));
    stack.detach_loop();
    stack.stop_nbdfuse();
    drop(stack);

    c.settle();
    let local = std::fs::read(c.disk("disk1")).unwrap();
    let image = c.path("recovered.img");
    let latest = c.recover("disk1", &["--latest"]);
    assert!(latest == local, "latest point differs from the local disk: {}", first_difference(&latest, &local));
    std::fs::write(&image, &latest).unwrap();
    run_ok(Command::new("e2fsck").arg("-fn").arg(&image));
    for (name, bytes) in &files {
        let got = run_ok_bytes(Command::new("debugfs").arg("-R").arg(format!("cat {name}")).arg(&image));
        assert!(got == *bytes, "{name} in the recovered image differs from what was written: {}", first_difference(&got, bytes));
    }
}

const BLOCK: u64 = 4096;
/// Writes per VM in the two-VM test.
const WRITES_PER_VM: u64 = 120;

/// The byte pattern of write `i` of VM number `vm` (1 or 2): distinct on each VM's volume.
fn pattern(vm: u64, i: u64) -> u8 {
    (((vm - 1) * WRITES_PER_VM + i) % 255 + 1) as u8
}

/// How many of a VM's writes an image holds, checking that they are a prefix of the VM's
/// issue order: blocks `0..k` hold their patterns, and every later block is still zero.
fn present_prefix(img: &[u8], vm: u64, what: &str) -> u64 {
    let block = |i: u64| &img[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
    let mut k = 0;
    while k < WRITES_PER_VM && block(k).iter().all(|&b| b == pattern(vm, k)) {
        k += 1;
    }
    for i in k..WRITES_PER_VM {
        assert!(
            block(i).iter().all(|&b| b == 0),
            "{what}: vm{vm} holds write {i} but not write {k} acknowledged before it: not a prefix of the issue order"
        );
    }
    assert!(img[(WRITES_PER_VM * BLOCK) as usize..].iter().all(|&b| b == 0), "{what}: vm{vm} has bytes past its writes");
    k
}

#[test]
fn two_vms_writing_at_once_share_one_sequence_and_every_point_is_a_prefix_of_both() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let size = MIB;
    let mut rng = seeded_rng();
    let c = Cluster::start(&[Vol::new("vm1", "disk1", size), Vol::new("vm2", "disk2", size)]);

    // One qemu-io per VM, both at once; each writes its own blocks in order.
    let writers: Vec<_> = [(1u64, c.uri("disk1")), (2u64, c.uri("disk2"))]
        .into_iter()
        .map(|(vm, uri)| {
            std::thread::spawn(move || {
                let cmds: Vec<String> = (0..WRITES_PER_VM).map(|i| format!("write -P {} {} {BLOCK}", pattern(vm, i), i * BLOCK)).collect();
                qemu_io(&uri, &cmds)
            })
        })
        .collect();
    for w in writers {
        let out = w.join().expect("a qemu-io writer panicked");
        assert_eq!(out.matches("wrote ").count() as u64, WRITES_PER_VM, "{out}");
    }

    let total = 2 * WRITES_PER_VM;
    let last = c.wait_target_seq_settled(total);
    assert_eq!(last, total, "the target holds {last} records for {total} writes");
    let h = c.history();
    assert_eq!(h["first_seq"].as_u64(), Some(0), "{h}");

    for (vm, vol) in [(1, "disk1"), (2, "disk2")] {
        let source = std::fs::read(c.disk(vol)).unwrap();
        let latest = c.recover(vol, &["--latest"]);
        assert!(latest == source, "{vol}: latest point differs from the source disk: {}", first_difference(&latest, &source));
        assert_eq!(present_prefix(&latest, vm, "latest"), WRITES_PER_VM);
    }

    let mut points: Vec<u64> = (0..10).map(|_| rng.gen_range(1..total)).collect();
    points.push(0);
    let mut mixed = 0;
    for n in points {
        let what = format!("seq {n}");
        let k1 = present_prefix(&c.recover("disk1", &["--seq", &n.to_string()]), 1, &what);
        let k2 = present_prefix(&c.recover("disk2", &["--seq", &n.to_string()]), 2, &what);
        assert_eq!(k1 + k2, n, "{what}: vm1 holds {k1} writes and vm2 {k2}; together they must be the first {n} of the group");
        if k1 > 0 && k2 > 0 && k1 < WRITES_PER_VM && k2 < WRITES_PER_VM {
            mixed += 1;
        }
    }
    eprintln!("{mixed} of the points held part of each VM's writes");
}
