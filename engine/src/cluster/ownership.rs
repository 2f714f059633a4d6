//! Whether this engine owns a group now, and whether its lease lets it acknowledge writes
//! (docs/ha.md, "Fencing"). Without `[cluster]` every group is owned, for good, with token 0.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hindsight_consistency::sync::lock;

/// When this engine's lease stops being valid by its own clock: renewed after each keep-alive
/// etcd answers.
#[derive(Debug, Default)]
pub struct LeaseClock {
    valid_until: Mutex<Option<Instant>>,
}

impl LeaseClock {
    /// The lease is valid until `until` (a keep-alive sent at `sent` renewed it: `until` is
    /// `sent + 0.8 TTL`).
    pub fn renewed(&self, until: Instant) {
        *lock(&self.valid_until) = Some(until);
    }

    /// The lease is gone (etcd said so, or the engine gave it up).
    pub fn expired(&self) {
        *lock(&self.valid_until) = None;
    }

    /// Whether the lease is valid now.
    pub fn valid(&self) -> bool {
        lock(&self.valid_until).is_some_and(|t| Instant::now() < t)
    }
}

/// A group's ownership as this engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnState {
    /// No cluster: the engine owns the group, token 0.
    Single,
    /// Claimed with `token`; the journal is started again after the target's durable seq
    /// before any write is taken ([`Ownership::serve`]).
    Claimed { token: u64 },
    /// Owned with `token`, taking writes.
    Serving { token: u64 },
    /// Owned with `token`, being handed over to the engine the group prefers: no new write is
    /// numbered while the target confirms what the journal holds; agents wait.
    Draining { token: u64 },
    /// Another engine owns it (its address, if known), or nobody does yet.
    Elsewhere { owner: Option<String> },
}

/// A group's ownership, shared by its sessions, journal task, shipper and the cluster thread.
#[derive(Debug)]
pub struct Ownership {
    lease: OnceLock<std::sync::Arc<LeaseClock>>,
    state: Mutex<OwnState>,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership { lease: OnceLock::new(), state: Mutex::new(OwnState::Single) }
    }
}

impl Ownership {
    /// The group belongs to a cluster: owned by nobody here until claimed.
    pub fn join_cluster(&self, lease: std::sync::Arc<LeaseClock>) {
        let _ = self.lease.set(lease);
        *lock(&self.state) = OwnState::Elsewhere { owner: None };
    }

    /// The state now.
    pub fn state(&self) -> OwnState {
        lock(&self.state).clone()
    }

    /// The token to ship with, if this engine owns the group.
    pub fn token(&self) -> Option<u64> {
        match *lock(&self.state) {
            OwnState::Single => Some(0),
            OwnState::Claimed { token } | OwnState::Serving { token } | OwnState::Draining { token } => Some(token),
            OwnState::Elsewhere { .. } => None,
        }
    }

    /// Whether agents may attach: `Err(owner address)` if another engine (or none yet) owns
    /// the group, or this one has not finished taking it.
    pub fn serving(&self) -> Result<(), Option<String>> {
        match &*lock(&self.state) {
            OwnState::Single | OwnState::Serving { .. } => Ok(()),
            OwnState::Claimed { .. } | OwnState::Draining { .. } => Err(None),
            OwnState::Elsewhere { owner } => Err(owner.clone()),
        }
    }

    /// Whether a write may be acknowledged now: the group is owned and the lease valid.
    pub fn may_ack(&self) -> bool {
        match *lock(&self.state) {
            OwnState::Single => true,
            OwnState::Serving { .. } | OwnState::Draining { .. } => self.lease.get().is_some_and(|l| l.valid()),
            OwnState::Claimed { .. } | OwnState::Elsewhere { .. } => false,
        }
    }

    /// The token of a claim whose journal is still to be started again.
    pub fn claimed(&self) -> Option<u64> {
        match *lock(&self.state) {
            OwnState::Claimed { token } => Some(token),
            _ => None,
        }
    }

