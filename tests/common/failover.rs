//! Failover and failback with the cluster's two sites: `hindsight failover` on its target,
//! production at the recovery site through agents that serve the promoted volumes, and the
//! failback's other half: the original site's own target, seeded from its disks, and an engine
//! at the recovery site shipping to it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use rand::Rng;

use super::*;

/// A process of the test, killed if the test ends first.
pub struct Running(pub Child);

impl Running {
    /// SIGTERM, and waits for it to end.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("a pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Random pattern writes, zero writes and trims of whole 4 KiB blocks (1 to `max_blocks` of
/// them) on `uri` (one qemu-io: acknowledged in order), applied to `model`. Returns them in
/// their order, as (offset, length, byte; 0 for zeroes and trims).
pub fn write_random_to(uri: &str, model: &mut Model, rng: &mut impl Rng, n: usize, max_blocks: u64) -> Vec<(u64, u64, u8)> {
    const BLOCK: u64 = 4096;
    let size = model.bytes.len() as u64;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    let mut ops = Vec::new();
    for _ in 0..n {
        let blocks = rng.gen_range(1..=max_blocks);
        let off = rng.gen_range(0..size / BLOCK - blocks) * BLOCK;
        let len = blocks * BLOCK;
        let (op, byte) = match rng.gen_range(0..8) {
            0 => (format!("write -z {off} {len}"), 0),
            1 => (format!("discard {off} {len}"), 0),
            _ => {
                let b = rng.gen_range(1..=255u8);
                (format!("write -P {b} {off} {len}"), b)
            }
        };
        cmd.arg("-c").arg(op);
        ops.push((off, len, byte));
    }
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed"), "qemu-io: {out}");
    for &(off, len, byte) in &ops {
        model.fill(off, len, byte);
    }
    ops
}

/// Pieces of `piece` bytes in which two image files differ (read a piece at a time: the files
/// may be large). The agent's compare sweep sends the pieces of 64 KiB that differ.
pub fn differing_pieces(a: &Path, b: &Path, piece: usize) -> usize {
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; piece], vec![0u8; piece]);
    let mut differ = 0;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(na, nb, "{} and {} differ in size", a.display(), b.display());
        if na == 0 {
            return differ;
        }
        differ += usize::from(ba[..na] != bb[..nb]);
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Whether two files hold the same bytes (`cmp`: they may be large).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp").arg("-s").arg(a).arg(b).status().unwrap().success()
}

/// Bytes of resync records (kind 7) in a target's journal of a group.
pub fn resync_bytes(data_dir: &Path, group: &str) -> u64 {
    let dir = data_dir.join("groups").join(group).join("journal");
    let fs = hindsight_consistency::storage::StdStorage::shared();
    let mut reader = hindsight_consistency::journal::JournalReader::open(fs, &dir, 1).unwrap();
    let mut bytes = 0;
    while let Some(rec) = reader.next().unwrap() {
        if rec.header.kind == hindsight_consistency::WriteKind::Resync {
            bytes += u64::from(rec.header.length);
        }
    }
    bytes
}

impl Cluster {
    /// `hindsight failover` on the cluster's target with `args`: its exit code and output.
    pub fn failover(&self, args: &[&str]) -> (Option<i32>, String, String) {
        run_code(
            Command::new(hindsight_bin()).args(["failover", "--group", &self.group, "--config"]).arg(self.target_toml()).args(args),
            Duration::from_secs(300),
        )
    }

    /// A successful failover's JSON report.
    pub fn failover_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.failover(&all);
        assert_eq!(code, Some(0), "failover {args:?}: {out}{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        eprintln!("failover {args:?}: {report}");
        report
    }

    /// The promoted image of a volume at the recovery site.
    pub fn promoted(&self, volume: &str) -> PathBuf {
        self.path(&format!("target/groups/{}/promoted/{volume}.img", self.group))
    }

    /// `hindsight history` of the group at the recovery site, as people read it.
    pub fn history_text(&self) -> String {
        run_ok(Command::new(hindsight_bin()).args(["history", "--group", &self.group, "--config"]).arg(self.target_toml()))
    }

    /// The operator options of `failover --planned` towards the engine at `port` (the
    /// certificate of operator alice, issued when first asked for).
    pub fn planned_args(&self, port: u16) -> Vec<String> {
        let pki = self.pki();
        if !pki.join("operator-alice.pem").exists() {
            self.issue(&["--role", "operator", "--name", "alice"]);
        }
        let p = |f: &str| pki.join(f).display().to_string();
        vec![
            "--planned".into(),
            "--engine".into(),
            format!("127.0.0.1:{port}"),
            "--engine-ca".into(),
            p("ca.pem"),
            "--engine-cert".into(),
            p("operator-alice.pem"),
            "--engine-key".into(),
            p("operator-alice-key.pem"),
        ]
    }

