//! One consistency group: its sequencer and journal, run by one thread.
//!
//! Writes of every agent of the group arrive on one channel. The journal thread takes what is
//! queued, gives each write the next sequence number in arrival order and a timestamp,
//! appends the batch to the journal and commits it with one fdatasync (group commit), and only
//! then acknowledges each write to its agent. A write sent after another was acknowledged is
//! therefore always queued after it and gets a later number: every prefix of the sequence is a
//! crash-consistent image of all the group's volumes.
//!
//! - `items`: what goes on a group's channel (writes, bookmarks, resync ends, barriers);
//! - `shared`: what the group's shipper and status requests share with its journal thread;
//! - `journal_thread`: the thread that numbers, journals, commits and acknowledges.

mod items;
mod journal_thread;
mod shared;

use std::sync::Arc;

use crossbeam_channel::Sender;
use hindsight_consistency::config::GroupConfig;
use hindsight_consistency::journal::Journal;
pub use hindsight_consistency::record::{INTERVAL_POINT_NAME, RESYNC_POINT_NAME};

pub use self::items::{Barrier, BookmarkPlacement, GroupItem, Latch, ResyncDone, WriteRequest};
use self::journal_thread::journal_loop;
pub use self::shared::{GroupShared, LinkStats};

/// A running group: the sender into its journal thread and the shared state.
#[derive(Clone)]
pub struct GroupHandle {
    /// The configuration.
    pub config: Arc<GroupConfig>,
    /// Shared state.
    pub shared: Arc<GroupShared>,
    /// Into the journal thread.
    pub tx: Sender<GroupItem>,
}

/// Starts the journal thread of a group over an opened journal.
pub fn start(config: GroupConfig, journal: Journal) -> std::io::Result<(GroupHandle, std::thread::JoinHandle<()>)> {
    let shared = Arc::new(GroupShared::new(&config, journal.durable_seq(), journal.last_time_ns()));
    // Bounded: a stalled disk pushes back on the agents instead of growing memory.
    let (tx, rx) = crossbeam_channel::bounded(4096);
    let s = shared.clone();
    let interval = config.interval;
    let join =
        std::thread::Builder::new().name(format!("journal-{}", config.name)).spawn(move || journal_loop(journal, rx, s, interval))?;
    Ok((GroupHandle { config: Arc::new(config), shared, tx }, join))
}
