//! System tests: the NBD server driven by real clients (nbdinfo, qemu-io, fio, nbdcopy).
//! Each test skips, saying so, when its client program is not installed.

mod nbd_support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use hindsight_splitter::file_device::CompletionMode;
use nbd_support::*;
use rand::RngCore;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Completions that come back late and out of order, as from the replicating device.
const DEFERRED: CompletionMode = CompletionMode::Deferred { max_delay: Duration::from_millis(2) };

fn assert_clean_qemu_io(out: &std::process::Output) {
    let t = text(out);
    assert!(out.status.success(), "qemu-io failed:\n{t}");
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported {bad:?}:\n{t}");
    }
}

#[test]
fn nbdinfo_json_reports_size_block_sizes_and_flags() {
    require_clients!("nbdinfo");
    let server = TestServer::unix(&[("disk", 16 * MIB)], CompletionMode::Inline);
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(server.uri("disk")));
    let json = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "\"protocol\": \"newstyle-fixed\"",
        "\"export-name\": \"disk\"",
        "\"export-size\": 16777216",
        "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_multi_conn\": true",
        "\"can_df\": false",
        "\"can_fast_zero\": false",
        "\"structured\": false",
    ] {
        assert!(json.contains(expected), "missing {expected} in:\n{json}");
    }
}

#[test]
fn nbdinfo_list_shows_every_export() {
    require_clients!("nbdinfo");
    let server = TestServer::unix(&[("alpha", MIB), ("beta", 2 * MIB)], CompletionMode::Inline);
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg("--json").arg(server.uri("")));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"export-name\": \"alpha\""), "{json}");
    assert!(json.contains("\"export-name\": \"beta\""), "{json}");
    assert!(json.contains("\"export-size\": 1048576"), "{json}");
    assert!(json.contains("\"export-size\": 2097152"), "{json}");
}

