//! The `[tls]` section of every file: the CA, certificate and key a daemon's links use, or
//! `insecure_plaintext` when every address is loopback (docs/security.md).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::transport::identity::{check_server_name, server_name_of, NameError};
use crate::transport::{Role, Security, TlsEndpoint, TlsFiles, TlsSetupError};

/// A mistake in a `[tls]` section, or in a server name a link is checked against.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsMistake {
    /// No `[tls]` section.
    #[error(
        "no [tls] section: the links between agents, engines and targets are authenticated with certificates \
         (docs/security.md). Make them with `hindsight certs init --dir /etc/hindsight/pki` and `{issue}`, then add \
         [tls] with ca, cert and key; on one machine, with every address on loopback, `insecure_plaintext = true` in \
         [tls] is allowed instead"
    )]
    NoSection {
        /// The `hindsight certs issue` command for this daemon's certificate.
        issue: String,
    },
    /// `insecure_plaintext` together with a certificate file.
    #[error("tls.insecure_plaintext = true cannot go with tls.{key}: remove insecure_plaintext to use TLS, or remove ca, cert and key")]
    PlaintextWithFiles {
        /// `ca`, `cert` or `key`.
        key: &'static str,
    },
    /// `insecure_plaintext` with an address that is not loopback.
    #[error(
        "tls.insecure_plaintext = true is only allowed when every address is loopback, and {key} = {address:?} is not; \
         remove insecure_plaintext and give ca, cert and key (`{issue}`, docs/security.md)"
    )]
    PlaintextNotLoopback {
        /// The key of the address.
        key: String,
        /// The address.
        address: String,
        /// The `hindsight certs issue` command for this daemon's certificate.
        issue: String,
    },
    /// One of `ca`, `cert` and `key` without the others.
    #[error(
        "tls.{key} is missing: give ca, cert and key together (made by `hindsight certs init` and `{issue}`), or \
         insecure_plaintext = true when every address is loopback"
    )]
    FileMissing {
        /// `ca`, `cert` or `key`.
        key: &'static str,
        /// The `hindsight certs issue` command for this daemon's certificate.
        issue: String,
    },
    /// The files could not be loaded, or do not fit together.
    #[error("{source}")]
    Load {
        /// The cause, naming the file.
        #[source]
        source: TlsSetupError,
    },
    /// A server name that is neither a DNS name nor an IP address.
    #[error("{key}: {source}; write e.g. \"site-a.engine.hindsight\" or an IP address")]
    ServerName {
        /// The key, with its context (`group "erp": target_server_name`).
        key: String,
        /// The cause.
        #[source]
        source: NameError,
    },
}

/// The keys every `[tls]` section has.
pub(super) struct TlsKeys {
    pub(super) ca: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) insecure_plaintext: bool,
}

/// True for `localhost` and loopback IP addresses.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What `hindsight certs issue` needs for this daemon's certificate.
fn issue_command(role: Role, name: &str, host: Option<&str>) -> String {
    let host = host.map(|h| format!(" --host {h}")).unwrap_or_default();
    format!("hindsight certs issue --dir /etc/hindsight/pki --role {role} --name {name}{host}")
}

