//! The engine between a fake agent and a fake target, both speaking the wire protocol over
//! 127.0.0.1: acknowledgements come after the journal holds the write, numbers follow arrival
//! order, shipping resumes where the target's journal ends, confirmed segments go, agents
//! whose disks do not match the configuration are refused, and the end of a resync places a
//! resync point behind the resync writes.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use hindsight_consistency::config::EngineConfig;
use hindsight_consistency::journal::{list_segments, JournalReader};
use hindsight_consistency::record::decode_record;
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::wire::*;
use hindsight_consistency::WriteKind;

fn engine_config(dir: &Path, target_port: u16, segment: &str) -> EngineConfig {
    let text = format!(
        "[engine]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nsegment_size = \"{segment}\"\n\n[tls]\ninsecure_plaintext = true\n\n[[group]]\nname = \"erp\"\nmode = \"cdp\"\ntarget = \"127.0.0.1:{target_port}\"\n\n[[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"64MiB\"\n\n[[group.volume]]\nname = \"logs\"\nvm = \"vm2\"\nsize = \"64MiB\"\n",
        dir.display()
    );
    EngineConfig::from_str(Path::new("engine.toml"), &text).unwrap()
}

struct FakeAgent {
    s: TcpStream,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl FakeAgent {
    fn connect(addr: std::net::SocketAddr, vm: &str, disks: &[(&str, u64)]) -> Result<FakeAgent, String> {
        Self::connect_group(addr, "erp", vm, disks)
    }

    fn connect_group(addr: std::net::SocketAddr, group: &str, vm: &str, disks: &[(&str, u64)]) -> Result<FakeAgent, String> {
        let disks: Vec<(&str, &str, u64)> = disks.iter().map(|(v, size)| (group, *v, *size)).collect();
        Self::connect_disks(addr, vm, &disks)
    }

    /// Connects with disks of any groups: `(group, volume, size)`, numbered in this order.
    fn connect_disks(addr: std::net::SocketAddr, vm: &str, disks: &[(&str, &str, u64)]) -> Result<FakeAgent, String> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = AgentHello {
            protocol: PROTOCOL_VERSION,
            vm: vm.into(),
            disks: disks.iter().map(|(g, v, size)| DiskHello { group: (*g).into(), volume: (*v).into(), size: *size }).collect(),
        };
        let mut scratch = Vec::new();
        write_frame(&mut s, FrameType::AgentHello, &encode_message(&hello), &mut scratch).unwrap();
        let mut payload = Vec::new();
        match read_frame(&mut s, &mut payload).unwrap() {
            FrameType::AgentWelcome => Ok(FakeAgent { s, payload, scratch }),
            FrameType::Error => Err(decode_message::<ErrorMessage>("Error", &payload).unwrap().message),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn send_write(&mut self, req_id: u64, offset: u64, data: &[u8]) {
        self.send_kind(req_id, 0, WriteKind::Data, offset, data);
    }

    /// A write of any kind an agent may send, to disk number `disk`.
    fn send_kind(&mut self, req_id: u64, disk: u16, kind: WriteKind, offset: u64, data: &[u8]) {
        let m = WriteMsg { req_id, offset, length: data.len() as u32, disk, kind };
        let mut p = m.encode_header().to_vec();
        p.extend_from_slice(data);
        write_frame(&mut self.s, FrameType::Write, &p, &mut self.scratch).unwrap();
    }

    fn send_resync_done(&mut self, disks: &[u16]) {
        let m = encode_message(&ResyncDoneMsg { disks: disks.to_vec() });
        write_frame(&mut self.s, FrameType::ResyncDone, &m, &mut self.scratch).unwrap();
    }

    fn ack(&mut self) -> WriteAck {
        assert_eq!(self.frame().unwrap(), FrameType::WriteAck);
        WriteAck::decode(&self.payload).unwrap()
    }

    /// The next frame other than the target's confirmations (which the engine passes on to
    /// every agent session).
    fn frame(&mut self) -> Result<FrameType, FrameError> {
        loop {
            match read_frame(&mut self.s, &mut self.payload)? {
                FrameType::TargetConfirmed => continue,
                other => return Ok(other),
            }
        }
    }
}

fn journal_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("groups").join("erp").join("journal")
}

/// Every record in the engine's journal from `from` on, as (seq, volume, offset, first byte).
fn journal_records(dir: &Path, from: u64) -> Vec<(u64, String, u64, u8)> {
    let mut r = JournalReader::open(StdStorage::shared(), &journal_dir(dir), from).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        out.push((rec.header.seq, rec.volume.to_owned(), rec.header.offset, rec.data[0]));
    }
    out
}

