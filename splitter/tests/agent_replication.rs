//! System tests of replication: real NBD clients write through the agent, a fake engine
//! records what it receives, and the local disk and the engine's replay must hold the same
//! bytes. Each test skips, saying so, when its client program is not installed.

mod agent_support;
mod nbd_support;

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use agent_support::*;
use hindsight_consistency::WriteKind;
use hindsight_splitter::block::{BlockDevice, BlockError, WriteKind as Op, WriteOp};
use hindsight_splitter::engine_link::ENGINE_TIMEOUT;
use nbd_support::{run, run_ok, text, Raw, Socket, CLIENT_TIMEOUT};

fn assert_clean_qemu_io(out: &std::process::Output) {
    let t = text(out);
    assert!(out.status.success(), "qemu-io failed:\n{t}");
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported {bad:?}:\n{t}");
    }
}

/// Runs every qemu-io `-c` command against `uri`.
fn qemu_io(uri: &str, commands: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(&mut cmd, CLIENT_TIMEOUT)
}

/// Writes, zeroes and discards with qemu-io, then checks the bytes on the local disk and in
/// the engine's replay.
fn check_qemu_io_mix(uri: &str, local: impl Fn() -> Vec<u8>, engine: &FakeEngine, disk: u16) {
    let out = qemu_io(
        uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 64k 64k",
            "write -z 64k 32k",
            "write -P 0xef 128k 64k",
            "discard 160k 32k",
            "write -f -P 0x22 192k 4k",
            "aio_write -P 0x33 256k 4k",
            "aio_write -P 0x44 260k 4k",
            "aio_flush",
            "read -P 0xab 0 64k",
            "read -P 0 64k 32k",
            "read -P 0xcd 96k 32k",
            "read -P 0 160k 32k",
            "flush",
        ],
    );
    assert_clean_qemu_io(&out);
    let bytes = local();
    let k = |n: usize| n * 1024;
    assert!(bytes[..k(64)].iter().all(|&b| b == 0xab));
    assert!(bytes[k(64)..k(96)].iter().all(|&b| b == 0));
    assert!(bytes[k(96)..k(128)].iter().all(|&b| b == 0xcd));
    assert!(bytes[k(128)..k(160)].iter().all(|&b| b == 0xef));
    assert!(bytes[k(160)..k(192)].iter().all(|&b| b == 0));
    assert!(bytes[k(192)..k(196)].iter().all(|&b| b == 0x22));
    assert!(bytes[k(256)..k(260)].iter().all(|&b| b == 0x33));
    assert!(bytes[k(260)..k(264)].iter().all(|&b| b == 0x44));
    let size = bytes.len() as u64;
    assert!(engine.replay(disk, size) == bytes, "engine replay differs from the local disk");
    let kinds: HashSet<WriteKind> = engine.writes().iter().map(|w| w.kind).collect();
    assert_eq!(kinds.len(), 3, "expected data, zeroes and trim writes: {kinds:?}");
}

#[test]
fn qemu_io_mix_through_agent_binary_reaches_local_disk_and_engine() {
    require_clients!("qemu-io");
    let engine = FakeEngine::start(Behaviour { ack_delay: Duration::from_millis(2), shuffle: true, ..Behaviour::default() });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.img");
    let logs = dir.path().join("logs.img");
    std::fs::File::create(&db).unwrap().set_len(4 * MIB).unwrap();
    std::fs::File::create(&logs).unwrap().set_len(MIB).unwrap();
    let socket = dir.path().join("nbd.sock");
    let config = write_agent_toml(dir.path(), &engine.addr.to_string(), &[("db", &db), ("logs", &logs)], &socket);
    let mut agent = AgentProcess::spawn(&config, &dir.path().join("agent.log"));
    agent.wait_for_log("serving volume logs of group g on unix:", Duration::from_secs(30));
    let log = agent.log_text();
    assert!(log.contains(&format!("serving volume db of group g on unix:{} (size 4194304)", socket.display())), "{log}");

    let hello = &engine.hellos()[0];
    assert_eq!(hello.vm, "vm1");
    assert_eq!(hello.disks.iter().map(|d| (d.volume.as_str(), d.size)).collect::<Vec<_>>(), vec![("db", 4 * MIB), ("logs", MIB)]);
    let uri = |v: &str| format!("nbd+unix:///{v}?socket={}", socket.display());
    check_qemu_io_mix(&uri("db"), || std::fs::read(&db).unwrap(), &engine, 0);
    assert_clean_qemu_io(&qemu_io(&uri("logs"), &["write -P 0x5a 4k 8k"]));
    let local = std::fs::read(&logs).unwrap();
    assert!(local[4096..12288].iter().all(|&b| b == 0x5a));
    assert!(engine.replay(1, MIB) == local, "engine replay of disk 1 differs");
}

