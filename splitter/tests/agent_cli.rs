//! System tests of the `hindsight-agent` binary: configuration errors, `--check`, and how it
//! starts against an engine that refuses it, is not up yet, or never comes.

mod agent_support;
mod nbd_support;

use std::fs;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use agent_support::*;
use nbd_support::{run, text};

const TIMEOUT: Duration = Duration::from_secs(60);

fn agent(args: &[&std::ffi::OsStr]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_hindsight-agent")).args(args), TIMEOUT)
}

/// A directory with one 1 MiB disk "v" and an agent.toml for it pointing at `engine`.
fn setup(engine: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("v.img");
    fs::File::create(&disk).unwrap().set_len(MIB).unwrap();
    let config = write_agent_toml(dir.path(), engine, &[("v", &disk)], &dir.path().join("v.sock"));
    (dir, config)
}

fn config_args(config: &std::path::Path) -> [&std::ffi::OsStr; 2] {
    ["--config".as_ref(), config.as_os_str()]
}

#[test]
fn refused_hello_exits_nonzero_with_the_engine_message() {
    let message = "disk \"v\": group \"g\" is not configured on the engine (groups: erp)";
    let engine = FakeEngine::start(Behaviour { refuse: Some(message.into()), ..Behaviour::default() });
    let (_dir, config) = setup(&engine.addr.to_string());
    let started = Instant::now();
    let out = agent(&config_args(&config));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("error: the engine at {} refused this agent: {message}", engine.addr)), "{t}");
    // A refusal is not retried.
    assert_eq!(engine.hellos().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn unknown_config_key_exits_2_naming_file_and_key() {
    let (dir, config) = setup("127.0.0.1:7400");
    let text_before = fs::read_to_string(&config).unwrap();
    fs::write(&config, text_before.replace("vm = \"vm1\"", "vm = \"vm1\"\ncolour = \"blue\"")).unwrap();
    let out = agent(&config_args(&config));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.starts_with(&format!("error: {}", config.display())), "{t}");
    assert!(t.contains("colour"), "{t}");
    drop(dir);
}

#[test]
fn missing_disk_exits_2_naming_the_disk() {
    let (dir, config) = setup("127.0.0.1:7400");
    fs::remove_file(dir.path().join("v.img")).unwrap();
    let run_args = config_args(&config).to_vec();
    let mut check_args = run_args.clone();
    check_args.push("--check".as_ref());
    for args in [run_args, check_args] {
        let out = agent(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(t.contains("disk \"v\": cannot open") && t.contains("v.img"), "{t}");
    }
}

#[test]
fn check_validates_config_and_disks_without_an_engine() {
    let (_dir, config) = setup("127.0.0.1:7400");
    let mut args = config_args(&config).to_vec();
    args.push("--check".as_ref());
    let out = agent(&args);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("volume v of group g") && t.contains("1048576 bytes"), "{t}");
}

#[test]
fn version_is_printed() {
    let out = agent(&["--version".as_ref()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("hindsight-agent {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn engine_that_never_comes_fails_with_its_address() {
    let addr = free_port();
    let (_dir, config) = setup(&addr.to_string());
    let started = Instant::now();
    let out = agent(&config_args(&config));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("error: cannot reach the engine at {addr}")), "{t}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(30), "gave up after {took:?}");
}

#[test]
fn engine_that_starts_late_is_waited_for() {
    require_clients!("qemu-io");
    let addr = free_port();
    let (dir, config) = setup(&addr.to_string());
    let mut proc = AgentProcess::spawn(&config, &dir.path().join("agent.log"));
    thread::sleep(Duration::from_millis(1500));
    let engine = FakeEngine::start_on(addr, Behaviour::default());
    proc.wait_for_log("serving volume v of group g", Duration::from_secs(30));
    let uri = format!("nbd+unix:///v?socket={}", dir.path().join("v.sock").display());
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x61 0 4k"]), TIMEOUT);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(engine.write_count(), 1);
    assert!(engine.replay(0, MIB) == fs::read(dir.path().join("v.img")).unwrap());
}

#[test]
fn kernel_front_end_the_kernel_lacks_is_a_clear_error_before_anything_starts_and_in_check() {
    // Runs where the kernel lacks the front end (as on a build host without nbd or ublk).
    for (frontend, probe, needle) in
        [("ublk", "/dev/ublk-control", "this kernel offers no ublk"), ("nbd", "/sys/block/nbd0", "this kernel offers no nbd")]
    {
        let (dir, config) = setup(&free_port().to_string());
        let text_of = fs::read_to_string(&config).unwrap();
        let replaced = text_of.lines().filter(|l| !l.starts_with("listen")).collect::<Vec<_>>().join("\n");
        fs::write(&config, format!("{replaced}\nfrontend = \"{frontend}\"\n")).unwrap();
        let started = Instant::now();
        let out = agent(&config_args(&config));
        if std::path::Path::new(probe).exists() {
            eprintln!("skipped for {frontend}: this kernel offers it");
            continue;
        }
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains("volume v: ") && t.contains(needle) && t.contains("modprobe"), "{t}");
        // Failed before waiting for the (absent) engine.
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // --check says so too, instead of promising a device the start cannot make.
        let mut check = config_args(&config).to_vec();
        check.push("--check".as_ref());
        let out = agent(&check);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(3), "{t}");
        assert!(t.contains("NOT AVAILABLE on this kernel") && t.contains("the agent would not start here") && t.contains(needle), "{t}");
        drop(dir);
    }
}
