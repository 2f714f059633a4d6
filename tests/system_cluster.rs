//! Engines as a cluster (docs/ha.md) with a real etcd (three members, or one where the test
//! does not need more): three engines share sync groups;
//! agents are sent to each group's owner; when the owner is killed another engine takes the
//! group over once its lease expires, and an engine that joins takes the groups it prefers by
//! a planned handover; no acknowledged write is lost, and a handover resyncs nothing.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 8 << 20;

/// Writes through `uri` and checks, as soon as qemu-io returns (every write acknowledged),
/// that the target already holds them: the group is sync. Returns the writes in their order.
fn write_and_check(site: &mut Site, group: &str, volume: &str, model: &mut Model, rng: &mut impl rand::Rng) -> Vec<(u64, u64, u8)> {
    let uri = site.c.uri(volume);
    let ops = write_random_to(&uri, model, rng, 12, 4);
    assert_same(&format!("{volume} at the target right after its writes were acknowledged"), &site.recovered(group, volume), &model.bytes);
    ops
}

/// Every point of the group's history (`samples` of them, at random) recovers `volume` to the
/// image after some prefix of `ops`, the writes in the order they were acknowledged: takeovers
/// leave a history whose every point is crash-consistent.
fn assert_points_are_prefixes(
    site: &mut Site,
    group: &str,
    volume: &str,
    ops: &[(u64, u64, u8)],
    samples: usize,
    rng: &mut impl rand::Rng,
) {
    use std::hash::{Hash, Hasher};
    let digest = |bytes: &[u8]| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    };
    let mut image = Model::new(SIZE);
    let mut prefixes = std::collections::HashSet::from([digest(&image.bytes)]);
    for &(off, len, byte) in ops {
        image.fill(off, len, byte);
        prefixes.insert(digest(&image.bytes));
    }
    site.c.group = group.to_owned();
    let h = site.c.history();
    let (first, last) = (h["first_seq"].as_u64().unwrap().max(1), h["last_seq"].as_u64().unwrap());
    for _ in 0..samples {
        let seq = rng.gen_range(first..=last);
        let got = site.c.recover(volume, &["--seq", &seq.to_string()]);
        assert!(prefixes.contains(&digest(&got)), "{volume} at seq {seq} is no prefix of the acknowledged writes");
    }
}

#[test]
fn a_killed_owner_is_taken_over_and_no_acknowledged_sync_write_is_lost() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE), Vol::in_group("crm", "vm2", "app", SIZE)];
    // Three etcd members: one of them is lost too, and the cluster goes on with two.
    let mut site = Site::start(&vols, 3, &ENGINES);
    let (erp_owner, erp_token) = site.owner("erp", Duration::from_secs(20));
    let (crm_owner, _) = site.owner("crm", Duration::from_secs(20));
    eprintln!("erp owned by {erp_owner} (token {erp_token}), crm by {crm_owner}");
    site.c.start_agents();
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    let mut db_ops = write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
    write_and_check(&mut site, "crm", "app", &mut app, &mut rng);

    for round in 0..2 {
        if round == 1 {
            site.etcd.kill_member(0);
        }
        // kill -9 the owner of erp while its agent writes.
        let (victim, old_token) = site.owner("erp", Duration::from_secs(20));
        let killed = site.engines.remove(victim.as_str()).expect("the owner runs");
        drop(killed);
        let t0 = Instant::now();
        db_ops.extend(write_and_check(&mut site, "erp", "db", &mut db, &mut rng));
        let took = t0.elapsed();
        let (owner, token) = site.owner("erp", Duration::from_secs(20));
        eprintln!(
            "round {round}: {victim} killed; {owner} took erp over (token {old_token} -> {token}); the agent's writes waited {took:.1?}"
        );
        assert_ne!(owner, victim);
        assert!(token > old_token, "a later ownership has a larger token");
        assert!(took < Duration::from_secs(15), "writes waited {took:?} for the takeover");
        let status = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(site.c.path(&format!("{owner}.toml"))));
        for want in [
            format!("cluster default: this engine is {owner}, lease valid"),
            format!("group erp: owned by {owner} (token {token}); since "),
            format!("from {victim}: engine {victim} no longer held it (its lease ended)"),
            // A new owner starts in sync: no write of the group is acknowledged before the
            // target holds it.
            "group erp: mode sync\n".to_string(),
        ] {
            assert!(status.contains(&want), "{want:?} not in:\n{status}");
        }
        // The other group goes on wherever it is.
        write_and_check(&mut site, "crm", "app", &mut app, &mut rng);
        // The killed engine comes back and joins again; it owns nothing it did not claim.
        let name = ENGINES.iter().find(|e| **e == victim).unwrap();
        site.start_engine(name);
    }
    assert!(site.c.log("target").contains("owns the group from token"));
    site.assert_never_degraded();
    assert_points_are_prefixes(&mut site, "erp", "db", &db_ops, 12, &mut rng);
    let _ = site.etcd.dir();
}

