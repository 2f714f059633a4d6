//! Fault injection at the target: EIO and ENOSPC on the journal, a failed fdatasync, a failed
//! replica write, and a torn write followed by a power loss. Each stops the group with an error
//! naming the cause, nothing wrong is ever served, and once the operator has fixed the cause
//! and restarted the target, the engine's resend brings it back to exactly the model.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hindsight_consistency::faults::{Fault, FaultPlan, FaultyStorage, Op, Rule};
use hindsight_consistency::storage::StdStorage;
use hindsight_consistency::Record;
use hindsight_target::{history, recover, start_with_storage, Point, RecoverRequest};

const VOLS: [(&str, u64); 2] = [("db", 2 << 20), ("logs", 1 << 20)];

/// The target over a faulty storage with `plan`.
fn target(dir: &std::path::Path, plan: &Arc<FaultPlan>) -> (hindsight_target::TargetHandle, Arc<FaultyStorage>) {
    let fs = Arc::new(FaultyStorage::new(StdStorage::shared(), Arc::clone(plan)));
    (start_with_storage(config(dir), fs.clone()).unwrap(), fs)
}

/// Replicas and a recovery at the latest point both equal the model after `upto`.
fn assert_image(dir: &std::path::Path, recs: &[Record], upto: u64) {
    for (vol, size) in VOLS {
        let want = model_image(recs, vol, size, |r| r.header.seq <= upto);
        assert_replica(dir, "g", vol, &want, &format!("replica {vol} at seq {upto}"));
        let out = dir.join(format!("recovered-{vol}-{upto}.img"));
        let _ = std::fs::remove_file(&out);
        let r = recover(&config(dir), &RecoverRequest { group: "g".into(), volume: vol.into(), point: Point::Latest, out: out.clone() })
            .unwrap();
        assert_eq!(r.seq, upto);
        assert_same_image(&std::fs::read(&out).unwrap(), &want, &format!("recovery of {vol} at seq {upto}"));
    }
}

/// Ships 1..=10, then sets the fault and ships 11..=20: the target must refuse with a message
/// holding `expect`, keep 1..=10 served exactly, and after a restart with the fault cleared
/// take 11..=20 from the engine's resend.
fn fault_then_fix(rule: Rule, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::default());
    let (t, _fs) = target(dir.path(), &plan);
    let (mut engine, welcome) = FakeEngine::connect(t.local_addr(), "e1", "g", &VOLS);
    assert_eq!(welcome, Ok(0));
    let recs = Writes::new(7, &VOLS).take(20);
    engine.send_records(&recs[..10]);
    engine.wait_confirm(10);

    plan.add(rule);
    engine.send_records(&recs[10..]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains(expect), "the refusal names the cause: {msg}");
    assert!(plan.fired() > 0);
    // The group says it is stopped, and serves exactly what was durable before.
    let (_, again) = FakeEngine::connect(t.local_addr(), "e1", "g", &VOLS);
    assert!(again.unwrap_err().contains("restart"), "a stopped group refuses a new session until restarted");
    // Recovery reads the journal, never a half-applied replica: the latest point is exactly
    // the model at the last durable record.
    let last = history(&config(dir.path()), "g").unwrap().last_seq;
    for (vol, size) in VOLS {
        let out = dir.path().join(format!("while-stopped-{vol}.img"));
        let r =
            recover(&config(dir.path()), &RecoverRequest { group: "g".into(), volume: vol.into(), point: Point::Latest, out: out.clone() })
                .unwrap();
        assert_eq!(r.seq, last);
        assert_same_image(
            &std::fs::read(&out).unwrap(),
            &model_image(&recs, vol, size, |r| r.header.seq <= last),
            "recovery while stopped",
        );
    }
    t.shutdown();

    // The operator fixes the cause and restarts the target: the engine resends from the
    // target's durable point and everything arrives once.
    plan.clear();
    let (t, _fs) = target(dir.path(), &plan);
    let (mut engine, welcome) = wait_for(Duration::from_secs(10), "the restarted target", || {
        let (e, w) = FakeEngine::connect(t.local_addr(), "e1", "g", &VOLS);
        w.is_ok().then_some((e, w))
    });
    let durable = welcome.unwrap();
    assert!((10..=20).contains(&durable), "durable after the fault: {durable}");
    let from = usize::try_from(durable).unwrap();
    if from < 20 {
        engine.send_records(&recs[from..]);
        engine.wait_confirm(20);
    }
    assert_image(dir.path(), &recs, 20);
    assert_eq!(history(&config(dir.path()), "g").unwrap().last_seq, 20);
    t.shutdown();
}

#[test]
fn eio_on_journal_append_stops_the_group_until_fixed() {
    fault_then_fix(Rule::always("journal", Op::Write, Fault::Eio), "Input/output error");
}

#[test]
fn enospc_on_journal_append_says_the_disk_is_full() {
    fault_then_fix(Rule::always("journal", Op::Write, Fault::NoSpace), "No space left on device");
}

#[test]
fn failed_fdatasync_is_never_retried() {
    fault_then_fix(Rule::always("journal", Op::Sync, Fault::Eio), "fdatasync");
}

#[test]
fn failed_replica_write_stops_the_group_and_recovery_still_serves_the_journal() {
    fault_then_fix(Rule::always("replica", Op::Write, Fault::Eio), "replica");
}

#[test]
fn torn_write_then_power_loss_resumes_from_the_durable_point() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::default());
    let (t, fs) = target(dir.path(), &plan);
    let (mut engine, _) = FakeEngine::connect(t.local_addr(), "e1", "g", &VOLS);
    let recs = Writes::new(8, &VOLS).take(30);
    engine.send_records(&recs[..10]);
    engine.wait_confirm(10);
    // The next journal write tears after 100 bytes; then the power goes.
    plan.add(Rule { times: Some(1), ..Rule::always("journal", Op::Write, Fault::Torn { keep: 100 }) });
    engine.send_records(&recs[10..20]);
    let msg = engine.expect_error_and_close();
    assert!(msg.contains("Input/output error"), "{msg}");
    t.shutdown();
    fs.crash().unwrap();

    let (t, _fs) = target(dir.path(), &plan);
    let (mut engine, welcome) = wait_for(Duration::from_secs(10), "the restarted target", || {
        let (e, w) = FakeEngine::connect(t.local_addr(), "e1", "g", &VOLS);
        w.is_ok().then_some((e, w))
    });
    assert_eq!(welcome, Ok(10), "the torn tail is cut, the durable records are kept");
    assert_image(dir.path(), &recs, 10);
    engine.send_records(&recs[10..]);
    engine.wait_confirm(30);
    assert_image(dir.path(), &recs, 30);
    t.shutdown();
}