/// Validates a `[tls]` section and loads its files. `listen` is where this daemon listens, if
/// it serves (its host goes in the `hindsight certs issue` hint); `addresses` are the (key,
/// address) pairs of every link of this daemon whose address is well formed, all of which
/// must be loopback for `insecure_plaintext`; `name` is the name the certificate must carry,
/// if fixed (an agent's VM).
pub(super) fn link_security(
    tls: Option<TlsKeys>,
    role: Role,
    name: Option<&str>,
    listen: Option<&str>,
    addresses: &[(String, String)],
) -> Result<Security, TlsMistake> {
    let own_host = listen.map(server_name_of);
    let issue = issue_command(role, name.unwrap_or("NAME"), own_host.as_deref().filter(|_| role.serves()));
    let Some(tls) = tls else {
        return Err(TlsMistake::NoSection { issue });
    };
    let given = [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)];
    if tls.insecure_plaintext {
        if let Some((key, _)) = given.iter().find(|(_, v)| v.is_some()) {
            return Err(TlsMistake::PlaintextWithFiles { key });
        }
        if let Some((key, addr)) = addresses.iter().find(|(_, a)| !is_loopback_host(&server_name_of(a))) {
            return Err(TlsMistake::PlaintextNotLoopback { key: key.clone(), address: addr.clone(), issue });
        }
        return Ok(Security::InsecurePlaintext);
    }
    if let Some((key, _)) = given.iter().find(|(_, v)| v.is_none()) {
        return Err(TlsMistake::FileMissing { key, issue });
    }
    let files = TlsFiles { ca: tls.ca.unwrap_or_default(), cert: tls.cert.unwrap_or_default(), key: tls.key.unwrap_or_default() };
    let endpoint = TlsEndpoint::load(&files, role, name).map_err(|source| TlsMistake::Load { source })?;
    Ok(Security::Tls(Arc::new(endpoint)))
}

/// Checks an expected server name (`key` names it in the error).
pub(super) fn server_name_key(key: &str, name: &str) -> Result<String, TlsMistake> {
    check_server_name(name).map_err(|source| TlsMistake::ServerName { key: key.to_owned(), source })?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{engine, ENGINE};

    #[test]
    fn without_tls_the_error_says_how_to_make_certificates() {
        let e = engine(&ENGINE.replace("[tls]\ninsecure_plaintext = true\n", "")).unwrap_err();
        assert!(e.contains("no [tls] section") && e.contains("hindsight certs init") && e.contains("--role engine"), "{e}");
        assert!(e.contains("--host 127.0.0.1"), "{e}");
    }

    #[test]
    fn insecure_plaintext_is_only_for_loopback() {
        let e = engine(&ENGINE.replace("target = \"127.0.0.1:7500\"", "target = \"10.0.0.5:7500\"")).unwrap_err();
        assert!(e.contains("insecure_plaintext") && e.contains("\"10.0.0.5:7500\"") && e.contains("target"), "{e}");
        let e = engine(&ENGINE.replace("listen = \"127.0.0.1:7400\"", "listen = \"0.0.0.0:7400\"")).unwrap_err();
        assert!(e.contains("engine.listen") && e.contains("0.0.0.0:7400"), "{e}");
        let ok = engine(&ENGINE.replace("target = \"127.0.0.1:7500\"", "target = \"localhost:7500\"")).unwrap();
        assert!(!ok.security.is_tls());
        assert_eq!(ok.groups[0].target_server_name, "localhost");
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "insecure_plaintext = true\nca = \"/ca.pem\"")).unwrap_err();
        assert!(e.contains("cannot go with tls.ca"), "{e}");
    }

    #[test]
    fn tls_keys_go_together_and_name_missing_files() {
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "ca = \"/ca.pem\"\ncert = \"/e.pem\"")).unwrap_err();
        assert!(e.contains("tls.key is missing"), "{e}");
        let e = engine(&ENGINE.replace("insecure_plaintext = true", "ca = \"/nonexistent/ca.pem\"\ncert = \"/e.pem\"\nkey = \"/k.pem\""))
            .unwrap_err();
        assert!(e.starts_with("engine.toml: tls.ca = \"/nonexistent/ca.pem\""), "{e}");
        let e = engine(&ENGINE.replace("[tls]", "[tls]\nengines = [\"a\"]")).unwrap_err();
        assert!(e.contains("unknown field `engines`"), "{e}");
    }

    #[test]
    fn a_malformed_address_is_not_also_called_not_loopback() {
        let e = engine(&ENGINE.replace("\"127.0.0.1:7500\"", "\"nowhere\"")).unwrap_err();
        assert!(!e.contains('\n') && e.contains("not an address"), "{e}");
        let e = engine(&ENGINE.replace("127.0.0.1:7400", "nowhere")).unwrap_err();
        assert!(!e.contains('\n') && e.contains("engine.listen"), "{e}");
    }
}