/// Two group names that prefer an engine other than engine-a among the three.
fn groups_away_from_the_first_engine() -> [String; 2] {
    let names: Vec<String> = (0..50).map(|i| format!("g{i}")).filter(|g| preferred_engine(g) != "engine-a").take(2).collect();
    [names[0].clone(), names[1].clone()]
}

#[test]
fn an_engine_that_joins_takes_its_groups_over_by_a_planned_handover() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let [g1, g2] = groups_away_from_the_first_engine();
    let vols = [Vol::in_group(&g1, "vm1", "db", SIZE), Vol::in_group(&g2, "vm2", "app", SIZE)];
    let mut site = Site::start(&vols, 1, &ENGINES[..1]);
    assert_eq!(site.owner(&g1, Duration::from_secs(20)).0, "engine-a", "alone, the first engine owns every group");
    assert_eq!(site.owner(&g2, Duration::from_secs(20)).0, "engine-a");
    site.c.start_agents();
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    write_and_check(&mut site, &g1, "db", &mut db, &mut rng);
    write_and_check(&mut site, &g2, "app", &mut app, &mut rng);

    // The other two join: each group moves to the engine it prefers, while its agent writes.
    site.start_engine(ENGINES[1]);
    site.start_engine(ENGINES[2]);
    let (mut longest, mut batches) = (Duration::ZERO, 0);
    let started = Instant::now();
    loop {
        let t = Instant::now();
        write_and_check(&mut site, &g1, "db", &mut db, &mut rng);
        write_and_check(&mut site, &g2, "app", &mut app, &mut rng);
        longest = longest.max(t.elapsed());
        batches += 1;
        let moved = [&g1, &g2].iter().all(|g| site.owner(g, Duration::from_secs(20)).0 == preferred_engine(g));
        if moved && batches >= 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the groups never moved to the engines they prefer");
    }
    eprintln!("handover: {batches} write batches, the longest (two groups, 12 writes each) took {longest:.1?}");
    for g in [&g1, &g2] {
        let why = site.etcd.get_json(&format!("/hindsight/default/changes/{g}")).unwrap();
        assert!(why["why"].as_str().unwrap().starts_with("handed over"), "{why}");
        let status = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(site.c.path("engine-a.toml")));
        assert!(status.contains(&format!("group {g}: owned by another engine")), "{status}");
        assert!(status.contains("from engine-a: handed over: engine "), "{status}");
        assert_eq!(resync_bytes(&site.c.path("target"), g), 0, "a planned handover resyncs nothing");
    }
    assert!(longest < Duration::from_secs(10), "writes paused {longest:?} for a handover");
    site.assert_never_degraded();
}

