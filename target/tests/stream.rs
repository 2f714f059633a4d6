//! The engine → target session: resume after restart, and every protocol violation refused
//! with nothing of the bad frame applied.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hindsight_consistency::journal::JournalReader;
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::wire::{write_frame, FrameType};
use hindsight_consistency::Record;
use hindsight_target::{history, recover, start, Point, RecoverRequest, TargetError};
use rand::SeedableRng;

const VOLS: [(&str, u64); 2] = [("db", 2 << 20), ("logs", 1 << 20)];

/// Replicas equal the model after `upto`.
fn assert_replicas(dir: &std::path::Path, recs: &[Record], upto: u64) {
    for (vol, size) in VOLS {
        let want = model_image(recs, vol, size, |r| r.header.seq <= upto);
        assert_replica(dir, "g", vol, &want, &format!("replica {vol} at seq {upto}"));
    }
}

fn journal_seqs(dir: &std::path::Path) -> Vec<u64> {
    let mut r = JournalReader::open(Arc::new(StdStorage), &dir.join("groups/g/journal"), 1).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        out.push(rec.header.seq);
    }
    out
}

#[test]
fn restart_then_resend_skips_what_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut writes = Writes::new(10, &VOLS);
    let recs = writes.take(150);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);

    let target = start(cfg.clone()).unwrap();
    let (mut engine, welcome) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
    assert_eq!(welcome, Ok(0));
    engine.ship(&recs[..100], &mut rng);
    drop(engine);
    target.shutdown();

    let target = start(cfg.clone()).unwrap();
    let (mut engine, welcome) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
    assert_eq!(welcome, Ok(100), "the welcome names the last durable seq");
    assert_replicas(dir.path(), &recs, 100);
    // The engine resends from further back than needed, including a frame that straddles
    // the durable point.
    engine.send_records(&recs[59..80]);
    engine.wait_confirm(100);
    engine.send_records(&recs[95..110]);
    engine.wait_confirm(110);
    engine.ship(&recs[110..], &mut rng);
    assert_replicas(dir.path(), &recs, 150);
    assert_eq!(journal_seqs(dir.path()), (1..=150).collect::<Vec<_>>(), "no record journaled twice");
    assert_eq!(history(&cfg, "g").unwrap().last_seq, 150);

    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("db.img");
    let r = recover(&cfg, &RecoverRequest { group: "g".into(), volume: "db".into(), point: Point::Seq(120), out: path.clone() }).unwrap();
    assert_eq!(r.seq, 120);
    assert_same_image(&std::fs::read(&path).unwrap(), &model_image(&recs, "db", VOLS[0].1, |r| r.header.seq <= 120), "db at 120");
    drop(engine);
    target.shutdown();
}

/// Starts a target holding records 1..=10 of a fresh group; returns it with the records.
fn ten_records(dir: &std::path::Path) -> (hindsight_target::TargetHandle, Vec<Record>) {
    let target = start(config(dir)).unwrap();
    let (mut engine, welcome) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
    assert_eq!(welcome, Ok(0));
    let mut writes = Writes::new(20, &VOLS);
    let recs = writes.take(20);
    engine.send_records(&recs[..10]);
    engine.wait_confirm(10);
    (target, recs)
}

/// After a refused frame: the target still holds exactly 1..=10, on disk and in the welcome.
fn assert_still_ten(target: &hindsight_target::TargetHandle, dir: &std::path::Path, recs: &[Record]) {
    let (_, welcome) = wait_for(Duration::from_secs(10), "the group to be released", || {
        let (e, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
        match &w {
            Err(m) if m.contains("already being shipped") => None,
            _ => Some((e, w)),
        }
    });
    assert_eq!(welcome, Ok(10));
    assert_replicas(dir, recs, 10);
    assert_eq!(journal_seqs(dir), (1..=10).collect::<Vec<_>>());
}

#[test]
fn gap_is_refused_with_both_numbers_and_nothing_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (target, recs) = ten_records(dir.path());
    let mut engine = reconnect(&target);
    engine.send_records(&recs[11..12]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("seq 12") && msg.contains("seq 11"), "{msg}");
    assert_still_ten(&target, dir.path(), &recs);

    // Records that do not follow each other inside one frame: the whole frame is refused,
    // even its first record, which was the expected one.
    let mut engine = reconnect(&target);
    engine.send_records(&[recs[10].clone(), recs[12].clone()]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("consecutive"), "{msg}");
    assert_still_ten(&target, dir.path(), &recs);
    target.shutdown();
}