    /// Production at the recovery site after a failover: an agent for each VM serving its
    /// promoted volumes on sockets, with no engine yet (`start_offline`); it tracks what is
    /// written and, when an engine comes at the returned port, compares every region.
    pub fn serve_promoted(&self) -> RecoverySite {
        let engine_port = free_port();
        let mut vms: Vec<&str> = self.vols.iter().map(|v| v.vm.as_str()).collect();
        vms.dedup();
        let mut agents = Vec::new();
        for vm in vms {
            let mut a = format!(
                "[agent]\nengine = \"127.0.0.1:{engine_port}\"\nvm = \"{vm}\"\nstart_offline = true\nengine_timeout = \"1s\"\n\n{}",
                self.tls_section("agent", vm)
            );
            for v in self.vols.iter().filter(|v| v.vm == vm) {
                a += &format!(
                    "\n[[disk]]\ngroup = \"{}\"\nvolume = \"{}\"\npath = \"{}\"\nlisten = \"unix:{}\"\n",
                    self.group,
                    v.name,
                    self.promoted(&v.name).display(),
                    self.path(&format!("b-{}.sock", v.name)).display()
                );
            }
            let toml = self.path(&format!("agent-b-{vm}.toml"));
            std::fs::write(&toml, a).unwrap();
            agents.push(self.run_logged(&format!("agent-b-{vm}"), Command::new(agent_bin()).arg("--config").arg(&toml)));
        }
        for v in &self.vols {
            wait_path(&self.path(&format!("b-{}.sock", v.name)), "the recovery site's agent");
        }
        RecoverySite { engine_port, agents, engine: None, origin: None }
    }

    /// Starts a process with its output in `<name>.log`.
    pub fn run_logged(&self, name: &str, cmd: &mut Command) -> Running {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        Running(cmd.env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap())
    }
}

/// The recovery site in production after a failover, and the failback's processes.
pub struct RecoverySite {
    /// Where the recovery site's engine listens (the agents dial it from the start).
    pub engine_port: u16,
    pub agents: Vec<Running>,
    pub engine: Option<Running>,
    /// The original site's target, once the failback started.
    pub origin: Option<Origin>,
}

/// The original site's own target during a failback.
pub struct Origin {
    pub port: u16,
    pub dir: PathBuf,
    pub toml: PathBuf,
    pub target: Running,
}

impl RecoverySite {
    /// The NBD URI of a volume served at the recovery site.
    pub fn uri(&self, c: &Cluster, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", c.path(&format!("b-{volume}.sock")).display())
    }

    /// Starts the failback: the original site's disks are prepared as a group of its own
    /// target (at `epoch`), which starts; the recovery site's engine starts, shipping to it.
    pub fn fail_back(&mut self, c: &Cluster, epoch: u64) {
        c.issue(&["--role", "engine", "--name", "recovery", "--host", "127.0.0.1"]);
        c.issue(&["--role", "target", "--name", "origin", "--host", "127.0.0.1"]);
        let port = free_port();
        let dir = c.path("origin-target");
        let toml = c.path("ta.toml");
        std::fs::write(
            &toml,
            format!("[target]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\n{}", dir.display(), c.tls_section("target", "origin")),
        )
        .unwrap();
        let mut prepare = Command::new(hindsight_bin());
        prepare.args(["failback", "prepare", "--group", &c.group, "--epoch", &epoch.to_string(), "--config"]).arg(&toml);
        let mut vms: Vec<&str> = c.vols.iter().map(|v| v.vm.as_str()).collect();
        vms.dedup();
        for vm in vms {
            prepare.arg("--agent-config").arg(c.agent_toml(vm));
        }
        let out = run_ok(&mut prepare);
        assert!(out.contains(&format!("prepared for failback at epoch {epoch}")), "{out}");
        let target = c.run_logged("target-a", Command::new(hindsight_bin()).arg("target").arg("--config").arg(&toml));
        wait_tcp(port, "the original site's target");
        let mut e = format!(
            "[engine]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\n{}\n[[group]]\nname = \"{}\"\nmode = \"cdp\"\nepoch = {epoch}\ntarget = \"127.0.0.1:{port}\"\n",
            self.engine_port,
            c.path("recovery-engine").display(),
            c.tls_section("engine", "recovery"),
            c.group
        );
        for v in &c.vols {
            e += &format!("\n[[group.volume]]\nname = \"{}\"\nvm = \"{}\"\nsize = \"{}\"\n", v.name, v.vm, v.size);
        }
        std::fs::write(c.path("engine-b.toml"), e).unwrap();
        self.engine =
            Some(c.run_logged("engine-b", Command::new(hindsight_bin()).arg("engine").arg("--config").arg(c.path("engine-b.toml"))));
        self.origin = Some(Origin { port, dir, toml, target });
    }

    /// Waits until each original disk equals its volume's promoted image (the failback's
    /// reverse protection caught up).
    pub fn wait_disks_equal(&self, c: &Cluster, within: Duration) {
        let started = std::time::Instant::now();
        for v in &c.vols {
            while !same_bytes(&c.disk(&v.name), &c.promoted(&v.name)) {
                assert!(started.elapsed() < within, "the original disk of {} never became equal to the production volume", v.name);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