#[test]
fn acks_follow_the_journal_and_numbers_follow_arrival() {
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let engine = hindsight_engine::start(engine_config(d.path(), unused, "1MiB")).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    let mut last = 0;
    for i in 0..50u64 {
        a.send_write(i, i * 4096, &[i as u8 + 1; 4096]);
        let ack = a.ack();
        assert_eq!((ack.req_id, ack.status), (i, 0));
        assert!(ack.seq > last, "sequence numbers must grow: {} after {last}", ack.seq);
        last = ack.seq;
        // The acknowledged write is already in the journal, with that number.
        let recs = journal_records(d.path(), ack.seq);
        assert_eq!(recs.first(), Some(&(ack.seq, "db".to_owned(), i * 4096, i as u8 + 1)));
    }
    // Pipelined: many in flight, acknowledged in sequence order.
    for i in 50..150u64 {
        a.send_write(i, i * 4096, &[7; 4096]);
    }
    let seqs: Vec<u64> = (50..150).map(|_| a.ack().seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "one agent's writes are numbered in the order sent");
    engine.shutdown();
}

#[test]
fn mismatched_disks_are_refused_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let engine = hindsight_engine::start(engine_config(d.path(), unused, "1MiB")).unwrap();
    let addr = engine.local_addr();
    let e = FakeAgent::connect(addr, "vm1", &[("db", 32 << 20)]).err().unwrap();
    assert!(e.contains("33554432") && e.contains("67108864"), "{e}");
    let e = FakeAgent::connect(addr, "vm1", &[("logs", 64 << 20)]).err().unwrap();
    assert!(e.contains("vm2") && e.contains("vm1"), "{e}");
    let e = FakeAgent::connect(addr, "vm1", &[("nope", 64 << 20)]).err().unwrap();
    assert!(e.contains("nope"), "{e}");
    let first = FakeAgent::connect(addr, "vm1", &[("db", 64 << 20)]).unwrap();
    let started = std::time::Instant::now();
    let e = FakeAgent::connect(addr, "vm1", &[("db", 64 << 20)]).err().unwrap();
    assert!(e.contains("already attached"), "{e}");
    assert!(started.elapsed() >= Duration::from_secs(4), "a live session's volumes are waited for before refusing");
    // An agent that reconnects right after its predecessor's connection ended is accepted:
    // the hello waits for the old session to detach.
    let waiter = std::thread::spawn(move || FakeAgent::connect(addr, "vm1", &[("db", 64 << 20)]).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    drop(first);
    waiter.join().unwrap().expect("the new session takes the volume once the old one is gone");
    // Nothing was journaled by the refused agents.
    assert!(journal_records(d.path(), 1).is_empty());
    engine.shutdown();
}

#[test]
fn out_of_range_write_gets_einval_and_the_session_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let engine = hindsight_engine::start(engine_config(d.path(), unused, "1MiB")).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    a.send_write(1, (64 << 20) - 512, &[1; 4096]);
    let ack = a.ack();
    assert_eq!((ack.req_id, ack.status, ack.seq), (1, 22, 0));
    a.send_write(2, 0, &[2; 512]);
    assert_eq!(a.ack().status, 0);
    assert_eq!(journal_records(d.path(), 1).len(), 1);
    engine.shutdown();
}

