//! Retention: old journal segments are folded into the base images and deleted; the points
//! before the new base are refused, the points after it are still exact.

mod common;

use std::time::Duration;

use common::*;
use hindsight_consistency::Record;
use hindsight_target::{history, recover, start, History, Point, RecoverRequest, TargetError};
use rand::{Rng, SeedableRng};

const VOLS: [(&str, u64); 2] = [("db", 4 << 20), ("logs", 2 << 20)];

fn size_of(volume: &str) -> u64 {
    VOLS.iter().find(|v| v.0 == volume).unwrap().1
}

/// Recovers `point` of `volume` and compares it with the model.
fn check_point(cfg: &hindsight_consistency::config::TargetConfig, recs: &[Record], volume: &str, point: Point) -> u64 {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("v.img");
    let report = recover(cfg, &RecoverRequest { group: "g".into(), volume: volume.into(), point, out: path.clone() }).unwrap();
    let want = match point {
        Point::Seq(n) => model_image(recs, volume, size_of(volume), |r| r.header.seq <= n),
        Point::Time(t) => model_image(recs, volume, size_of(volume), |r| r.header.time_ns <= t),
        Point::Latest => model_image(recs, volume, size_of(volume), |_| true),
    };
    assert_same_image(&std::fs::read(&path).unwrap(), &want, &format!("{volume} at {point}"));
    report.seq
}

fn assert_not_retained(cfg: &hindsight_consistency::config::TargetConfig, h: &History, point: Point) {
    let out = tempfile::tempdir().unwrap();
    let req = RecoverRequest { group: "g".into(), volume: "db".into(), point, out: out.path().join("v.img") };
    let e = recover(cfg, &req).unwrap_err();
    assert!(matches!(e, TargetError::NotRetained { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("no longer retained; the recoverable window is seq {} (", h.first_seq)), "{msg}");
    assert!(msg.contains(&format!(".. seq {} (", h.last_seq)), "{msg}");
}

#[test]
fn journal_size_limit_trims_old_segments_and_keeps_the_window_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.journal_size = Some(2 << 20);
    let target = start(cfg.clone()).unwrap();
    let (mut engine, _) = FakeEngine::connect(target.local_addr(), "e", "g", &VOLS);
    let mut writes = Writes::new(30, &VOLS);
    writes.max_len = 32 << 10;
    let recs = writes.take(400); // about 6 MiB of data
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    engine.ship(&recs, &mut rng);
    let last = recs.last().unwrap().header.seq;

    let h = wait_for(Duration::from_secs(20), "retention to trim the journal", || {
        let h = history(&cfg, "g").unwrap();
        (h.journal_bytes <= 2 << 20 && h.first_seq > 0).then_some(h)
    });
    assert_eq!(h.last_seq, last);
    assert!(h.segments <= 3, "{h:?}");
    assert_eq!(h.first_time_ns, recs[usize::try_from(h.first_seq).unwrap() - 1].header.time_ns);

    assert_not_retained(&cfg, &h, Point::Seq(h.first_seq - 1));
    assert_not_retained(&cfg, &h, Point::Seq(0));
    assert_not_retained(&cfg, &h, Point::Time(h.first_time_ns - 1));
    // The base point itself and points after it are exact.
    assert_eq!(check_point(&cfg, &recs, "db", Point::Seq(h.first_seq)), h.first_seq);
    assert_eq!(check_point(&cfg, &recs, "logs", Point::Seq(h.first_seq)), h.first_seq);
    assert_eq!(
        check_point(&cfg, &recs, "db", Point::Time(h.first_time_ns)),
        recs.iter().filter(|r| r.header.time_ns <= h.first_time_ns).count() as u64
    );
    for i in 0..8 {
        let n = rng.gen_range(h.first_seq..=last);
        check_point(&cfg, &recs, VOLS[i % 2].0, Point::Seq(n));
    }
    for (vol, _) in VOLS {
        assert_eq!(check_point(&cfg, &recs, vol, Point::Latest), last);
        assert_replica(dir.path(), "g", vol, &model_image(&recs, vol, size_of(vol), |_| true), "replica");
    }

    // The trimmed state survives a restart, and shipping goes on from it.
    drop(engine);
    target.shutdown();
    let target = start(cfg.clone()).unwrap();
    let (mut engine, w) = FakeEngine::connect(target.local_addr(), "e", "g", &VOLS);
    assert_eq!(w, Ok(last));
    let more = writes.take(50);
    engine.ship(&more, &mut rng);
    let all: Vec<Record> = recs.iter().chain(more.iter()).cloned().collect();
    let h2 = history(&cfg, "g").unwrap();
    assert!(h2.first_seq >= h.first_seq);
    check_point(&cfg, &all, "db", Point::Seq(h2.first_seq));
    check_point(&cfg, &all, "logs", Point::Latest);
    target.shutdown();
}

#[test]
fn retention_time_trims_segments_older_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retention = Some(Duration::from_millis(300));
    let target = start(cfg.clone()).unwrap();
    let (mut engine, _) = FakeEngine::connect(target.local_addr(), "e", "g", &VOLS);
    let mut writes = Writes::new(40, &VOLS);
    writes.max_len = 32 << 10;
    let recs = writes.take(250); // several 1 MiB segments
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    engine.ship(&recs, &mut rng);
    let last = recs.last().unwrap().header.seq;

    // Every segment but the active one is older than 300 ms soon after the last write.
    let h = wait_for(Duration::from_secs(20), "retention to trim all but the active segment", || {
        let h = history(&cfg, "g").unwrap();
        (h.segments == 1 && h.first_seq > 0).then_some(h)
    });
    assert_eq!(h.last_seq, last);
    assert!(h.first_seq < last);
    assert_not_retained(&cfg, &h, Point::Seq(1));
    assert_eq!(check_point(&cfg, &recs, "db", Point::Seq(h.first_seq)), h.first_seq);
    assert_eq!(check_point(&cfg, &recs, "logs", Point::Seq(h.first_seq)), h.first_seq);
    check_point(&cfg, &recs, "db", Point::Latest);
    check_point(&cfg, &recs, "logs", Point::Seq((h.first_seq + last) / 2));
    target.shutdown();
}
