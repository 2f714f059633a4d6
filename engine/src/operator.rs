//! The operator's requests on a control connection (`hindsight status`, `hindsight group
//! set-mode`, `hindsight bookmark`): who may send them, and their answers. A bookmark with
//! `--quiesce` asks the agents' sessions to freeze their file systems around it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::config::{check_name, ReplicationMode};
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{Peer, Role, WriteHalf};
use hindsight_consistency::wire::{
    decode_message, encode_message, write_frame, BookmarkPoint, BookmarkReply, BookmarkRequest, FrameType, GroupStatus, QuiesceMsg,
    SetModeReply, SetModeRequest, StatusReply, StatusRequest, ThawMsg,
};
use hindsight_consistency::{BookmarkBody, PointConsistency};

use crate::acks::AckTo;
use crate::connection::{refuse, Registry};
use crate::error::RequestError;
use crate::group::{BookmarkPlacement, GroupHandle, GroupItem, Latch};

/// Answers an operator's request (bookmark, status, mode): decodes it, runs `handle`, and
/// sends its reply, or an `Error` naming why not.
pub(crate) fn answer<Q: serde::de::DeserializeOwned, R: serde::Serialize>(
    writer: &mut WriteHalf,
    peer: SocketAddr,
    payload: &[u8],
    reply: FrameType,
    handle: impl FnOnce(&Q) -> Result<R, RequestError>,
) {
    match decode_message::<Q>("request", payload).map_err(|source| RequestError::Decode { source }).and_then(|req| handle(&req)) {
        Ok(r) => {
            let _ = write_frame(writer, reply, &encode_message(&r), &mut Vec::new());
            writer.close();
        }
        Err(why) => refuse(writer, peer, &why.to_string()),
    }
}

/// An operator certificate or this engine's own.
pub(crate) fn authorise_operator(peer: &Peer, reg: &Registry, what: &'static str) -> Result<(), RequestError> {
    match peer {
        Peer::Plaintext => Ok(()),
        Peer::Certified(id) if id.name(Role::Operator).is_some() || reg.own_name.as_deref().is_some_and(|own| id.is(Role::Engine, own)) => {
            Ok(())
        }
        Peer::Certified(id) => Err(RequestError::NotOperator { certificate: id.to_string(), what }),
    }
}

/// The state of the requested groups (all when none is named).
pub(crate) fn status(req: &StatusRequest, reg: &Registry) -> Result<StatusReply, RequestError> {
    let mut names: Vec<&String> = if req.groups.is_empty() { reg.groups.keys().collect() } else { req.groups.iter().collect() };
    names.sort();
    let attached = lock(&reg.attached).clone();
    let mut groups = Vec::new();
    for name in names {
        let g = reg.groups.get(name).ok_or_else(|| RequestError::NoGroup { group: name.clone() })?;
        let p = g.shared.policy.status();
        let lag = g.shared.policy.lag();
        let durable = g.shared.durable();
        let confirmed = g.shared.confirmed.load(Ordering::Acquire);
        groups.push(GroupStatus {
            name: name.clone(),
            mode: p.mode.as_str().to_owned(),
            effective_mode: p.effective.as_str().to_owned(),
            reason: p.reason,
            on_sync_loss: p.on_sync_loss.as_str().to_owned(),
            target: g.config.target.clone(),
            target_connected: p.target_connected,
            durable_seq: durable,
            confirmed_seq: confirmed,
            lag_writes: durable.saturating_sub(confirmed),
            lag_bytes: lag.bytes,
            lag_ms: u64::try_from(lag.age.as_millis()).unwrap_or(u64::MAX),
            rpo_ms: p.rpo.map_or(0, |r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX)),
            rpo_ok: p.rpo_ok,
            regulating: p.regulating,
            poisoned: g.shared.poisoned.load(Ordering::Relaxed),
            compression: g.shared.link.compression().to_owned(),
            shipped_bytes: g.shared.link.records.load(Ordering::Relaxed),
            wire_bytes: g.shared.link.wire.load(Ordering::Relaxed),
            resyncing: {
                let progress = lock(&reg.resync_progress);
                g.config.volumes.iter().filter_map(|v| progress.get(&v.name).cloned()).collect()
            },
            attached: g.config.volumes.iter().filter(|v| attached.contains(&v.name)).map(|v| v.name.clone()).collect(),
            on_journal_full: g.shared.journal.policy().as_str().to_owned(),
            journal_bytes: g.shared.journal.bytes(),
            journal_size: g.shared.journal.max().unwrap_or(0),
            paused: g.shared.journal.paused(),
            journal_state: g.shared.journal.describe(),
            handed_over: g.shared.handed_over.load(Ordering::Relaxed),
            target_refused: lock(&g.shared.target_refused).clone(),
            ownership: g.shared.ownership.describe().to_owned(),
        });
    }
    let cluster = reg.cluster.get().map(|c| c.status());
    Ok(StatusReply { engine: reg.name.clone(), groups, cluster })
}

