//! The reading side of a shipping connection: the target's confirmations, journal states,
//! hash replies and errors. It is a task of the engine's confirm pool, woken when the socket
//! has bytes (`tasks::Readiness`), so a connection with nothing to say holds no thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{Next, Pool, Readiness, Task, Watch};
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

/// The reader's state, and the watch on its socket once it is set.
struct Reader {
    r: ElasticReader<ReadHalf>,
    payload: Vec<u8>,
    shared: Arc<GroupShared>,
    hashes: Arc<HashBroker>,
    end: Arc<ReaderEnd>,
    group: String,
    watch: Option<Watch>,
    /// The last round read a frame.
    just_read: bool,
}

/// How long, in milliseconds, a reader that just read a frame waits for the next before it
/// parks.
const BURST_WAIT_MS: u8 = 1;

#[derive(Clone)]
struct ReaderTask(Arc<Mutex<Option<Reader>>>);

impl Task for ReaderTask {
    fn run(&self) -> Next {
        let mut state = lock(&self.0);
        let Some(reader) = state.as_mut() else { return Next::Done };
        // Right after a frame, the next one is waited for a moment before parking (a sync
        // group's confirmations come one after the other).
        let burst = std::mem::take(&mut reader.just_read);
        let ready = if burst { reader.r.get_ref().wait_readable(BURST_WAIT_MS) } else { reader.r.get_ref().readable() };
        if reader.r.buffer().is_empty() && !ready {
            let release_at = reader.r.park();
            if let Some(Err(e)) = reader.watch.as_ref().map(Watch::arm) {
                log::warn!("group {}: cannot watch the target connection: {e}", reader.group);
                finish(&mut state);
                return Next::Done;
            }
            return release_at.map_or(Next::Idle, Next::At);
        }
        if reader.frame() {
            reader.just_read = true;
            Next::Again
        } else {
            finish(&mut state);
            Next::Done
        }
    }
}

fn finish(state: &mut Option<Reader>) {
    if let Some(reader) = state.take() {
        reader.r.get_ref().shutdown();
        drop(reader.watch);
        reader.end.finish();
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

/// The threads that read every shipping connection of this process.
fn pool() -> std::io::Result<&'static Pool> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    // A reader waits a moment for the next frame before it parks: as many threads as the
    // others, so that busy connections do not hold up the rest.
    Pool::process_wide(&POOL, "confirm", hindsight_consistency::tasks::io_threads())
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
        watch: None,
        just_read: false,
    };
    let task = ReaderTask(Arc::new(Mutex::new(Some(reader))));
    let waker = pool()?.add(&format!("confirm-{group}"), task.clone());
    let mut state = lock(&task.0);
    if let Some(reader) = state.as_mut() {
        match Readiness::global().and_then(|g| g.watch(reader.r.get_ref().socket(), waker.clone())) {
            Ok(w) => reader.watch = Some(w),
            Err(e) => {
                finish(&mut state);
                return Err(e);
            }
        }
    }
    drop(state);
    waker.wake();
    Ok(end)
}