#[test]
fn qemu_io_mix_through_in_process_agent_reaches_local_disk_and_engine() {
    require_clients!("qemu-io");
    let engine = FakeEngine::start(Behaviour::default());
    let agent = InProcessAgent::start(engine.addr, &[("v", 4 * MIB)], ENGINE_TIMEOUT);
    check_qemu_io_mix(&agent.uri("v"), || agent.local("v"), &engine, 0);
}

/// A raw NBD client in transmission on export `v` of the agent.
fn raw_client(agent: &InProcessAgent) -> Raw {
    let s = UnixStream::connect(agent.socket()).unwrap();
    s.set_timeout(Duration::from_secs(20));
    Raw { s: Box::new(s) }.open("v")
}

#[test]
fn nbd_write_is_answered_only_after_the_engine_ack() {
    require_clients!("qemu-io");
    let delay = Duration::from_millis(300);
    let engine = FakeEngine::start(Behaviour { ack_delay: delay, ..Behaviour::default() });
    let agent = InProcessAgent::start(engine.addr, &[("v", MIB)], ENGINE_TIMEOUT);

    let mut raw = raw_client(&agent);
    let started = Instant::now();
    raw.write(1, 8192, &[0x77; 4096]);
    // The engine has the write and the local disk holds it, yet the client has no reply
    // until the engine acknowledges.
    wait_until("the engine to receive the write", Duration::from_secs(10), || engine.write_count() == 1);
    wait_until("the local write", Duration::from_secs(10), || agent.local("v")[8192] == 0x77);
    assert_eq!(raw.reply(), (0, 1));
    let took = started.elapsed();
    assert!(took >= delay, "reply after {took:?}, before the engine's ack ({delay:?})");
    drop(raw);

    // qemu-io's own timing of one write includes the engine's delay.
    let out = qemu_io(&agent.uri("v"), &["write -P 0x11 0 4k"]);
    assert_clean_qemu_io(&out);
    let t = text(&out);
    let secs: f64 = t
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no timing in qemu-io output:\n{t}"));
    assert!(secs >= 0.29, "qemu-io's write took {secs} s:\n{t}");
}

#[test]
fn engine_error_ack_fails_the_nbd_write() {
    require_clients!("qemu-io");
    let engine = FakeEngine::start(Behaviour::default());
    let agent = InProcessAgent::start(engine.addr, &[("v", MIB)], ENGINE_TIMEOUT);
    assert_clean_qemu_io(&qemu_io(&agent.uri("v"), &["write -P 1 0 4k"]));

    engine.set(|b| b.status = 5);
    let out = qemu_io(&agent.uri("v"), &["write -P 2 4k 4k"]);
    let t = text(&out);
    assert!(t.contains("write failed: Input/output error"), "{t}");
    let mut raw = raw_client(&agent);
    raw.write(9, 0, &[3; 512]);
    assert_eq!(raw.reply(), (5, 9), "NBD error is not EIO");
    assert_eq!(agent.link.diverged_volumes(), vec!["v".to_string()]);

    engine.set(|b| b.status = 0);
    assert_clean_qemu_io(&qemu_io(&agent.uri("v"), &["write -P 4 8k 4k"]));
}

/// Runs fio's verifying random-write job (every 4 KiB block of the export once, 32 in
/// flight, then read back and checked) against `uri`.
fn fio_randwrite_verify(uri: &str, dir: &std::path::Path, size: u64) {
    let out = run_ok(Command::new("fio").current_dir(dir).args([
        "--name=t",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        &format!("--size={}", size),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=normal",
    ]));
    let t = text(&out);
    let blocks = size / 4096;
    assert!(t.contains(&format!("issued rwts: total={blocks},{blocks},0,0")), "{t}");
    assert!(t.contains("err= 0"), "{t}");
}

#[test]
fn fio_randwrite_qd32_verify_passes_and_engine_replay_equals_local_disk() {
    require_clients!("fio");
    let engine = FakeEngine::start(Behaviour { ack_delay: Duration::from_millis(1), shuffle: true, ..Behaviour::default() });
    let size = 16 * MIB;
    let agent = InProcessAgent::start(engine.addr, &[("v", size)], ENGINE_TIMEOUT);
    fio_randwrite_verify(&agent.uri("v"), agent.dir.path(), size);
    assert_eq!(engine.write_count(), 4096);
    assert!(engine.replay(0, size) == agent.local("v"), "engine replay differs");
}

/// The req_ids of the writes received on connection `conn`, in order.
fn req_ids(writes: &[agent_support::Received], conn: usize) -> Vec<u64> {
    writes.iter().filter(|w| w.conn == conn).map(|w| w.req_id).collect()
}