/// Changes a group's mode on the running engine.
pub(crate) fn set_mode(req: &SetModeRequest, reg: &Registry) -> Result<SetModeReply, RequestError> {
    let g = reg.groups.get(&req.group).ok_or_else(|| RequestError::NoGroup { group: req.group.clone() })?;
    let mode = match req.mode.as_str() {
        "sync" => ReplicationMode::Sync,
        "cdp" => ReplicationMode::Cdp,
        "async" => ReplicationMode::Async,
        other => return Err(RequestError::NotAMode { mode: other.to_owned() }),
    };
    let previous = g.shared.policy.set_mode(mode);
    Ok(SetModeReply { group: req.group.clone(), previous: previous.as_str().to_owned(), mode: mode.as_str().to_owned() })
}

/// Who may place bookmarks: an operator certificate, this engine's own, or an agent for the
/// groups that hold volumes of its VM.
pub(crate) fn authorise_bookmark(peer: &Peer, req: &BookmarkRequest, reg: &Registry) -> Result<(), RequestError> {
    let Peer::Certified(id) = peer else { return Ok(()) };
    if authorise_operator(peer, reg, "").is_ok() {
        return Ok(());
    }
    if req.hold {
        return Err(RequestError::NotOperator { certificate: id.to_string(), what: "hand groups over for a planned failover" });
    }
    let vms: HashSet<&str> = id.names(Role::Agent).collect();
    if vms.is_empty() {
        return Err(RequestError::BookmarkNotAllowed { certificate: id.to_string() });
    }
    let own: HashSet<&str> = reg
        .groups
        .values()
        .filter(|g| g.config.volumes.iter().any(|v| vms.contains(v.vm.as_str())))
        .map(|g| g.config.name.as_str())
        .collect();
    if req.groups.is_empty() {
        return Err(RequestError::BookmarkGroupsUnnamed { certificate: id.to_string() });
    }
    match req.groups.iter().find(|g| !own.contains(g.as_str())) {
        Some(g) => Err(RequestError::BookmarkForeignGroup { certificate: id.to_string(), group: g.clone() }),
        None => Ok(()),
    }
}

/// Places one bookmark in each requested group (every group if none is named) at one
/// instant, and waits until each is durable.
pub(crate) fn place_bookmark(req: &BookmarkRequest, reg: &Registry) -> Result<BookmarkReply, RequestError> {
    check_name("bookmark", &req.name).map_err(|e| RequestError::BookmarkName { reason: e.to_string() })?;
    let mut names: Vec<&String> = if req.groups.is_empty() { reg.groups.keys().collect() } else { req.groups.iter().collect() };
    names.sort();
    names.dedup();
    let mut groups = Vec::new();
    for n in names {
        let Some(g) = reg.groups.get(n) else {
            let mut known: Vec<&str> = reg.groups.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(RequestError::UnknownGroup { group: n.clone(), known: known.join(", ") });
        };
        groups.push(g);
    }
    let names: HashSet<String> = groups.iter().map(|g| g.config.name.clone()).collect();
    let quiesce = if req.quiesce { Some(Quiesce::begin(reg, &names, Duration::from_millis(req.quiesce_timeout_ms.max(1)))) } else { None };
    let (consistency, reason) = match &quiesce {
        Some(q) => match &q.failure {
            None => (PointConsistency::Application, String::new()),
            Some(why) => (PointConsistency::Crash, why.clone()),
        },
        None => (PointConsistency::Crash, String::new()),
    };
    let note = match (req.note.is_empty(), reason.is_empty()) {
        (_, true) => req.note.clone(),
        (true, false) => format!("quiesce failed: {reason}"),
        (false, false) => format!("{} (quiesce failed: {reason})", req.note),
    };
    let placed = place_in_groups(req, &groups, consistency, &note, &reason);
    // Thaw whatever happened: a guest never stays frozen.
    if let Some(q) = quiesce {
        q.end(reg);
    }
    placed
}

