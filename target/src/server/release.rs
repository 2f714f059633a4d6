//! The daemon's side of a failover (docs/failover.md): a group whose `failover.toml` appears
//! is fenced at once (the next batch and every later hello are refused), and released on a
//! thread of its own once its connection has ended: the replicas brought up to the journal,
//! checkpointed, the group no longer served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::error_chain;
use hindsight_consistency::sync::lock;

use super::shared::{GroupEntry, Shared};
use crate::failover::{self, FailoverState, Stage};
use crate::group::Group;

/// How long a release waits for the group's connection to end before it gives up (the
/// connection's socket writes time out after 30 s).
const CONNECTION_GONE: Duration = Duration::from_secs(45);

/// Looks for a failover asked for on each group served; fences and releases those.
pub(super) fn look_for_failovers(shared: &Arc<Shared>) {
    for g in shared.ready_groups() {
        if !shared.fs.exists(&g.paths().failover()) {
            continue;
        }
        let name = g.name.clone();
        let entry = match failover::load(shared.fs.as_ref(), &name, g.paths()) {
            Ok(Some(state)) => {
                let why = state.refusal(&name);
                g.fence(why.clone());
                log::warn!("group {name:?}: a failover was asked for (epoch {}): refusing its engine from now on", state.epoch);
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new().name("target-release".into()).spawn(move || release(&s, g, state));
                if let Err(e) = spawned {
                    log::error!("group {name:?}: cannot start the thread that releases it: {e}; restart the target to release it");
                }
                GroupEntry::FailedOver(why)
            }
            Ok(None) => continue,
            Err(e) => {
                let why = error_chain(&e);
                g.fence(why.clone());
                log::error!("group {name:?}: {why}; the group is no longer served");
                GroupEntry::Broken(why)
            }
        };
        lock(&shared.groups).insert(name, entry);
    }
}

/// Waits for the group's connection to end, then releases it (unless it is already further).
fn release(shared: &Shared, group: Arc<Group>, state: FailoverState) {
    let name = group.name.clone();
    let since = Instant::now();
    while Arc::strong_count(&group) > 1 {
        if since.elapsed() > CONNECTION_GONE {
            log::error!("group {name:?}: its engine connection has not ended after {CONNECTION_GONE:?}; restart the target to release it");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = Arc::into_inner(group).expect("no other holder is left");
    if state.state != Stage::Requested {
        // Released already (by a run with no daemon): nothing is to be done but stop serving.
        group.maintain(true);
        return;
    }
    match failover::finish_release(shared.fs.as_ref(), group, state) {
        Ok(_) => {}
        Err(e) => log::error!("group {name:?}: the release for failover failed: {}; restart the target to try again", error_chain(&e)),
    }
}