#[test]
fn nbdinfo_default_export_is_the_only_export() {
    require_clients!("nbdinfo");
    let server = TestServer::unix(&[("only", MIB)], CompletionMode::Inline);
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(server.uri("")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
}

#[test]
fn nbdinfo_unknown_export_fails_without_hanging() {
    require_clients!("nbdinfo");
    let server = TestServer::unix(&[("a", MIB), ("b", MIB)], CompletionMode::Inline);
    for name in ["nope", ""] {
        let out = run(Command::new("nbdinfo").arg(server.uri(name)), CLIENT_TIMEOUT);
        assert!(!out.status.success(), "export {name:?} was found:\n{}", text(&out));
    }
}

/// Writes, reads back, zeroes, discards and flushes through qemu's NBD client, then checks
/// the backing file.
fn qemu_io_roundtrip(server: &TestServer) {
    let out = run(
        Command::new("qemu-io")
            .args(["-f", "raw", &server.uri("disk")])
            .args(["-c", "write -P 0xab 0 64k"])
            .args(["-c", "read -P 0xab 0 64k"])
            .args(["-c", "write -P 0xcd 64k 64k"])
            .args(["-c", "write -z 64k 64k"])
            .args(["-c", "read -P 0 64k 64k"])
            .args(["-c", "write -P 0xef 128k 64k"])
            .args(["-c", "discard 128k 64k"])
            .args(["-c", "write -f -P 0x22 192k 4k"])
            .args(["-c", "read -P 0x22 192k 4k"])
            .args(["-c", "aio_write -P 0x33 256k 4k"])
            .args(["-c", "aio_write -P 0x44 260k 4k"])
            .args(["-c", "aio_flush"])
            .args(["-c", "flush"]),
        CLIENT_TIMEOUT,
    );
    assert_clean_qemu_io(&out);
    let t = text(&out);
    assert_eq!(t.matches("wrote ").count(), 7, "{t}");
    assert_eq!(t.matches("read ").count(), 3, "{t}");
    assert!(t.contains("discard 65536/65536 bytes at offset 131072"), "{t}");

    let bytes = fs::read(server.backing("disk")).unwrap();
    let k = |n: usize| n * 1024;
    assert!(bytes[..k(64)].iter().all(|&b| b == 0xab));
    assert!(bytes[k(64)..k(128)].iter().all(|&b| b == 0));
    // The file device makes a discarded range read back as zeroes.
    assert!(bytes[k(128)..k(192)].iter().all(|&b| b == 0));
    assert!(bytes[k(192)..k(196)].iter().all(|&b| b == 0x22));
    assert!(bytes[k(196)..k(256)].iter().all(|&b| b == 0));
    assert!(bytes[k(256)..k(260)].iter().all(|&b| b == 0x33));
    assert!(bytes[k(260)..k(264)].iter().all(|&b| b == 0x44));
    assert!(bytes[k(264)..].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_write_read_zero_discard_flush_roundtrip_unix() {
    require_clients!("qemu-io");
    let server = TestServer::unix(&[("disk", 4 * MIB)], DEFERRED);
    qemu_io_roundtrip(&server);
}

#[test]
fn qemu_io_write_read_zero_discard_flush_roundtrip_tcp() {
    require_clients!("qemu-io");
    let server = TestServer::tcp(&[("disk", 4 * MIB)], CompletionMode::Inline);
    qemu_io_roundtrip(&server);
}

#[test]
fn qemu_io_out_of_range_reports_error_and_server_keeps_serving() {
    require_clients!("qemu-io");
    let server = TestServer::unix(&[("disk", MIB)], CompletionMode::Inline);
    for cmd in ["read 1M 4k", "write -P 1 1020k 8k", "discard 2M 4k"] {
        let out = run(Command::new("qemu-io").args(["-f", "raw", &server.uri("disk"), "-c", cmd]), CLIENT_TIMEOUT);
        let t = text(&out);
        assert!(t.contains("failed"), "{cmd}: no error reported:\n{t}");
    }
    let out = run(
        Command::new("qemu-io").args(["-f", "raw", &server.uri("disk")]).args([
            "-c",
            "write -P 0x5a 1020k 4k",
            "-c",
            "read -P 0x5a 1020k 4k",
        ]),
        CLIENT_TIMEOUT,
    );
    assert_clean_qemu_io(&out);
}

fn fio_randwrite_verify(mode: CompletionMode) {
    let server = TestServer::unix(&[("disk", 16 * MIB)], mode);
    let dir = server.dir.path().to_path_buf();
    let out = run_ok(Command::new("fio").current_dir(&dir).args([
        "--name=t",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("disk")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=normal",
    ]));
    let t = text(&out);
    // Every block written once, then read back and checked.
    assert!(t.contains("issued rwts: total=4096,4096,0,0"), "{t}");
    assert!(t.contains("err= 0"), "{t}");
}

#[test]
fn fio_randwrite_qd32_verify_passes_inline_completions() {
    require_clients!("fio");
    fio_randwrite_verify(CompletionMode::Inline);
}

#[test]
fn fio_randwrite_qd32_verify_passes_out_of_order_completions() {
    require_clients!("fio");
    fio_randwrite_verify(DEFERRED);
}

#[test]
fn nbdcopy_roundtrip_preserves_bytes() {
    require_clients!("nbdcopy");
    let size = 8 * MIB;
    let server = TestServer::unix(&[("disk", size)], DEFERRED);
    let dir = server.dir.path();
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    rand::thread_rng().fill_bytes(&mut data);
    // A zero run, which nbdcopy sends as write-zeroes.
    let mib = usize::try_from(MIB).unwrap();
    data[mib..2 * mib].fill(0);
    fs::write(&input, &data).unwrap();

    run_ok(Command::new("nbdcopy").arg("--flush").arg(&input).arg(server.uri("disk")));
    assert!(same_bytes(&input, &server.backing("disk")), "backing file differs");
    run_ok(Command::new("nbdcopy").arg(server.uri("disk")).arg(&output));
    assert!(same_bytes(&input, &output), "copied-out file differs");
}

/// nbdfuse running in the foreground; unmounted and killed on drop.
struct FuseMount {
    child: std::process::Child,
    mountpoint: std::path::PathBuf,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&self.mountpoint).stderr(std::process::Stdio::null()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdfuse_mkfs_ext4_then_fsck_is_clean() {
    require_clients!("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck");
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing, so nbdfuse cannot mount");
        return;
    }
    let server = TestServer::unix(&[("disk", 128 * MIB)], DEFERRED);
    let dir = server.dir.path();
    let mountpoint = dir.join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let stderr = fs::File::create(dir.join("nbdfuse.err")).unwrap();
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mountpoint.join("disk"))
        .arg(server.uri("disk"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut mount = FuseMount { child, mountpoint: mountpoint.clone() };
    // nbdfuse writes its pid file once the file is being served.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        if let Some(status) = mount.child.try_wait().unwrap() {
            let err = fs::read_to_string(dir.join("nbdfuse.err")).unwrap_or_default();
            if err.contains("fuse") {
                eprintln!("SKIPPED: FUSE mounts are not allowed here: {err}");
                return;
            }
            panic!("nbdfuse exited ({status}) before serving:\n{err}");
        }
        assert!(std::time::Instant::now() < deadline, "nbdfuse not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = mountpoint.join("disk");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
    run_ok(Command::new("e2fsck").arg("-fn").arg(&file));
    run_ok(Command::new("fusermount3").arg("-u").arg(&mountpoint));
    // Unmounting ends nbdfuse, which disconnects cleanly.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while mount.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "nbdfuse did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(mount);
    // What the filesystem wrote through NBD is on the backing file.
    run_ok(Command::new("e2fsck").arg("-fn").arg(server.backing("disk")));
}
