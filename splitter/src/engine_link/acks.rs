//! The ack reader: reads the engine's frames on the connection's read half, completes each
//! acknowledged write (or fails it, noting the volume for a resync), and hands control
//! frames (quiesce, thaw, hash replies) to [`control`](super::control).

use std::sync::Arc;
use std::time::Instant;

use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::ReadHalf;
use hindsight_consistency::wire::frame::whole_frame_buffered;
use hindsight_consistency::wire::{
    decode_message, read_frame, ErrorMessage, FrameError, FrameType, HashReply, QuiesceMsg, TargetConfirmedMsg, ThawMsg, WriteAck,
};
use log::{error, info, warn};

use super::state::Inner;
use crate::block::{self, BlockError};

/// Reads acknowledgements until the connection ends; returns why it ended.
pub(super) fn read_acks(inner: &Arc<Inner>, stream: ReadHalf) -> FrameError {
    let mut payload = Vec::new();
    // Acknowledgements arrive in batches: one read takes many of them, and the guests'
    // replies to a batch go out together (one send per client connection) under a cork,
    // dropped before this thread waits for more.
    let mut stream = std::io::BufReader::with_capacity(64 << 10, stream);
    let mut cork: Option<block::Cork> = None;
    loop {
        if !whole_frame_buffered(stream.buffer()) {
            cork = None;
        }
        let frame = read_frame(&mut stream, &mut payload);
        inner.frames_read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ack = match frame {
            Ok(FrameType::WriteAck) => match WriteAck::decode(&payload) {
                Ok(ack) => ack,
                Err(e) => return e,
            },
            Ok(FrameType::Error) => {
                return match decode_message::<ErrorMessage>("Error", &payload) {
                    Ok(e) => FrameError::Peer(e.message),
                    Err(e) => e,
                }
            }
            Ok(FrameType::Quiesce) => {
                match decode_message::<QuiesceMsg>("Quiesce", &payload) {
                    Ok(q) => inner.quiesce(q),
                    Err(e) => return e,
                }
                continue;
            }
            Ok(FrameType::TargetConfirmed) => {
                match decode_message::<TargetConfirmedMsg>("TargetConfirmed", &payload) {
                    Ok(m) => {
                        if let Some(events) = inner.events.get() {
                            for &d in &m.disks {
                                events.target_confirmed(d, m.seq);
                            }
                        }
                    }
                    Err(e) => return e,
                }
                continue;
            }
            Ok(FrameType::HashReply) => {
                match decode_message::<HashReply>("HashReply", &payload) {
                    Ok(r) => inner.hash_reply(r),
                    Err(e) => return e,
                }
                continue;
            }
            Ok(FrameType::Thaw) => {
                match decode_message::<ThawMsg>("Thaw", &payload) {
                    Ok(t) => inner.thaw(t),
                    Err(e) => return e,
                }
                continue;
            }
            Ok(got) => return FrameError::Unexpected { got, expected: "WriteAck" },
            Err(e) => return e,
        };
        cork.get_or_insert_with(block::cork);
        inner.complete(ack);
    }
}

impl Inner {
    /// Runs the completion of an acknowledged write.
    fn complete(&self, ack: WriteAck) {
        let Some(p) = lock(&self.pending).remove(&ack.req_id) else {
            warn!("engine {} acknowledged unknown write {}; ignored", self.engine, ack.req_id);
            return;
        };
        let w = &p.write;
        if ack.status == WriteAck::OK {
            if lock(&self.paused).remove(&w.disk).is_some() {
                info!("engine {} takes the writes of volume {} again", self.engine, self.volumes[usize::from(w.disk)]);
            }
            return (p.done)(Ok(ack.seq));
        }
        lock(&self.diverged).insert(w.disk);
        if ack.status == WriteAck::ENOSPC {
            // The group is paused: said once, not for every write.
            if lock(&self.paused).insert(w.disk, Instant::now()).is_none() {
                warn!(
                    "engine {} paused the group of volume {} (a journal is full): its writes are kept on the local disk and \
                     tracked for a resync (or fail, with on_engine_loss = \"fail\")",
                    self.engine,
                    self.volumes[usize::from(w.disk)]
                );
            }
            return (p.done)(Err(BlockError::Io));
        }
        error!(
            "engine {} failed the write to volume {} at offset {} ({} bytes, {}): errno {}",
            self.engine,
            self.volumes[usize::from(w.disk)],
            w.offset,
            w.length,
            w.body.kind().as_str(),
            ack.status
        );
        (p.done)(Err(BlockError::Io));
    }
}