fn assert_increasing(ids: &[u64], what: &str) {
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{what} out of order: {ids:?}");
}

#[test]
fn engine_drop_mid_stream_resends_in_flight_writes_and_replay_equals_local_disk() {
    require_clients!("fio");
    let engine =
        FakeEngine::start(Behaviour { ack_delay: Duration::from_millis(5), shuffle: true, drop_after: Some(1000), ..Behaviour::default() });
    let size = 16 * MIB;
    let agent = InProcessAgent::start(engine.addr, &[("v", size)], ENGINE_TIMEOUT);
    fio_randwrite_verify(&agent.uri("v"), agent.dir.path(), size);

    assert_eq!(engine.connections(), 2, "the agent did not reconnect once");
    let writes = engine.writes();
    let (first, second) = (req_ids(&writes, 0), req_ids(&writes, 1));
    assert_eq!(first.len(), 1000);
    assert_increasing(&first, "writes of the first connection");
    assert_increasing(&second, "writes of the second connection");
    // Every write the engine had not acknowledged when it closed came again, first.
    let acked = engine.acked();
    let unacked: Vec<u64> = first.iter().copied().filter(|id| !acked.contains(&(0, *id))).collect();
    assert!(!unacked.is_empty(), "no write was in flight at the drop");
    assert_eq!(&second[..unacked.len()], &unacked[..], "in-flight writes not re-sent first, in order");
    // No write was lost: every req_id up to the last arrived.
    let all: HashSet<u64> = writes.iter().map(|w| w.req_id).collect();
    assert_eq!(all.len(), 4096);
    assert!((1..=4096).all(|id| all.contains(&id)));
    assert!(engine.replay(0, size) == agent.local("v"), "engine replay differs");
    assert!(agent.link.diverged_volumes().is_empty());
}

/// Submits one write straight to the device; the receiver gets its result.
fn submit(dev: &dyn BlockDevice, offset: u64, byte: u8) -> mpsc::Receiver<Result<(), BlockError>> {
    let (tx, rx) = mpsc::channel();
    let op = WriteOp { offset, kind: Op::Data(vec![byte; 4096]), fua: false };
    dev.submit(op, Box::new(move |r| tx.send(r).unwrap()));
    rx
}

#[test]
fn writes_in_flight_at_a_drop_are_resent_before_new_writes() {
    let engine = FakeEngine::start(Behaviour { ack_delay: Duration::from_secs(600), ..Behaviour::default() });
    let agent = InProcessAgent::start(engine.addr, &[("v", MIB)], ENGINE_TIMEOUT);
    let dev = &*agent.devices[0];
    let early: Vec<_> = (0..3u8).map(|i| submit(dev, u64::from(i) * 4096, i + 1)).collect();
    wait_until("three writes at the engine", Duration::from_secs(10), || engine.write_count() == 3);
    engine.set(|b| b.ack_delay = Duration::ZERO);
    engine.drop_connections();
    wait_until("the agent to see the drop", Duration::from_secs(10), || !agent.link.is_connected());
    let late = submit(dev, 3 * 4096, 4);
    for rx in early.iter().chain([&late]) {
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
    }
    let writes = engine.writes();
    assert_eq!(req_ids(&writes, 0), vec![1, 2, 3]);
    assert_eq!(req_ids(&writes, 1), vec![1, 2, 3, 4]);
    assert!(engine.replay(0, MIB) == agent.local("v"));
}

#[test]
fn agent_started_offline_serves_once_the_engine_comes() {
    // The engine is not up when the agent starts (as after a guest reboot with the engine
    // site away): the agent starts anyway, and a write waits for the engine, then goes.
    let addr = free_port();
    let agent = InProcessAgent::start_with(addr, &[("v", MIB)], Duration::from_secs(20), true);
    if agent.link.is_connected() {
        eprintln!("SKIPPED: another test took the free port {addr} first");
        return;
    }
    let dev = &*agent.devices[0];
    let pending = submit(dev, 4096, 7);
    assert!(pending.recv_timeout(Duration::from_millis(300)).is_err(), "write finished with no engine");
    let engine = FakeEngine::start_on(addr, Behaviour::default());
    assert_eq!(pending.recv_timeout(Duration::from_secs(15)).unwrap(), Ok(()));
    let writes = engine.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!((writes[0].offset, writes[0].data[0]), (4096, 7));
    assert_eq!(engine.replay(0, MIB), agent.local("v"));
}

