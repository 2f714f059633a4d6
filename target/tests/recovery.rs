//! A fake engine ships random writes to a real target; every recovered point must equal a
//! model of the volumes byte for byte.

mod common;

use common::*;
use hindsight_consistency::Record;
use hindsight_target::{history, recover, start, Point, RecoverRequest, TargetError};
use rand::{Rng, SeedableRng};

const VOLS: [(&str, u64); 2] = [("db", 3 << 20), ("logs", (1 << 20) + 4096)];

fn recover_to(
    cfg: &hindsight_consistency::config::TargetConfig,
    out_dir: &std::path::Path,
    volume: &str,
    point: Point,
    n: usize,
) -> (hindsight_target::RecoverReport, Vec<u8>) {
    let out = out_dir.join(format!("{volume}-{n}.img"));
    let report = recover(cfg, &RecoverRequest { group: "erp".into(), volume: volume.into(), point, out: out.clone() }).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    (report, bytes)
}

fn size_of(volume: &str) -> u64 {
    VOLS.iter().find(|v| v.0 == volume).unwrap().1
}

#[test]
fn recovered_seq_and_time_points_equal_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let target = start(cfg.clone()).unwrap();
    let (mut engine, welcome) = FakeEngine::connect(target.local_addr(), "engine-a", "erp", &VOLS);
    assert_eq!(welcome, Ok(0));

    let mut writes = Writes::new(1, &VOLS);
    let history_recs: Vec<Record> = writes.take(500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    engine.ship(&history_recs, &mut rng);
    let last = history_recs.last().unwrap().header;

    let h = history(&cfg, "erp").unwrap();
    assert_eq!((h.first_seq, h.last_seq, h.last_time_ns), (0, last.seq, last.time_ns));
    assert!(h.segments > 1, "1 MiB segments should have rotated: {h:?}");

    // Latest: the model, and the replica the target keeps current.
    for (vol, size) in VOLS {
        let want = model_image(&history_recs, vol, size, |_| true);
        let (report, got) = recover_to(&cfg, out_dir.path(), vol, Point::Latest, 0);
        assert_eq!((report.seq, report.time_ns, report.bytes), (last.seq, last.time_ns, size));
        assert_eq!(report.records_applied, history_recs.iter().filter(|r| r.volume == vol).count() as u64);
        assert_same_image(&got, &want, &format!("{vol} latest"));
        assert_replica(dir.path(), "erp", vol, &want, &format!("{vol} replica"));
    }

    // Random sequence points, 0 and the last included.
    let mut points: Vec<u64> = (0..20).map(|_| rng.gen_range(0..=last.seq)).collect();
    points.extend([0, 1, last.seq]);
    for (i, n) in points.into_iter().enumerate() {
        let vol = VOLS[i % 2].0;
        let (report, got) = recover_to(&cfg, out_dir.path(), vol, Point::Seq(n), i);
        let want = model_image(&history_recs, vol, size_of(vol), |r| r.header.seq <= n);
        assert_same_image(&got, &want, &format!("{vol} at seq {n}"));
        assert_eq!(report.seq, n);
        if n > 0 {
            assert_eq!(report.time_ns, history_recs[usize::try_from(n).unwrap() - 1].header.time_ns);
        }
    }

    // Time points: exactly a record's time (all records sharing it are in), and just before.
    for i in 0..16 {
        let k = rng.gen_range(0..history_recs.len());
        let t = history_recs[k].header.time_ns - u64::from(i % 2 == 1);
        if t < h.first_time_ns {
            continue;
        }
        let vol = VOLS[i % 2].0;
        let (report, got) = recover_to(&cfg, out_dir.path(), vol, Point::Time(t), 100 + i);
        let want = model_image(&history_recs, vol, size_of(vol), |r| r.header.time_ns <= t);
        assert_same_image(&got, &want, &format!("{vol} at time {t}"));
        let expect_seq = history_recs.iter().filter(|r| r.header.time_ns <= t).map(|r| r.header.seq).max().unwrap_or(0);
        assert_eq!(report.seq, expect_seq, "time {t}");
    }
    target.shutdown();
}

