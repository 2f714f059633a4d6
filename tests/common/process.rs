//! Running the binaries and other commands with a timeout; waiting for ports and paths.

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

/// A TCP port of 127.0.0.1 nothing listens on now, never handed out before in this process: the tests of one
/// binary run side by side, and a port one of them picked but has not bound yet must not go
/// to another.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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

pub(super) fn kill(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Spawns `cmd` with its standard output piped and waits up to `within` for its first line
/// (a server's "ready" line); returns the child and that line. Kills the child and panics if
/// none comes.
pub fn spawn_until_line(cmd: &mut Command, within: Duration) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(within) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            panic!("{cmd:?} printed no line within {within:?} (exit {:?})", child.wait());
        }
    }
}

/// CPU time (user and system, in clock ticks of 10 ms) a process has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// CPU seconds (user and system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid) as f64 / 100.0
}

/// Runs fio with `args` and returns its JSON report.
pub fn fio_json(args: &[String]) -> serde_json::Value {
    let out = run_ok(Command::new("fio").args(args).arg("--output-format=json"));
    let start = out.find('{').expect("fio printed JSON");
    serde_json::from_str(&out[start..]).unwrap()
}
