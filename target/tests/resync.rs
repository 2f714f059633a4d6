//! A resync (records of kind 7, ended by a point named `resync`) is not a consistent stretch:
//! history lists it, recovery inside it is refused naming the points around it, and `--latest`
//! and `--time` fall back to the last consistent point before it, even past a bookmark placed
//! inside it. The span index rebuilt from the journal says the same.

mod common;

use common::*;
use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::{BookmarkBody, PointConsistency, Record, RecordHeader, WriteKind};
use hindsight_target::spans::{Span, SpanKind};
use hindsight_target::{history, recover, start, Point, RecoverRequest, TargetError};
use rand::{Rng, SeedableRng};

const VOLS: [(&str, u64); 2] = [("db", 1 << 20), ("logs", 1 << 20)];

/// Records 1..=10 data, 11..=14 resync, 15 a bookmark, 16..=17 data, 18 the resync point,
/// 19..=20 data; every record has its own time.
fn resync_history() -> Vec<Record> {
    let mut writes = Writes::new(21, &VOLS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut recs: Vec<Record> = Vec::new();
    let push = |recs: &mut Vec<Record>, mut r: Record| {
        r.header.seq = recs.len() as u64 + 1;
        r.header.time_ns = 1_800_000_000_000_000_000 + r.header.seq * 1_000;
        recs.push(r);
    };
    for seq in 1..=20u64 {
        let r = match seq {
            11..=14 => {
                // A dirty region re-sent from the agent's disk.
                let volume = VOLS[usize::from(seq % 2 == 0)].0;
                let length = rng.gen_range(1..=16u32) * 4096;
                let offset = rng.gen_range(0..(1u64 << 20) / 4096 - 16) * 4096;
                let data = (0..length).map(|_| rng.gen()).collect();
                Record { header: RecordHeader { seq, time_ns: 0, kind: WriteKind::Resync, offset, length }, volume: volume.into(), data }
            }
            15 => {
                let body = BookmarkBody { consistency: PointConsistency::Crash, note: "placed during a resync".into() }.encode();
                let length = u32::try_from(body.len()).unwrap();
                Record {
                    header: RecordHeader { seq, time_ns: 0, kind: WriteKind::Bookmark, offset: 0, length },
                    volume: "mid".into(),
                    data: body,
                }
            }
            18 => Record {
                header: RecordHeader { seq, time_ns: 0, kind: WriteKind::Point, offset: 0, length: 8 },
                volume: "resync".into(),
                data: 11u64.to_le_bytes().to_vec(),
            },
            _ => writes.next(),
        };
        push(&mut recs, r);
    }
    recs
}

fn recover_at(cfg: &TargetConfig, volume: &str, point: Point) -> Result<(u64, Vec<u8>), TargetError> {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join(format!("{volume}.img"));
    let report = recover(cfg, &RecoverRequest { group: "erp".into(), volume: volume.into(), point, out: out.clone() })?;
    Ok((report.seq, std::fs::read(&out).unwrap()))
}

/// Every volume recovered at `point` is the model at `seq`.
fn assert_point(cfg: &TargetConfig, recs: &[Record], point: Point, seq: u64) {
    for (vol, size) in VOLS {
        let (got_seq, got) = recover_at(cfg, vol, point).unwrap();
        assert_eq!(got_seq, seq, "{point}");
        assert_same_image(&got, &model_image(recs, vol, size, |r| r.header.seq <= seq), &format!("{vol} at {point}"));
    }
}

fn assert_refused(cfg: &TargetConfig, seq: u64, after: &str) {
    let e = recover_at(cfg, "db", Point::Seq(seq)).unwrap_err();
    assert!(matches!(e, TargetError::NotConsistent { requested, .. } if requested == seq), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("not a consistent point") && msg.contains("inside a resync"), "{msg}");
    assert!(msg.contains("the last consistent point before it is seq 10") && msg.contains(after), "{msg}");
}

#[test]
fn a_resync_is_not_consistent_until_its_resync_point_even_at_a_bookmark() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let recs = resync_history();
    let target = start(cfg.clone()).unwrap();
    let (mut engine, welcome) = FakeEngine::connect(target.local_addr(), "engine-a", "erp", &VOLS);
    assert_eq!(welcome, Ok(0));

    // The resync has not completed: every point from its first record on is inconsistent.
    engine.send_records(&recs[..17]);
    engine.wait_confirm(17);
    let h = history(&cfg, "erp").unwrap();
    assert_eq!(
        h.inconsistent,
        vec![Span { from: 11, to: None, kind: SpanKind::Resync, from_time_ns: recs[10].header.time_ns, to_time_ns: None }]
    );
    assert_eq!((h.last_seq, h.last_consistent_seq), (17, 10));
    assert_eq!(h.bookmarks.iter().map(|b| b.seq).collect::<Vec<_>>(), [15]);
    assert_point(&cfg, &recs, Point::Latest, 10);
    assert_point(&cfg, &recs, Point::Time(recs[16].header.time_ns), 10);
    assert_refused(&cfg, 15, "the resync has not completed yet");
    assert_refused(&cfg, 17, "the resync has not completed yet");

    // The resync point arrives: consistent again from it on.
    engine.send_records(&recs[17..]);
    engine.wait_confirm(20);
    let resync_span = vec![Span {
        from: 11,
        to: Some(18),
        kind: SpanKind::Resync,
        from_time_ns: recs[10].header.time_ns,
        to_time_ns: Some(recs[17].header.time_ns),
    }];
    let h = history(&cfg, "erp").unwrap();
    assert_eq!(h.inconsistent, resync_span);
    assert_eq!((h.last_seq, h.last_consistent_seq), (20, 20));
    for seq in [10, 18, 20] {
        assert_point(&cfg, &recs, Point::Seq(seq), seq);
    }
    assert_point(&cfg, &recs, Point::Latest, 20);
    assert_point(&cfg, &recs, Point::Time(recs[14].header.time_ns), 10);
    assert_point(&cfg, &recs, Point::Time(recs[17].header.time_ns), 18);
    for seq in [11, 12, 15, 17] {
        assert_refused(&cfg, seq, "the resync point after it is seq 18");
    }
    // The replicas hold the resync data like any data.
    for (vol, size) in VOLS {
        let replica = wait_for(std::time::Duration::from_secs(10), "the replica to catch up", || {
            let img = std::fs::read(replica_path(dir.path(), "erp", vol)).unwrap();
            (img == model_image(&recs, vol, size, |_| true)).then_some(img)
        });
        assert_eq!(replica.len() as u64, size);
    }
    let index = dir.path().join("groups").join("erp").join("spans.toml");
    assert!(std::fs::read_to_string(&index).unwrap().contains("kind = \"resync\""));

    // The index removed: the restarted target rebuilds it from the journal, the same.
    drop(engine);
    target.shutdown();
    std::fs::remove_file(&index).unwrap();
    let target = start(cfg.clone()).unwrap();
    let h = history(&cfg, "erp").unwrap();
    assert_eq!(h.inconsistent, resync_span);
    assert_eq!(h.last_consistent_seq, 20);
    assert_refused(&cfg, 15, "the resync point after it is seq 18");
    assert_point(&cfg, &recs, Point::Seq(18), 18);
    target.shutdown();
}