/// The owner of erp is lost by `lose` while its agent writes (agents take a silent engine as
/// hung after 3 s; leases last 2 s); another engine takes the group over, and every write
/// acknowledged meanwhile is at the target. Then `restore` brings the old owner back: it gives
/// the group up and neither ships nor takes an agent; the target keeps the new owner's token,
/// and every point of history is a prefix of the acknowledged writes.
fn lost_owner_comes_back(proxied: bool, what: &str, lose: impl Fn(&Site, &str), restore: impl Fn(&Site, &str)) {
    let mut rng = seeded_rng();
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE)];
    let mut site = Site::start_with(&vols, &ENGINES, &Options { engine_timeout: "3s".into(), proxied, ..Options::default() });
    site.c.start_agents();
    let mut db = Model::new(SIZE);
    let mut ops = write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
    let (victim, old_token) = site.owner("erp", Duration::from_secs(20));
    lose(&site, &victim);
    let t0 = Instant::now();
    // Sent to the lost engine first: the agent sees it hung and goes to the new owner.
    ops.extend(write_and_check(&mut site, "erp", "db", &mut db, &mut rng));
    let took = t0.elapsed();
    let (owner, token) = site.owner("erp", Duration::from_secs(20));
    eprintln!("{victim} {what}; {owner} took erp over (token {old_token} -> {token}); the writes waited {took:.1?}");
    assert!(owner != victim && token > old_token);
    let before = site.c.log(&victim).len();
    restore(&site, &victim);
    site.c.wait_log_within(&victim, "every group it owned is given up", Duration::from_secs(20));
    // What it still had (writes read from its socket once back) is refused.
    std::thread::sleep(Duration::from_secs(2));
    let after = &site.c.log(&victim)[before..];
    let shipped = after.lines().any(|l| l.contains("shipping to") && l.contains(" from seq "));
    assert!(!shipped, "the old owner shipped again once back:\n{after}");
    assert!(!after.contains("attached volumes"), "the old owner took an agent once back:\n{after}");
    let meta = std::fs::read_to_string(site.c.path("target/groups/erp/group.toml")).unwrap();
    assert!(meta.contains(&format!("owner = {token}")), "{meta}");
    ops.extend(write_and_check(&mut site, "erp", "db", &mut db, &mut rng));
    assert_points_are_prefixes(&mut site, "erp", "db", &ops, 8, &mut rng);
}

#[test]
fn a_stopped_owner_is_taken_over_and_once_resumed_gets_no_record_in_and_no_write_acknowledged() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let pid = |site: &Site, name: &str| site.engines[name].0.id();
    lost_owner_comes_back(false, "stopped", |site, name| signal(pid(site, name), "STOP"), |site, name| signal(pid(site, name), "CONT"));
}

#[test]
fn an_owner_cut_off_from_etcd_agents_and_target_is_taken_over_and_when_the_link_returns_gets_nothing_in() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    // Every link of the owner through a stalled proxy: nothing passes, the connections stay
    // open, the process runs on. (The old owner degrades its group when the target closes its
    // connection during the cut: by then it can acknowledge nothing anyway.)
    lost_owner_comes_back(true, "cut off", |site, name| site.cut_off(name), |site, name| site.rejoin(name));
}

/// The engines' claims so far, as their logs say them.
fn claims(site: &Site) -> usize {
    ENGINES.iter().map(|e| site.c.log(e).matches(": claimed by engine ").count()).sum()
}

#[test]
fn etcd_down_moves_no_group_and_corrupts_none() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE)];
    let mut site = Site::start_with(&vols, &ENGINES, &Options { engine_timeout: "3s".into(), ..Options::default() });
    site.c.start_agents();
    let mut db = Model::new(SIZE);
    write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
    let (owner, token) = site.owner("erp", Duration::from_secs(20));
    let claimed = claims(&site);

    site.etcd.kill_all();
    // The owner stops acknowledging once its lease is not renewed (0.8 of the 2 s TTL); the
    // agent keeps the guest running and tracks what the engine does not take.
    std::thread::sleep(Duration::from_secs(2));
    write_random_to(&site.c.uri("db"), &mut db, &mut rng, 12, 4);
    let status = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(site.c.path(&format!("{owner}.toml"))));
    assert!(status.contains("LEASE NOT VALID") && status.contains("etcd: etcd cannot be reached"), "{status}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(claims(&site), claimed, "no group changes owner while etcd is down");

    site.etcd.restart_all();
    // Protection comes back: the tracked regions are resynced and the target ends equal to
    // the disk, under one owner whose token the target holds.
    wait_target_holds(&mut site, &db.bytes, Duration::from_secs(60), "the target never caught up after etcd came back");
    let (owner_after, token_after) = site.owner("erp", Duration::from_secs(20));
    eprintln!("etcd down and back: erp owned by {owner} (token {token}), then by {owner_after} (token {token_after})");
    assert!(token_after >= token);
    let meta = std::fs::read_to_string(site.c.path("target/groups/erp/group.toml")).unwrap();
    assert!(meta.contains(&format!("owner = {token_after}")), "{meta}");
    write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
}

