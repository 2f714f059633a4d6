//! Engine errors, one enum per layer: starting the engine ([`EngineError`]), a group's
//! journal task ([`GroupError`]), an operator's request ([`RequestError`]), an agent's hello
//! ([`HelloError`]) and a shipper's connection ([`ShipError`]). The words of the messages are
//! those operators, agents and logs have always read: where a message named its cause, it
//! still does, and the cause is also the error's source.

use std::io;
use std::net::SocketAddr;

use hindsight_consistency::journal::JournalError;
use hindsight_consistency::record::Seq;
use hindsight_consistency::transport::TransportError;
use hindsight_consistency::wire::{FrameError, FrameType, PROTOCOL_VERSION};
use thiserror::Error;

/// What went wrong in the engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address from engine.listen.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The group's epoch in engine.toml does not fit its journal's.
    #[error("group {group:?}: {reason}")]
    Epoch {
        /// The group.
        group: String,
        /// What is wrong.
        reason: String,
    },
    /// A group's journal could not be opened.
    #[error("group {group:?}: cannot open the journal")]
    OpenJournal {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: JournalError,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread")]
    Spawn {
        /// Which thread.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why a group's journal task could not do what was queued for it (a bookmark, a barrier).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The group dropped the item uncommitted: it is stopped or shutting down.
    #[error("the group is stopped or shutting down")]
    Stopped,
    /// The group is paused with a full journal: a bookmark now would not hold the writes its
    /// agents track.
    #[error(
        "group {group} is paused because a journal is full: its agents track writes the target lacks, so a bookmark \
         now would not hold them; try again once `hindsight status` no longer shows it paused"
    )]
    Paused {
        /// The group.
        group: String,
    },
    /// This engine does not own the group now, or its lease is not valid (docs/ha.md).
    #[error("group {group}: this engine does not own it now (or its etcd lease is not renewed); ask the group's owner")]
    NotOwner {
        /// The group.
        group: String,
    },
    /// The group is stopped after an earlier journal failure.
    #[error("group {group} is stopped after a journal failure")]
    Poisoned {
        /// The group.
        group: String,
    },
    /// The journal failed appending or committing the item; the group is stopped now.
    #[error("group {group}: the journal failed: {source}")]
    Journal {
        /// The group.
        group: String,
        /// The cause.
        #[source]
        source: JournalError,
    },
}

/// Why an operator's request (status, set-mode, bookmark) is refused. The message goes back to
/// the operator in an `Error` frame.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be decoded.
    #[error("{source}")]
    Decode {
        /// The cause.
        #[source]
        source: FrameError,
    },
    /// The certificate is neither an operator's nor the engine's own.
    #[error("its certificate names {certificate}: only an operator certificate (hindsight certs issue --role operator) or the engine's own {what}")]
    NotOperator {
        /// What the certificate names.
        certificate: String,
        /// What the request does (`changes a group's mode`).
        what: &'static str,
    },
    /// A group named in a status or set-mode request is not on this engine.
    #[error("no group {group:?} on this engine")]
    NoGroup {
        /// The group.
        group: String,
    },
    /// A set-mode request names no mode.
    #[error("{mode:?} is not a mode; use sync, cdp or async")]
    NotAMode {
        /// What it names.
        mode: String,
    },
    /// The certificate may not place bookmarks at all.
    #[error(
        "its certificate names {certificate}: bookmarks are placed with an operator certificate (hindsight certs issue --role \
         operator), the engine's own, or an agent's for the groups of its VM"
    )]
    BookmarkNotAllowed {
        /// What the certificate names.
        certificate: String,
    },
    /// An agent's certificate asked for a bookmark in every group.
    #[error("{certificate} may only bookmark the groups of its own volumes; name them (--group or --groups)")]
    BookmarkGroupsUnnamed {
        /// What the certificate names.
        certificate: String,
    },
    /// An agent's certificate asked for a bookmark in a group that holds none of its volumes.
    #[error("{certificate} may only bookmark the groups of its own volumes, and group {group:?} holds none of them")]
    BookmarkForeignGroup {
        /// What the certificate names.
        certificate: String,
        /// The group.
        group: String,
    },
    /// The bookmark's name is not usable.
    #[error("{reason}")]
    BookmarkName {
        /// Why.
        reason: String,
    },
    /// A group named in a bookmark request is not on this engine.
    #[error("group {group:?} is not configured on this engine (groups: {known})")]
    UnknownGroup {
        /// The group.
        group: String,
        /// The engine's groups, comma-separated.
        known: String,
    },
    /// A group's journal task is gone.
    #[error("group {group} is shutting down")]
    ShuttingDown {
        /// The group.
        group: String,
    },
    /// A group could not place the bookmark.
    #[error(transparent)]
    Placement(#[from] GroupError),
    /// A group did not answer the bookmark in time.
    #[error("group {group} did not place the bookmark within 30 s")]
    PlacementTimeout {
        /// The group.
        group: String,
    },
}

