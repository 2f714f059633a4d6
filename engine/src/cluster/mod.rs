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
use ownership::{LeaseClock, OwnState};

/// How often the keys are read.
pub const POLL: Duration = Duration::from_millis(500);

/// Polls an unowned group stays unowned before any engine claims it, not only the one it
/// prefers.
const UNOWNED_POLLS: u32 = 2;

/// The share of the TTL after a renewal's sending during which acknowledgements go on.
const FENCE_SHARE: f64 = 0.8;

/// The longest a planned handover waits for the target to confirm what the journal holds;
/// past it the group takes writes again and the handover is tried later.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The longest a claimed group may take to reach the target and start taking writes; past it
/// the claim is given up, and this engine claims the group again only after [`CLAIM_PAUSE`].
const CLAIM_LIMIT: Duration = Duration::from_secs(15);
const CLAIM_PAUSE: Duration = Duration::from_secs(30);

/// `owners/<group>` and `engines/<name>` values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The engine's name.
    pub engine: String,
    /// Where agents reach it.
    pub address: String,
    /// A digest of the engine's group definitions (`engines/` values): every engine of a site
    /// must have the same ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub groups: String,
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
    /// Live engines whose group definitions differ from this engine's.
    pub disagree: Vec<String>,
}

/// A clustered engine's part of the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    /// Each group's unit of ownership (`assign::units`): the name its preference is taken for.
    units: HashMap<String, String>,
    /// [`groups_digest`] of this engine's groups.
    groups_digest: String,
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

    /// What `status` shows of the cluster.
    pub fn status(&self) -> hindsight_consistency::wire::ClusterStatus {
        let v = self.view();
        let mut groups: Vec<&String> = v.owners.keys().chain(v.changes.keys()).collect();
        groups.sort();
        groups.dedup();
        let owners = groups
            .into_iter()
            .map(|g| {
                let (owner, token) = v.owners.get(g).cloned().map_or((None, 0), |(m, t)| (Some(m), t));
                let change = v.changes.get(g);
                hindsight_consistency::wire::GroupOwner {
                    group: g.clone(),
                    engine: owner.as_ref().map(|m| m.engine.clone()).unwrap_or_default(),
                    address: owner.map(|m| m.address).unwrap_or_default(),
                    token,
                    changed_from: change.map(|c| c.from.clone()).unwrap_or_default(),
                    why: change.map(|c| c.why.clone()).unwrap_or_default(),
                    time: change.map(|c| c.time.clone()).unwrap_or_default(),
                }
            })
            .collect();
        hindsight_consistency::wire::ClusterStatus {
            site: self.cfg.site.clone(),
            name: self.cfg.name.clone(),
            lease_valid: self.lease.valid(),
            etcd_error: v.etcd_error.unwrap_or_default(),
            engines: v.engines.into_iter().map(|m| (m.engine, m.address)).collect(),
            owners,
            disagree: v.disagree,
        }
    }

    fn me(&self) -> Member {
        Member { engine: self.cfg.name.clone(), address: self.cfg.advertise.clone(), groups: self.groups_digest.clone() }
    }
}

/// Starts the cluster thread over the groups of `reg`, which joined the cluster with `lease`
/// as they were started (owned by nobody here yet).
pub fn start(cfg: ClusterConfig, lease: Arc<LeaseClock>, reg: &Arc<Registry>) -> Result<Arc<Cluster>, EngineError> {
    let timeout = (cfg.lease_ttl / 3).min(Duration::from_secs(2));
    let units = assign::units(reg.groups.iter().map(|(name, g)| (name.as_str(), g.config.volumes.iter().map(|v| v.vm.as_str()).collect())));
    let groups_digest = groups_digest(reg.groups.values().map(|g| &*g.config));
    let cluster = Arc::new(Cluster { etcd: Etcd::new(&cfg.endpoints, timeout), cfg, units, groups_digest, lease, view: Mutex::default() });
    let (c, r) = (Arc::clone(&cluster), Arc::clone(reg));
    std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || run(&c, &r))
        .map_err(|source| EngineError::Spawn { what: "the cluster thread".into(), source })?;
    Ok(cluster)
}

