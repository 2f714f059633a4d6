//! scripts/install-agent.sh, run with `--root` into a temporary directory and the real
//! `hindsight-agent`: what it installs (binary, agent.toml the agent accepts, the systemd unit),
//! that a second run changes nothing, that a different agent.toml is replaced only with
//! `--force`, and that bad arguments stop it with exit code 2 before anything is written.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{agent_bin, certs, run_code};
use hindsight_consistency::config::AgentConfig;
use hindsight_consistency::transport::{Identity, Role};

/// Longest the script (which copies the binary and runs `hindsight-agent --check`) may take.
const SCRIPT_WITHIN: Duration = Duration::from_secs(120);

/// The default install locations, as written into the unit and the configuration.
const BIN: &str = "/usr/local/bin/hindsight-agent";
const CONFIG: &str = "/etc/hindsight/agent.toml";
const UNIT: &str = "/etc/systemd/system/hindsight-agent.service";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-agent.sh")
}

/// A temporary directory holding the staging root (`<dir>/root`) and file-backed disks.
struct Staging {
    dir: tempfile::TempDir,
}

/// How one run of the script ended.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "install-agent.sh should succeed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
    }
}

impl Staging {
    fn new() -> Staging {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        Staging { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A file-backed local disk of `size` bytes.
    fn disk(&self, name: &str, size: u64) -> String {
        let p = self.dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p.display().to_string()
    }

    /// A disk path that does not exist on this machine (the script then skips the check).
    fn absent_disk(&self, name: &str) -> String {
        self.dir.path().join("absent").join(name).display().to_string()
    }

    /// Where `path` of the installed system is in the staging root.
    fn installed(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// `--ca`, `--cert` and `--key` of a certificate for the VM `args` name (`--vm`, or this
    /// host's name), issued by `hindsight certs` in the staging directory.
    fn tls_args<S: AsRef<OsStr>>(&self, args: &[S]) -> Vec<PathBuf> {
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        if args.iter().any(|a| *a == "--insecure-plaintext" || *a == "--ca") {
            return Vec::new();
        }
        let vm = match args.iter().position(|a| *a == "--vm").and_then(|i| args.get(i + 1)) {
            Some(vm) => vm.to_string_lossy().into_owned(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned(),
        };
        let pki = self.dir.path().join("pki");
        if !pki.join("ca.pem").exists() {
            certs(&["init"], &pki);
        }
        let (cert, key) = (pki.join(format!("agent-{vm}.pem")), pki.join(format!("agent-{vm}-key.pem")));
        if !cert.exists() && Identity::new(Role::Agent, &vm).is_ok() {
            certs(&["issue", "--role", "agent", "--name", &vm], &pki);
        }
        ["--ca".into(), pki.join("ca.pem"), "--cert".into(), cert, "--key".into(), key].into()
    }

    /// Runs the script with `--root` and `--binary` (the agent built next to `hindsight`), and
    /// the VM's certificate unless `args` choose the link's security themselves.
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Outcome {
        let mut cmd = Command::new(script());
        cmd.arg("--root").arg(self.root()).arg("--binary").arg(agent_bin()).args(args).args(self.tls_args(args));
        let (code, stdout, stderr) = run_code(&mut cmd, SCRIPT_WITHIN);
        Outcome { code, stdout, stderr }
    }

    /// Runs the script with `--root`, `args` and the VM's certificate (no `--binary`).
    fn run_without_binary<S: AsRef<OsStr>>(&self, args: &[S]) -> Outcome {
        let mut cmd = Command::new(script());
        cmd.arg("--root").arg(self.root()).args(args).args(self.tls_args(args));
        let (code, stdout, stderr) = run_code(&mut cmd, SCRIPT_WITHIN);
        Outcome { code, stdout, stderr }
    }

    /// Every file under the staging root, relative to it, sorted.
    fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root(), &self.root(), &mut out);
        out.sort();
        out
    }

    /// Content and modification time of each installed file.
    fn snapshot(&self) -> Vec<(Vec<u8>, SystemTime)> {
        [BIN, CONFIG, UNIT]
            .iter()
            .map(|p| {
                let f = self.installed(p);
                (std::fs::read(&f).unwrap(), std::fs::metadata(&f).unwrap().modified().unwrap())
            })
            .collect()
    }
}

#[test]
fn install_with_file_disks_stages_binary_config_and_unit_that_the_agent_accepts() {
    let s = Staging::new();
    let db = s.disk("db.disk", 4 << 20);
    let logs = s.disk("logs.disk", 2 << 20);
    let out = s.run(&[
        "--engine",
        "127.0.0.1:7400",
        "--vm",
        "erp-db",
        "--disk",
        &format!("erp:db-data:{db}:nbd"),
        "--disk",
        &format!("erp:logs:{logs}:nbd:/dev/nbd7"),
        "--freeze",
        "/srv/db",
    ]);
    out.assert_ok();
    assert!(out.stdout.contains("configuration checked"), "every disk exists, so the script should check the config:\n{}", out.stdout);

    // The binary: the same bytes, executable.
    let bin = s.installed(BIN);
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{} has mode {mode:o}", bin.display());
    assert!(std::fs::read(&bin).unwrap() == std::fs::read(agent_bin()).unwrap(), "the installed binary differs from the one given");

    // agent.toml: parsed by the project's own loader, and accepted by the installed agent. It
    // names the TLS files as the guest sees them; here they are under the staging root.
    let text = std::fs::read_to_string(s.installed(CONFIG)).unwrap();
    assert!(text.contains("\n[tls]\nca = \"/etc/hindsight/tls/ca.pem\"\ncert = \"/etc/hindsight/tls/agent.pem\"\n"), "{text}");
    let key_mode = std::fs::metadata(s.installed("/etc/hindsight/tls/agent-key.pem")).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600, "the private key must be readable by root only");
    let toml = s.dir.path().join("agent-staged.toml");
    std::fs::write(&toml, text.replace("\"/etc/hindsight/tls/", &format!("\"{}/etc/hindsight/tls/", s.root().display()))).unwrap();
    let config = AgentConfig::load(&toml).unwrap_or_else(|e| panic!("the installed agent.toml does not load: {e}\n{text}"));
    assert_eq!((config.engine.as_str(), config.vm.as_str()), ("127.0.0.1:7400", "erp-db"));
    let disks: Vec<_> = config.disks.iter().map(|d| (d.group.as_str(), d.volume.as_str(), d.path.display().to_string())).collect();
    assert_eq!(disks, [("erp", "db-data", db.clone()), ("erp", "logs", logs.clone())]);
    assert_eq!(config.quiesce.freeze, [PathBuf::from("/srv/db")]);
    assert_eq!(text.matches("\nfrontend = \"nbd\"\n").count(), 2, "both disks use the nbd front end:\n{text}");
    assert!(text.contains("\ndevice = \"/dev/nbd7\"\n"), "the second disk names its device:\n{text}");
    assert_eq!(text.matches("\ndevice = ").count(), 1, "only the second disk names a device:\n{text}");

    let (code, stdout, stderr) = run_code(Command::new(&bin).arg("--config").arg(&toml).arg("--check"), SCRIPT_WITHIN);
    if std::path::Path::new("/sys/block/nbd0").exists() {
        assert_eq!(code, Some(0), "hindsight-agent --check rejects the installed config:\nstdout: {stdout}\nstderr: {stderr}");
    } else {
        // This host's kernel lacks nbd (a build host): --check says the agent would not start.
        assert_eq!(code, Some(3), "--check should refuse a front end this kernel lacks:\nstdout: {stdout}\nstderr: {stderr}");
        assert!(stderr.contains("the agent would not start here") && stderr.contains("modprobe nbd"), "{stderr}");
    }
    for part in ["db-data", "logs", "/dev/nbd7"] {
        assert!(stdout.contains(part), "--check should list {part}: {stdout}");
    }

    // The unit starts the installed binary on the installed config; no placeholder is left.
    let unit = std::fs::read_to_string(s.installed(UNIT)).unwrap();
    assert!(unit.lines().any(|l| l == format!("ExecStart={BIN} --config {CONFIG}")), "no substituted ExecStart in the unit:\n{unit}");
    assert!(!unit.contains("@AGENT_"), "a placeholder is left in the unit:\n{unit}");
    assert!(!s.installed(&format!("{CONFIG}.bak")).exists(), "a first install has nothing to back up");
}

#[test]
fn second_run_with_the_same_arguments_changes_nothing() {
    let s = Staging::new();
    let args = [
        "--engine",
        "10.0.0.5:7400",
        "--vm",
        "erp-db",
        "--disk",
        &format!("erp:db-data:{}", s.absent_disk("vdb")),
        "--prefix",
        "/opt/hindsight",
        "--config-dir",
        "/etc/hs",
        "--systemd-dir",
        "/lib/systemd/system",
    ];
    let first = s.run(&args);
    first.assert_ok();
    assert!(first.stdout.contains("not checked"), "a missing disk path should skip the check and say so:\n{}", first.stdout);
    let files = s.files();
    assert_eq!(
        files,
        [
            "etc/hs/agent.toml",
            "etc/hs/tls/agent-key.pem",
            "etc/hs/tls/agent.pem",
            "etc/hs/tls/ca.pem",
            "lib/systemd/system/hindsight-agent.service",
            "opt/hindsight/bin/hindsight-agent"
        ]
    );
    let unit = std::fs::read_to_string(s.installed("/lib/systemd/system/hindsight-agent.service")).unwrap();
    assert!(
        unit.lines().any(|l| l == "ExecStart=/opt/hindsight/bin/hindsight-agent --config /etc/hs/agent.toml"),
        "the unit should use --prefix and --config-dir:\n{unit}"
    );
    let text = std::fs::read_to_string(s.installed("/etc/hs/agent.toml")).unwrap();
    assert!(text.contains("\nfrontend = \"auto\"\n"), "a disk without FRONTEND gets frontend = \"auto\":\n{text}");

    let before: Vec<_> = files.iter().map(|f| std::fs::metadata(s.root().join(f)).unwrap().modified().unwrap()).collect();
    let second = s.run(&args);
    second.assert_ok();
    assert_eq!(second.stdout.matches("unchanged:").count(), 6, "the second run should leave all six files:\n{}", second.stdout);
    assert!(!second.stdout.contains("installed "), "the second run rewrote a file:\n{}", second.stdout);
    assert_eq!(s.files(), files, "the second run added or removed files");
    let after: Vec<_> = files.iter().map(|f| std::fs::metadata(s.root().join(f)).unwrap().modified().unwrap()).collect();
    assert_eq!(before, after, "the second run touched a file");
}

#[test]
fn existing_different_config_is_kept_without_force_and_backed_up_with_force() {
    let s = Staging::new();
    let disk = format!("erp:db-data:{}:ublk:/dev/ublkb0", s.absent_disk("vdb"));
    let with_engine = |engine: &str, extra: &[&str]| {
        let mut args = vec!["--engine", engine, "--vm", "erp-db", "--disk", &disk];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    with_engine("10.0.0.5:7400", &[]).assert_ok();
    let original = std::fs::read_to_string(s.installed(CONFIG)).unwrap();
    let installed = s.snapshot();

    let refused = with_engine("10.0.0.6:7400", &[]);
    assert_eq!(
        refused.code,
        Some(1),
        "a different agent.toml must not be replaced:\nstdout: {}\nstderr: {}",
        refused.stdout,
        refused.stderr
    );
    for part in ["--force", &s.installed(CONFIG).display().to_string(), "10.0.0.6:7400"] {
        assert!(refused.stderr.contains(part), "the refusal should mention {part:?}:\n{}", refused.stderr);
    }
    assert!(s.snapshot() == installed, "a refused run changed an installed file");
    assert!(!s.installed(&format!("{CONFIG}.bak")).exists());

    with_engine("10.0.0.6:7400", &["--force"]).assert_ok();
    let replaced = std::fs::read_to_string(s.installed(CONFIG)).unwrap();
    assert!(replaced.contains("engine = \"10.0.0.6:7400\""), "--force should install the new config:\n{replaced}");
    let backup = std::fs::read_to_string(s.installed(&format!("{CONFIG}.bak"))).unwrap();
    assert_eq!(backup, original, "the .bak should hold the replaced config");

    // The new configuration is now the installed one: the same arguments need no --force.
    with_engine("10.0.0.6:7400", &[]).assert_ok();
}

#[test]
fn bad_arguments_exit_2_naming_the_problem_and_change_nothing() {
    let s = Staging::new();
    let disk = s.disk("db.disk", 1 << 20);
    let ok = format!("erp:db-data:{disk}");
    let (too_many, floppy) = (format!("{ok}:nbd:/dev/nbd0:more"), format!("{ok}:floppy"));
    let (nbd_as_ublk, ublk_as_sdb) = (format!("{ok}:nbd:/dev/ublkb0"), format!("{ok}:ublk:/dev/sdb"));
    let auto_with_device = format!("{ok}:auto:/dev/nbd0");
    let (bad_volume, same_volume) = (format!("erp:db data:{disk}"), format!("erp:db-data:{disk}2"));
    let e = "127.0.0.1:7400";
    let cases: &[(&[&str], &[&str])] = &[
        (&["--disk", &ok], &["--engine", "required"]),
        (&["--disk", &ok, "--engine"], &["--engine needs a value"]),
        (&["--engine", "--disk", &ok], &["--engine needs a value"]),
        (&["--engine", "10.0.0.5", "--disk", &ok], &["\"10.0.0.5\"", "host:port"]),
        (&["--engine", "10.0.0.5:70000", "--disk", &ok], &["10.0.0.5:70000", "65535"]),
        (&["--engine", e, "--engine", e, "--disk", &ok], &["--engine is given twice"]),
        (&["--engine", e], &["no --disk"]),
        (&["--engine", e, "--disk", "erp:db-data"], &["\"erp:db-data\"", "GROUP:VOLUME:PATH[:FRONTEND[:DEVICE]]"]),
        (&["--engine", e, "--disk", &too_many], &["3 to 5 fields"]),
        (&["--engine", e, "--disk", &floppy], &["\"floppy\"", "auto, ublk or nbd"]),
        (&["--engine", e, "--disk", &nbd_as_ublk], &["\"/dev/ublkb0\"", "/dev/nbdN"]),
        (&["--engine", e, "--disk", &ublk_as_sdb], &["\"/dev/sdb\"", "/dev/ublkbN"]),
        (&["--engine", e, "--disk", &auto_with_device], &["a DEVICE needs the front end"]),
        (&["--engine", e, "--disk", "erp:db-data:disk.img"], &["\"disk.img\"", "absolute"]),
        (&["--engine", e, "--disk", &bad_volume], &["\"db data\"", "not valid"]),
        (&["--engine", e, "--disk", &ok, "--disk", &same_volume], &["\"db-data\"", "twice"]),
        (&["--engine", e, "--disk", &ok, "--vm", ".hidden"], &["\".hidden\"", "--vm"]),
        (&["--engine", e, "--disk", &ok, "--freeze", "srv/db"], &["\"srv/db\"", "absolute mount point"]),
        (&["--engine", e, "--disk", &ok, "--prefix", "usr/local"], &["--prefix", "absolute"]),
        (&["--engine", e, "--disk", &ok, "--colour", "blue"], &["unknown option --colour"]),
        (&["--engine", e, "--disk", &ok, "--force=yes"], &["--force takes no value"]),
        (&["--engine", e, "--disk", &ok, "stray"], &["unexpected argument \"stray\""]),
        (&["--engine", "10.0.0.5:7400", "--disk", &ok, "--insecure-plaintext"], &["--insecure-plaintext", "loopback", "10.0.0.5:7400"]),
        (&["--engine", e, "--disk", &ok, "--insecure-plaintext", "--ca", "/x"], &["cannot go with --ca"]),
        (&["--engine", e, "--disk", &ok, "--ca", "/nonexistent/ca.pem", "--cert", "/x", "--key", "/y"], &["--ca \"/nonexistent/ca.pem\""]),
        (&["--engine", e, "--disk", &ok, "--ca", &disk], &["give --ca, --cert and --key", "hindsight certs issue"]),
    ];
    for (args, wanted) in cases {
        let out = s.run(args);
        assert_eq!(out.code, Some(2), "{args:?} should exit 2:\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
        for w in *wanted {
            assert!(out.stderr.contains(w), "{args:?}: the message should contain {w:?}:\n{}", out.stderr);
        }
    }

    // A --binary that is not the agent.
    let out = s.run_without_binary(&["--engine", e, "--disk", &ok, "--binary", "/bin/true"]);
    assert_eq!(out.code, Some(2), "a --binary that is not hindsight-agent should exit 2:\n{}", out.stderr);
    assert!(out.stderr.contains("/bin/true") && out.stderr.contains("not a hindsight-agent"), "{}", out.stderr);

    assert!(s.files().is_empty(), "a rejected run installed files: {:?}", s.files());
}

#[test]
fn config_the_agent_rejects_exits_2_and_installs_nothing() {
    let s = Staging::new();
    // A directory is not a disk: the agent's --check refuses it.
    let not_a_disk = s.dir.path().join("not-a-disk");
    std::fs::create_dir(&not_a_disk).unwrap();
    let out = s.run(&["--engine", "127.0.0.1:7400", "--disk", &format!("erp:db-data:{}:nbd", not_a_disk.display())]);
    assert_eq!(out.code, Some(2), "should exit 2:\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    for part in ["the agent rejects", "exited 2", "disk \"db-data\""] {
        assert!(out.stderr.contains(part), "the message should pass on the agent's refusal ({part:?} missing):\n{}", out.stderr);
    }
    assert!(s.files().is_empty(), "a rejected run installed files: {:?}", s.files());
}

#[test]
fn installed_unit_passes_systemd_analyze_verify() {
    let found = Command::new("sh").args(["-c", "command -v systemd-analyze"]).output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: systemd-analyze is not installed (it comes with systemd), so the unit file is not verified");
        return;
    }
    let s = Staging::new();
    s.run(&["--engine", "10.0.0.5:7400", "--vm", "erp-db", "--disk", &format!("erp:db-data:{}:auto", s.absent_disk("vdb"))]).assert_ok();
    // --root makes it resolve ExecStart inside the staging root, where the binary is installed.
    let (code, stdout, stderr) = run_code(
        Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", s.root().display())).arg(s.installed(UNIT)),
        SCRIPT_WITHIN,
    );
    assert_eq!(code, Some(0), "systemd-analyze verify failed:\nstdout: {stdout}\nstderr: {stderr}");
    // Unknown keys and bad values are only warnings (exit 0): there must be none.
    let warnings: Vec<_> =
        format!("{stdout}{stderr}").lines().filter(|l| l.contains("hindsight-agent.service")).map(String::from).collect();
    assert!(warnings.is_empty(), "systemd-analyze verify warns about the unit:\n{}", warnings.join("\n"));
}

#[test]
fn help_lists_every_option_and_exits_0() {
    let (code, stdout, stderr) = run_code(Command::new(script()).arg("--help"), SCRIPT_WITHIN);
    assert_eq!(code, Some(0), "--help failed: {stderr}");
    for opt in [
        "--binary",
        "--engine",
        "--vm",
        "--disk",
        "--freeze",
        "--prefix",
        "--config-dir",
        "--systemd-dir",
        "--force",
        "--no-start",
        "--root",
        "--dry-run",
    ] {
        assert!(stdout.contains(opt), "--help does not mention {opt}:\n{stdout}");
    }
}
