//! Engines as a cluster (docs/ha.md): membership and group ownership through etcd leases.
//!
//! One thread per clustered engine (`cluster`) holds the engine's lease and renews it every
//! TTL / 3; each renewal etcd answers moves the ack fence to `sent + 0.8 TTL`
//! ([`ownership::LeaseClock`]). Every [`POLL`] it reads the site's keys, claims the groups it
//! should own, and gives up those it lost:
//!
//! - `engines/<name>`: the live engines (attached to their leases);
//! - `owners/<group>`: each group's owner; the key's `create_revision` is the ownership token
//!   the shipper sends the target (the target refuses smaller ones);
//! - `changes/<group>`: the latest change of owner and why, for `status`.
//!
//! A claimed group takes writes only after its shipper has said hello to the target with the
//! new token (fencing the previous owner there) and started the journal after the target's
//! durable seq (`shipper.rs`, `Ownership::serve`).

pub mod assign;
pub mod etcd;
pub mod ownership;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hindsight_consistency::config::ClusterConfig;
use hindsight_consistency::sync::lock;
use hindsight_consistency::wire::{encode_message, ErrorMessage, FrameType};
use serde::{Deserialize, Serialize};

use crate::connection::Registry;
use crate::error::EngineError;
use etcd::{Etcd, EtcdError, KeyValue, LeaseId};
use ownership::LeaseClock;

/// How often the keys are read.
pub const POLL: Duration = Duration::from_millis(500);

/// Polls an unowned group stays unowned before any engine claims it, not only the one it
/// prefers.
const UNOWNED_POLLS: u32 = 2;

/// The share of the TTL after a renewal's sending during which acknowledgements go on.
const FENCE_SHARE: f64 = 0.8;

/// `owners/<group>` and `engines/<name>` values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The engine's name.
    pub engine: String,
    /// Where agents reach it.
    pub address: String,
}

/// `changes/<group>`: the latest change of a group's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub why: String,
    pub token: u64,
    /// RFC 3339.
    pub time: String,
}

/// What `status` shows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The live engines.
    pub engines: Vec<Member>,
    /// Each group's owner and token.
    pub owners: BTreeMap<String, (Member, u64)>,
    /// Each group's latest change.
    pub changes: BTreeMap<String, Change>,
    /// Why etcd could not be read, if it could not at the last try.
    pub etcd_error: Option<String>,
}

/// A clustered engine's part of the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    etcd: Etcd,
    /// The ack fence.
    pub lease: Arc<LeaseClock>,
    view: Mutex<View>,
}

impl Cluster {
    /// `/hindsight/<site>/`.
    fn prefix(&self) -> String {
        format!("/hindsight/{}/", self.cfg.site)
    }

    /// This engine's name in the cluster.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// What the cluster looked like at the last poll.
    pub fn view(&self) -> View {
        lock(&self.view).clone()
    }

    fn me(&self) -> Member {
        Member { engine: self.cfg.name.clone(), address: self.cfg.advertise.clone() }
    }
}

/// Starts the cluster thread over the groups of `reg`, which joined the cluster with `lease`
/// as they were started (owned by nobody here yet).
pub fn start(cfg: ClusterConfig, lease: Arc<LeaseClock>, reg: &Arc<Registry>) -> Result<Arc<Cluster>, EngineError> {
    let timeout = (cfg.lease_ttl / 3).min(Duration::from_secs(2));
    let cluster = Arc::new(Cluster { etcd: Etcd::new(&cfg.endpoints, timeout), cfg, lease, view: Mutex::default() });
    let (c, r) = (Arc::clone(&cluster), Arc::clone(reg));
    std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || run(&c, &r))
        .map_err(|source| EngineError::Spawn { what: "the cluster thread".into(), source })?;
    Ok(cluster)
}

/// The cluster thread's state between rounds.
struct Round {
    lease: Option<LeaseId>,
    next_renewal: Instant,
    /// Polls each group has been seen unowned in a row.
    unowned: HashMap<String, u32>,
    /// The last etcd failure logged (each new one is logged once).
    last_error: String,
}

