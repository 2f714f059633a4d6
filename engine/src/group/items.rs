//! What goes on a group's channel to its journal task: the agents' writes, bookmarks, the
//! ends of resyncs and barriers, and the latch the groups of one bookmark request share.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crossbeam_channel::Sender;
use hindsight_consistency::record::{Seq, WriteKind};
use hindsight_consistency::sync::lock;

use crate::acks::AckTo;
use crate::error::GroupError;

/// One write on its way into the journal.
pub struct WriteRequest {
    /// Agent's id for the write.
    pub req_id: u64,
    /// Volume name.
    pub volume: Arc<str>,
    /// What it does.
    pub kind: WriteKind,
    /// Byte offset.
    pub offset: u64,
    /// Bytes covered.
    pub length: u32,
    /// The frame payload holding the data at `data_at..` (moved, not copied, from the socket
    /// buffer).
    pub payload: Vec<u8>,
    /// Where the data starts in `payload`.
    pub data_at: usize,
    /// Where the acknowledgement goes.
    pub ack: AckTo,
}

/// What a group's journal task takes from its channel.
pub enum GroupItem {
    /// A guest write.
    Write(WriteRequest),
    /// A bookmark to place.
    Bookmark(BookmarkPlacement),
    /// An agent re-sent every dirty region of these volumes of the group.
    ResyncDone(ResyncDone),
    /// Answered with the durable sequence number once everything queued before it is
    /// committed (a hash request's `through_seq`).
    Barrier(Barrier),
}

/// Passes the durable sequence number that covers everything queued before it, once; if the
/// group drops it uncommitted (stopped, shutting down), passes why instead.
pub struct Barrier(Option<BarrierThen>);

/// What a barrier runs: the durable sequence number, or why there is none.
type BarrierThen = Box<dyn FnOnce(Result<Seq, GroupError>) + Send>;

impl Barrier {
    /// A barrier that runs `then`.
    pub fn new(then: impl FnOnce(Result<Seq, GroupError>) + Send + 'static) -> Barrier {
        Barrier(Some(Box::new(then)))
    }

    pub(super) fn pass(mut self, durable: Seq) {
        if let Some(then) = self.0.take() {
            then(Ok(durable));
        }
    }
}

impl Drop for Barrier {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then(Err(GroupError::Stopped));
        }
    }
}

/// The end of the resync of some volumes of a group, on its way to the journal task behind
/// every resync write of the same agent connection.
pub struct ResyncDone {
    /// The volumes whose resync completed.
    pub volumes: Vec<Arc<str>>,
}

/// A bookmark on its way into a group's journal.
pub struct BookmarkPlacement {
    /// The bookmark's name.
    pub name: String,
    /// Its record data (an encoded [`hindsight_consistency::BookmarkBody`]).
    pub body: Vec<u8>,
    /// Counted down by every group of the request once its bookmark is durable; the journal
    /// thread takes nothing numbered after its bookmark until it reaches zero.
    pub latch: Arc<Latch>,
    /// Where the group's bookmark sequence number and time (or an error) go.
    pub reply: Sender<Result<(Seq, u64), GroupError>>,
    /// Hand the group over after the bookmark: number nothing more (a planned failover).
    pub hold: bool,
}

impl BookmarkPlacement {
    /// Answers the request, then waits for the other groups of it: nothing after the bookmark
    /// is numbered before every group has placed (or failed to place) its own.
    pub(super) fn answer(self, result: Result<(Seq, u64), GroupError>, group: &str) {
        let _ = self.reply.send(result);
        self.latch.arrive_and_wait(group);
    }
}

/// A countdown the groups of one bookmark request wait on together.
pub struct Latch {
    left: Mutex<usize>,
    zero: Condvar,
}

/// How long a group waits for the other groups of a bookmark request.
const LATCH_WAIT: Duration = Duration::from_secs(10);

impl Latch {
    /// A latch for `n` groups.
    pub fn new(n: usize) -> Latch {
        Latch { left: Mutex::new(n), zero: Condvar::new() }
    }

    /// Counts one group down and waits (bounded) for the others.
    fn arrive_and_wait(&self, group: &str) {
        let mut left = lock(&self.left);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.zero.notify_all();
            return;
        }
        let (left, timeout) = self.zero.wait_timeout_while(left, LATCH_WAIT, |l| *l > 0).unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() {
            log::warn!("group {group}: {} other group(s) did not place their bookmark within {LATCH_WAIT:?}; going on", *left);
        }
    }
}