    /// For `status`: `owner`, `claimed`, `draining`, `elsewhere`, or empty without a cluster.
    pub fn describe(&self) -> &'static str {
        match *lock(&self.state) {
            OwnState::Single => "",
            OwnState::Claimed { .. } => "claimed",
            OwnState::Serving { .. } => "owner",
            OwnState::Draining { .. } => "draining",
            OwnState::Elsewhere { .. } => "elsewhere",
        }
    }

    /// Whether the group is being handed over (the journal task numbers nothing meanwhile).
    pub fn draining(&self) -> bool {
        matches!(*lock(&self.state), OwnState::Draining { .. })
    }

    /// Starts handing the group over: true if it was serving with `token`.
    pub fn drain(&self, token: u64) -> bool {
        let mut s = lock(&self.state);
        if *s == (OwnState::Serving { token }) {
            *s = OwnState::Draining { token };
            return true;
        }
        false
    }

    /// A handover that could not finish: the group takes writes again.
    pub fn undrain(&self, token: u64) {
        let mut s = lock(&self.state);
        if *s == (OwnState::Draining { token }) {
            *s = OwnState::Serving { token };
        }
    }

    /// This engine claimed the group with `token`.
    pub fn claim(&self, token: u64) {
        *lock(&self.state) = OwnState::Claimed { token };
    }

    /// The claim with `token` is ready: writes are taken. False if the claim was lost meanwhile.
    pub fn serve(&self, token: u64) -> bool {
        let mut s = lock(&self.state);
        if *s == (OwnState::Claimed { token }) {
            *s = OwnState::Serving { token };
            return true;
        }
        false
    }

    /// Another engine owns the group (or nobody): returns whether this engine owned it.
    pub fn elsewhere(&self, owner: Option<String>) -> bool {
        let mut s = lock(&self.state);
        let was = matches!(*s, OwnState::Claimed { .. } | OwnState::Serving { .. } | OwnState::Draining { .. });
        if !matches!(*s, OwnState::Single) {
            *s = OwnState::Elsewhere { owner };
        }
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn without_a_cluster_the_group_is_always_owned() {
        let o = Ownership::default();
        assert_eq!((o.token(), o.serving(), o.may_ack()), (Some(0), Ok(()), true));
        assert!(!o.elsewhere(Some("x:1".into())), "a single engine is never told otherwise");
        assert!(o.may_ack());
    }

    #[test]
    fn a_claim_serves_only_once_ready_and_acks_only_while_the_lease_is_valid() {
        let lease = Arc::new(LeaseClock::default());
        let o = Ownership::default();
        o.join_cluster(Arc::clone(&lease));
        assert_eq!((o.token(), o.serving(), o.may_ack()), (None, Err(None), false));
        o.elsewhere(Some("10.0.0.2:7100".into()));
        assert_eq!(o.serving(), Err(Some("10.0.0.2:7100".into())));
        o.claim(41);
        assert_eq!((o.token(), o.claimed(), o.serving(), o.may_ack()), (Some(41), Some(41), Err(None), false));
        assert!(!o.serve(40), "a claim that was replaced does not serve");
        assert!(o.serve(41));
        assert_eq!(o.serving(), Ok(()));
        assert!(!o.may_ack(), "no lease renewed yet");
        lease.renewed(Instant::now() + Duration::from_secs(60));
        assert!(o.may_ack());
        lease.renewed(Instant::now());
        assert!(!o.may_ack(), "the lease ran out by this engine's clock");
        lease.renewed(Instant::now() + Duration::from_secs(60));
        assert!(o.drain(41));
        assert_eq!((o.token(), o.serving(), o.may_ack(), o.draining()), (Some(41), Err(None), true, true));
        o.undrain(41);
        assert_eq!((o.serving(), o.draining()), (Ok(()), false));
        assert!(o.elsewhere(None));
        assert_eq!((o.token(), o.may_ack()), (None, false));
    }
}