/// The cluster thread: never returns.
fn run(c: &Cluster, reg: &Registry) {
    let ttl = c.cfg.lease_ttl;
    let mut r = Round { lease: None, next_renewal: Instant::now(), unowned: HashMap::new(), last_error: String::new() };
    loop {
        let now = Instant::now();
        if r.lease.is_none() {
            match join(c) {
                Ok(id) => {
                    r.lease = Some(id);
                    r.next_renewal = now + ttl / 3;
                    log::info!(
                        "cluster {}: engine {} joined (lease {id:x}, TTL {ttl:?}); agents reach it at {}",
                        c.cfg.site,
                        c.cfg.name,
                        c.cfg.advertise
                    );
                }
                Err(e) => {
                    note_error(c, &mut r, &e);
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        } else if now >= r.next_renewal {
            let id = r.lease.expect("checked");
            r.next_renewal = now + ttl / 3;
            match c.etcd.keep_alive(id) {
                Ok(Some(_)) => c.lease.renewed(now + ttl.mul_f64(FENCE_SHARE)),
                Ok(None) => {
                    log::error!("cluster {}: this engine's lease expired in etcd: every group it owned is given up", c.cfg.site);
                    c.lease.expired();
                    lose_all(c, reg, "its lease expired");
                    r.lease = None;
                    continue;
                }
                Err(e) => note_error(c, &mut r, &e),
            }
        }
        if let Some(id) = r.lease {
            match c.etcd.get_prefix(&c.prefix()) {
                Ok((_, kvs)) => {
                    if !r.last_error.is_empty() {
                        log::info!("cluster {}: etcd answers again", c.cfg.site);
                        r.last_error.clear();
                    }
                    reconcile(c, reg, id, &kvs, &mut r.unowned);
                }
                Err(e) => note_error(c, &mut r, &e),
            }
        }
        let wait = POLL.min(r.next_renewal.saturating_duration_since(Instant::now()));
        std::thread::sleep(wait);
    }
}

/// Logs an etcd failure once until another (or success) comes, and shows it in status.
fn note_error(c: &Cluster, r: &mut Round, e: &EtcdError) {
    let text = e.to_string();
    if text != r.last_error {
        log::warn!(
            "cluster {}: {text}; no group changes owner meanwhile, and this engine stops acknowledging writes once its lease \
             is not renewed within {:?}",
            c.cfg.site,
            c.cfg.lease_ttl.mul_f64(FENCE_SHARE)
        );
        r.last_error = text.clone();
    }
    lock(&c.view).etcd_error = Some(text);
}

/// Grants a lease and registers the engine under it.
fn join(c: &Cluster) -> Result<LeaseId, EtcdError> {
    let sent = Instant::now();
    let id = c.etcd.grant(c.cfg.lease_ttl)?;
    c.lease.renewed(sent + c.cfg.lease_ttl.mul_f64(FENCE_SHARE));
    let key = format!("{}engines/{}", c.prefix(), c.cfg.name);
    c.etcd.put(&key, &serde_json::to_vec(&c.me()).expect("serializes"), id)?;
    Ok(id)
}

/// One poll's worth of decisions over the site's keys.
fn reconcile(c: &Cluster, reg: &Registry, lease: LeaseId, kvs: &[KeyValue], unowned: &mut HashMap<String, u32>) {
    let prefix = c.prefix();
    let mut view = View::default();
    for kv in kvs {
        let Some(rest) = kv.key.strip_prefix(&prefix) else { continue };
        if let Some(_name) = rest.strip_prefix("engines/") {
            if let Ok(m) = serde_json::from_slice::<Member>(&kv.value) {
                view.engines.push(m);
            }
        } else if let Some(group) = rest.strip_prefix("owners/") {
            if let Ok(m) = serde_json::from_slice::<Member>(&kv.value) {
                view.owners.insert(group.to_owned(), (m, u64::try_from(kv.create_revision).unwrap_or(0)));
            }
        } else if let Some(group) = rest.strip_prefix("changes/") {
            if let Ok(ch) = serde_json::from_slice::<Change>(&kv.value) {
                view.changes.insert(group.to_owned(), ch);
            }
        }
    }
    view.engines.sort_by(|a, b| a.engine.cmp(&b.engine));
    let live: Vec<String> = view.engines.iter().map(|m| m.engine.clone()).collect();
    for (name, g) in &reg.groups {
        let own = &g.shared.ownership;
        match view.owners.get(name) {
            Some((m, token)) => {
                unowned.remove(name);
                if m.engine == c.cfg.name && own.token() == Some(*token) {
                    continue;
                }
                // Another engine's, or a key of this engine's earlier life (a restart within
                // the TTL): it goes with that lease.
                if own.elsewhere(Some(m.address.clone())) {
                    log::warn!("group {name}: engine {} owns it now (token {token}); this engine lets it go", m.engine);
                    let message = format!("engine {} no longer owns group {name}; its owner is {} at {}", c.cfg.name, m.engine, m.address);
                    close_sessions(reg, name, &message);
                    g.shared.wake_shipper();
                }
            }
            None => {
                if own.elsewhere(None) {
                    log::warn!("group {name}: its ownership key is gone; this engine lets it go");
                    close_sessions(reg, name, &format!("engine {} no longer owns group {name}", c.cfg.name));
                    g.shared.wake_shipper();
                }
                let polls = unowned.entry(name.clone()).or_insert(0);
                *polls += 1;
                let preferred = assign::preferred(name, live.iter().map(String::as_str));
                if preferred == Some(c.cfg.name.as_str()) || *polls > UNOWNED_POLLS {
                    claim(c, g, name, lease, &mut view);
                }
            }
        }
    }
    *lock(&c.view) = view;
}

/// Tries to claim an unowned group.
fn claim(c: &Cluster, g: &crate::group::GroupHandle, name: &str, lease: LeaseId, view: &mut View) {
    let key = format!("{}owners/{name}", c.prefix());
    let me = c.me();
    match c.etcd.create(&key, &serde_json::to_vec(&me).expect("serializes"), lease) {
        Ok(Ok(revision)) => {
            let token = u64::try_from(revision).unwrap_or(0);
            let from = view.changes.get(name).map(|ch| ch.to.clone()).unwrap_or_default();
            let why = if from.is_empty() || from == c.cfg.name {
                "unowned".to_owned()
            } else {
                format!("engine {from} no longer held it (its lease ended)")
            };
            log::info!("group {name}: claimed by engine {} (token {token}): {why}", c.cfg.name);
            g.shared.ownership.claim(token);
            g.shared.wake_shipper();
            let change = Change {
                from,
                to: c.cfg.name.clone(),
                why,
                token,
                time: hindsight_consistency::time::format_rfc3339(hindsight_consistency::time::now_ns()),
            };
            let _ = c.etcd.put(&format!("{}changes/{name}", c.prefix()), &serde_json::to_vec(&change).expect("serializes"), 0);
            view.owners.insert(name.to_owned(), (me, token));
            view.changes.insert(name.to_owned(), change);
        }
        Ok(Err(existing)) => {
            if let Ok(m) = serde_json::from_slice::<Member>(&existing.value) {
                g.shared.ownership.elsewhere(Some(m.address.clone()));
                view.owners.insert(name.to_owned(), (m, u64::try_from(existing.create_revision).unwrap_or(0)));
            }
        }
        Err(e) => log::warn!("group {name}: claiming it: {e}"),
    }
}

/// The lease is gone: every group goes, and its agents are sent away.
fn lose_all(c: &Cluster, reg: &Registry, why: &str) {
    for (name, g) in &reg.groups {
        if g.shared.ownership.elsewhere(None) {
            close_sessions(reg, name, &format!("engine {} gave up group {name}: {why}", c.cfg.name));
            g.shared.wake_shipper();
        }
    }
}

/// Ends the sessions of the agents with a volume in `group`: they reconnect and are sent to
/// the owner.
fn close_sessions(reg: &Registry, group: &str, message: &str) {
    for s in lock(&reg.sessions).values() {
        if s.groups.contains(group) {
            s.out.frame(FrameType::Error, encode_message(&ErrorMessage { message: message.to_owned() }));
            s.out.close();
        }
    }
}
