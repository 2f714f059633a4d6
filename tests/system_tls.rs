//! TLS between the real target, engine and agents, with certificates made by `hindsight
//! certs`: the right certificates replicate; a certificate of another CA, none at all, one
//! for another VM, an expired one, a plaintext agent on the TLS port and an engine the target
//! does not trust are all refused, with a log line naming the reason, and nothing they send
//! is written (the engine's journal stays empty, the target holds nothing). After each
//! refusal the right agent writes once, and exactly that one write arrives.
//!
//! Where a well-behaved agent refuses its own bad configuration before connecting (an
//! expired certificate, one of a CA it does not trust for the engine), the engine's own
//! refusal is shown with a hand-made TLS client that presents it anyway.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{agent_bin, certs, have_tools, hindsight_bin, qemu_io, run_code, run_ok, tls_section, Cluster, Vol};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, AgentHello, DiskHello, ErrorMessage, FrameType, WriteMsg, PROTOCOL_VERSION,
};
use hindsight_consistency::WriteKind;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const SIZE: u64 = 4 << 20;
const WITHIN: Duration = Duration::from_secs(30);

/// Runs an agent that must stop with an error; returns its standard error.
fn refused_agent(config: &Path) -> String {
    let (code, out, err) = run_code(Command::new(agent_bin()).arg("--config").arg(config), WITHIN);
    assert!(code.is_some_and(|c| c != 0), "the agent should stop with an error (exit {code:?}):\nstdout: {out}\nstderr: {err}");
    eprintln!("the agent stopped with exit code {code:?}: {}", err.trim());
    err
}

/// Writes an agent.toml for `vm` serving `volume` with this [tls] section; returns its path.
fn agent_toml(c: &Cluster, file: &str, vm: &str, volume: &str, tls: &str) -> PathBuf {
    let path = c.path(file);
    let text = format!(
        "[agent]\nengine = \"127.0.0.1:{}\"\nvm = \"{vm}\"\n\n{tls}\n[[disk]]\ngroup = \"{}\"\nvolume = \"{volume}\"\npath = \"{}\"\nlisten = \"unix:{}\"\n",
        c.eport,
        c.group,
        c.disk(volume).display(),
        c.sock(volume).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS client built on rustls directly, trusting the cluster's CA and presenting `identity`
/// (certificate, key) or nothing: what the agent's own checks would never send. It says
/// hello as `vm` with `volume`, reads the answer, then sends one 4 KiB write anyway. Returns
/// what it saw.
fn raw_agent(c: &Cluster, identity: Option<(PathBuf, PathBuf)>, vm: &str, volume: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(c.pki().join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap()).unwrap()
        }
    };
    let conn = rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", c.eport)).unwrap();
    tcp.set_read_timeout(Some(WITHIN)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let hello = AgentHello {
        protocol: PROTOCOL_VERSION,
        vm: vm.into(),
        disks: vec![DiskHello { group: c.group.clone(), volume: volume.into(), size: SIZE }],
    };
    let mut scratch = Vec::new();
    if let Err(e) = write_frame(&mut s, FrameType::AgentHello, &encode_message(&hello), &mut scratch) {
        return format!("hello not sent: {e}");
    }
    let mut payload = Vec::new();
    let seen = match read_frame(&mut s, &mut payload) {
        Ok(FrameType::Error) => format!("Error frame: {}", decode_message::<ErrorMessage>("Error", &payload).unwrap().message),
        Ok(other) => panic!("the engine answered {other:?} to a peer it must refuse"),
        Err(e) => e.to_string(),
    };
    let w = WriteMsg { req_id: 1, offset: 0, length: 4096, disk: 0, kind: WriteKind::Data };
    let mut frame = w.encode_header().to_vec();
    frame.extend_from_slice(&[0xab; 4096]);
    let _ = write_frame(&mut s, FrameType::Write, &frame, &mut scratch);
    eprintln!("the hand-made client saw: {seen}");
    seen
}

/// The engine journaled nothing and the target holds nothing.
fn assert_nothing_written(c: &Cluster) {
    // Give anything that slipped through time to reach the journal.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.engine_records(), 0, "the engine journaled writes of a refused peer; logs in {}", c.dir.path().display());
    assert_eq!(c.target_last_seq(), 0, "the target holds writes of a refused peer");
}

/// The right agent of `vm` writes one 4 KiB block to `volume`: exactly one record arrives
/// everywhere (so nothing a refused peer sent was kept), and the target's image has it.
fn the_right_certificate_works(c: &mut Cluster, vm: &str, volume: &str) {
    c.start_agent(vm);
    qemu_io(&c.uri(volume), &["write -P 0x5c 8192 4096".to_string()]);
    c.wait_target_seq(1);
    assert_eq!(c.settle(), 1, "exactly the one write of the right agent reaches the target");
    assert_eq!(c.engine_records(), 1);
    let image = c.recover(volume, &["--latest"]);
    assert!(image[8192..12288].iter().all(|&b| b == 0x5c) && image[..8192].iter().all(|&b| b == 0), "the recovered image lacks the write");
}

#[test]
fn right_certificates_replicate_and_each_side_logs_its_peer() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    the_right_certificate_works(&mut c, "vm1", "disk1");
    c.wait_log("engine", "(vm vm1, certificate vm1.agent.hindsight) attached volumes disk1", 1);
    c.wait_log("target", "(certificate primary.engine.hindsight) ships group \"erp\"", 1);
    c.wait_log("agent-vm1", "(certificate primary.engine.hindsight)", 1);
    assert!(!c.log("engine").contains("plaintext"), "{}", c.log("engine"));
}

