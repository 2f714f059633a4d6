//! System-test harness: starts the real `hindsight target`, `hindsight engine` and one
//! `hindsight-agent` per VM on 127.0.0.1 with file-backed disks in a temporary directory, and
//! kills them by PID when dropped.

#![allow(dead_code)]

pub mod wan;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `hindsight` binary.
pub fn hindsight_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hindsight"))
}

/// The `hindsight-agent` binary, built next to `hindsight` by `cargo build --workspace`.
pub fn agent_bin() -> PathBuf {
    let p = hindsight_bin().with_file_name("hindsight-agent");
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` before the tests", p.display());
    p
}

/// True if every named tool is on PATH; otherwise prints why the test is skipped.
pub fn have_tools(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            eprintln!("SKIPPED: {t} is not installed (scripts/install-deps.sh installs it)");
            return false;
        }
    }
    true
}

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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs a command with a timeout; returns (status success, stdout, stderr).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> (bool, String, String) {
    let out = run_output(cmd, timeout);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let (ok, out, err) = run_timeout(cmd, Duration::from_secs(300));
    assert!(ok, "{desc} failed:\nstdout: {out}\nstderr: {err}");
    out
}

/// Runs a command with a timeout; returns its exit code (`None` if a signal ended it),
/// stdout and stderr.
pub fn run_code(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    let out = run_output(cmd, timeout);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command with a timeout and returns its status and raw output; kills it and panics
/// if it takes longer.
pub fn run_output(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::process::Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Runs a command that must succeed within two minutes; returns stdout as bytes.
pub fn run_ok_bytes(cmd: &mut Command) -> Vec<u8> {
    let desc = format!("{cmd:?}");
    let out = run_output(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{desc} failed ({}):\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Runs qemu-io on an NBD URI with one `-c` per command. qemu-io waits for each request's
/// reply before it sends the next, so the acknowledged order is the command order. Panics if
/// qemu-io or any command fails; returns its output.
pub fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let desc = format!("qemu-io on {uri} ({} commands)", commands.len());
    let (ok, out, err) = run_timeout(&mut cmd, Duration::from_secs(120));
    let all = format!("{out}{err}");
    assert!(ok, "{desc} failed:\n{all}");
    for bad in ["failed", "error", "Error"] {
        assert!(!all.contains(bad), "{desc} reported {bad:?}:\n{all}");
    }
    all
}

/// A seeded random generator: the seed comes from HS_SEED or is drawn, and is printed so that
/// a failing run can be repeated.
pub fn seeded_rng() -> rand::rngs::StdRng {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `len` random bytes.
pub fn random_bytes(rng: &mut impl rand::RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rng.fill_bytes(&mut v);
    v
}

/// True if two files hold the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A volume of the test cluster.
#[derive(Clone, Debug)]
pub struct Vol {
    pub vm: String,
    pub name: String,
    pub size: u64,
}

impl Vol {
    pub fn new(vm: &str, name: &str, size: u64) -> Vol {
        Vol { vm: vm.into(), name: name.into(), size }
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

    /// The records of the target's journal of the group, oldest retained first:
    /// (seq, kind, length).
    pub fn target_records(&self) -> Vec<(u64, hindsight_consistency::WriteKind, u32)> {
        let dir = self.path("target").join("groups").join(&self.group).join("journal");
        let fs = hindsight_consistency::storage::StdStorage::shared();
        let first = hindsight_consistency::journal::list_segments(fs.as_ref(), &dir).unwrap().first().map_or(1, |s| s.0);
        let mut reader = hindsight_consistency::journal::JournalReader::open(fs, &dir, first).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = reader.next().unwrap() {
            out.push((rec.header.seq, rec.header.kind, rec.header.length));
        }
        out
    }

    /// Every record in the engine's journal of the group (0 when it has none).
    pub fn engine_records(&self) -> usize {
        let dir = self.path("engine").join("groups").join(&self.group).join("journal");
        let Ok(mut r) = hindsight_consistency::journal::JournalReader::open(hindsight_consistency::storage::StdStorage::shared(), &dir, 1)
        else {
            return 0;
        };
        let mut n = 0;
        while r.next().unwrap().is_some() {
            n += 1;
        }
        n
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

    /// The log of a process so far: "target", "engine" or "agent-<vm>" (every run of it,
    /// appended).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// `hindsight status --json` of the (first) group.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(self.engine_toml()));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
        v["groups"][0].clone()
    }

    /// Waits until the group's status satisfies `cond`; returns it.
    pub fn wait_status(&self, what: &str, timeout: Duration, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let g = self.status();
            if cond(&g) {
                return g;
            }
            assert!(start.elapsed() < timeout, "status never showed {what} within {timeout:?}: {g:#}\nengine log:\n{}", self.log("engine"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` until a process's log holds `needle`.
    pub fn wait_log_within(&self, name: &str, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log(name).contains(needle) {
            assert!(start.elapsed() < timeout, "{name}.log never said {needle:?}:\n{}", self.log(name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a process's log holds `needle` at least `count` times.
    pub fn wait_log(&self, name: &str, needle: &str, count: usize) {
        let start = Instant::now();
        loop {
            let n = self.log(name).matches(needle).count();
            if n >= count {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}.log holds {needle:?} {n} times, waited for {count}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn write_configs(&self) {
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
            "[engine]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n{}\n\n{}\n[[group]]\nname = \"{}\"\n{mode}target = \"127.0.0.1:{}\"\n{}\n",
            self.eport,
            d.join("engine").display(),
            self.engine_extra,
            self.tls_section("engine", ENGINE_NAME),
            self.group,
            self.ship_port.unwrap_or(self.tport),
            self.group_extra
        );
        for v in &self.vols {
            e += &format!("\n[[group.volume]]\nname = \"{}\"\nvm = \"{}\"\nsize = \"{}\"\n", v.name, v.vm, v.size);
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
                    self.group,
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

    /// kill -9 the engine.
    pub fn kill_engine(&mut self) {
        kill(self.engine.take());
    }

    /// Waits until the agent's dirty map of `volume` is clean on disk (every region written
    /// is confirmed and idle, so a kill now leaves nothing to resync): bytes 16.. of the map,
    /// up to its checksum, all zero.
    pub fn wait_map_clean(&self, volume: &str) {
        let mut path = self.disk(volume).into_os_string();
        path.push(".hsmap");
        let start = Instant::now();
        loop {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.len() > 20 && bytes[16..bytes.len() - 4].iter().all(|&b| b == 0) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "the dirty map of {volume} never became clean");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kill -9 an agent.
    pub fn kill_agent(&mut self, vm: &str) {
        kill(self.agents.remove(vm));
    }

    /// `hindsight history --json` of the group.
    pub fn history(&self) -> serde_json::Value {
        let out =
            run_ok(Command::new(hindsight_bin()).args(["history", "--json", "--group", &self.group, "--config"]).arg(self.target_toml()));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("history output is not JSON ({e}): {out}"))
    }

    /// `hindsight history --json` of the group, or `None` while the target does not know the
    /// group yet (its directory may exist before the creation is finished: `group.toml` is
    /// written last).
    pub fn history_if_known(&self) -> Option<serde_json::Value> {
        let mut cmd = Command::new(hindsight_bin());
        cmd.args(["history", "--json", "--group", &self.group, "--config"]).arg(self.target_toml());
        let desc = format!("{cmd:?}");
        let (ok, out, err) = run_timeout(&mut cmd, Duration::from_secs(300));
        if !ok && err.contains("is not known to this target") {
            return None;
        }
        assert!(ok, "{desc} failed:\nstdout: {out}\nstderr: {err}");
        Some(serde_json::from_str(&out).unwrap_or_else(|e| panic!("history output is not JSON ({e}): {out}")))
    }

    /// Last sequence number the target holds (0 if the group is not there yet).
    pub fn target_last_seq(&self) -> u64 {
        if !self.path("target").join("groups").join(&self.group).exists() {
            return 0;
        }
        self.history_if_known().map_or(0, |h| h["last_seq"].as_u64().expect("last_seq"))
    }

    /// Waits until the target holds at least `seq`.
    pub fn wait_target_seq(&self, seq: u64) {
        let start = Instant::now();
        loop {
            let last = self.target_last_seq();
            if last >= seq {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "target stuck at seq {last}, waiting for {seq}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the target holds at least `seq`, then until it stops moving; returns the
    /// last sequence number (use it when a restart may delay shipping beyond `settle`'s
    /// patience).
    pub fn wait_target_seq_settled(&self, seq: u64) -> u64 {
        self.wait_target_seq(seq);
        self.settle()
    }

    /// Waits until the engine says the target has confirmed everything it holds (status
    /// `lag_writes` 0 twice in a row, with at least one write shipped). Returns the sequence
    /// number.
    pub fn wait_shipped(&self) -> u64 {
        let start = Instant::now();
        let mut zero = 0;
        loop {
            let out = run_ok(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(self.engine_toml()));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
            let g = &v["groups"][0];
            if g["lag_writes"] == 0 && g["durable_seq"].as_u64().unwrap_or(0) > 0 {
                zero += 1;
                if zero >= 2 {
                    return g["confirmed_seq"].as_u64().unwrap();
                }
            } else {
                zero = 0;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the target never caught up: {g}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the target's last sequence number has not moved for a while (every write
    /// the agents acknowledged is at the engine; this lets the shipper catch up). Returns it.
    pub fn settle(&self) -> u64 {
        let start = Instant::now();
        let mut last = u64::MAX;
        let mut same = 0;
        loop {
            let cur = self.target_last_seq();
            if cur == last {
                same += 1;
                if same >= 4 {
                    return cur;
                }
            } else {
                same = 0;
                last = cur;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "target never settled");
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Recovers a volume at a point (`["--seq", "5"]`, `["--latest"]`, ...) and returns the
    /// image bytes.
    pub fn recover(&self, volume: &str, point: &[&str]) -> Vec<u8> {
        let out = self.path(&format!("recovered-{volume}.img"));
        let _ = std::fs::remove_file(&out);
        run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--group", &self.group, "--volume", volume, "--config"])
                .arg(self.target_toml())
                .args(point)
                .arg("--out")
                .arg(&out),
        );
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
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

fn kill(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits until 127.0.0.1:port accepts connections.
pub fn wait_tcp(port: u16, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what} does not listen on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a path exists.
pub fn wait_path(p: &Path, what: &str) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// A model of a volume: what every acknowledged write made of it.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model { bytes: vec![0; usize::try_from(size).unwrap()] }
    }

    pub fn fill(&mut self, off: u64, len: u64, byte: u8) {
        let (o, l) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
        self.bytes[o..o + l].fill(byte);
    }
}

/// Describes where two images differ first, for assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths differ: {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}: {:#04x} vs {:#04x}", a[i], b[i]),
        None => "equal".into(),
    }
}

impl Cluster {
    /// Recovers every volume of the group at one point with `recover --all` (`["--seq", "5"]`,
    /// `["--time", T]`, ...); returns the manifest and each volume's image by volume name.
    pub fn recover_all(&self, point: &[&str]) -> (serde_json::Value, BTreeMap<String, Vec<u8>>) {
        let dir = self.path("recovered-all");
        let _ = std::fs::remove_dir_all(&dir);
        let out = run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--all", "--json", "--group", &self.group, "--config"])
                .arg(self.target_toml())
                .args(point)
                .arg("--out-dir")
                .arg(&dir),
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("recover --all --json output is not JSON ({e}): {out}"));
        let mut images = BTreeMap::new();
        for v in manifest["volumes"].as_array().unwrap_or_else(|| panic!("no volumes in the manifest: {manifest}")) {
            let (name, file) = (v["name"].as_str().expect("volume name"), v["file"].as_str().expect("image file"));
            images.insert(name.to_owned(), std::fs::read(dir.join(file)).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        (manifest, images)
    }
}

/// A long-lived qemu-io on an NBD URI, fed one command at a time on its standard input: each
/// command is sent only after the previous one was answered, so a write is acknowledged when
/// `write_file` returns. Killed on drop if still running.
pub struct QemuIoSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    what: String,
}

impl QemuIoSession {
    pub fn start(uri: &str) -> QemuIoSession {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn qemu-io on {uri}: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        QemuIoSession { child, stdin, lines, what: format!("qemu-io on {uri}") }
    }

    /// Writes `len` bytes read from the file `src` at `off` and waits for the reply.
    pub fn write_file(&mut self, src: &Path, off: u64, len: u64) {
        if let Err(e) = self.try_write_file(src, off, len, Duration::from_secs(60)) {
            panic!("{e}");
        }
    }

    /// Like `write_file`, but a failed or unanswered write is an error, not a panic.
    pub fn try_write_file(&mut self, src: &Path, off: u64, len: u64, wait: Duration) -> Result<(), String> {
        use std::io::Write;
        let cmd = format!("write -s {} {off} {len}\n", src.display());
        let stdin = self.stdin.as_mut().ok_or("session is closed")?;
        stdin.write_all(cmd.as_bytes()).and_then(|()| stdin.flush()).map_err(|e| format!("{}: send {cmd:?}: {e}", self.what))?;
        let done = format!("wrote {len}/{len} bytes at offset {off}");
        loop {
            let line = self.lines.recv_timeout(wait).map_err(|e| format!("{}: no reply to {:?} ({e})", self.what, cmd.trim()))?;
            if line.contains(&done) {
                return Ok(());
            }
            for bad in ["failed", "error", "Error", "No such", "Invalid"] {
                if line.contains(bad) {
                    return Err(format!("{}: {:?} reported: {line}", self.what, cmd.trim()));
                }
            }
        }
    }

    /// Closes standard input and waits for qemu-io to exit cleanly.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{} did not exit after its input ended", self.what);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "{} exited with {status}", self.what);
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// nbdfuse serving the export as a file, a loop device on that file and an ext4 mount on the
/// loop device; undone in reverse order on drop, also when the test fails.
pub struct Ext4Stack {
    pub nbdfuse: Option<Child>,
    pub fuse_dir: PathBuf,
    pub loop_dev: Option<String>,
    pub mount_dir: Option<PathBuf>,
}

impl Ext4Stack {
    pub fn unmount(&mut self) {
        if let Some(m) = self.mount_dir.take() {
            run_ok(Command::new("umount").arg(&m));
        }
    }

    pub fn detach_loop(&mut self) {
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev));
        }
    }

    /// Unmounts the FUSE file system, which ends nbdfuse after it has flushed and
    /// disconnected.
    pub fn stop_nbdfuse(&mut self) {
        if let Some(mut child) = self.nbdfuse.take() {
            let (ok, _, err) = run_timeout(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir), Duration::from_secs(30));
            assert!(ok, "fusermount3 -u failed: {err}");
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nbdfuse did not exit after its file system was unmounted");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Ext4Stack {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if let Some(m) = self.mount_dir.take() {
            quiet(Command::new("umount").arg("-l").arg(&m));
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut child) = self.nbdfuse.take() {
            quiet(Command::new("fusermount3").arg("-u").arg("-z").arg(&self.fuse_dir));
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts nbdfuse on `uri`, serving it as the file `<fuse_dir>/disk`; `None` (after saying
/// why) if FUSE mounts are not possible here.
pub fn start_nbdfuse(dir: &Path, uri: &str) -> Option<Ext4Stack> {
    let fuse_dir = dir.join("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let errfile = dir.join("nbdfuse.err");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errfile).unwrap())
        .spawn()
        .unwrap();
    let mut stack = Ext4Stack { nbdfuse: Some(child), fuse_dir, loop_dev: None, mount_dir: None };
    // nbdfuse writes its pid file once the file is served.
    let start = Instant::now();
    while !pidfile.exists() {
        if let Some(status) = stack.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
            stack.nbdfuse = None;
            let err = std::fs::read_to_string(&errfile).unwrap_or_default();
            if err.contains("fuse") {
                eprintln!("SKIPPED: FUSE mounts are not possible here: {err}");
                return None;
            }
            panic!("nbdfuse exited ({status}) before serving: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "nbdfuse did not start serving");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(stack)
}
