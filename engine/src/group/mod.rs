//! One consistency group: its sequencer and journal, a task of the engine's journal pool.
//!
//! Writes of every agent of the group arrive on one channel, and whoever queues one wakes the
//! group's journal task ([`GroupHandle::send`]). Each round the task takes what is
//! queued, gives each write the next sequence number in arrival order and a timestamp,
//! appends the batch to the journal and commits it with one fdatasync (group commit), and only
//! then acknowledges each write to its agent. A write sent after another was acknowledged is
//! therefore always queued after it and gets a later number: every prefix of the sequence is a
//! crash-consistent image of all the group's volumes.
//!
//! - `items`: what goes on a group's channel (writes, bookmarks, resync ends, barriers);
//! - `shared`: what the group's shipper and status requests share with its journal task;
//! - `journal_task`: the task that numbers, journals, commits and acknowledges.

mod items;
mod journal_task;
mod room;
mod shared;

use std::sync::Arc;

use crossbeam_channel::{SendError, Sender};
use hindsight_consistency::config::GroupConfig;
use hindsight_consistency::journal::Journal;
pub use hindsight_consistency::record::{INTERVAL_POINT_NAME, RESYNC_POINT_NAME};
use hindsight_consistency::tasks::{Pool, Waker};

pub use self::items::{Barrier, BookmarkPlacement, GroupItem, Latch, ResyncDone, WriteRequest};
use self::journal_task::JournalTask;
use self::room::{Offer, Room};
pub use self::shared::{GroupShared, LinkStats};

/// A running group: the way into its journal task and the shared state.
#[derive(Clone)]
pub struct GroupHandle {
    /// The configuration.
    pub config: Arc<GroupConfig>,
    /// Shared state.
    pub shared: Arc<GroupShared>,
    /// Into the journal task.
    tx: Sender<GroupItem>,
    /// Bounds what is queued on `tx`.
    room: Arc<Room>,
    /// Runs the journal task's next round.
    waker: Waker,
}

impl GroupHandle {
    /// Queues an item for the journal task and wakes it. Waits while the channel is full (a
    /// stalled disk pushes back on the agents). Fails once the task has ended.
    pub fn send(&self, item: GroupItem) -> Result<(), SendError<GroupItem>> {
        if !self.room.take() {
            return Err(SendError(item));
        }
        self.queue(item)
    }

    /// Queues an item without waiting and without waking the journal task: the caller wakes
    /// it (or runs it, [`GroupHandle::commit_here`]) once it has queued what it read. With the
    /// channel full the item comes back, the journal task is woken to make room, and `waiter`
    /// is woken once there is room (offer it again then). `Err` once the task has ended.
    pub fn offer_unwoken(&self, item: GroupItem, waiter: &Waker) -> Result<Option<GroupItem>, SendError<GroupItem>> {
        match self.room.offer(waiter) {
            Offer::Taken => self.queue_unwoken(item).map(|()| None),
            Offer::Full => {
                self.waker.wake();
                Ok(Some(item))
            }
            Offer::Closed => Err(SendError(item)),
        }
    }

    fn queue(&self, item: GroupItem) -> Result<(), SendError<GroupItem>> {
        self.queue_unwoken(item)?;
        self.waker.wake();
        Ok(())
    }

    fn queue_unwoken(&self, item: GroupItem) -> Result<(), SendError<GroupItem>> {
        if let Err(e) = self.tx.send(item) {
            self.room.give(1);
            return Err(e);
        }
        Ok(())
    }

    /// Wakes the journal task (to see that the group stops, or that the target confirmed).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Runs the journal task's round (numbering, the group commit, the acknowledgements) on
    /// this thread if nobody runs it now, else wakes it: for a connection that has queued its
    /// writes and would otherwise only wait for more (no other thread is woken for the commit).
    pub fn commit_here(&self) {
        self.waker.run_here();
    }

    /// True if both handles are of the same group.
    pub fn same(&self, other: &GroupHandle) -> bool {
        Arc::ptr_eq(&self.room, &other.room)
    }
}

/// Adds the journal task of a group over an opened journal to `pool`.
pub fn start(config: GroupConfig, journal: Journal, pool: &Pool) -> GroupHandle {
    let shared = Arc::new(GroupShared::new(&config, journal.durable_seq(), journal.last_time_ns()));
    // Bounded by `room`: a stalled disk pushes back on the agents instead of growing memory.
    let (tx, rx) = crossbeam_channel::unbounded();
    let room = Arc::new(Room::default());
    let task = JournalTask::new(journal, (rx, Arc::clone(&room)), Arc::clone(&shared), config.interval);
    let waker = pool.add(&format!("journal-{}", config.name), task);
    GroupHandle { config: Arc::new(config), shared, tx, room, waker }
}
