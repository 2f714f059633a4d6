//! Who a certificate names, and what it is allowed to be.
//!
//! Every Hindsight certificate carries its identity as a subject alternative name of type
//! dNSName, `<name>.<role>.hindsight` (docs/security.md):
//!
//! | role | name | example |
//! |---|---|---|
//! | agent | the VM it runs in (`agent.vm`) | `erp-db.agent.hindsight` |
//! | engine | the engine's name | `site-a.engine.hindsight` |
//! | target | the target's name | `dr.target.hindsight` |
//! | operator | a person or tool placing bookmarks | `alice.operator.hindsight` |
//!
//! After the chain has been verified against the configured CA, each side reads these names
//! and decides what the peer may do: an agent only writes the volumes of its own VM, a target
//! only takes groups from the engines it trusts. Names are compared exactly (byte for byte,
//! case included); wildcard names never match.

use std::fmt;

use rustls::pki_types::{CertificateDer, DnsName, ServerName};
use thiserror::Error;

use crate::record::MAX_NAME_LEN;

/// The domain under which every identity lives.
pub const IDENTITY_DOMAIN: &str = "hindsight";

/// Longest part of a DNS name between two dots.
const MAX_LABEL_LEN: usize = 63;

/// A name Hindsight cannot use: not a valid name, not writable in a certificate, or not a
/// server name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// [`check_name`]: not 1 to 64 of the allowed characters, or starting with `.`.
    #[error("{what} name {name:?} is not valid; use 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-'")]
    Invalid {
        /// What the name names (`group`, `volume`, `vm`, a role).
        what: String,
        /// The name.
        name: String,
    },
    /// [`check_identity_name`]: a part between dots is not a DNS label.
    #[error(
        "{what} name {name:?} cannot be written in a certificate: each part between dots must have 1 to \
         {MAX_LABEL_LEN} characters and must not start or end with '-'; choose another name"
    )]
    Label {
        /// What the name names.
        what: String,
        /// The name.
        name: String,
    },
    /// [`check_identity_name`]: the identity the name makes is not a DNS name.
    #[error("{what} name {name:?} cannot be written in a certificate ({full:?} is not a DNS name); choose another name")]
    DnsName {
        /// What the name names.
        what: String,
        /// The name.
        name: String,
        /// The identity, `<name>.<what>.hindsight`.
        full: String,
    },
    /// [`check_server_name`]: neither a DNS name nor an IP address.
    #[error("{name:?} is neither a DNS name nor an IP address")]
    ServerName {
        /// The name.
        name: String,
    },
}

/// Why [`identities_in`] could not read a certificate's names.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IdentitiesError {
    /// The certificate is not one webpki can parse.
    #[error("the certificate cannot be parsed: {source}")]
    Parse {
        /// The cause.
        #[source]
        source: webpki::Error,
    },
}

/// What a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A `hindsight-agent` in a guest; its name is its VM.
    Agent,
    /// A replication engine.
    Engine,
    /// A target at the recovery site.
    Target,
    /// A person or tool that places bookmarks (`hindsight bookmark`).
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Agent, Role::Engine, Role::Target, Role::Operator];

    /// The role as written in names and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Engine => "engine",
            Role::Target => "target",
            Role::Operator => "operator",
        }
    }

    /// Parses `agent`, `engine`, `target` or `operator`.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The role with its article, for messages: "an agent", "a target".
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Agent => "an agent",
            Role::Engine => "an engine",
            Role::Target => "a target",
            Role::Operator => "an operator",
        }
    }

    /// True if certificates of this role act as TLS servers (engines serve agents, targets
    /// serve engines); the others are only clients.
    pub fn serves(self) -> bool {
        matches!(self, Role::Engine | Role::Target)
    }

    /// True if certificates of this role connect to a server.
    pub fn connects(self) -> bool {
        !matches!(self, Role::Target)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One identity: a role and a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// What it is.
    pub role: Role,
    /// Its name (for an agent, its VM).
    pub name: String,
}

impl Identity {
    /// An identity, if `name` can be written in a certificate.
    pub fn new(role: Role, name: &str) -> Result<Identity, NameError> {
        check_identity_name(role.as_str(), name)?;
        Ok(Identity { role, name: name.to_owned() })
    }

    /// The dNSName that carries it: `<name>.<role>.hindsight`.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.{IDENTITY_DOMAIN}", self.name, self.role)
    }

    /// The identity a dNSName carries, if it is one (`erp-db.agent.hindsight`).
    pub fn from_dns_name(dns: &str) -> Option<Identity> {
        let rest = dns.strip_suffix(IDENTITY_DOMAIN)?.strip_suffix('.')?;
        let (name, role) = rest.rsplit_once('.')?;
        let role = Role::parse(role)?;
        Identity::new(role, name).ok()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dns_name())
    }
}

/// Checks a group, volume or VM name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid { what: what.to_owned(), name: name.to_owned() })
    }
}

