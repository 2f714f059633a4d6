//! TLS material of one daemon (CA, certificate, key), the rustls configurations built from it,
//! the handshakes, and the words an operator reads when one fails.
//!
//! TLS 1.3 only, with the `ring` provider; both sides present a certificate issued by the
//! configured CA (mutual authentication). Sessions are not resumed and no tickets are sent:
//! connections are long-lived, and a handshake per (re)connection is cheap.

use std::io::{self, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

use super::error::TransportError;
use super::identity::{check_server_name, identities_in, Identity, PeerIdentity, Role};

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The three files of a daemon's `[tls]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must be issued by (PEM).
    pub ca: PathBuf,
    /// This daemon's certificate, then any intermediates (PEM).
    pub cert: PathBuf,
    /// This daemon's private key (PEM, PKCS#8 or SEC1).
    pub key: PathBuf,
}

/// A problem with a `[tls]` file, naming its key; shown as `tls.cert = "/path": why; fix`.
#[derive(Debug, Error)]
#[error("tls.{key} = {path:?}: {problem}")]
pub struct TlsSetupError {
    /// `ca`, `cert` or `key`.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong and what to do.
    pub problem: String,
}

/// Everything one daemon needs for its TLS links: the server and client configurations built
/// from its files, and the identities its own certificate names.
pub struct TlsEndpoint {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    own: PeerIdentity,
    files: TlsFiles,
}

impl std::fmt::Debug for TlsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEndpoint").field("own", &self.own.to_string()).field("files", &self.files).finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn setup_err(key: &'static str, path: &Path, problem: impl Into<String>) -> TlsSetupError {
    TlsSetupError { key, path: path.to_owned(), problem: problem.into() }
}

/// Reads every certificate of a PEM file.
pub fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| setup_err(key, path, format!("cannot read certificates from it: {}", pem_problem(&e))))?;
    if certs.is_empty() {
        return Err(setup_err(key, path, "holds no certificate (no \"BEGIN CERTIFICATE\" block)"));
    }
    Ok(certs)
}

fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

impl TlsEndpoint {
    /// Loads and checks a daemon's files: the CA, its certificate chain and key (which must
    /// match), the certificate valid now, issued by that CA, and naming an identity of `role`
    /// (and, when `name` is given, exactly that name).
    pub fn load(files: &TlsFiles, role: Role, name: Option<&str>) -> Result<TlsEndpoint, TlsSetupError> {
        Self::load_as(files, Some(role), name)
    }

    /// Loads the files of a client that may be any of several roles (`hindsight bookmark`
    /// with an operator's, an agent's or an engine's certificate): the role is the first
    /// its certificate names.
    pub fn load_client(files: &TlsFiles) -> Result<TlsEndpoint, TlsSetupError> {
        Self::load_as(files, None, None)
    }

