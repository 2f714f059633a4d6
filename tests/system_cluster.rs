//! Engines as a cluster (docs/ha.md) with a real etcd: three engines share two sync groups;
//! agents are sent to each group's owner; when the owner is killed another engine takes the
//! group over once its lease expires, and no acknowledged write is lost.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 8 << 20;
const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
/// Short, so that a takeover comes within seconds.
const LEASE_TTL: &str = "2s";

/// The target, three clustered engines, the agents and etcd.
struct Site {
    c: Cluster,
    etcd: Etcd,
    ports: BTreeMap<&'static str, u16>,
    engines: BTreeMap<&'static str, Running>,
}

impl Site {
    fn start(vols: &[Vol], etcd_members: usize) -> Site {
        let mut c = Cluster::prepare(vols, "", "");
        c.group_extra = "mode = \"sync\"\n".into();
        // Writes wait for the takeover instead of being tracked at once.
        c.agent_extra = "engine_timeout = \"20s\"\n".into();
        c.write_configs();
        c.start_target();
        let etcd = Etcd::start(c.dir.path(), etcd_members);
        let ports: BTreeMap<&'static str, u16> = ENGINES.iter().map(|e| (*e, free_port())).collect();
        let base = std::fs::read_to_string(c.engine_toml()).unwrap();
        let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
        for (name, port) in &ports {
            let text = base
                .replace(&format!("listen = \"127.0.0.1:{}\"", c.eport), &format!("listen = \"127.0.0.1:{port}\""))
                .replace(&c.path("engine").display().to_string(), &c.path(name).display().to_string())
                + &format!(
                    "\n[cluster]\nendpoints = [{}]\nname = \"{name}\"\nadvertise = \"127.0.0.1:{port}\"\nlease_ttl = \"{LEASE_TTL}\"\n",
                    endpoints.join(", ")
                );
            std::fs::write(c.path(&format!("{name}.toml")), text).unwrap();
        }
        let list: Vec<String> = ports.values().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let mut vms: Vec<&str> = vols.iter().map(|v| v.vm.as_str()).collect();
        vms.dedup();
        for vm in vms {
            let path = c.agent_toml(vm);
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace(&format!("engine = \"127.0.0.1:{}\"", c.eport), &format!("engines = [{}]", list.join(", ")));
            std::fs::write(path, text).unwrap();
        }
        let mut site = Site { c, etcd, ports, engines: BTreeMap::new() };
        for name in ENGINES {
            site.start_engine(name);
        }
        site
    }

    fn start_engine(&mut self, name: &'static str) {
        let run =
            self.c.run_logged(name, Command::new(hindsight_bin()).arg("engine").arg("--config").arg(self.c.path(&format!("{name}.toml"))));
        self.engines.insert(name, run);
        wait_tcp(self.ports[name], name);
    }

    /// The owner of `group` and its token, once it has one that takes writes.
    fn owner(&self, group: &str, within: Duration) -> (String, u64) {
        let key = format!("/hindsight/default/owners/{group}");
        let start = Instant::now();
        loop {
            if let (Some(v), Some(token)) = (self.etcd.get_json(&key), self.etcd.create_revision(&key)) {
                let engine = v["engine"].as_str().unwrap().to_owned();
                if self.c.log(&engine).contains(&format!("group {group}: owned by this engine (token {token})")) {
                    return (engine, token);
                }
            }
            assert!(
                start.elapsed() < within,
                "group {group} has no owner taking writes after {within:?}; logs in {}",
                self.c.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the target recovers of `volume` (of `group`) at its latest point.
    fn recovered(&mut self, group: &str, volume: &str) -> Vec<u8> {
        self.c.group = group.to_owned();
        self.c.recover(volume, &["--latest"])
    }
}

/// Writes through `uri` and checks, as soon as qemu-io returns (every write acknowledged),
/// that the target already holds them: the group is sync.
fn write_and_check(site: &mut Site, group: &str, volume: &str, model: &mut Model, rng: &mut impl rand::Rng) {
    let uri = site.c.uri(volume);
    write_random_to(&uri, model, rng, 12, 4);
    assert_same(&format!("{volume} at the target right after its writes were acknowledged"), &site.recovered(group, volume), &model.bytes);
}

#[test]
fn a_killed_owner_is_taken_over_and_no_acknowledged_sync_write_is_lost() {
    if !have_tools(&["etcd", "etcdctl", "qemu-io"]) {
        return;
    }
    let mut rng = seeded_rng();
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE), Vol::in_group("crm", "vm2", "app", SIZE)];
    let mut site = Site::start(&vols, 1);
    let (erp_owner, erp_token) = site.owner("erp", Duration::from_secs(20));
    let (crm_owner, _) = site.owner("crm", Duration::from_secs(20));
    eprintln!("erp owned by {erp_owner} (token {erp_token}), crm by {crm_owner}");
    site.c.start_agents();
    let (mut db, mut app) = (Model::new(SIZE), Model::new(SIZE));
    write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
    write_and_check(&mut site, "crm", "app", &mut app, &mut rng);

    for round in 0..2 {
        // kill -9 the owner of erp while its agent writes.
        let (victim, old_token) = site.owner("erp", Duration::from_secs(20));
        let killed = site.engines.remove(victim.as_str()).expect("the owner runs");
        drop(killed);
        let t0 = Instant::now();
        write_and_check(&mut site, "erp", "db", &mut db, &mut rng);
        let took = t0.elapsed();
        let (owner, token) = site.owner("erp", Duration::from_secs(20));
        eprintln!(
            "round {round}: {victim} killed; {owner} took erp over (token {old_token} -> {token}); the agent's writes waited {took:.1?}"
        );
        assert_ne!(owner, victim);
        assert!(token > old_token, "a later ownership has a larger token");
        assert!(took < Duration::from_secs(15), "writes waited {took:?} for the takeover");
        // The other group goes on wherever it is.
        write_and_check(&mut site, "crm", "app", &mut app, &mut rng);
        // The killed engine comes back and joins again; it owns nothing it did not claim.
        let name = ENGINES.iter().find(|e| **e == victim).unwrap();
        site.start_engine(name);
    }
    assert!(site.c.log("target").contains("owns the group now") || site.c.log("target").contains("owns the group from token"));
    let _ = site.etcd.dir();
}
