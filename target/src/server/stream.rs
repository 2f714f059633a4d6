//! The records of an engine connection once its group is taken: `Records` frames read in
//! batches, journaled with one commit each and confirmed at once, hash requests answered
//! between two batches, and the `Error` frame that tells the engine why a connection ends.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{self, start_reading, Pool, Reading, Step, Waker};
use hindsight_consistency::transport::elastic::RELEASE_AFTER;
use hindsight_consistency::transport::{ElasticReader, ReadHalf, WriteHalf};
use hindsight_consistency::wire::frame::whole_frame_buffered;
use hindsight_consistency::wire::{
    decode_message, decompress_records, encode_confirm, encode_message, read_frame, write_frame, ErrorMessage, FrameError, FrameType,
    TargetHashRequest,
};

use super::shared::Shared;
use crate::group::{Group, ShipperClaim};

/// Most frames and bytes journaled with one commit.
const MAX_BATCH_FRAMES: usize = 64;
const MAX_BATCH_BYTES: usize = 32 << 20;

/// Sends an `Error` frame (best effort): the peer learns why before the connection closes.
pub(super) fn send_error(stream: &mut impl Write, message: &str) {
    let mut scratch = Vec::new();
    let payload = encode_message(&ErrorMessage { message: message.to_owned() });
    let _ = write_frame(stream, FrameType::Error, &payload, &mut scratch);
    let _ = stream.flush();
}

/// An engine connection once its group is taken and welcomed: a task of the process's receive
/// pool, woken when bytes arrive (`tasks::Readiness`); with nothing to read it parks and holds
/// no thread and almost no memory.
pub(super) struct Receiving {
    pub shared: Arc<Shared>,
    pub group: Arc<Group>,
    /// The group is this connection's until dropped (held, never read).
    pub _claim: ShipperClaim,
    pub reader: ElasticReader<ReadHalf>,
    pub writer: WriteHalf,
    /// For the log: which engine, where, which group.
    pub ctx: String,
    /// Its key in `Shared::conns`, removed when it ends.
    pub id: u64,
    pub batch: Vec<Vec<u8>>,
    pub scratch: Vec<u8>,
    pub packed: Vec<u8>,
    /// The group's journal buffers were given back since the last frame.
    pub released: bool,
}

impl Reading for Receiving {
    fn ready(&mut self, burst: bool) -> bool {
        self.shared.stop.load(Ordering::SeqCst) || self.reader.has_input(burst)
    }

    /// Gives back a grown read buffer after a while, and, once, the group's journal buffers.
    fn parking(&mut self) -> Option<Instant> {
        let release_at = self.reader.park_idle();
        if self.released {
            return release_at;
        }
        let since = self.reader.idle_since().unwrap_or_else(Instant::now);
        if since.elapsed() >= RELEASE_AFTER {
            self.group.release_memory();
            self.writer.release();
            self.batch = Vec::new();
            self.scratch = Vec::new();
            self.packed = Vec::new();
            self.released = true;
            return release_at;
        }
        let at = since + RELEASE_AFTER;
        Some(release_at.map_or(at, |r| r.min(at)))
    }

    fn step(&mut self, _me: &Waker) -> Step {
        self.released = false;
        self.receive()
    }

    /// Its watch, claim and socket go, and shutdown no longer waits for it.
    fn end(self) {
        let (shared, id) = (Arc::clone(&self.shared), self.id);
        drop(self);
        lock(&shared.conns).remove(&id);
    }
}

/// The threads that run every engine connection's task in this process.
fn pool() -> std::io::Result<&'static Pool> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    Pool::process_wide(&POOL, "target-recv", tasks::io_threads())
}

/// Hands a welcomed connection to the receive pool. Fails (and the connection is closed) if
/// the pool or the watch cannot be set up.
pub(super) fn start_receiving(conn: Receiving) -> std::io::Result<()> {
    let (ctx, socket) = (conn.ctx.clone(), conn.reader.get_ref().socket());
    match pool() {
        Ok(pool) => start_reading(pool, &ctx, socket, conn).map(drop),
        Err(e) => {
            conn.end();
            Err(e)
        }
    }
}

