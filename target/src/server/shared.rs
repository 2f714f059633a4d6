//! What the daemon's threads share: the configuration, the groups (ready, or broken at
//! start-up), the stop flag and the open engine connections.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::Closer;

use crate::group::{Group, GroupOptions};

/// A group as the daemon holds it.
pub(super) enum GroupEntry {
    Ready(Arc<Group>),
    /// It could not be loaded at start-up; engines are told why.
    Broken(String),
    /// A failover was asked for: it is served no more, and engines are told this.
    FailedOver(String),
}

/// State shared by the daemon's threads.
pub(super) struct Shared {
    pub(super) config: TargetConfig,
    pub(super) fs: Arc<dyn Storage>,
    pub(super) opts: GroupOptions,
    pub(super) groups: Mutex<BTreeMap<String, GroupEntry>>,
    pub(super) stop: AtomicBool,
    /// Open engine connections, so that shutdown can close them.
    pub(super) conns: Mutex<HashMap<u64, ConnClose>>,
    pub(super) conn_threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) next_conn: AtomicU64,
}

impl Shared {
    /// The groups failed over here (no longer served), with their failover state as
    /// `failover.toml` says now.
    pub(super) fn failed_over_groups(&self) -> Vec<crate::metrics::FailedOver> {
        let names: Vec<String> =
            lock(&self.groups).iter().filter(|(_, e)| matches!(e, GroupEntry::FailedOver(_))).map(|(n, _)| n.clone()).collect();
        names
            .into_iter()
            .map(|name| {
                let paths = crate::layout::GroupPaths::new(&self.config.data_dir, &name);
                let state = crate::failover::load(self.fs.as_ref(), &name, &paths).ok().flatten();
                crate::metrics::FailedOver { name, state }
            })
            .collect()
    }

    pub(super) fn ready_groups(&self) -> Vec<Arc<Group>> {
        lock(&self.groups)
            .values()
            .filter_map(|e| match e {
                GroupEntry::Ready(g) => Some(Arc::clone(g)),
                GroupEntry::Broken(_) | GroupEntry::FailedOver(_) => None,
            })
            .collect()
    }
}

/// How a stop closes an engine connection: by a duplicate of its socket while the handshake
/// runs, then by the connection's own closer (no descriptor of its own).
pub(super) enum ConnClose {
    Handshake(TcpStream),
    Open(Closer),
}

impl ConnClose {
    /// Shuts the connection down in both directions.
    pub(super) fn shutdown(&self) {
        match self {
            ConnClose::Handshake(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            ConnClose::Open(c) => c.shutdown(),
        }
    }
}