/// Checks that a name (VM, engine, target or operator) can be part of a certificate identity:
/// a valid Hindsight name ([`check_name`]) whose parts between dots are DNS labels
/// (1 to 63 characters, not starting or ending with '-').
pub fn check_identity_name(what: &str, name: &str) -> Result<(), NameError> {
    check_name(what, name)?;
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN || label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::Label { what: what.to_owned(), name: name.to_owned() });
        }
    }
    let full = format!("{name}.{what}.{IDENTITY_DOMAIN}");
    if DnsName::try_from(full.as_str()).is_err() {
        return Err(NameError::DnsName { what: what.to_owned(), name: name.to_owned(), full });
    }
    Ok(())
}

/// The identities a certificate names (its dNSName subject alternative names of the form
/// `<name>.<role>.hindsight`), in the order written. Other names are ignored. The chain must
/// already have been verified: this only reads the names.
pub fn identities_in(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, IdentitiesError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|source| IdentitiesError::Parse { source })?;
    Ok(ee.valid_dns_names().filter_map(Identity::from_dns_name).collect())
}

/// The identities of a verified peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    identities: Vec<Identity>,
}

impl PeerIdentity {
    /// The identities read from a peer's verified certificate.
    pub fn new(identities: Vec<Identity>) -> PeerIdentity {
        PeerIdentity { identities }
    }

    /// Every identity.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// The names it holds for `role`.
    pub fn names(&self, role: Role) -> impl Iterator<Item = &str> {
        self.identities.iter().filter(move |i| i.role == role).map(|i| i.name.as_str())
    }

    /// The first name it holds for `role`.
    pub fn name(&self, role: Role) -> Option<&str> {
        self.names(role).next()
    }

    /// True if it is `name` in `role`, exactly.
    pub fn is(&self, role: Role, name: &str) -> bool {
        self.names(role).any(|n| n == name)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.identities.is_empty() {
            return f.write_str("no Hindsight identity");
        }
        let names: Vec<String> = self.identities.iter().map(Identity::dns_name).collect();
        f.write_str(&names.join(", "))
    }
}

/// The name a client checks the server's certificate against: the host part of a
/// `host:port` address (`[::1]:7400` gives `::1`), or an explicit name.
pub fn server_name_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']').to_owned()
}

/// Checks that a server name is a DNS name or an IP address.
pub fn check_server_name(name: &str) -> Result<ServerName<'static>, NameError> {
    ServerName::try_from(name.to_owned()).map_err(|_| NameError::ServerName { name: name.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_its_dns_name() {
        for (role, name) in [(Role::Agent, "erp-db"), (Role::Engine, "site.a"), (Role::Target, "dr_1"), (Role::Operator, "Alice")] {
            let id = Identity::new(role, name).unwrap();
            assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id));
        }
        assert_eq!(Identity::new(Role::Agent, "erp-db").unwrap().dns_name(), "erp-db.agent.hindsight");
    }

    #[test]
    fn a_vm_named_like_another_role_stays_an_agent() {
        let id = Identity::from_dns_name("x.engine.hindsight.agent.hindsight").unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Agent, "x.engine.hindsight"));
    }

    #[test]
    fn names_that_are_not_identities_are_ignored() {
        for dns in
            ["erp.example.com", "agent.hindsight", ".agent.hindsight", "x.admin.hindsight", "*.agent.hindsight", "a..b.agent.hindsight"]
        {
            assert_eq!(Identity::from_dns_name(dns), None, "{dns}");
        }
    }

    #[test]
    fn names_that_cannot_be_dns_labels_are_refused_with_the_rule() {
        for bad in ["-db", "db-", "a..b", "db.", &"x".repeat(64)] {
            let e = check_identity_name("vm", bad).unwrap_err().to_string();
            assert!(e.contains("name"), "{bad}: {e}");
        }
        for good in ["erp-db", "db_1", "a.b-c", "VM7", &"x".repeat(63)] {
            check_identity_name("vm", good).unwrap();
        }
    }

    #[test]
    fn name_errors_say_the_rule() {
        assert_eq!(
            check_name("group", "a b").unwrap_err().to_string(),
            "group name \"a b\" is not valid; use 1 to 64 letters, digits, '.', '_' or '-'"
        );
        assert_eq!(
            check_identity_name("vm", "db-").unwrap_err().to_string(),
            "vm name \"db-\" cannot be written in a certificate: each part between dots must have 1 to 63 characters and must \
             not start or end with '-'; choose another name"
        );
        assert_eq!(check_server_name("a b").unwrap_err().to_string(), "\"a b\" is neither a DNS name nor an IP address");
    }

    #[test]
    fn server_name_is_the_host_of_the_address() {
        assert_eq!(server_name_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(server_name_of("[::1]:7400"), "::1");
        assert_eq!(server_name_of("engine.example.com:7400"), "engine.example.com");
        assert!(check_server_name("127.0.0.1").is_ok());
        assert!(check_server_name("site-a.engine.hindsight").is_ok());
        assert!(check_server_name("not a name").is_err());
    }
}
