//! The test cluster: target, engine and agents of one group on 127.0.0.1, their configs,
//! certificates and processes, killed by PID when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::kill;
use super::*;

/// Runs `hindsight certs` with these arguments; panics if it fails.
pub fn certs(args: &[&str], dir: &Path) -> String {
    run_ok(Command::new(hindsight_bin()).arg("certs").args(args).arg("--dir").arg(dir))
}

/// The `[tls]` section for the certificate of `role` `name` issued in `pki` by `hindsight
/// certs issue` (its default file names).
pub fn tls_section(pki: &Path, role: &str, name: &str) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.join("ca.pem").display(),
        pki.join(format!("{role}-{name}.pem")).display(),
        pki.join(format!("{role}-{name}-key.pem")).display()
    )
}

/// The engine's and the target's names in the test cluster's certificates.
pub const ENGINE_NAME: &str = "primary";
pub const TARGET_NAME: &str = "dr";

/// A volume of the test cluster.
#[derive(Clone, Debug)]
pub struct Vol {
    pub vm: String,
    pub name: String,
    pub size: u64,
    /// Its consistency group, when not the cluster's own (`Cluster::group`).
    pub group: Option<String>,
}

impl Vol {
    pub fn new(vm: &str, name: &str, size: u64) -> Vol {
        Vol { vm: vm.into(), name: name.into(), size, group: None }
    }

    /// A volume of group `group` (a cluster may hold many groups).
    pub fn in_group(group: &str, vm: &str, name: &str, size: u64) -> Vol {
        Vol { group: Some(group.into()), ..Vol::new(vm, name, size) }
    }
}

/// Target, engine and agents of one group, "erp", on 127.0.0.1.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub group: String,
    pub vols: Vec<Vol>,
    pub tport: u16,
    pub eport: u16,
    target: Option<Child>,
    engine: Option<Child>,
    agents: BTreeMap<String, Child>,
    pub target_extra: String,
    /// Extra lines for the target's [tls] section (e.g. `engines = [...]`).
    pub target_tls_extra: String,
    /// Extra lines for the group's section of engine.toml (e.g. `mode = "sync"`).
    pub group_extra: String,
    /// The port the engine ships to, when not the target's own (a WAN proxy in between).
    pub ship_port: Option<u16>,
    /// Extra lines for the [engine] section.
    pub engine_extra: String,
    /// Extra lines for every [agent] section.
    pub agent_extra: String,
    /// Extra lines for every [[disk]] section.
    pub disk_extra: String,
    /// Every link in plaintext (`insecure_plaintext`, loopback) instead of TLS, for the
    /// benchmark that measures what TLS costs.
    pub plaintext: bool,
}

impl Cluster {
    /// Starts everything and waits until every agent serves its volumes.
    pub fn start(vols: &[Vol]) -> Cluster {
        Self::start_with(vols, "")
    }

    /// Like `start`, with extra lines for the [target] section.
    pub fn start_with(vols: &[Vol], target_extra: &str) -> Cluster {
        let mut c = Self::start_servers_with(vols, target_extra);
        let vms: Vec<String> = {
            let mut v: Vec<String> = vols.iter().map(|v| v.vm.clone()).collect();
            v.dedup();
            v
        };
        for vm in vms {
            c.start_agent(&vm);
        }
        c
    }

    /// Writes the configs and the disk files and starts the target and the engine, but no
    /// agent (start them with `start_agent`, or run `agent_bin()` on `agent_toml(vm)`).
    pub fn start_servers(vols: &[Vol]) -> Cluster {
        Self::start_servers_with(vols, "")
    }

    fn start_servers_with(vols: &[Vol], target_extra: &str) -> Cluster {
        Self::start_servers_tls(vols, target_extra, "")
    }

    /// Like `start_servers`, with extra lines for the [target] and the target's [tls] section.
    pub fn start_servers_tls(vols: &[Vol], target_extra: &str, target_tls_extra: &str) -> Cluster {
        let mut c = Self::prepare(vols, target_extra, target_tls_extra);
        c.start_target();
        c.start_engine();
        c
    }