/// Why an agent's hello is refused. The message goes back to the agent in an `Error` frame.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HelloError {
    /// The agent's certificate names another VM than its hello.
    #[error(
        "its certificate names {certificate}, but its hello claims vm {vm:?} ({vm}.agent.hindsight): an agent may only write the \
         volumes of its own VM; nothing was written"
    )]
    WrongCertificate {
        /// What the certificate names.
        certificate: String,
        /// The VM of the hello.
        vm: String,
    },
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol {got}, this engine speaks {PROTOCOL_VERSION}; upgrade the older side")]
    Protocol {
        /// The agent's version.
        got: u16,
    },
    /// The hello offers no disks (or more than can be numbered).
    #[error("the agent offers no disks")]
    NoDisks,
    /// A disk names a group the engine does not have.
    #[error("disk {volume:?}: group {group:?} is not configured on the engine (groups: {known})")]
    UnknownGroup {
        /// The volume.
        volume: String,
        /// The group.
        group: String,
        /// The engine's groups, comma-separated.
        known: String,
    },
    /// A disk names a volume its group does not have.
    #[error("disk {volume:?}: group {group:?} has no volume {volume:?}; add it to engine.toml or fix agent.toml")]
    UnknownVolume {
        /// The volume.
        volume: String,
        /// The group.
        group: String,
    },
    /// A disk's volume belongs to another VM.
    #[error("disk {volume:?}: volume belongs to vm {owner:?} in engine.toml, but this agent is vm {vm:?}")]
    OtherVm {
        /// The volume.
        volume: String,
        /// Its VM in engine.toml.
        owner: String,
        /// The agent's VM.
        vm: String,
    },
    /// A disk's size differs from its volume's.
    #[error(
        "disk {volume:?}: the local disk has {local} bytes but engine.toml says size = {configured} bytes; make them equal (nothing was replicated)"
    )]
    Size {
        /// The volume.
        volume: String,
        /// The local disk's size.
        local: u64,
        /// The volume's size in engine.toml.
        configured: u64,
    },
    /// Another agent still serves a volume.
    #[error(
        "volume {volume:?} is already attached by another agent of vm {vm:?}; stop the other agent (or wait until the engine sees it gone)"
    )]
    AlreadyAttached {
        /// The volume.
        volume: String,
        /// The agent's VM.
        vm: String,
    },
    /// A clustered engine does not own a group of the hello (docs/ha.md): the agent is sent
    /// to the owner (a `Redirect`).
    #[error("{}", match owner {
        Some(o) => format!("this engine does not own group {group:?}; its owner takes agents at {o}"),
        None => format!("group {group:?} has no owner that takes agents yet (being taken over); try again shortly"),
    })]
    NotOwner {
        /// The group.
        group: String,
        /// The owner's address, if known.
        owner: Option<String>,
    },
}

