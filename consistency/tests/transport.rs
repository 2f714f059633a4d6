//! The transport on 127.0.0.1: TLS handshakes with certificates made here (rcgen), who is
//! refused and with which words, and the two halves of a connection carrying data both ways
//! at once from several threads without blocking each other.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use hindsight_consistency::transport::{AcceptError, Connection, Peer, Role, Security, TlsEndpoint, TlsFiles, TransportError};
use hindsight_consistency::wire::{read_frame, write_frame, FrameType};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// A CA made for a test, able to issue certificates.
struct Ca {
    dir: PathBuf,
    name: String,
    key: KeyPair,
    params: CertificateParams,
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - days(1);
        params.not_after = now + days(30);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca { dir: dir.to_owned(), name: name.to_owned(), key, params }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// Issues `<name>.<role>.hindsight` (plus `hosts`), valid from `from` to `to` days from
    /// now; returns the files with this CA.
    fn issue_between(&self, role: Role, name: &str, hosts: &[&str], from: i64, to: i64) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let mut sans = vec![SanType::DnsName(format!("{name}.{role}.hindsight").try_into().unwrap())];
        for h in hosts {
            sans.push(match h.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*h).try_into().unwrap()),
            });
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, format!("{name}.{role}.hindsight"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + days(from);
        params.not_after = now + days(to);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let stem = format!("{}-{role}-{name}-{from}-{to}", self.name);
        let cert_file = self.dir.join(format!("{stem}.pem"));
        let key_file = self.dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        TlsFiles { ca: self.ca_file(), cert: cert_file, key: key_file }
    }

    fn issue(&self, role: Role, name: &str, hosts: &[&str]) -> TlsFiles {
        self.issue_between(role, name, hosts, -1, 10)
    }
}

fn endpoint(files: &TlsFiles, role: Role) -> Security {
    Security::Tls(Arc::new(TlsEndpoint::load(files, role, None).unwrap()))
}

/// Accepts one connection on a thread; returns the address and what `accept` gave.
fn serve_once(server: Security) -> (std::net::SocketAddr, thread::JoinHandle<Result<Connection, AcceptError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        server.accept(tcp)
    });
    (addr, t)
}

fn accept_error(r: Result<Connection, AcceptError>) -> String {
    match r {
        Ok(c) => panic!("accepted {:?}", c.peer()),
        Err(AcceptError::Failed(e)) => e.to_string(),
        Err(AcceptError::Plaintext(_)) => "plaintext".into(),
    }
}