    fn load_as(files: &TlsFiles, role: Option<Role>, name: Option<&str>) -> Result<TlsEndpoint, TlsSetupError> {
        let ca = read_certificates("ca", &files.ca)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| setup_err("ca", &files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certificates("cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| setup_err("key", &files.key, format!("cannot read a private key from it: {}", pem_problem(&e))))?;

        let own = PeerIdentity::new(identities_in(&chain[0]).map_err(|e| setup_err("cert", &files.cert, e.to_string()))?);
        let role =
            match role {
                Some(r) => r,
                None => own.identities().iter().map(|i| i.role).find(|r| r.connects()).ok_or_else(|| {
                    setup_err("cert", &files.cert, format!("the certificate names {own}, not an operator, agent or engine"))
                })?,
            };
        let issue_hint =
            |what: &str| format!("issue one with `hindsight certs issue --dir DIR --role {role} --name {}`", name.unwrap_or(what));
        match name {
            Some(n) if !own.is(role, n) => {
                return Err(setup_err(
                    "cert",
                    &files.cert,
                    format!("the certificate names {own}, not {}; {}", Identity { role, name: n.to_owned() }, issue_hint(n)),
                ))
            }
            None if own.name(role).is_none() => {
                return Err(setup_err(
                    "cert",
                    &files.cert,
                    format!(
                        "the certificate names {own}, not {} (a name ending in .{role}.hindsight); {}",
                        role.with_article(),
                        issue_hint("NAME")
                    ),
                ))
            }
            _ => {}
        }

        let provider = provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| setup_err("ca", &files.ca, format!("cannot verify clients with it: {e}")))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| setup_err("ca", &files.ca, format!("cannot verify servers with it: {e}")))?;

        // The daemon's own certificate must pass the checks its peers will make.
        let now = UnixTime::now();
        let own_check = if role.serves() {
            let own_name = own.identities().iter().find(|i| i.role == role).map(Identity::dns_name).unwrap_or_default();
            let sn = check_server_name(&own_name).map_err(|e| setup_err("cert", &files.cert, e.to_string()))?;
            server_verifier.verify_server_cert(&chain[0], &chain[1..], &sn, &[], now).map(|_| ())
        } else {
            client_verifier.verify_client_cert(&chain[0], &chain[1..], now).map(|_| ())
        };
        own_check.map_err(|e| {
            setup_err("cert", &files.cert, format!("{}; issue a new certificate with `hindsight certs issue`", explain_own(&e, &files.ca)))
        })?;

        let versions = [&rustls::version::TLS13];
        let key_problem = |e: rustls::Error| {
            setup_err("key", &files.key, format!("does not fit the certificate in tls.cert ({e}); give the key written with it"))
        };
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions)
            .map_err(|e| setup_err("ca", &files.ca, e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(key_problem)?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| setup_err("ca", &files.ca, e.to_string()))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(key_problem)?;
        client.resumption = Resumption::disabled();
        client.enable_sni = false;
        Ok(TlsEndpoint { server: Arc::new(server), client: Arc::new(client), own, files: files.clone() })
    }

    /// The identities this daemon's own certificate names.
    pub fn own(&self) -> &PeerIdentity {
        &self.own
    }

    /// The files it was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The server side of a handshake on a fresh connection (the peer's first byte is known
    /// to open a TLS record). Returns the connection and the client's identities.
    pub(super) fn accept(&self, tcp: &mut TcpStream) -> Result<(rustls::Connection, PeerIdentity), TransportError> {
        let conn = ServerConnection::new(Arc::clone(&self.server)).map_err(|e| handshake_error(&e))?;
        let mut conn = rustls::Connection::Server(conn);
        handshake(&mut conn, tcp)?;
        let peer = peer_identity(&conn)?;
        Ok((conn, peer))
    }

    /// The client side of a handshake: the server's certificate must be valid for
    /// `server_name` and name an identity of `role`.
    pub(super) fn connect(
        &self,
        tcp: &mut TcpStream,
        server_name: &str,
        role: Role,
    ) -> Result<(rustls::Connection, PeerIdentity), TransportError> {
        let name: ServerName<'static> = check_server_name(server_name).map_err(TransportError::BadServerName)?;
        let conn = ClientConnection::new(Arc::clone(&self.client), name).map_err(|e| handshake_error(&e))?;
        let mut conn = rustls::Connection::Client(conn);
        handshake(&mut conn, tcp)?;
        let peer = peer_identity(&conn)?;
        if peer.name(role).is_none() {
            return Err(TransportError::WrongPeer { expected: role, presented: peer.to_string() });
        }
        Ok((conn, peer))
    }
}

fn handshake_error(e: &rustls::Error) -> TransportError {
    TransportError::Handshake { reason: explain(e), refused: is_refusal(e) }
}

fn handshake_io_error(e: &io::Error) -> TransportError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => handshake_error(tls),
        None => TransportError::Handshake { reason: explain_io(e), refused: false },
    }
}