#[test]
fn certificates_of_another_ca_are_refused_and_nothing_is_written() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    let other = c.path("pki-other");
    certs(&["init"], &other);
    certs(&["issue", "--role", "agent", "--name", "vm1"], &other);

    // The real agent, all of whose files come from the other CA: it refuses the engine's
    // certificate, and the engine hears why.
    let config = agent_toml(&c, "agent-other-ca.toml", "vm1", "disk1", &tls_section(&other, "agent", "vm1"));
    let err = refused_agent(&config);
    assert!(err.contains("not issued by the CA in tls.ca"), "{err}");
    c.wait_log("engine", "refused: TLS handshake failed: the peer refused the TLS session (alert UnknownCA)", 1);

    // A client that trusts the engine but presents the other CA's certificate.
    let seen = raw_agent(&c, Some((other.join("agent-vm1.pem"), other.join("agent-vm1-key.pem"))), "vm1", "disk1");
    assert!(seen.contains("UnknownCA") || seen.contains("refused"), "{seen}");
    c.wait_log("engine", "the peer's certificate is refused: it is not issued by the CA in tls.ca (unknown issuer)", 1);
    assert!(!c.sock("disk1").exists());
    assert_nothing_written(&c);
    the_right_certificate_works(&mut c, "vm1", "disk1");
}

#[test]
fn a_client_without_certificate_is_refused_and_nothing_is_written() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    let seen = raw_agent(&c, None, "vm1", "disk1");
    assert!(seen.contains("CertificateRequired") || seen.contains("refused"), "{seen}");
    c.wait_log("engine", "the peer presented no certificate", 1);
    assert_nothing_written(&c);
    the_right_certificate_works(&mut c, "vm1", "disk1");
}

#[test]
fn an_agent_certified_for_another_vm_cannot_write_its_volumes() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("erp-db", "db", SIZE), Vol::new("crm-app", "crm", SIZE)]);

    // The real agent of crm-app, with its own certificate, asking for erp-db's volume.
    let config = agent_toml(&c, "agent-crm-claims-db.toml", "crm-app", "db", &c.tls_section("agent", "crm-app"));
    let err = refused_agent(&config);
    assert!(err.contains("belongs to vm \"erp-db\"") && err.contains("\"crm-app\""), "{err}");

    // crm-app's certificate, with a hello that claims to be erp-db.
    let pki = c.pki();
    let seen = raw_agent(&c, Some((pki.join("agent-crm-app.pem"), pki.join("agent-crm-app-key.pem"))), "erp-db", "db");
    assert!(seen.contains("an agent may only write the volumes of its own VM"), "{seen}");
    c.wait_log("engine", "refused: its certificate names crm-app.agent.hindsight, but its hello claims vm \"erp-db\"", 1);
    assert!(!c.sock("db").exists());
    assert_nothing_written(&c);
    the_right_certificate_works(&mut c, "erp-db", "db");
}

#[test]
fn a_plaintext_agent_on_the_tls_port_is_refused_and_nothing_is_written() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    let config = agent_toml(&c, "agent-plaintext.toml", "vm1", "disk1", "[tls]\ninsecure_plaintext = true\n");
    let err = refused_agent(&config);
    assert!(err.contains("this engine requires TLS"), "{err}");
    c.wait_log("engine", "refused: it does not use TLS, and this engine requires it; nothing it sent is read", 1);
    assert_nothing_written(&c);
    the_right_certificate_works(&mut c, "vm1", "disk1");
}

#[test]
fn an_expired_certificate_is_refused_and_nothing_is_written() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    let expired = c.path("pki-expired");
    let out = run_ok(
        Command::new(hindsight_bin())
            .args(["certs", "issue", "--role", "agent", "--name", "vm1", "--not-after", "2020-01-01T00:00:00Z", "--dir"])
            .arg(c.pki())
            .arg("--out-dir")
            .arg(&expired),
    );
    assert!(out.contains("already expired"), "{out}");

    // The agent's own loader refuses it before connecting, naming the key.
    let tls = tls_section(&c.pki(), "agent", "vm1")
        .replace(&c.pki().join("agent-vm1").display().to_string(), &expired.join("agent-vm1").display().to_string());
    let config = agent_toml(&c, "agent-expired.toml", "vm1", "disk1", &tls);
    let err = refused_agent(&config);
    assert!(err.contains("tls.cert") && err.contains("expired"), "{err}");

    // Presented anyway, the engine refuses it.
    let seen = raw_agent(&c, Some((expired.join("agent-vm1.pem"), expired.join("agent-vm1-key.pem"))), "vm1", "disk1");
    assert!(seen.contains("CertificateExpired") || seen.contains("refused"), "{seen}");
    c.wait_log("engine", "the peer's certificate is refused: it has expired", 1);
    assert_nothing_written(&c);
    the_right_certificate_works(&mut c, "vm1", "disk1");
}