/// A digest of group definitions (name, mode, target, epoch, volumes), the same on every engine
/// whose `[[group]]` tables are the same, in any order.
fn groups_digest<'a>(groups: impl Iterator<Item = &'a hindsight_consistency::config::GroupConfig>) -> String {
    let mut lines: Vec<String> = groups
        .map(|g| {
            let vols: Vec<String> = g.volumes.iter().map(|v| format!("{}:{}:{}", v.name, v.vm, v.size)).collect();
            format!("{}|{}|{}|{}|{}", g.name, g.mode.as_str(), g.target, g.epoch, vols.join(","))
        })
        .collect();
    lines.sort();
    blake3::hash(lines.join("\n").as_bytes()).to_hex()[..16].to_owned()
}

/// The cluster thread's state between rounds.
struct Round {
    lease: Option<LeaseId>,
    next_renewal: Instant,
    /// What the cluster thread tracks of each group between polls.
    groups: Tracked,
    /// The last etcd failure logged (each new one is logged once).
    last_error: String,
}

/// The cluster thread: never returns.
fn run(c: &Cluster, reg: &Registry) {
    let ttl = c.cfg.lease_ttl;
    let mut r = Round { lease: None, next_renewal: Instant::now(), groups: Tracked::default(), last_error: String::new() };
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
                    reconcile(c, reg, id, &kvs, &mut r.groups);
                }
                Err(e) => note_error(c, &mut r, &e),
            }
        }
        let wait = POLL.min(r.next_renewal.saturating_duration_since(Instant::now()));
        std::thread::sleep(wait);
    }
}

