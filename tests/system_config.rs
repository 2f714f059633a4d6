//! Wrong configurations: each daemon stops at once with exit code 2 and a message naming the
//! file and the key, and an agent whose disk or VM does not match the engine's configuration
//! is refused before anything is replicated.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{agent_bin, free_port, hindsight_bin, run_code, Cluster, Vol};

/// Longest a daemon may take to reject its configuration.
const REJECT_WITHIN: Duration = Duration::from_secs(20);

/// Runs a daemon on a configuration that must be rejected: exit code 2, with a message on
/// stderr naming the file and every one of `names`.
fn assert_rejected(cmd: &mut Command, file: &Path, names: &[&str]) {
    let desc = format!("{cmd:?}");
    let (code, out, err) = run_code(cmd, REJECT_WITHIN);
    assert_eq!(code, Some(2), "{desc} should exit with code 2:\nstdout: {out}\nstderr: {err}");
    let file = file.display().to_string();
    assert!(err.contains(&file), "the message should name the file {file}: {err}");
    for name in names {
        assert!(err.contains(name), "the message should name {name:?}: {err}");
    }
}

fn engine_toml(dir: &Path, volume: &str) -> String {
    format!(
        "[engine]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\n[[group]]\nname = \"erp\"\nmode = \"cdp\"\ntarget = \"127.0.0.1:{}\"\n\n[[group.volume]]\n{volume}",
        free_port(),
        dir.join("engine").display(),
        free_port()
    )
}

#[test]
fn daemons_with_a_bad_config_exit_2_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Engine: a key that does not exist.
    let f = d.join("engine-unknown-key.toml");
    std::fs::write(&f, engine_toml(d, "name = \"db\"\nvm = \"erp-db\"\nsize = \"1MiB\"\ncolour = \"blue\"\n")).unwrap();
    assert_rejected(Command::new(hindsight_bin()).arg("engine").arg("--config").arg(&f), &f, &["colour"]);

    // Engine: a volume without a size.
    let f = d.join("engine-no-size.toml");
    std::fs::write(&f, engine_toml(d, "name = \"db\"\nvm = \"erp-db\"\n")).unwrap();
    assert_rejected(Command::new(hindsight_bin()).arg("engine").arg("--config").arg(&f), &f, &["\"db\"", "size"]);

    // Target: a retention that is not a duration.
    let f = d.join("target-retention.toml");
    std::fs::write(
        &f,
        format!("[target]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\nretention = \"soon\"\n", free_port(), d.join("t").display()),
    )
    .unwrap();
    assert_rejected(Command::new(hindsight_bin()).arg("target").arg("--config").arg(&f), &f, &["retention", "soon"]);

    // Agent: a listen address that is neither unix: nor tcp:.
    let f = d.join("agent-listen.toml");
    let disk = d.join("db.disk");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    std::fs::write(
        &f,
        format!(
            "[agent]\nengine = \"127.0.0.1:{}\"\nvm = \"erp-db\"\n\n[[disk]]\ngroup = \"erp\"\nvolume = \"db\"\npath = \"{}\"\nlisten = \"nbd://somewhere\"\n",
            free_port(),
            disk.display()
        ),
    )
    .unwrap();
    assert_rejected(Command::new(agent_bin()).arg("--config").arg(&f), &f, &["listen", "nbd://somewhere"]);
    // Nothing was started, so nothing was created either.
    assert!(!d.join("engine").exists() && !d.join("t").exists(), "a rejected daemon created its data directory");
}

/// How many records the target holds for the group (0 when it does not know the group).
fn target_records(c: &Cluster) -> u64 {
    c.history_if_known().map_or(0, |h| h["last_seq"].as_u64().unwrap_or_else(|| panic!("no last_seq in {h}")))
}

/// Starts the target and the engine and waits until the engine's shipper has reached the
/// target, so that the group exists there from the start.
fn servers(vols: &[Vol]) -> Cluster {
    let c = Cluster::start_servers(vols);
    c.wait_log("target", "ships group", 1);
    c
}

/// Runs an agent that the engine must refuse; returns its stderr.
fn refused_agent(c: &Cluster, vm: &str) -> String {
    let (code, out, err) = run_code(Command::new(agent_bin()).arg("--config").arg(c.agent_toml(vm)), REJECT_WITHIN);
    assert!(code.is_some_and(|c| c != 0), "the agent should stop with an error (exit {code:?}):\nstdout: {out}\nstderr: {err}");
    eprintln!("the agent stopped with exit code {code:?}: {}", err.trim());
    err
}

#[test]
fn agent_disk_smaller_than_the_engine_volume_is_refused_and_nothing_is_replicated() {
    let mut c = servers(&[Vol::new("vm1", "disk1", 4 << 20)]);
    std::fs::File::options().write(true).open(c.disk("disk1")).unwrap().set_len(2 << 20).unwrap();

    let err = refused_agent(&c, "vm1");
    for size in ["2097152", "4194304"] {
        assert!(err.contains(size), "the message should give both sizes ({size} missing): {err}");
    }
    assert!(err.contains("disk1"), "the message should name the volume: {err}");
    assert!(!c.sock("disk1").exists(), "a refused agent must not serve its disk");
    assert_eq!(target_records(&c), 0, "the target received writes of a refused agent");

    // The refusal left the volume free: with the right size the same agent is accepted.
    std::fs::File::options().write(true).open(c.disk("disk1")).unwrap().set_len(4 << 20).unwrap();
    c.start_agent("vm1");
    assert_eq!(target_records(&c), 0);
}

#[test]
fn agent_claiming_a_volume_of_another_vm_is_refused_naming_both() {
    let c = servers(&[Vol::new("y", "disk1", 1 << 20)]);
    // The agent config for VM "y", now claiming to be VM "x".
    let toml = std::fs::read_to_string(c.agent_toml("y")).unwrap();
    // With a certificate of its own: the engine, not the agent's loader, must refuse it.
    c.issue(&["--role", "agent", "--name", "x"]);
    let claimed = toml.replace("vm = \"y\"", "vm = \"x\"").replace(&c.tls_section("agent", "y"), &c.tls_section("agent", "x"));
    assert_ne!(toml, claimed);
    std::fs::write(c.agent_toml("x"), claimed).unwrap();

    let err = refused_agent(&c, "x");
    for name in ["\"x\"", "\"y\"", "disk1"] {
        assert!(err.contains(name), "the message should name {name}: {err}");
    }
    assert!(!c.sock("disk1").exists(), "a refused agent must not serve its disk");
    assert_eq!(target_records(&c), 0, "the target received writes of a refused agent");
}