/// A client built around rustls directly, to present what a Hindsight endpoint would refuse
/// to load: no certificate, an expired one, one of a CA it does not trust.
fn raw_client(ca: &Path, identity: Option<&TlsFiles>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(hindsight_consistency::transport::tls::read_certificates("ca", ca).unwrap());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some(f) => {
            let chain = hindsight_consistency::transport::tls::read_certificates("cert", &f.cert).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&f.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// Runs a handshake with `config` against `addr` and sends a few bytes; the server decides.
fn raw_connect(config: rustls::ClientConfig, addr: std::net::SocketAddr) -> String {
    let conn = rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    let _ = tls.write_all(b"HSWF");
    let _ = tls.flush();
    // TLS 1.3: the client learns of the refusal on its first read.
    match tls.read(&mut [0u8; 16]) {
        Ok(n) => format!("read {n} bytes"),
        Err(e) => e.to_string(),
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    engine: TlsFiles,
    agent: TlsFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let engine = ca.issue(Role::Engine, "site-a", &["127.0.0.1"]);
    let agent = ca.issue(Role::Agent, "vm1", &[]);
    Pki { _dir: dir, ca, engine, agent }
}

#[test]
fn mutual_tls_names_both_peers() {
    let p = pki();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let client = endpoint(&p.agent, Role::Agent);
    let mut c = client.connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine).unwrap();
    let mut s = server.join().unwrap().unwrap();
    let Peer::Certified(agent) = s.peer().clone() else { panic!("plaintext") };
    assert!(agent.is(Role::Agent, "vm1") && !agent.is(Role::Agent, "vm2"), "{agent}");
    let Peer::Certified(engine) = c.peer().clone() else { panic!("plaintext") };
    assert_eq!(engine.name(Role::Engine), Some("site-a"));
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
}

#[test]
fn halves_carry_large_streams_both_ways_at_once() {
    let p = pki();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let client = endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine).unwrap();
    let server = server.join().unwrap().unwrap();
    const TOTAL: usize = 48 << 20;
    let pattern = |i: usize| u8::try_from((i * 7 + i / 4093) % 251).unwrap();
    let mut threads = Vec::new();
    for conn in [client, server] {
        let (mut r, mut w) = conn.split();
        // Both sides write everything before reading anything back would deadlock if a
        // reader waited on the writer's socket; the reader runs on its own thread here.
        threads.push(thread::spawn(move || {
            let mut sent = 0;
            let mut size = 1;
            while sent < TOTAL {
                let n = size.min(TOTAL - sent);
                let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
                w.write_all(&chunk).unwrap();
                sent += n;
                size = (size * 3 + 1) % (3 << 20) + 1;
            }
            w.close();
        }));
        threads.push(thread::spawn(move || {
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {}", got + k);
                }
                got += n;
            }
            assert_eq!(got, TOTAL);
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn concurrent_writers_and_acks_flow_like_the_data_path() {
    // Four threads send 4 KiB frames on one write half while the peer answers each with a
    // small frame, read by a reader thread: the agent's link in miniature.
    let p = pki();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let client = endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine).unwrap();
    let server = server.join().unwrap().unwrap();
    const PER_THREAD: usize = 2000;
    let (sr, sw) = server.split();
    let echo = thread::spawn(move || {
        let mut r = std::io::BufReader::new(sr);
        let mut w = sw;
        let mut payload = Vec::new();
        let mut scratch = Vec::new();
        let mut n = 0;
        while let Ok(FrameType::Write) = read_frame(&mut r, &mut payload) {
            assert_eq!(payload.len(), 4096);
            write_frame(&mut w, FrameType::WriteAck, &payload[..24], &mut scratch).unwrap();
            n += 1;
        }
        n
    });
    let (cr, cw) = client.split();
    let cw = Arc::new(std::sync::Mutex::new(cw));
    let acks = thread::spawn(move || {
        let mut r = std::io::BufReader::new(cr);
        let mut payload = Vec::new();
        for _ in 0..4 * PER_THREAD {
            assert_eq!(read_frame(&mut r, &mut payload).unwrap(), FrameType::WriteAck);
        }
    });
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let cw = Arc::clone(&cw);
            thread::spawn(move || {
                let mut scratch = Vec::new();
                for i in 0..PER_THREAD {
                    let data = vec![u8::try_from((t * 31 + i) % 256).unwrap(); 4096];
                    write_frame(&mut *cw.lock().unwrap(), FrameType::Write, &data, &mut scratch).unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    acks.join().unwrap();
    cw.lock().unwrap().close();
    assert_eq!(echo.join().unwrap(), 4 * PER_THREAD);
}

#[test]
fn a_client_without_certificate_is_refused() {
    let p = pki();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let client_side = raw_connect(raw_client(&p.engine.ca, None), addr);
    let e = accept_error(server.join().unwrap());
    assert!(e.contains("presented no certificate"), "{e}");
    assert!(client_side.contains("CertificateRequired"), "{client_side}");
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let p = pki();
    let other = Ca::new(p.ca.dir.as_path(), "other");
    let mut stranger = other.issue(Role::Agent, "vm1", &[]);
    // It trusts the right CA, so the engine is the one that refuses it.
    stranger.ca = p.ca.ca_file();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let client_side = raw_connect(raw_client(&p.ca.ca_file(), Some(&stranger)), addr);
    let e = accept_error(server.join().unwrap());
    assert!(e.contains("not issued by the CA"), "{e}");
    assert!(client_side.contains("UnknownCA"), "{client_side}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let p = pki();
    let expired = p.ca.issue_between(Role::Agent, "vm1", &[], -10, -1);
    // Its own loader refuses it too, so the handshake is driven with a config built around it.
    let load = TlsEndpoint::load(&expired, Role::Agent, None).unwrap_err().to_string();
    assert!(load.contains("tls.cert") && load.contains("expired"), "{load}");
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    raw_connect(raw_client(&p.ca.ca_file(), Some(&expired)), addr);
    let e = accept_error(server.join().unwrap());
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn a_server_of_another_role_or_name_is_refused_by_the_client() {
    let p = pki();
    let target = p.ca.issue(Role::Target, "dr", &["127.0.0.1"]);
    let (addr, _server) = serve_once(endpoint(&target, Role::Target));
    let e = endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine).unwrap_err();
    assert!(matches!(e, TransportError::WrongPeer { expected: Role::Engine, .. }), "{e}");
    assert!(e.is_refusal());

    let (addr, _server) = serve_once(endpoint(&p.engine, Role::Engine));
    let e = endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "10.9.9.9", Role::Engine).unwrap_err();
    assert!(e.to_string().contains("not valid for the name"), "{e}");
    let (addr, _server) = serve_once(endpoint(&p.engine, Role::Engine));
    endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "site-a.engine.hindsight", Role::Engine).unwrap();
}

#[test]
fn plaintext_and_tls_never_mix() {
    let p = pki();
    let (addr, server) = serve_once(endpoint(&p.engine, Role::Engine));
    let mut plain = Security::InsecurePlaintext.connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine).unwrap();
    plain.write_all(b"HSWF....").unwrap();
    match server.join().unwrap() {
        Err(AcceptError::Plaintext(c)) => assert_eq!(c.peer(), &Peer::Plaintext),
        other => panic!("{other:?}"),
    }

    let (addr, server) = serve_once(Security::InsecurePlaintext);
    let e = endpoint(&p.agent, Role::Agent).connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", Role::Engine);
    let s = accept_error(server.join().unwrap());
    assert!(s.contains("insecure_plaintext"), "{s}");
    assert!(e.is_err());
}

#[test]
fn loading_names_the_key_and_the_fix() {
    let p = pki();
    let e = TlsEndpoint::load(&p.agent, Role::Engine, None).unwrap_err().to_string();
    assert!(e.starts_with("tls.cert = ") && e.contains("not an engine") && e.contains("--role engine"), "{e}");
    let e = TlsEndpoint::load(&p.agent, Role::Agent, Some("vm2")).unwrap_err().to_string();
    assert!(e.contains("vm1.agent.hindsight") && e.contains("vm2.agent.hindsight"), "{e}");
    let swapped = TlsFiles { key: p.engine.key.clone(), ..p.agent.clone() };
    let e = TlsEndpoint::load(&swapped, Role::Agent, None).unwrap_err().to_string();
    assert!(e.starts_with("tls.key = ") && e.contains("does not fit"), "{e}");
    let missing = TlsFiles { ca: p.ca.dir.join("nope.pem"), ..p.agent.clone() };
    let e = TlsEndpoint::load(&missing, Role::Agent, None).unwrap_err().to_string();
    assert!(e.starts_with("tls.ca = ") && e.contains("No such file"), "{e}");
    let other = Ca::new(p.ca.dir.as_path(), "other");
    let foreign = TlsFiles { ca: other.ca_file(), ..p.agent.clone() };
    let e = TlsEndpoint::load(&foreign, Role::Agent, None).unwrap_err().to_string();
    assert!(e.contains("not issued by the CA in tls.ca"), "{e}");
}