fn reconnect(target: &hindsight_target::TargetHandle) -> FakeEngine {
    wait_for(Duration::from_secs(10), "the group to be released", || {
        let (e, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
        w.is_ok().then_some(e)
    })
}

#[test]
fn corrupted_record_or_frame_closes_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (target, recs) = ten_records(dir.path());

    // A record whose own checksum fails, inside a frame whose checksum is right.
    let mut engine = reconnect(&target);
    let mut payload = encode_records(&recs[10..13]);
    let second = 40 + recs[10].volume.len() + recs[10].data.len() + 4;
    payload[second + 41] ^= 0x20; // in the volume name or data of the second record
    engine.send_frame(FrameType::Records, &payload);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("invalid") && msg.contains("checksum"), "{msg}");
    assert_still_ten(&target, dir.path(), &recs);

    // A frame whose checksum fails.
    let mut engine = reconnect(&target);
    let mut frame = Vec::new();
    write_frame(&mut frame, FrameType::Records, &encode_records(&recs[10..13]), &mut Vec::new()).unwrap();
    let n = frame.len();
    frame[n - 10] ^= 1;
    engine.send_bytes(&frame);
    match engine.read_reply() {
        Reply::Error(m) => {
            assert!(m.contains("checksum"), "{m}");
            assert_eq!(engine.read_reply(), Reply::Closed);
        }
        Reply::Closed => {}
        other => panic!("{other:?}"),
    }
    assert_still_ten(&target, dir.path(), &recs);

    // An engine that dies in the middle of a frame.
    let mut engine = reconnect(&target);
    frame[n - 10] ^= 1;
    engine.send_bytes(&frame[..n / 2]);
    drop(engine);
    assert_still_ten(&target, dir.path(), &recs);
    target.shutdown();
}

#[test]
fn lz4_frames_are_applied_and_a_bad_block_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (target, recs) = ten_records(dir.path());

    // The welcome chose lz4 (the fake engine offers it); compressed frames apply like plain ones.
    let mut engine = reconnect(&target);
    // (Random test data does not shrink, so the frame is built whatever its ratio.)
    let raw = encode_records(&recs[10..14]);
    let mut packed = u32::try_from(raw.len()).unwrap().to_le_bytes().to_vec();
    packed.extend_from_slice(&lz4_flex_compress(&raw));
    engine.send_frame(FrameType::RecordsLz4, &packed);
    engine.wait_confirm(14);
    assert_replicas(dir.path(), &recs, 14);

    // A block that does not decompress to its declared length: refused, nothing of it kept.
    let raw = encode_records(&recs[14..16]);
    let mut lying = (u32::try_from(raw.len()).unwrap() + 7).to_le_bytes().to_vec();
    lying.extend_from_slice(&lz4_flex_compress(&raw));
    engine.send_frame(FrameType::RecordsLz4, &lying);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("RecordsLz4"), "{msg}");
    let (_, welcome) = wait_for(Duration::from_secs(10), "the group to be released", || {
        let (e, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
        w.is_ok().then_some((e, w))
    });
    assert_eq!(welcome, Ok(14));
    assert_replicas(dir.path(), &recs, 14);
    target.shutdown();
}

/// The raw LZ4 block of `raw`, whatever its ratio.
fn lz4_flex_compress(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    hindsight_consistency::wire::compress::lz4_block(raw, &mut out);
    out
}

#[test]
fn unknown_volume_or_write_past_the_end_refuses_the_whole_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (target, recs) = ten_records(dir.path());

    let mut engine = reconnect(&target);
    let mut bad = recs[11].clone();
    bad.volume = "web".into();
    engine.send_records(&[recs[10].clone(), bad]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("\"web\"") && msg.contains("seq 12"), "{msg}");
    assert_still_ten(&target, dir.path(), &recs);

    let mut engine = reconnect(&target);
    let mut bad = recs[11].clone();
    bad.volume = "logs".into();
    bad.header.offset = VOLS[1].1 - u64::from(bad.header.length) + 1;
    engine.send_records(&[recs[10].clone(), bad]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("past the end of volume \"logs\""), "{msg}");
    assert_still_ten(&target, dir.path(), &recs);
    target.shutdown();
}

#[test]
fn second_engine_for_a_group_is_refused_until_the_first_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let target = start(config(dir.path())).unwrap();
    let (first, welcome) = FakeEngine::connect(target.local_addr(), "engine-a", "g", &VOLS);
    assert_eq!(welcome, Ok(0));
    let (_, refused) = FakeEngine::connect(target.local_addr(), "engine-b", "g", &VOLS);
    let msg = refused.unwrap_err();
    assert!(msg.contains("group \"g\" is already being shipped by engine-a"), "{msg}");
    // Another group is independent.
    let (_, other) = FakeEngine::connect(target.local_addr(), "engine-b", "h", &VOLS);
    assert_eq!(other, Ok(0));
    drop(first);
    wait_for(Duration::from_secs(10), "engine-b to be accepted", || {
        let (e, w) = FakeEngine::connect(target.local_addr(), "engine-b", "g", &VOLS);
        w.is_ok().then_some(e)
    });
    target.shutdown();
}