/// A target that welcomes with `durable` and collects records, confirming each frame (but
/// never beyond `confirm_cap`, like a target whose later records were not yet durable).
fn fake_target(listener: &TcpListener, durable: u64, want: usize, confirm_cap: u64) -> Vec<u64> {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    assert_eq!(read_frame(&mut s, &mut payload).unwrap(), FrameType::TargetHello);
    let hello: TargetHello = decode_message("TargetHello", &payload).unwrap();
    assert_eq!(hello.group, "erp");
    assert_eq!(hello.volumes.len(), 2);
    write_frame(
        &mut s,
        FrameType::TargetWelcome,
        &encode_message(&TargetWelcome { protocol: 1, durable_seq: durable, compression: String::new() }),
        &mut scratch,
    )
    .unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < want {
        assert_eq!(read_frame(&mut s, &mut payload).unwrap(), FrameType::Records);
        let mut at = 0;
        while at < payload.len() {
            let (rec, used) = decode_record(&payload[at..]).unwrap();
            seqs.push(rec.header.seq);
            at += used;
        }
        let confirm = (*seqs.last().unwrap()).min(confirm_cap);
        write_frame(&mut s, FrameType::Confirm, &encode_confirm(confirm), &mut scratch).unwrap();
    }
    s.flush().unwrap();
    seqs
}

#[test]
fn shipping_resumes_after_the_targets_durable_seq_and_confirmed_segments_go() {
    let d = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let engine = hindsight_engine::start(engine_config(d.path(), listener.local_addr().unwrap().port(), "1MiB")).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    // 600 writes of 8 KiB: about five 1 MiB segments.
    for i in 0..600u64 {
        a.send_write(i, (i % 1000) * 8192, &[i as u8; 8192]);
    }
    for _ in 0..600 {
        assert_eq!(a.ack().status, 0);
    }
    // First session: the target says it holds nothing; it receives 1.. in order, but only
    // 1..=250 become durable before it goes away.
    let seqs = fake_target(&listener, 0, 300, 250);
    assert_eq!(seqs[..300], (1..=300).collect::<Vec<u64>>()[..]);
    // Second session: the target says it holds up to 250: the engine resumes at 251.
    let seqs = fake_target(&listener, 250, 350, u64::MAX);
    assert_eq!(seqs[..350], (251..=600).collect::<Vec<u64>>()[..]);
    // All 600 are confirmed: every segment but the active one is deleted.
    let start = std::time::Instant::now();
    loop {
        let n = list_segments(StdStorage::shared().as_ref(), &journal_dir(d.path())).unwrap().len();
        if n == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{n} segments left after everything was confirmed");
        std::thread::sleep(Duration::from_millis(50));
    }
    engine.shutdown();
}