    /// Writes the certificates, the configs and the disk files; starts nothing. Set
    /// `group_extra`, `engine_extra` or `ship_port` then, and `launch`.
    pub fn prepare(vols: &[Vol], target_extra: &str, target_tls_extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster {
            dir,
            group: "erp".into(),
            vols: vols.to_vec(),
            tport: free_port(),
            eport: free_port(),
            target: None,
            engine: None,
            agents: BTreeMap::new(),
            target_extra: target_extra.into(),
            target_tls_extra: target_tls_extra.into(),
            group_extra: String::new(),
            ship_port: None,
            engine_extra: String::new(),
            agent_extra: String::new(),
            disk_extra: String::new(),
            plaintext: false,
        };
        for v in vols {
            let f = std::fs::File::create(c.disk(&v.name)).unwrap();
            f.set_len(v.size).unwrap();
        }
        c.make_certs();
        c.write_configs();
        c
    }

    /// Writes the configs again (with `group_extra`, `engine_extra`, `ship_port`) and starts
    /// the target and the engine.
    pub fn launch(&mut self) {
        self.write_configs();
        self.start_target();
        self.start_engine();
    }

    /// Starts one agent per VM.
    pub fn start_agents(&mut self) {
        let mut vms: Vec<String> = self.vols.iter().map(|v| v.vm.clone()).collect();
        vms.dedup();
        for vm in vms {
            self.start_agent(&vm);
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA and the certificates (`hindsight certs`).
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// Issues a certificate in the cluster's CA (`["--role", "agent", "--name", "vm1"]`, ...).
    pub fn issue(&self, args: &[&str]) -> String {
        let mut all = vec!["issue"];
        all.extend_from_slice(args);
        certs(&all, &self.pki())
    }

    /// The [tls] section of a certificate issued in the cluster's CA.
    pub fn tls_section(&self, role: &str, name: &str) -> String {
        if self.plaintext {
            return "[tls]\ninsecure_plaintext = true\n".to_string();
        }
        tls_section(&self.pki(), role, name)
    }

    /// A CA, the engine's and the target's certificates (for 127.0.0.1), one per VM.
    fn make_certs(&self) {
        certs(&["init"], &self.pki());
        self.issue(&["--role", "engine", "--name", ENGINE_NAME, "--host", "127.0.0.1"]);
        self.issue(&["--role", "target", "--name", TARGET_NAME, "--host", "127.0.0.1"]);
        let mut vms: Vec<&str> = self.vols.iter().map(|v| v.vm.as_str()).collect();
        vms.sort_unstable();
        vms.dedup();
        for vm in vms {
            self.issue(&["--role", "agent", "--name", vm]);
        }
    }

    /// The agent's local disk of a volume.
    pub fn disk(&self, volume: &str) -> PathBuf {
        self.path(&format!("{volume}.disk"))
    }

    pub fn sock(&self, volume: &str) -> PathBuf {
        self.path(&format!("{volume}.sock"))
    }

    /// NBD URI of a volume's export.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.sock(volume).display())
    }

    pub fn target_toml(&self) -> PathBuf {
        self.path("target.toml")
    }

    pub fn engine_toml(&self) -> PathBuf {
        self.path("engine.toml")
    }

    /// The agent configuration of a VM.
    pub fn agent_toml(&self, vm: &str) -> PathBuf {
        self.path(&format!("agent-{vm}.toml"))
    }

    /// The group a volume is in.
    pub fn group_of<'a>(&'a self, v: &'a Vol) -> &'a str {
        v.group.as_deref().unwrap_or(&self.group)
    }

    /// Every group, in the order their first volume is named.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for v in &self.vols {
            let g = self.group_of(v);
            if !groups.iter().any(|x| x == g) {
                groups.push(g.to_owned());
            }
        }
        groups
    }

    pub fn write_configs(&self) {
        let d = self.dir.path();
        std::fs::write(
            self.target_toml(),
            format!(
                "[target]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n{}\n\n{}{}\n",
                self.tport,
                d.join("target").display(),
                self.target_extra,
                self.tls_section("target", TARGET_NAME),
                self.target_tls_extra
            ),
        )
        .unwrap();
        let mode = if self.group_extra.contains("mode =") { String::new() } else { "mode = \"cdp\"\n".to_string() };
        let mut e = format!(
            "[engine]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n{}\n\n{}\n",
            self.eport,
            d.join("engine").display(),
            self.engine_extra,
            self.tls_section("engine", ENGINE_NAME),
        );
        for group in self.groups() {
            e += &format!(
                "\n[[group]]\nname = \"{group}\"\n{mode}target = \"127.0.0.1:{}\"\n{}\n",
                self.ship_port.unwrap_or(self.tport),
                self.group_extra
            );
            for v in self.vols.iter().filter(|v| self.group_of(v) == group) {
                e += &format!("\n[[group.volume]]\nname = \"{}\"\nvm = \"{}\"\nsize = \"{}\"\n", v.name, v.vm, v.size);
            }
        }
        std::fs::write(self.path("engine.toml"), e).unwrap();
        let mut vms: Vec<&str> = self.vols.iter().map(|v| v.vm.as_str()).collect();
        vms.dedup();
        for vm in vms {
            let mut a = format!(
                "[agent]\nengine = \"127.0.0.1:{}\"\nvm = \"{vm}\"\n{}\n\n{}",
                self.eport,
                self.agent_extra,
                self.tls_section("agent", vm)
            );
            for v in self.vols.iter().filter(|v| v.vm == vm) {
                a += &format!(
                    "\n[[disk]]\ngroup = \"{}\"\nvolume = \"{}\"\npath = \"{}\"\nlisten = \"unix:{}\"\n{}\n",
                    self.group_of(v),
                    v.name,
                    self.disk(&v.name).display(),
                    self.sock(&v.name).display(),
                    self.disk_extra
                );
            }
            std::fs::write(self.path(&format!("agent-{vm}.toml")), a).unwrap();
        }
    }

    fn spawn(&self, name: &str, cmd: &mut Command) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).env("RUST_LOG", "info").spawn().unwrap()
    }

    pub fn start_target(&mut self) {
        let child = self.spawn("target", Command::new(hindsight_bin()).arg("target").arg("--config").arg(self.target_toml()));
        self.target = Some(child);
        wait_tcp(self.tport, "target");
    }

    pub fn start_engine(&mut self) {
        let child = self.spawn("engine", Command::new(hindsight_bin()).arg("engine").arg("--config").arg(self.path("engine.toml")));
        self.engine = Some(child);
        wait_tcp(self.eport, "engine");
    }

    pub fn start_agent(&mut self, vm: &str) {
        for v in self.vols.iter().filter(|v| v.vm == vm) {
            let _ = std::fs::remove_file(self.sock(&v.name));
        }
        let child =
            self.spawn(&format!("agent-{vm}"), Command::new(agent_bin()).arg("--config").arg(self.path(&format!("agent-{vm}.toml"))));
        self.agents.insert(vm.to_owned(), child);
        for v in self.vols.iter().filter(|v| v.vm == vm) {
            let start = Instant::now();
            while !self.sock(&v.name).exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "agent {vm} does not serve {} after 30 s; its log:\n{}",
                    v.name,
                    self.log(&format!("agent-{vm}"))
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// kill -9 the target.
    pub fn kill_target(&mut self) {
        kill(self.target.take());
    }

    /// The process id of the running "engine" or "target".
    pub fn pid(&self, which: &str) -> Option<u32> {
        match which {
            "engine" => self.engine.as_ref().map(Child::id),
            "target" => self.target.as_ref().map(Child::id),
            _ => None,
        }
    }

    /// Freezes the running "engine" or "target" with SIGSTOP, as a hung process or host looks
    /// to its peers (its sockets stay open, nothing answers); it goes on when the guard is
    /// dropped or resumed. The guard borrows the cluster, so that it resumes the process before
    /// the cluster kills it.
    pub fn pause(&self, which: &str) -> Paused<'_> {
        let pid = self.pid(which).unwrap_or_else(|| panic!("the {which} is not running"));
        signal(pid, "STOP");
        Paused { pid, _cluster: self }
    }

    /// Stops the running "engine" or "target" with SIGTERM, as a service manager does, and
    /// returns how it exited (within 10 s, or the test fails).
    pub fn stop(&mut self, which: &str) -> std::process::ExitStatus {
        let child = match which {
            "engine" => &mut self.engine,
            "target" => &mut self.target,
            _ => panic!("stop takes \"engine\" or \"target\", not {which:?}"),
        };
        let mut child = child.take().unwrap_or_else(|| panic!("the {which} is not running"));
        let (ok, _, err) = run_timeout(Command::new("kill").args(["-TERM", &child.id().to_string()]), Duration::from_secs(10));
        assert!(ok, "kill -TERM the {which}: {err}");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(10) {
                kill(Some(child));
                panic!("the {which} was still running 10 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 the engine.
    pub fn kill_engine(&mut self) {
        kill(self.engine.take());
    }

    /// kill -9 an agent.
    pub fn kill_agent(&mut self, vm: &str) {
        kill(self.agents.remove(vm));
    }

    /// Starts the agent of `vm` like `start_agent`, but if it exits before it serves its
    /// volumes (the engine refuses it while it still holds the attachment of a killed agent),
    /// starts it again, for up to `within` in all. Returns how many starts it took.
    pub fn start_agent_retrying(&mut self, vm: &str, within: Duration) -> usize {
        let start = Instant::now();
        let mut starts = 0;
        loop {
            starts += 1;
            for v in self.vols.iter().filter(|v| v.vm == vm) {
                let _ = std::fs::remove_file(self.sock(&v.name));
            }
            let child =
                self.spawn(&format!("agent-{vm}"), Command::new(agent_bin()).arg("--config").arg(self.path(&format!("agent-{vm}.toml"))));
            self.agents.insert(vm.to_owned(), child);
            loop {
                if self.vols.iter().filter(|v| v.vm == vm).all(|v| self.sock(&v.name).exists()) {
                    return starts;
                }
                let exited = self.agents.get_mut(vm).and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() {
                    self.agents.remove(vm);
                    break;
                }
                assert!(
                    start.elapsed() < within,
                    "agent {vm} does not serve after {within:?} ({starts} start(s)); its log:\n{}",
                    self.log(&format!("agent-{vm}"))
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                start.elapsed() < within,
                "agent {vm} exited before serving, {starts} time(s) in {within:?}; its log:\n{}",
                self.log(&format!("agent-{vm}"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, a) in std::mem::take(&mut self.agents) {
            kill(Some(a));
        }
        kill(self.engine.take());
        kill(self.target.take());
        if std::thread::panicking() {
            // Keep the logs of a failed test.
            let keep = self.dir.path().to_owned();
            eprintln!("test files and logs kept in {}", keep.display());
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            let _ = d.keep();
        }
    }
}

/// A process of the cluster frozen by [`Cluster::pause`]; SIGCONT when dropped.
pub struct Paused<'a> {
    pid: u32,
    _cluster: &'a Cluster,
}

impl Paused<'_> {
    /// Lets the process go on.
    pub fn resume(self) {}
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        signal(self.pid, "CONT");
    }
}

/// Sends a signal (`"STOP"`, `"CONT"`, ...) to a process; panics if `kill` fails, unless the
/// thread is already panicking.
pub fn signal(pid: u32, name: &str) {
    let (ok, _, err) = run_timeout(Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()), Duration::from_secs(10));
    assert!(ok || std::thread::panicking(), "kill -{name} {pid}: {err}");
}

/// A cluster of one volume, "data" of VM "vm1", whose engine ships to the target through a
/// WAN emulator; `setup` sets the extra configuration (`group_extra`, `engine_extra`,
/// `plaintext`, ...) before the processes start.
pub fn cluster_via_wan(size: u64, setup: impl FnOnce(&mut Cluster)) -> (Cluster, wan::WanProxy) {
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", size)], "", "");
    let proxy = wan::WanProxy::start(format!("127.0.0.1:{}", c.tport).parse().unwrap());
    c.ship_port = Some(proxy.port());
    setup(&mut c);
    c.launch();
    c.start_agents();
    (c, proxy)
}