#[test]
fn volume_size_change_is_refused_naming_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (target, recs) = ten_records(dir.path());
    let grown = [("db", 4 << 20), ("logs", 1 << 20)];
    let (_, w) = wait_for(Duration::from_secs(10), "an answer other than busy", || {
        let (e, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &grown);
        match &w {
            Err(m) if m.contains("already being shipped") => None,
            _ => Some((e, w)),
        }
    });
    let msg = w.unwrap_err();
    assert!(msg.contains("\"db\"") && msg.contains("2097152") && msg.contains("4194304"), "{msg}");
    // A new volume is added and usable.
    let more = [("db", 2 << 20), ("logs", 1 << 20), ("tmp", 1 << 20)];
    let (mut engine, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &more);
    assert_eq!(w, Ok(10));
    let mut r = recs[10].clone();
    r.volume = "tmp".into();
    r.header.offset = 0;
    r.header.length = 4;
    r.header.kind = hindsight_consistency::WriteKind::Data;
    r.data = b"abcd".to_vec();
    engine.send_records(&[r]);
    engine.wait_confirm(11);
    let h = history(&config(dir.path()), "g").unwrap();
    assert_eq!(h.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["db", "logs", "tmp"]);
    let mut want = vec![0u8; usize::try_from(std::fs::metadata(replica_path(dir.path(), "g", "tmp")).unwrap().len()).unwrap()];
    want[..4].copy_from_slice(b"abcd");
    assert_replica(dir.path(), "g", "tmp", &want, "replica tmp");
    target.shutdown();
}

#[test]
fn second_daemon_on_a_data_dir_and_busy_address_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = start(config(dir.path())).unwrap();
    let e = start(config(dir.path())).unwrap_err();
    assert!(matches!(e, TargetError::DataDirInUse { .. }), "{e:?}");

    let other = tempfile::tempdir().unwrap();
    let mut cfg = config(other.path());
    cfg.listen = target.local_addr();
    let e = start(cfg).unwrap_err();
    assert!(matches!(e, TargetError::Bind { .. }), "{e:?}");
    assert!(e.to_string().contains(&target.local_addr().to_string()), "{e}");
    target.shutdown();
}

#[test]
fn damaged_group_is_refused_with_the_cause_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = ten_records(dir.path());
    let (_, w) = FakeEngine::connect(target.local_addr(), "e2", "h", &VOLS);
    assert_eq!(w, Ok(0));
    target.shutdown();

    let state = dir.path().join("groups/g/state");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[9] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let target = start(config(dir.path())).unwrap();
    let (_, w) = FakeEngine::connect(target.local_addr(), "e1", "g", &VOLS);
    let msg = w.unwrap_err();
    assert!(msg.contains("could not be loaded") && msg.contains("state") && msg.contains("checksum mismatch"), "{msg}");
    let (_, w) = FakeEngine::connect(target.local_addr(), "e2", "h", &VOLS);
    assert_eq!(w, Ok(0));
    target.shutdown();
}

/// Ownership tokens (docs/ha.md, "Fencing"): a hello with a larger token displaces the
/// connection of a smaller one, which gets nothing more in; a smaller token is refused from
/// then on, also after a restart of the target.
#[test]
fn a_newer_owner_displaces_the_older_and_the_older_gets_no_record_in() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let recs = Writes::new(30, &VOLS).take(20);
    let target = start(cfg.clone()).unwrap();
    let (mut old, welcome) = FakeEngine::connect_owning(target.local_addr(), "engine-a", "g", &VOLS, 5);
    assert_eq!(welcome, Ok(0));
    old.send_records(&recs[..6]);
    old.wait_confirm(6);

    // The new owner's hello is accepted while the old connection is still open: the old one
    // is closed, and what it sends after that is refused.
    let (mut new, welcome) = FakeEngine::connect_owning(target.local_addr(), "engine-b", "g", &VOLS, 7);
    assert_eq!(welcome, Ok(6), "the new owner resumes after what the target holds");
    old.send_records(&recs[6..8]);
    match old.read_reply() {
        Reply::Closed => {}
        Reply::Error(m) => assert!(m.contains("token 5") && m.contains("token 7"), "{m}"),
        other => panic!("the old owner's records were taken: {other:?}"),
    }
    new.send_records(&recs[6..10]);
    new.wait_confirm(10);
    assert_eq!(journal_seqs(dir.path()), (1..=10).collect::<Vec<_>>());

    // A smaller token is refused by name, and stays refused after a restart.
    let (_, refused) = FakeEngine::connect_owning(target.local_addr(), "engine-a", "g", &VOLS, 5);
    let msg = refused.unwrap_err();
    assert!(msg.contains("token 5") && msg.contains("token 7") && msg.contains("another engine owns the group"), "{msg}");
    drop(new);
    target.shutdown();
    let target = start(cfg).unwrap();
    let (_, refused) = FakeEngine::connect_owning(target.local_addr(), "engine-a", "g", &VOLS, 6);
    assert!(refused.unwrap_err().contains("token 7"));
    let (_, welcome) = FakeEngine::connect_owning(target.local_addr(), "engine-b", "g", &VOLS, 7);
    assert_eq!(welcome, Ok(10));
    assert_replicas(dir.path(), &recs, 10);
    target.shutdown();
}