fn request_bookmark(addr: std::net::SocketAddr, name: &str, groups: &[&str]) -> Result<BookmarkReply, String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = BookmarkRequest {
        protocol: PROTOCOL_VERSION,
        name: name.into(),
        groups: groups.iter().map(|g| (*g).into()).collect(),
        note: "test".into(),
        quiesce: false,
        quiesce_timeout_ms: 0,
        hold: false,
    };
    write_frame(&mut s, FrameType::BookmarkRequest, &encode_message(&req), &mut Vec::new()).unwrap();
    let mut payload = Vec::new();
    match read_frame(&mut s, &mut payload).unwrap() {
        FrameType::BookmarkReply => Ok(decode_message("BookmarkReply", &payload).unwrap()),
        FrameType::Error => Err(decode_message::<ErrorMessage>("Error", &payload).unwrap().message),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_parallel_bookmark_lands_in_every_group_between_acknowledged_writes() {
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = format!(
        "[engine]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[tls]\ninsecure_plaintext = true\n\n[[group]]\nname = \"erp\"\ntarget = \"127.0.0.1:{unused}\"\n[[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"64MiB\"\n\n[[group]]\nname = \"crm\"\ntarget = \"127.0.0.1:{unused}\"\n[[group.volume]]\nname = \"crm-db\"\nvm = \"vm2\"\nsize = \"64MiB\"\n",
        d.path().display()
    );
    let engine = hindsight_engine::start(EngineConfig::from_str(Path::new("engine.toml"), &text).unwrap()).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    let mut b = FakeAgent::connect_group(engine.local_addr(), "crm", "vm2", &[("crm-db", 64 << 20)]).unwrap();
    for i in 0..5u64 {
        a.send_write(i, i * 4096, &[1; 4096]);
        assert_eq!(a.ack().status, 0);
    }
    for i in 0..3u64 {
        b.send_write(i, i * 4096, &[2; 4096]);
        assert_eq!(b.ack().status, 0);
    }
    let reply = request_bookmark(engine.local_addr(), "both", &[]).unwrap();
    let mut points: Vec<(String, u64)> = reply.points.iter().map(|p| (p.group.clone(), p.seq)).collect();
    points.sort();
    // After every acknowledged write of each group, before any later one.
    assert_eq!(points, [("crm".to_owned(), 4), ("erp".to_owned(), 6)]);
    a.send_write(9, 0, &[3; 4096]);
    assert_eq!(a.ack().seq, 7);
    // The bookmark is a record of each journal.
    let dir = d.path().join("groups").join("erp").join("journal");
    let mut r = JournalReader::open(StdStorage::shared(), &dir, 6).unwrap();
    let rec = r.next().unwrap().unwrap();
    assert_eq!((rec.header.kind, rec.volume), (WriteKind::Bookmark, "both"));
    // Unknown groups and bad names are refused, and nothing is placed.
    let e = request_bookmark(engine.local_addr(), "x", &["nope"]).unwrap_err();
    assert!(e.contains("nope") && e.contains("erp"), "{e}");
    let e = request_bookmark(engine.local_addr(), "bad name", &["erp"]).unwrap_err();
    assert!(e.contains("not valid"), "{e}");
    a.send_write(10, 0, &[4; 4096]);
    assert_eq!(a.ack().seq, 8);
    engine.shutdown();
}

#[test]
fn journal_failure_stops_the_group_with_eio_until_the_engine_restarts() {
    use hindsight_consistency::faults::{Fault, FaultPlan, FaultyStorage, Op, Rule};
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let plan = Arc::new(FaultPlan::default());
    let fs = Arc::new(FaultyStorage::new(StdStorage::shared(), Arc::clone(&plan)));
    let engine = hindsight_engine::start_with_storage(engine_config(d.path(), unused, "1MiB"), fs).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    for i in 0..5u64 {
        a.send_write(i, i * 4096, &[i as u8 + 1; 4096]);
        assert_eq!(a.ack().status, 0);
    }
    // The disk under the journal fails: the write is refused with EIO, and so is every later
    // one (the group does not retry a journal in an unknown state).
    plan.add(Rule::always("journal", Op::Write, Fault::Eio));
    a.send_write(5, 5 * 4096, &[9; 4096]);
    assert_eq!(a.ack().status, 5);
    plan.clear();
    a.send_write(6, 6 * 4096, &[9; 4096]);
    assert_eq!(a.ack().status, 5, "a stopped group stays stopped");
    let status = status(engine.local_addr());
    assert!(status.groups[0].poisoned, "status shows the stopped group");
    drop(a);
    engine.shutdown();

    // The operator fixed the disk and restarts the engine: the journal reopens with exactly the
    // five acknowledged writes, and new writes follow them.
    let engine = hindsight_engine::start(engine_config(d.path(), unused, "1MiB")).unwrap();
    let mut a = wait_agent(engine.local_addr());
    a.send_write(7, 7 * 4096, &[7; 4096]);
    let ack = a.ack();
    assert_eq!((ack.status, ack.seq), (0, 6));
    let recs = journal_records(d.path(), 1);
    assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    assert_eq!(recs[5].3, 7);
    engine.shutdown();
}

/// The engine's status.
fn status(addr: std::net::SocketAddr) -> StatusReply {
    let mut s = TcpStream::connect(addr).unwrap();
    write_frame(&mut s, FrameType::StatusRequest, &encode_message(&StatusRequest { protocol: 1, groups: vec![] }), &mut Vec::new())
        .unwrap();
    let mut p = Vec::new();
    assert_eq!(read_frame(&mut s, &mut p).unwrap(), FrameType::StatusReply);
    decode_message("StatusReply", &p).unwrap()
}

#[test]
fn resync_progress_shows_in_status_until_the_resync_is_done() {
    let d = tempfile::tempdir().unwrap();
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let engine = hindsight_engine::start(engine_config(d.path(), unused, "1MiB")).unwrap();
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    let m =
        encode_message(&ResyncProgressMsg { disk: 0, done: 16, total: 64, bytes_per_s: 8 << 20, compare_total: 0, compared: 0, differ: 0 });
    write_frame(&mut a.s, FrameType::ResyncProgress, &m, &mut a.scratch).unwrap();
    let start = std::time::Instant::now();
    let r = loop {
        if let Some(r) = status(engine.local_addr()).groups[0].resyncing.first().cloned() {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "status never showed the resync");
        std::thread::sleep(Duration::from_millis(20));
    };
    // 48 regions of 1 MiB left at 8 MiB/s.
    assert_eq!((r.volume.as_str(), r.done, r.total, r.eta_s), ("db", 16, 64, 6));
    a.send_write(1, 0, &[1; 4096]);
    assert_eq!(a.ack().status, 0);
    a.send_resync_done(&[0]);
    let start = std::time::Instant::now();
    while !status(engine.local_addr()).groups[0].resyncing.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the finished resync stayed in status");
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown();
}

/// Connects an agent, waiting for an earlier session of its volumes to be let go.
fn wait_agent(addr: std::net::SocketAddr) -> FakeAgent {
    let start = std::time::Instant::now();
    loop {
        match FakeAgent::connect(addr, "vm1", &[("db", 64 << 20)]) {
            Ok(a) => return a,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(15), "agent refused: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two groups: erp holds db (vm1) and logs (vm2), crm holds crm-db (vm1).
fn two_group_config(dir: &Path) -> EngineConfig {
    let unused = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = format!(
        "[engine]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[tls]\ninsecure_plaintext = true\n\n[[group]]\nname = \"erp\"\ntarget = \"127.0.0.1:{unused}\"\n[[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"64MiB\"\n[[group.volume]]\nname = \"logs\"\nvm = \"vm2\"\nsize = \"64MiB\"\n\n[[group]]\nname = \"crm\"\ntarget = \"127.0.0.1:{unused}\"\n[[group.volume]]\nname = \"crm-db\"\nvm = \"vm1\"\nsize = \"64MiB\"\n",
        dir.display()
    );
    EngineConfig::from_str(Path::new("engine.toml"), &text).unwrap()
}

/// Every record of a group's journal from `from` on: (seq, kind, volume or name, data).
fn group_records(dir: &Path, group: &str, from: u64) -> Vec<(u64, WriteKind, String, Vec<u8>)> {
    let jdir = dir.join("groups").join(group).join("journal");
    let mut r = JournalReader::open(StdStorage::shared(), &jdir, from).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        out.push((rec.header.seq, rec.header.kind, rec.volume.to_owned(), rec.data.to_vec()));
    }
    out
}

/// Polls a group's journal until it holds `seq`.
fn wait_record(dir: &Path, group: &str, seq: u64) -> (u64, WriteKind, String, Vec<u8>) {
    let start = std::time::Instant::now();
    loop {
        if let Some(r) = group_records(dir, group, 1).into_iter().find(|r| r.0 == seq) {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "group {group}: seq {seq} never journaled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resync_point(first: u64) -> (WriteKind, String, Vec<u8>) {
    (WriteKind::Point, "resync".to_owned(), first.to_le_bytes().to_vec())
}

#[test]
fn resync_writes_are_journaled_with_their_data_and_resync_done_places_a_point_behind_them_in_each_group() {
    let d = tempfile::tempdir().unwrap();
    let engine = hindsight_engine::start(two_group_config(d.path())).unwrap();
    let mut a = FakeAgent::connect_disks(engine.local_addr(), "vm1", &[("erp", "db", 64 << 20), ("crm", "crm-db", 64 << 20)]).unwrap();
    a.send_kind(1, 0, WriteKind::Data, 0, &[1; 4096]);
    assert_eq!(a.ack().seq, 1);
    // The resync: dirty regions of both disks, pipelined, with a guest write among them.
    a.send_kind(2, 0, WriteKind::Resync, 8192, &[2; 4096]);
    a.send_kind(3, 1, WriteKind::Resync, 0, &[3; 8192]);
    a.send_kind(4, 0, WriteKind::Data, 0, &[4; 512]);
    a.send_kind(5, 0, WriteKind::Resync, 1 << 20, &[5; 4096]);
    a.send_kind(6, 1, WriteKind::Resync, 1 << 21, &[6; 4096]);
    let mut acks: Vec<(u64, u64)> = (0..5).map(|_| a.ack()).map(|k| (k.req_id, k.seq)).collect();
    acks.sort_unstable();
    assert_eq!(acks, [(2, 2), (3, 1), (4, 3), (5, 4), (6, 2)]);
    a.send_resync_done(&[0, 1]);
    // Behind every resync write, in each group: a point named resync whose data is the first
    // resync record of the resync.
    let erp = wait_record(d.path(), "erp", 5);
    assert_eq!((erp.1, erp.2, erp.3), resync_point(2));
    let crm = wait_record(d.path(), "crm", 3);
    assert_eq!((crm.1, crm.2, crm.3), resync_point(1));
    let erp: Vec<(u64, WriteKind, String, Vec<u8>)> = group_records(d.path(), "erp", 1);
    let kinds: Vec<(u64, WriteKind, &str)> = erp.iter().map(|r| (r.0, r.1, r.2.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (1, WriteKind::Data, "db"),
            (2, WriteKind::Resync, "db"),
            (3, WriteKind::Data, "db"),
            (4, WriteKind::Resync, "db"),
            (5, WriteKind::Point, "resync")
        ]
    );
    assert_eq!((erp[1].3.clone(), erp[3].3.clone()), (vec![2; 4096], vec![5; 4096]), "resync records carry their data");
    let crm = group_records(d.path(), "crm", 1);
    assert_eq!((crm[0].1, crm[0].3.clone()), (WriteKind::Resync, vec![3; 8192]));
    assert_eq!(crm.len(), 3);
    // Writes after it are numbered after the point.
    a.send_kind(7, 0, WriteKind::Data, 0, &[7; 512]);
    assert_eq!(a.ack().seq, 6);
    a.send_kind(8, 1, WriteKind::Data, 0, &[8; 512]);
    assert_eq!(a.ack().seq, 4);
    engine.shutdown();
}

#[test]
fn the_resync_point_waits_until_no_volume_of_the_group_is_resyncing() {
    let d = tempfile::tempdir().unwrap();
    let engine = hindsight_engine::start(two_group_config(d.path())).unwrap();
    let mut a = FakeAgent::connect_disks(engine.local_addr(), "vm1", &[("erp", "db", 64 << 20)]).unwrap();
    let mut b = FakeAgent::connect_disks(engine.local_addr(), "vm2", &[("erp", "logs", 64 << 20)]).unwrap();
    b.send_kind(1, 0, WriteKind::Resync, 0, &[1; 4096]);
    assert_eq!(b.ack().seq, 1);
    a.send_kind(1, 0, WriteKind::Resync, 0, &[2; 4096]);
    assert_eq!(a.ack().seq, 2);
    a.send_resync_done(&[0]);
    // vm2's logs is still resyncing: no point yet (the next write of the same connection
    // follows the ResyncDone, so it would be numbered after a point).
    a.send_kind(2, 0, WriteKind::Data, 0, &[3; 512]);
    assert_eq!(a.ack().seq, 3);
    assert_eq!(group_records(d.path(), "erp", 1).iter().filter(|r| r.1 == WriteKind::Point).count(), 0);
    b.send_resync_done(&[0]);
    let p = wait_record(d.path(), "erp", 4);
    assert_eq!((p.1, p.2, p.3), resync_point(1));
    engine.shutdown();
}

#[test]
fn resync_done_naming_a_disk_the_hello_did_not_have_is_refused_with_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let engine = hindsight_engine::start(two_group_config(d.path())).unwrap();
    let mut a = FakeAgent::connect_disks(engine.local_addr(), "vm1", &[("erp", "db", 64 << 20), ("crm", "crm-db", 64 << 20)]).unwrap();
    a.send_kind(1, 0, WriteKind::Resync, 0, &[1; 4096]);
    assert_eq!(a.ack().seq, 1);
    // Disk 0 is known, disk 2 is not: nothing of it is placed.
    a.send_resync_done(&[0, 2]);
    assert_eq!(a.frame().unwrap(), FrameType::Error);
    let e = decode_message::<ErrorMessage>("Error", &a.payload).unwrap().message;
    assert!(e.contains("disk number 2") && e.contains("2 disk(s)"), "{e}");
    assert!(matches!(a.frame(), Err(FrameError::Closed | FrameError::Io(_))), "the session ends");
    // An empty list is refused too.
    let mut a = wait_disks(engine.local_addr());
    a.send_resync_done(&[]);
    assert_eq!(a.frame().unwrap(), FrameType::Error);
    let e = decode_message::<ErrorMessage>("Error", &a.payload).unwrap().message;
    assert!(e.contains("names no disk"), "{e}");
    // The volumes are free again, and the resync is still open: no point was placed.
    let mut a = wait_disks(engine.local_addr());
    a.send_kind(2, 0, WriteKind::Data, 0, &[2; 512]);
    assert_eq!(a.ack().seq, 2);
    a.send_resync_done(&[0]);
    let p = wait_record(d.path(), "erp", 3);
    assert_eq!((p.1, p.2, p.3), resync_point(1));
    engine.shutdown();
}

/// Connects vm1 with erp/db and crm/crm-db, waiting for an earlier session to be let go.
fn wait_disks(addr: std::net::SocketAddr) -> FakeAgent {
    let start = std::time::Instant::now();
    loop {
        match FakeAgent::connect_disks(addr, "vm1", &[("erp", "db", 64 << 20), ("crm", "crm-db", 64 << 20)]) {
            Ok(a) => return a,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(15), "agent refused: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fake target that confirms every record and answers every hash request with blank
/// hashes at the highest seq it has received; it fails if a request names a `through_seq` it
/// has not received yet (the engine must send a request behind the records it covers).
/// Returns the number of requests answered.
fn hashing_target(listener: &TcpListener) -> usize {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (mut payload, mut scratch) = (Vec::new(), Vec::new());
    assert_eq!(read_frame(&mut s, &mut payload).unwrap(), FrameType::TargetHello);
    let welcome = TargetWelcome { protocol: 1, durable_seq: 0, compression: String::new() };
    write_frame(&mut s, FrameType::TargetWelcome, &encode_message(&welcome), &mut scratch).unwrap();
    let (mut received, mut answered) = (0u64, 0usize);
    loop {
        match read_frame(&mut s, &mut payload) {
            Ok(FrameType::Records) => {
                let mut at = 0;
                while at < payload.len() {
                    let (rec, used) = decode_record(&payload[at..]).unwrap();
                    received = rec.header.seq;
                    at += used;
                }
                write_frame(&mut s, FrameType::Confirm, &encode_confirm(received), &mut scratch).unwrap();
            }
            Ok(FrameType::TargetHashRequest) => {
                let req: TargetHashRequest = decode_message("TargetHashRequest", &payload).unwrap();
                assert!(
                    req.through_seq <= received,
                    "a hash request through seq {} came before the records after {received}",
                    req.through_seq
                );
                let reply = HashReply {
                    id: req.id,
                    status: HashStatus::Ok,
                    seq: received,
                    hashes: vec![[0; 32]; req.regions.len()],
                    message: String::new(),
                };
                write_frame(&mut s, FrameType::TargetHashReply, &encode_message(&reply), &mut scratch).unwrap();
                answered += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => return answered,
        }
    }
}

#[test]
fn a_hash_request_reaches_the_target_behind_every_record_it_covers() {
    let d = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let engine = hindsight_engine::start(engine_config(d.path(), listener.local_addr().unwrap().port(), "64MiB")).unwrap();
    let target = std::thread::spawn(move || hashing_target(&listener));
    let mut a = FakeAgent::connect(engine.local_addr(), "vm1", &[("db", 64 << 20)]).unwrap();
    // A small write then at once a hash request, many times: in cdp mode the write's frame
    // gathers for a moment before it is sent, and the request must wait behind it.
    let mut ok = 0;
    for i in 0..300u64 {
        a.send_write(i, (i % 64) << 20, &[i as u8; 4096]);
        let seq = a.ack().seq;
        let m = HashRequest { id: i, disk: 0, region_shift: 20, regions: vec![i % 64] };
        write_frame(&mut a.s, FrameType::HashRequest, &encode_message(&m), &mut a.scratch).unwrap();
        assert_eq!(a.frame().unwrap(), FrameType::HashReply);
        let r: HashReply = decode_message("HashReply", &a.payload).unwrap();
        assert_eq!(r.id, i);
        if r.status == HashStatus::Ok {
            assert!(r.seq >= seq, "hashes at seq {} answered a request made after seq {seq}", r.seq);
            ok += 1;
        } else {
            // Only before the engine's first connection to the target.
            assert!(ok == 0 && r.message.contains("not connected"), "request {i}: {}", r.message);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(ok >= 250, "{ok} of 300 requests answered");
    drop(a);
    engine.shutdown();
    assert_eq!(target.join().unwrap(), ok);
}
