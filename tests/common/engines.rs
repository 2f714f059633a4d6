//! Three clustered engines (docs/ha.md) beside one target, the agents and a real etcd, for the
//! engine-cluster tests and benchmarks: every engine has the same groups, its own port, data
//! directory and `[cluster]` name; agents list every engine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use super::cluster::{Cluster, Vol};
use super::etcd::Etcd;
use super::failover::Running;
use super::process::{free_port, hindsight_bin, wait_tcp};
use super::wan::WanProxy;

pub const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
/// Short, so that a takeover in a test comes within seconds.
pub const LEASE_TTL: &str = "2s";

/// The target, three clustered engines, the agents and etcd.
/// How a [`Site`] is set up.
pub struct Options {
    /// etcd members: 1 or 3.
    pub etcd_members: usize,
    /// The agents' `engine_timeout` (after which a silent engine is taken as hung).
    pub engine_timeout: String,
    /// The engines' `lease_ttl`.
    pub lease_ttl: String,
    /// The groups' mode.
    pub mode: String,
    /// Every link of each engine through a proxy ([`Site::cut_off`]); one etcd member.
    pub proxied: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { etcd_members: 1, engine_timeout: "20s".into(), lease_ttl: LEASE_TTL.into(), mode: "sync".into(), proxied: false }
    }
}

pub struct Site {
    pub c: Cluster,
    pub etcd: Etcd,
    pub ports: BTreeMap<&'static str, u16>,
    pub engines: BTreeMap<&'static str, Running>,
    /// With `Options::proxied`: each engine's links (to etcd, to the target, from the
    /// agents) through proxies that can be stalled as a cut link.
    pub links: BTreeMap<&'static str, [WanProxy; 3]>,
}

impl Site {
    /// Starts the target, etcd (`etcd_members`) and the engines named in `running` (all three
    /// are configured), sync groups, a 2 s lease; agents wait 20 s for the takeover (instead
    /// of tracking writes at once).
    pub fn start(vols: &[Vol], etcd_members: usize, running: &[&'static str]) -> Site {
        Self::start_with(vols, running, &Options { etcd_members, ..Options::default() })
    }

    /// Like `start`, with `options`.
    pub fn start_with(vols: &[Vol], running: &[&'static str], options: &Options) -> Site {
        let Options { etcd_members, engine_timeout, lease_ttl, mode, proxied } = options;
        let (etcd_members, proxied) = (*etcd_members, *proxied);
        let mut c = Cluster::prepare(vols, "", "");
        c.group_extra = format!("mode = \"{mode}\"\n");
        c.agent_extra = format!("engine_timeout = \"{engine_timeout}\"\n");
        c.write_configs();
        c.start_target();
        let etcd = Etcd::start(c.dir.path(), etcd_members);
        let ports: BTreeMap<&'static str, u16> = ENGINES.iter().map(|e| (*e, free_port())).collect();
        let base = std::fs::read_to_string(c.engine_toml()).unwrap();
        let mut links = BTreeMap::new();
        if proxied {
            let etcd_addr: SocketAddr = etcd.endpoints()[0].trim_start_matches("http://").parse().unwrap();
            let target: SocketAddr = format!("127.0.0.1:{}", c.tport).parse().unwrap();
            for (name, port) in &ports {
                let agents: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                links.insert(*name, [WanProxy::start(etcd_addr), WanProxy::start(target), WanProxy::start(agents)]);
            }
        }
        // Where each engine reaches etcd and the target, and where agents reach it.
        let reach = |name: &str, port: u16| match links.get(name) {
            Some([e, t, a]) => (vec![format!("\"http://127.0.0.1:{}\"", e.port())], t.port(), a.port()),
            None => (etcd.endpoints().iter().map(|e| format!("{e:?}")).collect(), c.tport, port),
        };
        for (name, port) in &ports {
            let (endpoints, tport, advertise) = reach(name, *port);
            let text = base
                .replace(&format!("listen = \"127.0.0.1:{}\"", c.eport), &format!("listen = \"127.0.0.1:{port}\""))
                .replace(&format!("target = \"127.0.0.1:{}\"", c.tport), &format!("target = \"127.0.0.1:{tport}\""))
                .replace(&c.path("engine").display().to_string(), &c.path(name).display().to_string())
                + &format!(
                    "\n[cluster]\nendpoints = [{}]\nname = \"{name}\"\nadvertise = \"127.0.0.1:{advertise}\"\nlease_ttl = \"{lease_ttl}\"\n",
                    endpoints.join(", ")
                );
            std::fs::write(c.path(&format!("{name}.toml")), text).unwrap();
        }
        let list: Vec<String> = ports.iter().map(|(name, p)| format!("\"127.0.0.1:{}\"", reach(name, *p).2)).collect();
        let mut vms: Vec<&str> = vols.iter().map(|v| v.vm.as_str()).collect();
        vms.dedup();
        for vm in vms {
            let path = c.agent_toml(vm);
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace(&format!("engine = \"127.0.0.1:{}\"", c.eport), &format!("engines = [{}]", list.join(", ")));
            std::fs::write(path, text).unwrap();
        }
        let mut site = Site { c, etcd, ports, engines: BTreeMap::new(), links };
        for name in running {
            site.start_engine(name);
        }
        site
    }

    /// Cuts every link of engine `name` as a partition does: each proxy holds what is in
    /// flight and passes nothing, the connections stay open; `rejoin` ends it.
    pub fn cut_off(&self, name: &str) {
        for p in &self.links[name] {
            p.stall(true);
        }
    }

    /// Ends a partition made by `cut_off`.
    pub fn rejoin(&self, name: &str) {
        for p in &self.links[name] {
            p.stall(false);
        }
    }

    pub fn start_engine(&mut self, name: &'static str) {
        let run =
            self.c.run_logged(name, Command::new(hindsight_bin()).arg("engine").arg("--config").arg(self.c.path(&format!("{name}.toml"))));
        self.engines.insert(name, run);
        wait_tcp(self.ports[name], name);
    }

    /// The owner of `group` and its token, once it has one that takes writes.
    pub fn owner(&self, group: &str, within: Duration) -> (String, u64) {
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

    /// No engine's sync group degraded: none lost its target, and giving a group up (or
    /// taking it) is no loss of the target.
    pub fn assert_never_degraded(&self) {
        for name in ENGINES {
            let log = self.c.log(name);
            assert!(!log.contains("degraded to cdp"), "{name} degraded a group:\n{log}");
        }
    }

    /// What the target recovers of `volume` (of `group`) at its latest point.
    pub fn recovered(&mut self, group: &str, volume: &str) -> Vec<u8> {
        self.c.group = group.to_owned();
        self.c.recover(volume, &["--latest"])
    }
}

/// The engine `group` prefers among the three (docs/ha.md, "Which engine owns what").
pub fn preferred_engine(group: &str) -> &'static str {
    hindsight_engine::cluster::assign::preferred(group, ENGINES).expect("three engines")
}