/// Why a shipper's connection to its target ended; it connects again after a pause.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShipError {
    /// The target's address could not be resolved.
    #[error("cannot resolve {target}: {source}")]
    Resolve {
        /// The target address.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The target's address resolved to nothing.
    #[error("cannot connect: no address")]
    NoAddress,
    /// This engine no longer owns the group (docs/ha.md): the connection ends.
    #[error("this engine no longer owns the group")]
    NotOwner,
    /// A new claim could not start the journal after the target's seq.
    #[error("{why}")]
    Restart {
        /// Why.
        why: String,
    },
    /// No address of the target took the connection (the error is the last address's).
    #[error("cannot connect: {source}")]
    Connect {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("{source}")]
    Handshake {
        /// The cause.
        #[source]
        source: TransportError,
    },
    /// The hello could not be sent.
    #[error("{source}")]
    SendHello {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The target's answer to the hello could not be read.
    #[error("{source}")]
    ReadWelcome {
        /// The cause.
        #[source]
        source: FrameError,
    },
    /// The target refused the hello.
    #[error("target refused: {message}")]
    Refused {
        /// The target's words.
        message: String,
    },
    /// The target answered the hello with something else.
    #[error("unexpected {got:?} frame in handshake")]
    UnexpectedFrame {
        /// What came.
        got: FrameType,
    },
    /// The target holds more than the engine: nothing may be shipped.
    #[error(
        "the target holds up to seq {target_seq} but this engine only up to seq {durable}: the engine's journal was lost or replaced; nothing is shipped"
    )]
    TargetAhead {
        /// The target's durable sequence number.
        target_seq: Seq,
        /// The engine's.
        durable: Seq,
    },
    /// The engine's journal no longer holds what the target needs next.
    #[error("the target needs seq {from} on, but the engine no longer has it ({source}); the target must be resynchronised")]
    NotRetained {
        /// The first sequence number the target lacks.
        from: Seq,
        /// The cause.
        #[source]
        source: JournalError,
    },
    /// The confirmation reader could not be started.
    #[error("{source}")]
    SpawnReader {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The target's journal is full; it closed the connection.
    #[error("the target's journal is full")]
    TargetFull,
    /// The confirmation reader saw the connection end.
    #[error("the target closed the connection")]
    TargetClosed,
    /// The target confirmed nothing for a long while with records shipped.
    #[error(
        "the target confirmed nothing for {waited:?} while {waiting} shipped record(s) waited: it hangs, or its host does; reconnecting"
    )]
    TargetSilent {
        /// How long nothing was confirmed.
        waited: std::time::Duration,
        /// Records shipped and not confirmed.
        waiting: u64,
    },
    /// The engine's journal could not be read.
    #[error("reading the journal: {source}")]
    ReadJournal {
        /// The cause.
        #[source]
        source: JournalError,
    },
    /// A frame could not be sent.
    #[error("sending: {source}")]
    Send {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The frames sent could not be flushed.
    #[error("{source}")]
    Flush {
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_the_words_operators_and_agents_read() {
        let e = HelloError::OtherVm { volume: "db".into(), owner: "erp-db".into(), vm: "crm-app".into() };
        assert_eq!(e.to_string(), r#"disk "db": volume belongs to vm "erp-db" in engine.toml, but this agent is vm "crm-app""#);
        let e = HelloError::WrongCertificate { certificate: "crm-app.agent.hindsight".into(), vm: "erp-db".into() };
        assert!(e.to_string().starts_with(r#"its certificate names crm-app.agent.hindsight, but its hello claims vm "erp-db""#), "{e}");
        assert_eq!(RequestError::NoGroup { group: "nope".into() }.to_string(), r#"no group "nope" on this engine"#);
        let e = RequestError::from(GroupError::Poisoned { group: "erp".into() });
        assert_eq!(e.to_string(), "group erp is stopped after a journal failure");
        assert_eq!(
            ShipError::Refused { message: "this target requires TLS".into() }.to_string(),
            "target refused: this target requires TLS"
        );
        let e = ShipError::Connect { source: io::Error::from(io::ErrorKind::ConnectionRefused) };
        assert_eq!(e.to_string(), format!("cannot connect: {}", io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(std::error::Error::source(&e).is_some());
    }
}