#[test]
fn recovery_refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let target = start(cfg.clone()).unwrap();
    let (mut engine, _) = FakeEngine::connect(target.local_addr(), "engine-a", "erp", &VOLS);
    let mut writes = Writes::new(3, &VOLS);
    let recs = writes.take(20);
    engine.send_records(&recs);
    engine.wait_confirm(20);
    let req = |group: &str, volume: &str, point: Point, out: std::path::PathBuf| RecoverRequest {
        group: group.into(),
        volume: volume.into(),
        point,
        out,
    };
    let out = out_dir.path().join("x.img");

    let e = recover(&cfg, &req("nope", "db", Point::Latest, out.clone())).unwrap_err();
    assert!(matches!(e, TargetError::UnknownGroup { .. }), "{e:?}");
    assert!(e.to_string().contains("\"nope\"") && e.to_string().contains("erp"), "{e}");

    let e = recover(&cfg, &req("erp", "web", Point::Latest, out.clone())).unwrap_err();
    assert!(e.to_string().contains("\"web\"") && e.to_string().contains("db, logs"), "{e}");

    let e = recover(&cfg, &req("erp", "db", Point::Seq(21), out.clone())).unwrap_err();
    assert!(matches!(e, TargetError::NotReceived { requested: 21, last_seq: 20, .. }), "{e:?}");
    assert!(e.to_string().contains("not received yet; the latest point is seq 20"), "{e}");

    let h = history(&cfg, "erp").unwrap();
    let e = recover(&cfg, &req("erp", "db", Point::Time(h.first_time_ns - 1), out.clone())).unwrap_err();
    // Nothing was ever folded away: the time is before the group existed, not "no longer retained".
    assert!(matches!(e, TargetError::BeforeCreation { .. }), "{e:?}");
    assert!(e.to_string().contains("is before the group was created at") && e.to_string().contains("window is seq 0 ("), "{e}");

    let inside = dir.path().join("groups").join("erp").join("x.img");
    let e = recover(&cfg, &req("erp", "db", Point::Latest, inside.clone())).unwrap_err();
    assert!(matches!(e, TargetError::OutputRefused { .. }), "{e:?}");
    assert!(!inside.exists());

    std::fs::write(&out, b"precious").unwrap();
    let e = recover(&cfg, &req("erp", "db", Point::Latest, out.clone())).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let list = hindsight_target::groups(&cfg).unwrap();
    assert_eq!(list, vec!["erp".to_owned()]);
    target.shutdown();
}

#[test]
fn recovery_while_records_arrive_and_retention_trims_is_exact_at_the_reported_point() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.journal_size = Some(2 << 20);
    let target = start(cfg.clone()).unwrap();
    let (mut engine, _) = FakeEngine::connect(target.local_addr(), "engine-a", "erp", &VOLS);
    let mut writes = Writes::new(5, &VOLS);
    writes.max_len = 32 << 10;
    let recs = std::sync::Arc::new(writes.take(600));
    let shipper = {
        let recs = std::sync::Arc::clone(&recs);
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            for chunk in recs.chunks(20) {
                engine.ship(chunk, &mut rng);
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut exact, mut refused) = (0, 0);
    for i in 0..200 {
        let done = shipper.is_finished();
        let vol = VOLS[i % 2].0;
        let h = history(&cfg, "erp").unwrap();
        let point = if i % 3 == 0 { Point::Latest } else { Point::Seq(rng.gen_range(h.first_seq..=h.last_seq)) };
        let out = out_dir.path().join(format!("{i}.img"));
        match recover(&cfg, &RecoverRequest { group: "erp".into(), volume: vol.into(), point, out: out.clone() }) {
            Ok(report) => {
                let want = model_image(&recs, vol, size_of(vol), |r| r.header.seq <= report.seq);
                assert_same_image(&std::fs::read(&out).unwrap(), &want, &format!("{vol} at {point} (seq {})", report.seq));
                std::fs::remove_file(&out).unwrap();
                exact += 1;
            }
            // Retention may move the window between the history call and the recovery.
            Err(TargetError::NotRetained { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        if done {
            break;
        }
    }
    shipper.join().unwrap();
    eprintln!("{exact} recoveries checked while shipping, {refused} refused by a moving window");
    assert!(exact > 5, "{exact} recoveries checked, {refused} refused");
    let h = history(&cfg, "erp").unwrap();
    assert_eq!(h.last_seq, 600);
    assert!(h.first_seq > 0, "retention ran: {h:?}");
    target.shutdown();
}