impl Receiving {
    /// Reads `Records` frames, journals them in a batch (one commit for the frames that have
    /// already arrived together) and confirms the batch as soon as it is committed; the
    /// group's applier applies it to the replicas meanwhile. A `TargetHashRequest` ends a
    /// batch and is answered once every record before it is applied.
    fn receive(&mut self) -> Step {
        let ctx = &self.ctx;
        // One frame, waiting for it; then any that are already here.
        let mut pending_error: Option<(FrameError, bool)> = None;
        let mut hash_request: Option<Vec<u8>> = None;
        let mut bytes = 0;
        loop {
            let mut payload = self.group.buffer();
            match read_frame(&mut self.reader, &mut payload) {
                Ok(FrameType::Records) => {
                    bytes += payload.len();
                    self.batch.push(payload);
                }
                Ok(FrameType::RecordsLz4) => {
                    std::mem::swap(&mut self.packed, &mut payload);
                    match decompress_records(&self.packed, &mut payload) {
                        Ok(()) => {
                            bytes += payload.len();
                            self.batch.push(payload);
                        }
                        Err(e) => pending_error = Some((e, true)),
                    }
                }
                Ok(FrameType::Error) => {
                    let msg = decode_message::<ErrorMessage>("Error", &payload).map(|m| m.message).unwrap_or_else(|e| e.to_string());
                    pending_error = Some((FrameError::Peer(msg), false));
                }
                Ok(FrameType::TargetHashRequest) => hash_request = Some(payload),
                Ok(other) => pending_error = Some((FrameError::Unexpected { got: other, expected: "Records" }, true)),
                Err(e) => pending_error = Some((e, false)),
            }
            if pending_error.is_some()
                || hash_request.is_some()
                || self.batch.len() >= MAX_BATCH_FRAMES
                || bytes >= MAX_BATCH_BYTES
                || !whole_frame_buffered(self.reader.buffer())
            {
                break;
            }
        }
        if !self.batch.is_empty() {
            let receipt = self.group.receive_owned(self._claim.owner, &mut self.batch);
            if let Err(e) = write_frame(&mut self.writer, FrameType::Confirm, &encode_confirm(receipt.durable_seq), &mut self.scratch) {
                log::warn!("{ctx}: sending Confirm({}): {e}; closing", receipt.durable_seq);
                return Step::Close;
            }
            if let Some(why) = receipt.error {
                log::error!("{ctx}: {why}; closing the connection");
                send_error(&mut self.writer, &why);
                return Step::Close;
            }
            if let Some(full) = receipt.full {
                // The engine keeps the records and tries again later.
                let _ = write_frame(&mut self.writer, FrameType::JournalState, &encode_message(&full), &mut self.scratch);
                let _ = self.writer.flush();
                log::debug!("{ctx}: journal full; told the engine and closed the connection");
                return Step::Close;
            }
            if let Some(notice) = self.group.take_notice() {
                if let Err(e) = write_frame(&mut self.writer, FrameType::JournalState, &encode_message(&notice), &mut self.scratch) {
                    log::warn!("{ctx}: sending JournalState: {e}; closing");
                    return Step::Close;
                }
            }
        }
        if let Some(payload) = hash_request.take() {
            // Answered once every record sent before the request is applied (`with_replicas`
            // waits for the applier): the hashes are of that prefix.
            let reply = match decode_message::<TargetHashRequest>("TargetHashRequest", &payload) {
                Ok(req) => crate::hashes::answer(&self.group, &req),
                Err(e) => {
                    log::warn!("{ctx}: {e}; closing the connection");
                    send_error(&mut self.writer, &e.to_string());
                    return Step::Close;
                }
            };
            if let Err(e) = write_frame(&mut self.writer, FrameType::TargetHashReply, &encode_message(&reply), &mut self.scratch) {
                log::warn!("{ctx}: sending TargetHashReply: {e}; closing");
                return Step::Close;
            }
        }
        if let (Some(_), Some(why)) = (&pending_error, self.group.refusal()) {
            // The applier failed, or a failover fenced the group, while the loop waited for
            // frames (and woke it).
            log::error!("{ctx}: {why}; closing the connection");
            send_error(&mut self.writer, &why);
            return Step::Close;
        }
        match pending_error {
            None => {}
            Some((FrameError::Closed, _)) => {
                log::info!("{ctx}: the engine closed the connection");
                return Step::Close;
            }
            Some((FrameError::Peer(msg), _)) => {
                log::warn!("{ctx}: the engine reported: {msg}; closing");
                return Step::Close;
            }
            Some((e, tell)) => {
                if self.shared.stop.load(Ordering::SeqCst) {
                    log::info!("{ctx}: closed for shutdown");
                } else {
                    log::warn!("{ctx}: {e}; closing the connection, nothing of the bad frame is kept");
                    if tell || matches!(e, FrameError::Malformed(_)) {
                        send_error(&mut self.writer, &format!("{e}"));
                    }
                }
                return Step::Close;
            }
        }
        Step::Continue
    }
}