#[test]
fn groups_that_share_a_vm_are_owned_by_one_engine_and_its_agent_writes_to_both() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    // Find two groups that would prefer different engines on their own: sharing vm1 keeps
    // them together.
    let names: Vec<String> = (0..50).map(|i| format!("g{i}")).collect();
    let first = &names[0];
    let second = names.iter().find(|g| preferred_engine(g) != preferred_engine(first)).unwrap();
    let vols = [Vol::in_group(first, "vm1", "db", SIZE), Vol::in_group(second, "vm1", "logs", SIZE)];
    let mut site = Site::start(&vols, 1, &ENGINES);
    let (a, _) = site.owner(first, Duration::from_secs(20));
    let (b, _) = site.owner(second, Duration::from_secs(20));
    assert_eq!(a, b, "groups sharing a VM have one owner");
    site.c.start_agents();
    let (mut db, mut logs) = (Model::new(SIZE), Model::new(SIZE));
    write_and_check(&mut site, first, "db", &mut db, &mut rng);
    write_and_check(&mut site, second, "logs", &mut logs, &mut rng);
}

#[test]
fn an_engine_with_other_group_definitions_is_named_in_status() {
    if !have_tools(&["etcd", "etcdctl"]) {
        return;
    }
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE)];
    let mut site = Site::start(&vols, 1, &ENGINES[..2]);
    let toml = site.c.path("engine-c.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace("mode = \"sync\"", "mode = \"cdp\"");
    std::fs::write(&toml, text).unwrap();
    site.start_engine(ENGINES[2]);
    site.c.wait_log_within("engine-a", "engine(s) engine-c have other [[group]] tables", Duration::from_secs(10));
    let status = run_ok(Command::new(hindsight_bin()).args(["status", "--config"]).arg(site.c.path("engine-a.toml")));
    assert!(status.contains("OTHER GROUP DEFINITIONS at engine(s) engine-c"), "{status}");
}

#[test]
fn a_cdp_owner_killed_with_writes_the_target_lacks_is_taken_over_and_the_agent_resyncs_them() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE)];
    let mut site = Site::start_with(&vols, &ENGINES, &Options { mode: "cdp".into(), ..Options::default() });
    site.c.start_agents();
    let mut db = Model::new(SIZE);
    write_random_to(&site.c.uri("db"), &mut db, &mut rng, 12, 4);
    site.c.group = "erp".into();
    let before = site.c.settle();
    let (victim, _) = site.owner("erp", Duration::from_secs(20));
    {
        // The target hangs: the owner acknowledges cdp writes it cannot ship, then dies.
        let _hung = site.c.pause("target");
        write_random_to(&site.c.uri("db"), &mut db, &mut rng, 12, 4);
        drop(site.engines.remove(victim.as_str()));
    }
    // The new owner continues after what the target holds; the agent resyncs every region it
    // still has marked, and the target ends with every acknowledged write.
    wait_target_holds(&mut site, &db.bytes, Duration::from_secs(60), "the writes the dead owner acknowledged never reached the target");
    let (owner, _) = site.owner("erp", Duration::from_secs(20));
    assert_ne!(owner, victim);
    assert!(site.c.log(&owner).contains("every volume's writes go as resync data"), "{}", site.c.log(&owner));
    assert!(site.c.log("agent-vm1").contains("its group was taken over by another engine"));
    let h = site.c.history();
    assert!(h["last_consistent_seq"].as_u64().unwrap() > before, "{h}");
    write_and_check_cdp(&mut site, &mut db, &mut rng);
}

/// Waits until the target's latest image of erp/db is `want`.
fn wait_target_holds(site: &mut Site, want: &[u8], within: Duration, what: &str) {
    let start = Instant::now();
    while site.recovered("erp", "db") != want {
        assert!(start.elapsed() < within, "{what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// More writes after the takeover reach the target (cdp: once it settles).
fn write_and_check_cdp(site: &mut Site, db: &mut Model, rng: &mut impl rand::Rng) {
    write_random_to(&site.c.uri("db"), db, rng, 12, 4);
    wait_target_holds(site, &db.bytes, Duration::from_secs(30), "writes after the takeover never reached the target");
}
