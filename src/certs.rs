//! `hindsight certs init|issue`: a small CA for Hindsight's links and the certificates it
//! signs (docs/security.md). Keys are ECDSA P-256; certificates name their identity as a
//! dNSName `<name>.<role>.hindsight`, plus any `--host` (DNS name or IP address) a client
//! reaches the server by.
//!
//! The CA's subject is derived from its key (`Hindsight CA <key id>`), so `issue` needs only
//! `ca.pem` and `ca-key.pem` to sign, and two CAs never share a name.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hindsight_consistency::time::{format_rfc3339, parse_rfc3339};
use hindsight_consistency::transport::identity::{check_server_name, Identity};
use hindsight_consistency::transport::{Role, TlsEndpoint, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

/// The CA certificate file in a `--dir`.
pub const CA_CERT: &str = "ca.pem";
/// The CA key file in a `--dir`.
pub const CA_KEY: &str = "ca-key.pem";
/// Certificates are valid from a little before now, for clocks slightly behind.
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// What `certs issue` is asked for.
pub struct IssueRequest {
    /// Where the CA is.
    pub dir: PathBuf,
    /// Where the certificate and key go (default: `dir`).
    pub out_dir: Option<PathBuf>,
    /// What the holder is.
    pub role: Role,
    /// Its name (for an agent, its VM).
    pub name: String,
    /// DNS names or IP addresses clients reach it by.
    pub hosts: Vec<String>,
    /// Days of validity from now.
    pub days: u32,
    /// Or an end of validity (RFC 3339); in the past, an expired certificate (for tests).
    pub not_after: Option<String>,
    /// Replace existing files.
    pub force: bool,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from(SystemTime::now())
}

fn rfc3339(t: OffsetDateTime) -> String {
    u64::try_from(t.unix_timestamp_nanos()).map_or_else(|_| t.to_string(), format_rfc3339)
}

/// The CA's parameters, derived from its key alone.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let id: String = p.key_identifier(key).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Hindsight CA {id}"));
    p.distinguished_name = dn;
    p
}

/// Writes `text` to a new file (or over an old one with `force`) with `mode`.
fn write_file(path: &Path, text: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

fn refuse_existing(paths: &[&Path], force: bool, what: &str) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!("{} already exists; {what}", p.display());
    }
    Ok(())
}

/// `hindsight certs init`: a new CA in `dir`. Returns what to print.
pub fn init(dir: &Path, days: u32) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(
        &[&cert_path, &key_path],
        false,
        "this directory already holds a CA: issue certificates with it, or choose another --dir",
    )?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = ca_params(&key);
    let start = now() - CLOCK_SLACK;
    params.not_before = start;
    params.not_after = start + Duration::from_secs(u64::from(days) * 86_400);
    let cert = params.self_signed(&key).context("cannot sign the CA certificate")?;
    write_file(&key_path, &key.serialize_pem(), 0o600, false)?;
    write_file(&cert_path, &cert.pem(), 0o644, false)?;
    let d = dir.display();
    Ok(format!(
        "created a CA valid until {}:\n  {}  the CA certificate: tls.ca of every engine, target and agent\n  {}  its private key \
         (mode 0600): it signs every certificate; keep it here only\nnext: hindsight certs issue --dir {d} --role engine --name NAME --host HOST\n",
        rfc3339(params.not_after),
        cert_path.display(),
        key_path.display(),
    ))
}

/// `hindsight certs issue`: a key and a certificate for one identity. Returns what to print.
pub fn issue(req: &IssueRequest) -> anyhow::Result<String> {
    let identity = Identity::new(req.role, &req.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let mut sans = vec![SanType::DnsName(identity.dns_name().try_into().context("the identity is not a DNS name")?)];
    for h in &req.hosts {
        check_server_name(h).map_err(|e| anyhow::anyhow!("--host {h:?}: {e}; give a DNS name or an IP address"))?;
        sans.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.as_str().try_into().with_context(|| format!("--host {h:?} is not a DNS name"))?),
        });
    }
    let (ca_cert, ca_key_path) = (req.dir.join(CA_CERT), req.dir.join(CA_KEY));
    if !ca_cert.exists() {
        bail!("{} does not exist: make the CA first with `hindsight certs init --dir {}`", ca_cert.display(), req.dir.display());
    }
    let ca_pem = std::fs::read_to_string(&ca_key_path).with_context(|| format!("cannot read the CA key {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_pem).with_context(|| format!("{} is not a private key", ca_key_path.display()))?;

    let out_dir = req.out_dir.clone().unwrap_or_else(|| req.dir.clone());
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let stem = format!("{}-{}", req.role, req.name);
    let (cert_path, key_path) = (out_dir.join(format!("{stem}.pem")), out_dir.join(format!("{stem}-key.pem")));
    refuse_existing(&[&cert_path, &key_path], req.force, "give --force to replace it (a new key and certificate)")?;

    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.dns_name());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match req.role {
        Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Role::Target => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Engine => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    let start = now() - CLOCK_SLACK;
    let end = match &req.not_after {
        Some(t) => {
            let ns = parse_rfc3339(t).map_err(|e| anyhow::anyhow!("--not-after: {e}"))?;
            OffsetDateTime::from(UNIX_EPOCH + Duration::from_nanos(ns))
        }
        None => start + Duration::from_secs(u64::from(req.days) * 86_400),
    };
    // An end in the past gives a certificate that has already expired, valid for one day
    // before that end.
    params.not_before = if end > start { start } else { end - Duration::from_secs(86_400) };
    params.not_after = end;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let cert = params.signed_by(&key, &issuer).context("cannot sign the certificate")?;
    write_file(&key_path, &key.serialize_pem(), 0o600, req.force)?;
    write_file(&cert_path, &cert.pem(), 0o644, req.force)?;

    let files = TlsFiles { ca: ca_cert.clone(), cert: cert_path.clone(), key: key_path.clone() };
    let expired = end <= now();
    if !expired {
        // The same checks the daemons make: this catches a ca.pem that is not ca-key.pem's.
        TlsEndpoint::load(&files, req.role, Some(&req.name)).map_err(|e| anyhow::anyhow!("the new certificate does not load: {e}"))?;
    }
    let file = match req.role {
        Role::Agent => "agent.toml",
        Role::Engine => "engine.toml",
        Role::Target => "target.toml",
        Role::Operator => "hindsight bookmark --ca --cert --key",
    };
    let hosts = if req.hosts.is_empty() { String::new() } else { format!(" and {}", req.hosts.join(", ")) };
    let mut out = format!(
        "issued {identity}{hosts}, valid until {}{}, signed by {}:\n  {}  certificate (tls.cert)\n  {}  private key \
         (tls.key, mode 0600)\nfor {file}:\n  [tls]\n  ca = {:?}\n  cert = {:?}\n  key = {:?}\n",
        rfc3339(end),
        if expired { " (already expired, as asked)" } else { "" },
        ca_cert.display(),
        cert_path.display(),
        key_path.display(),
        ca_cert.display().to_string(),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    if req.role.serves() && req.hosts.is_empty() {
        out.push_str(&format!(
            "no --host given: clients must then set the server name {:?} ({})\n",
            identity.dns_name(),
            if req.role == Role::Engine { "tls.server_name in agent.toml" } else { "target_server_name in engine.toml" }
        ));
    }
    Ok(out)
}