#[test]
fn the_target_refuses_an_engine_it_does_not_trust_and_holds_nothing() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let mut c = Cluster::start_servers_tls(&[Vol::new("vm1", "disk1", SIZE)], "", "engines = [\"other-site\"]");
    c.wait_log("target", "engine primary is not trusted here: tls.engines in target.toml lists other-site", 1);
    c.wait_log("engine", "target refused: engine primary is not trusted here", 1);
    // The engine still acknowledges (cdp: its journal holds the write); the target takes nothing.
    c.start_agent("vm1");
    qemu_io(&c.uri("disk1"), &["write -P 0x11 0 4096".to_string()]);
    assert_eq!(c.engine_records(), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!c.path("target").join("groups").join("erp").exists(), "the target created the group of an engine it does not trust");
    assert_eq!(c.target_last_seq(), 0);
}

#[test]
fn a_plaintext_engine_is_refused_by_a_tls_target() {
    let mut c = Cluster::prepare(&[Vol::new("vm1", "disk1", SIZE)], "", "");
    let engine_toml = std::fs::read_to_string(c.engine_toml()).unwrap();
    let plain = engine_toml.replace(&c.tls_section("engine", common::ENGINE_NAME), "[tls]\ninsecure_plaintext = true\n");
    assert_ne!(engine_toml, plain);
    std::fs::write(c.engine_toml(), plain).unwrap();
    c.start_target();
    c.start_engine();
    c.wait_log("target", "refused: it does not use TLS, and this target requires it", 1);
    c.wait_log("engine", "target refused: this target requires TLS", 1);
    assert!(!c.path("target").join("groups").join("erp").exists(), "the target created a group for a plaintext engine");
}

#[test]
fn certs_never_overwrite_a_ca_or_a_key_and_check_names_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = certs(&["init"], &pki);
    assert!(out.contains("ca.pem") && out.contains("ca-key.pem"), "{out}");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pki.join("ca-key.pem")).unwrap().permissions());
    assert_eq!(key_mode & 0o777, 0o600);
    let fails = |args: &[&str], wanted: &str| {
        let (code, out, err) = run_code(Command::new(hindsight_bin()).arg("certs").args(args).arg("--dir").arg(&pki), WITHIN);
        assert_ne!(code, Some(0), "{args:?} should fail:\n{out}");
        assert!(err.contains(wanted), "{args:?}: the message should contain {wanted:?}: {err}");
    };
    fails(&["init"], "already holds a CA");
    let out = certs(&["issue", "--role", "engine", "--name", "primary", "--host", "127.0.0.1,engine.example.com"], &pki);
    assert!(out.contains("primary.engine.hindsight and 127.0.0.1, engine.example.com") && out.contains("[tls]"), "{out}");
    fails(&["issue", "--role", "engine", "--name", "primary"], "--force");
    certs(&["issue", "--role", "engine", "--name", "primary", "--force"], &pki);
    fails(&["issue", "--role", "agent", "--name", "a..b"], "cannot be written in a certificate");
    fails(&["issue", "--role", "admin", "--name", "x"], "agent, engine, target or operator");
    fails(&["issue", "--role", "target", "--name", "dr", "--host", "not a host"], "--host");
    let (code, _, err) = run_code(
        Command::new(hindsight_bin()).args(["certs", "issue", "--role", "agent", "--name", "x", "--dir"]).arg(dir.path().join("none")),
        WITHIN,
    );
    assert!(code != Some(0) && err.contains("hindsight certs init"), "{err}");
}

#[test]
fn status_in_plaintext_against_a_tls_engine_is_told_what_to_give_it() {
    let c = Cluster::start_servers(&[Vol::new("vm1", "disk1", SIZE)]);
    let engine = format!("127.0.0.1:{}", c.eport);
    let (code, out, err) = run_code(Command::new(hindsight_bin()).args(["status", "--engine", &engine, "--insecure-plaintext"]), WITHIN);
    assert!(code.is_some_and(|c| c != 0), "status should fail (exit {code:?}):\nstdout: {out}\nstderr: {err}");
    assert!(err.contains("this engine requires TLS"), "{err}");
    // The operator is told about the command's own options, not only about agent.toml.
    assert!(err.contains("hindsight status") && err.contains("instead of --insecure-plaintext"), "{err}");
}
