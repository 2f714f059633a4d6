//! The reading side of a shipping connection: the target's confirmations, journal states,
//! hash replies and errors. It is a task of the engine's link pool, woken when the socket
//! has bytes (`tasks::Readiness`), so a connection with nothing to say holds no thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{start_reading, Reading, Step, Waker};
use hindsight_consistency::transport::{ElasticReader, ReadHalf};
use hindsight_consistency::wire::{decode_confirm, decode_message, read_frame, ErrorMessage, FrameType, HashReply, JournalStateMsg};

use crate::group::GroupShared;
use crate::hashes::HashBroker;

/// The target's frames to the engine are small: this buffer is plenty.
const READ_BUFFER: usize = 64 << 10;

/// What the shipper learns from the reader.
#[derive(Default)]
pub struct ReaderEnd {
    /// The connection broke, or the target said something that ends it.
    pub broken: AtomicBool,
    /// The target's journal is full: it closes, the records go again later.
    pub target_full: AtomicBool,
    /// Set when the reader has ended.
    done: Mutex<bool>,
    ended: Condvar,
}

impl ReaderEnd {
    /// Waits until the reader has ended (the shipper shuts the socket first).
    pub fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.ended.wait(done).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn finish(&self) {
        self.broken.store(true, Ordering::Release);
        *lock(&self.done) = true;
        self.ended.notify_all();
    }
}

/// The reader's state.
struct Reader {
    r: ElasticReader<ReadHalf>,
    payload: Vec<u8>,
    shared: Arc<GroupShared>,
    hashes: Arc<HashBroker>,
    end: Arc<ReaderEnd>,
    group: String,
}

impl Reading for Reader {
    fn ready(&mut self, burst: bool) -> bool {
        // Right after a frame, the next one is waited for a moment before parking (a sync
        // group's confirmations come one after the other).
        self.r.has_input(burst)
    }

    fn parking(&mut self) -> Option<std::time::Instant> {
        self.r.park_idle()
    }

    fn step(&mut self, _me: &Waker) -> Step {
        if self.frame() {
            Step::Continue
        } else {
            Step::Close
        }
    }

    fn end(self) {
        self.r.get_ref().shutdown();
        self.end.finish();
    }
}

impl Reader {
    /// Reads and handles one frame; false once the connection ends.
    fn frame(&mut self) -> bool {
        let (shared, group) = (&self.shared, &self.group);
        match read_frame(&mut self.r, &mut self.payload) {
            Ok(FrameType::Confirm) => match decode_confirm(&self.payload) {
                Ok(seq) => {
                    shared.confirm(seq);
                    true
                }
                Err(e) => {
                    log::warn!("group {group}: bad confirmation: {e}");
                    false
                }
            },
            Ok(FrameType::JournalState) => match decode_message::<JournalStateMsg>("JournalState", &self.payload) {
                Ok(m) => {
                    let full = m.full;
                    shared.journal.target_state(m, shared.confirmed.load(Ordering::Acquire));
                    if full {
                        // The target closes; the records are shipped again later.
                        self.end.target_full.store(true, Ordering::Release);
                    }
                    !full
                }
                Err(e) => {
                    log::warn!("group {group}: bad JournalState: {e}");
                    false
                }
            },
            Ok(FrameType::TargetHashReply) => match decode_message::<HashReply>("TargetHashReply", &self.payload) {
                Ok(reply) => {
                    self.hashes.answer(reply);
                    true
                }
                Err(e) => {
                    log::warn!("group {group}: bad hash reply: {e}");
                    false
                }
            },
            Ok(FrameType::Error) => {
                let m = decode_message::<ErrorMessage>("Error", &self.payload).map(|m| m.message).unwrap_or_default();
                log::error!("group {group}: the target reported: {m}");
                *lock(&shared.target_refused) = m;
                false
            }
            Ok(other) => {
                log::warn!("group {group}: unexpected {other:?} frame from the target");
                false
            }
            Err(e) => {
                log::debug!("group {group}: target connection: {e}");
                false
            }
        }
    }
}

/// Starts reading the target's side of a shipping connection; the returned end says when it
/// broke and when the reader has finished.
pub fn start(r: ReadHalf, shared: Arc<GroupShared>, hashes: Arc<HashBroker>, group: &str) -> std::io::Result<Arc<ReaderEnd>> {
    let end = Arc::new(ReaderEnd::default());
    let reader = Reader {
        r: ElasticReader::new(r, READ_BUFFER),
        payload: Vec::new(),
        shared,
        hashes,
        end: Arc::clone(&end),
        group: group.to_owned(),
    };
    start_reading(crate::connection::link_pool()?, &format!("confirm-{group}"), reader.r.get_ref().socket(), reader)?;
    Ok(end)
}