/// Logs the first etcd failure after a success (later ones at debug level), and shows the
/// latest in status.
fn note_error(c: &Cluster, r: &mut Round, e: &EtcdError) {
    let text = e.to_string();
    if !r.last_error.is_empty() {
        log::debug!("cluster {}: {text}", c.cfg.site);
    } else {
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

/// What the cluster thread remembers of groups from one poll to the next.
#[derive(Default)]
struct Tracked {
    /// Polls each group has been seen unowned in a row.
    unowned: HashMap<String, u32>,
    /// Since when each group this engine hands over has been draining.
    draining: HashMap<String, Instant>,
    /// Since when each group this engine claimed has waited to take writes.
    claimed: HashMap<String, Instant>,
    /// Groups this engine does not claim again before then (a claim it gave up).
    paused: HashMap<String, Instant>,
    /// The engines last seen with other group definitions (said when it changes).
    disagree: Vec<String>,
}

/// One poll's worth of decisions over the site's keys.
fn reconcile(c: &Cluster, reg: &Registry, lease: LeaseId, kvs: &[KeyValue], t: &mut Tracked) {
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
    view.disagree = view.engines.iter().filter(|m| !m.groups.is_empty() && m.groups != c.groups_digest).map(|m| m.engine.clone()).collect();
    if view.disagree != t.disagree {
        if !view.disagree.is_empty() {
            log::warn!(
                "cluster {}: engine(s) {} have other [[group]] tables than this engine: give every engine of the site the same \
                 groups (ha.md, \"Configuration\")",
                c.cfg.site,
                view.disagree.join(", ")
            );
        }
        t.disagree.clone_from(&view.disagree);
    }
    let live: Vec<String> = view.engines.iter().map(|m| m.engine.clone()).collect();
    for (name, g) in &reg.groups {
        let own = &g.shared.ownership;
        match view.owners.get(name) {
            Some((m, token)) => {
                t.unowned.remove(name);
                if m.engine == c.cfg.name && own.token() == Some(*token) {
                    let preferred = assign::preferred(&c.units[name], live.iter().map(String::as_str));
                    let to = preferred.and_then(|p| view.engines.iter().find(|e| e.engine == p)).cloned();
                    keep_or_hand_over(c, reg, g, name, *token, to, t);
                    continue;
                }
                t.draining.remove(name);
                t.claimed.remove(name);
                // Another engine's, or a key of this engine's earlier life (a restart within
                // the TTL): it goes with that lease, and meanwhile agents are told to wait
                // rather than sent back here.
                let owner = (m.engine != c.cfg.name).then(|| m.address.clone());
                if own.elsewhere(owner) {
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
                t.draining.remove(name);
                t.claimed.remove(name);
                let polls = t.unowned.entry(name.clone()).or_insert(0);
                *polls += 1;
                let preferred = assign::preferred(&c.units[name], live.iter().map(String::as_str));
                let paused = t.paused.get(name).is_some_and(|until| Instant::now() < *until);
                if !paused && (preferred == Some(c.cfg.name.as_str()) || *polls > UNOWNED_POLLS) && claim(c, g, name, lease, &mut view) {
                    t.claimed.insert(name.clone(), Instant::now());
                }
            }
        }
    }
    *lock(&c.view) = view;
}

/// A group this engine owns: hands it over if another live engine prefers it (a planned
/// handover: drain, then release), gives up a claim that cannot reach the target.
fn keep_or_hand_over(
    c: &Cluster,
    reg: &Registry,
    g: &crate::group::GroupHandle,
    name: &str,
    token: u64,
    preferred: Option<Member>,
    t: &mut Tracked,
) {
    let own = &g.shared.ownership;
    let key = format!("{}owners/{name}", c.prefix());
    let other = preferred.filter(|p| p.engine != c.cfg.name);
    match own.state() {
        OwnState::Claimed { .. } => {
            let since = *t.claimed.entry(name.to_owned()).or_insert_with(Instant::now);
            if since.elapsed() >= CLAIM_LIMIT {
                log::warn!(
                    "group {name}: claimed {:?} ago but its target has not taken this engine's hello; giving the claim up",
                    since.elapsed()
                );
                if c.etcd.delete_if_created(&key, i64::try_from(token).unwrap_or(i64::MAX)).unwrap_or(false) {
                    own.elsewhere(None);
                    t.claimed.remove(name);
                    t.paused.insert(name.to_owned(), Instant::now() + CLAIM_PAUSE);
                }
            }
        }
        OwnState::Serving { .. } => {
            t.claimed.remove(name);
            if let Some(to) = other {
                if own.drain(token) {
                    log::info!("group {name}: handing it over to engine {}, which the group prefers: draining first", to.engine);
                    t.draining.insert(name.to_owned(), Instant::now());
                }
            }
        }
        OwnState::Draining { .. } => {
            let since = *t.draining.entry(name.to_owned()).or_insert_with(Instant::now);
            let Some(to) = other else {
                log::info!("group {name}: the engine it preferred is gone; this engine keeps it");
                own.undrain(token);
                t.draining.remove(name);
                return;
            };
            let shared = &g.shared;
            if shared.confirmed.load(std::sync::atomic::Ordering::Acquire) >= shared.durable() {
                let change = Change {
                    from: c.cfg.name.clone(),
                    to: to.engine.clone(),
                    why: format!("handed over: engine {} prefers it", to.engine),
                    token,
                    time: hindsight_consistency::time::format_rfc3339(hindsight_consistency::time::now_ns()),
                };
                let _ = c.etcd.put(&format!("{}changes/{name}", c.prefix()), &serde_json::to_vec(&change).expect("serializes"), 0);
                match c.etcd.delete_if_created(&key, i64::try_from(token).unwrap_or(i64::MAX)) {
                    Ok(_) => {
                        // The sessions end before the writes they queued are failed (as no
                        // longer owned): their agents send those again to the new owner.
                        close_sessions(reg, name, &format!("group {name} is handed over to engine {} at {}", to.engine, to.address));
                        own.elsewhere(Some(to.address.clone()));
                        t.draining.remove(name);
                        log::info!(
                            "group {name}: handed over to engine {} after {:?} of draining (the target holds every record)",
                            to.engine,
                            since.elapsed()
                        );
                        shared.wake_shipper();
                        g.wake();
                    }
                    Err(e) => log::warn!("group {name}: releasing it for the handover: {e}"),
                }
            } else if since.elapsed() >= DRAIN_LIMIT {
                log::warn!(
                    "group {name}: the target did not confirm what the journal holds within {DRAIN_LIMIT:?}; the handover to engine {} \
                     waits, and the group takes writes again",
                    to.engine
                );
                own.undrain(token);
                t.draining.remove(name);
            }
        }
        OwnState::Single | OwnState::Elsewhere { .. } => {}
    }
}

/// Tries to claim an unowned group; whether it did.
fn claim(c: &Cluster, g: &crate::group::GroupHandle, name: &str, lease: LeaseId, view: &mut View) -> bool {
    let key = format!("{}owners/{name}", c.prefix());
    let me = c.me();
    match c.etcd.create(&key, &serde_json::to_vec(&me).expect("serializes"), lease) {
        Ok(Ok(revision)) => {
            let token = u64::try_from(revision).unwrap_or(0);
            let last = view.changes.get(name);
            let (from, why) = match last {
                // The engine that handed it over said so.
                Some(ch) if ch.to == c.cfg.name && ch.why.starts_with("handed over") => (ch.from.clone(), ch.why.clone()),
                Some(ch) if ch.to != c.cfg.name => (ch.to.clone(), format!("engine {} no longer held it (its lease ended)", ch.to)),
                _ => (String::new(), "unowned".to_owned()),
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
            true
        }
        Ok(Err(existing)) => {
            if let Ok(m) = serde_json::from_slice::<Member>(&existing.value) {
                g.shared.ownership.elsewhere(Some(m.address.clone()));
                view.owners.insert(name.to_owned(), (m, u64::try_from(existing.create_revision).unwrap_or(0)));
            }
            false
        }
        Err(e) => {
            log::warn!("group {name}: claiming it: {e}");
            false
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::config::EngineConfig;

    fn groups(text: &str) -> Vec<hindsight_consistency::config::GroupConfig> {
        let head = "[engine]\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"/nonexistent\"\n[tls]\ninsecure_plaintext = true\n";
        EngineConfig::from_str(std::path::Path::new("engine.toml"), &format!("{head}{text}")).unwrap().groups
    }

    const ERP: &str =
        "[[group]]\nname = \"erp\"\ntarget = \"127.0.0.1:7500\"\n[[group.volume]]\nname = \"db\"\nvm = \"vm1\"\nsize = \"1GiB\"\n";
    const CRM: &str =
        "[[group]]\nname = \"crm\"\ntarget = \"127.0.0.1:7500\"\n[[group.volume]]\nname = \"app\"\nvm = \"vm2\"\nsize = \"1GiB\"\n";

    #[test]
    fn the_group_digest_ignores_order_and_sees_any_difference() {
        let a = groups_digest(groups(&format!("{ERP}{CRM}")).iter());
        assert_eq!(a, groups_digest(groups(&format!("{CRM}{ERP}")).iter()), "the order of the tables does not matter");
        assert_ne!(a, groups_digest(groups(ERP).iter()), "a group less");
        assert_ne!(a, groups_digest(groups(&format!("{}{CRM}", ERP.replace("1GiB", "2GiB"))).iter()), "a volume's size");
        assert_ne!(
            a,
            groups_digest(groups(&format!("{}{CRM}", ERP.replace("name = \"erp\"\n", "name = \"erp\"\nmode = \"sync\"\n"))).iter())
        );
    }
}