/// Places the bookmark records and waits until each group has made its own durable.
fn place_in_groups(
    req: &BookmarkRequest,
    groups: &[&GroupHandle],
    consistency: PointConsistency,
    note: &str,
    reason: &str,
) -> Result<BookmarkReply, RequestError> {
    let body = BookmarkBody { consistency, note: note.to_owned() }.encode();
    let latch = Arc::new(Latch::new(groups.len()));
    let mut waiting = Vec::new();
    for g in groups {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let item = GroupItem::Bookmark(BookmarkPlacement {
            name: req.name.clone(),
            body: body.clone(),
            latch: latch.clone(),
            reply: tx,
            hold: req.hold,
        });
        if g.send(item).is_err() {
            return Err(RequestError::ShuttingDown { group: g.config.name.clone() });
        }
        waiting.push((g.config.name.clone(), rx));
    }
    let mut points = Vec::new();
    for (group, rx) in waiting {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok((seq, time_ns))) => {
                points.push(BookmarkPoint { group, seq, time_ns, consistency: consistency.as_str().to_owned(), reason: reason.to_owned() })
            }
            Ok(Err(why)) => return Err(why.into()),
            Err(_) => return Err(RequestError::PlacementTimeout { group }),
        }
    }
    Ok(BookmarkReply { points })
}

/// One quiesce of every agent serving some volume of a set of groups.
struct Quiesce {
    id: u64,
    /// The sessions asked, to be thawed.
    asked: Vec<AckTo>,
    /// Why the point is not application-consistent (`None`: every agent quiesced).
    failure: Option<String>,
}

impl Quiesce {
    /// Asks every agent of the groups to quiesce and waits for all of them, at most `timeout`.
    fn begin(reg: &Registry, groups: &HashSet<String>, timeout: Duration) -> Quiesce {
        let id = reg.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::unbounded();
        lock(&reg.quiesce_waits).insert(id, tx);
        let mut asked = Vec::new();
        let mut vms = Vec::new();
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        for s in lock(&reg.sessions).values() {
            if s.groups.is_disjoint(groups) {
                continue;
            }
            let msg = encode_message(&QuiesceMsg { id, timeout_ms });
            if s.out.frame(FrameType::Quiesce, msg) {
                asked.push(Arc::clone(&s.out));
                vms.push(s.vm.clone());
            }
        }
        let mut q = Quiesce { id, asked, failure: None };
        if vms.is_empty() {
            q.failure = Some("no agent of these groups is connected".into());
            return q;
        }
        log::info!("quiesce {id}: asking vm(s) {} to quiesce (timeout {timeout:?})", vms.join(", "));
        let deadline = Instant::now() + timeout;
        let mut waiting: HashSet<String> = vms.into_iter().collect();
        let mut failures = Vec::new();
        while !waiting.is_empty() {
            match rx.recv_deadline(deadline) {
                Ok((vm, m)) => {
                    waiting.remove(&vm);
                    if !m.ok {
                        failures.push(format!("vm {vm}: {}", m.message));
                    }
                }
                Err(_) => {
                    let mut late: Vec<String> = waiting.drain().collect();
                    late.sort();
                    failures.push(format!("vm(s) {} did not quiesce within {timeout:?}", late.join(", ")));
                }
            }
        }
        if !failures.is_empty() {
            let why = failures.join("; ");
            log::warn!("quiesce {id}: {why}; the bookmark is crash-consistent");
            q.failure = Some(why);
        }
        q
    }

    /// Thaws every agent asked, and forgets the quiesce.
    fn end(self, reg: &Registry) {
        let msg = encode_message(&ThawMsg { id: self.id });
        for c in &self.asked {
            c.frame(FrameType::Thaw, msg.clone());
        }
        lock(&reg.quiesce_waits).remove(&self.id);
    }
}