#[test]
fn engine_unreachable_past_timeout_fails_writes_until_it_is_back() {
    let timeout = Duration::from_millis(1500);
    let engine = FakeEngine::start(Behaviour { ack_delay: Duration::from_secs(600), ..Behaviour::default() });
    let addr = engine.addr;
    let agent = InProcessAgent::start(addr, &[("v", MIB)], timeout);
    let dev = &*agent.devices[0];
    let pending = submit(dev, 0, 1);
    wait_until("the write at the engine", Duration::from_secs(10), || engine.write_count() == 1);
    let stopped = Instant::now();
    drop(engine);

    // Within the timeout the write waits for the engine to come back ...
    assert!(pending.recv_timeout(timeout / 2).is_err(), "write finished while the engine was away");
    // ... after it, it fails, and so do new writes, at once.
    assert_eq!(pending.recv_timeout(Duration::from_secs(10)).unwrap(), Err(BlockError::Io));
    assert!(stopped.elapsed() >= timeout);
    let started = Instant::now();
    assert_eq!(submit(dev, 4096, 2).recv_timeout(Duration::from_secs(1)).unwrap(), Err(BlockError::Io));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(agent.link.diverged_volumes(), vec!["v".to_string()]);

    // Once the engine is back, writes flow again.
    let engine = FakeEngine::start_on(addr, Behaviour::default());
    wait_until("the link to come back", Duration::from_secs(15), || agent.link.is_connected());
    assert_eq!(submit(dev, 8192, 3).recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
    let writes = engine.writes();
    assert_eq!(writes.len(), 1, "failed writes were sent again: {writes:?}");
    assert_eq!((writes[0].offset, writes[0].data[0]), (8192, 3));
}

#[test]
fn long_trim_is_split_into_engine_sized_writes() {
    let engine = FakeEngine::start(Behaviour::default());
    let size = 80 * MIB;
    let agent = InProcessAgent::start(engine.addr, &[("v", size)], ENGINE_TIMEOUT);
    let dev = &*agent.devices[0];
    assert_eq!(submit(dev, 0, 9).recv_timeout(Duration::from_secs(10)).unwrap(), Ok(()));
    let (tx, rx) = mpsc::channel();
    let len = u32::try_from(70 * MIB).unwrap();
    dev.submit(WriteOp { offset: 0, kind: Op::Trim { len }, fua: true }, Box::new(move |r| tx.send(r).unwrap()));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), Ok(()));
    let trims: Vec<(u64, u32)> = engine.writes().iter().filter(|w| w.kind == WriteKind::Trim).map(|w| (w.offset, w.length)).collect();
    assert_eq!(trims, vec![(0, 32 << 20), (32 << 20, 32 << 20), (64 << 20, 6 << 20)]);
    assert!(engine.replay(0, size) == agent.local("v"));
}

#[test]
fn out_of_range_requests_are_invalid_and_not_sent() {
    let engine = FakeEngine::start(Behaviour::default());
    let agent = InProcessAgent::start(engine.addr, &[("v", MIB)], ENGINE_TIMEOUT);
    let dev = &*agent.devices[0];
    assert_eq!(submit(dev, MIB - 4095, 1).recv().unwrap(), Err(BlockError::Invalid));
    let mut buf = [0u8; 2];
    assert_eq!(dev.read(MIB - 1, &mut buf), Err(BlockError::Invalid));
    assert_eq!(dev.read(MIB - 2, &mut buf), Ok(()));
    assert_eq!(engine.write_count(), 0);
}

/// Overlapping writes from many threads at once, small ones applied inline and large ones on
/// the writer threads: the engine must see them in the order the local disk applied them, so
/// that replaying the engine's stream gives exactly the local disk.
#[test]
fn concurrent_overlapping_writes_leave_engine_replay_equal_to_local_disk() {
    use rand::{Rng, SeedableRng};
    let engine = FakeEngine::start(Behaviour { ack_delay: Duration::from_millis(1), shuffle: true, ..Behaviour::default() });
    let size = MIB;
    let agent = InProcessAgent::start(engine.addr, &[("v", size)], ENGINE_TIMEOUT);
    let dev = Arc::clone(&agent.devices[0]);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut in_flight = std::collections::VecDeque::new();
                for i in 0..150u64 {
                    let len: u64 = [4096, 65536, 128 << 10, 256 << 10, 512 << 10][rng.gen_range(0..5)];
                    let offset = rng.gen_range(0..=(size - len) / 4096) * 4096;
                    let byte = u8::try_from((t * 64 + i % 64) % 256).unwrap() | 1;
                    let (tx, rx) = mpsc::channel();
                    let op = WriteOp { offset, kind: Op::Data(vec![byte; usize::try_from(len).unwrap()]), fua: false };
                    dev.submit(op, Box::new(move |r| tx.send(r).unwrap()));
                    in_flight.push_back(rx);
                    if in_flight.len() >= 8 {
                        in_flight.pop_front().unwrap().recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
                    }
                }
                for rx in in_flight {
                    rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(engine.write_count(), 600);
    assert!(engine.replay(0, size) == agent.local("v"), "engine replay differs from the local disk");
}