/// Runs a handshake to its end on a blocking socket, with [`HANDSHAKE_TIMEOUT`].
fn handshake(conn: &mut rustls::Connection, tcp: &mut TcpStream) -> Result<(), TransportError> {
    let io = |e: io::Error| handshake_io_error(&e);
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    while conn.is_handshaking() {
        match conn.complete_io(tcp) {
            Ok((0, 0)) => {
                return Err(TransportError::Handshake {
                    reason: "the peer closed the connection during the TLS handshake (is it configured with \
                             tls.insecure_plaintext = true?)"
                        .into(),
                    refused: false,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(handshake_io_error(&e)),
        }
    }
    while conn.wants_write() {
        conn.write_tls(tcp).map_err(io)?;
    }
    tcp.flush().map_err(io)?;
    tcp.set_read_timeout(None).map_err(io)?;
    tcp.set_write_timeout(None).map_err(io)?;
    Ok(())
}

fn peer_identity(conn: &rustls::Connection) -> Result<PeerIdentity, TransportError> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| TransportError::Handshake { reason: "the peer presented no certificate".into(), refused: true })?;
    identities_in(cert).map(PeerIdentity::new).map_err(|e| TransportError::Handshake { reason: e.to_string(), refused: true })
}

/// Why a handshake or a TLS read failed, in words that say what to look at.
pub fn explain(e: &rustls::Error) -> String {
    match e {
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no certificate (each side needs one issued by the CA in tls.ca)".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("the peer's certificate is refused: {}", explain_certificate(c)),
        rustls::Error::AlertReceived(alert) => format!(
            "the peer refused the TLS session (alert {alert:?}): it does not accept this side's certificate, or it is not a \
             Hindsight TLS port; the peer's log says why"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the peer does not speak TLS ({e}); is it configured with tls.insecure_plaintext = true?")
        }
        other => format!("TLS: {other}"),
    }
}

fn explain_certificate(c: &CertificateError) -> String {
    match c {
        CertificateError::UnknownIssuer => "it is not issued by the CA in tls.ca (unknown issuer)".into(),
        CertificateError::BadSignature => "its signature does not verify against the CA in tls.ca".into(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!("it has expired ({c})"),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("it is not valid yet ({c}); check both clocks")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
            "it is not valid for the name this side expects ({c}); issue it with `--host` for that address, or set the \
             expected name (server_name / target_server_name)"
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => format!(
            "it is not made for this use ({c}): engines and targets need server certificates, agents, engines and operators \
             client certificates; issue it with `hindsight certs issue --role ...`"
        ),
        other => other.to_string(),
    }
}

/// Why this daemon's own certificate would be refused by its peers.
fn explain_own(e: &rustls::Error, ca: &Path) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            format!("the certificate is not issued by the CA in tls.ca ({})", ca.display())
        }
        rustls::Error::InvalidCertificate(c) => format!("the certificate is not usable: {c}"),
        other => other.to_string(),
    }
}

/// Like [`explain`] for an I/O error that may carry a rustls error.
pub fn explain_io(e: &io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => explain(tls),
        None if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            format!("no answer within {HANDSHAKE_TIMEOUT:?} during the TLS handshake")
        }
        None => e.to_string(),
    }
}

/// True if a failure of a TLS read or handshake means that a peer refused the other (a
/// certificate problem, an alert): retrying with the same files cannot succeed.
pub fn is_refusal(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertificate(_)
            | rustls::Error::AlertReceived(_)
            | rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
    )
}

/// The first byte of a TLS handshake record (a ClientHello).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Waits for the first byte a client sends, without consuming it: `Some(byte)`, or `None` if
/// the client closed first.
pub(super) fn peek_first_byte(tcp: &TcpStream) -> io::Result<Option<u8>> {
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut b = [0u8; 1];
    let n = loop {
        match tcp.peek(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    tcp.set_read_timeout(None)?;
    Ok((n == 1).then_some(b[0]))
}
