//! The records of an engine connection once its group is taken: `Records` frames read in
//! batches, journaled with one commit each and confirmed at once, hash requests answered
//! between two batches, and the `Error` frame that tells the engine why a connection ends.

use std::io::{BufReader, Write};
use std::sync::atomic::Ordering;

use hindsight_consistency::transport::{ReadHalf, WriteHalf};
use hindsight_consistency::wire::frame::whole_frame_buffered;
use hindsight_consistency::wire::{
    decode_message, decompress_records, encode_confirm, encode_message, read_frame, write_frame, ErrorMessage, FrameError, FrameType,
    TargetHashRequest,
};

use super::shared::Shared;
use crate::group::Group;

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

/// Reads `Records` frames, journals them in batches (one commit for the frames that have
/// already arrived together) and confirms each batch as soon as it is committed; the group's
/// applier applies it to the replicas meanwhile. A `TargetHashRequest` ends a batch and is
/// answered once every record before it is applied.
pub(super) fn receive_loop(shared: &Shared, group: &Group, reader: &mut BufReader<ReadHalf>, writer: &mut WriteHalf, ctx: &str) {
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut scratch = Vec::new();
    let mut packed = Vec::new();
    loop {
        // One frame, waiting for it; then any that are already here.
        let mut pending_error: Option<(FrameError, bool)> = None;
        let mut hash_request: Option<Vec<u8>> = None;
        let mut bytes = 0;
        loop {
            let mut payload = group.buffer();
            match read_frame(reader, &mut payload) {
                Ok(FrameType::Records) => {
                    bytes += payload.len();
                    batch.push(payload);
                }
                Ok(FrameType::RecordsLz4) => {
                    std::mem::swap(&mut packed, &mut payload);
                    match decompress_records(&packed, &mut payload) {
                        Ok(()) => {
                            bytes += payload.len();
                            batch.push(payload);
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
                || batch.len() >= MAX_BATCH_FRAMES
                || bytes >= MAX_BATCH_BYTES
                || !whole_frame_buffered(reader.buffer())
            {
                break;
            }
        }
        if !batch.is_empty() {
            let receipt = group.receive(&mut batch);
            if let Err(e) = write_frame(writer, FrameType::Confirm, &encode_confirm(receipt.durable_seq), &mut scratch) {
                log::warn!("{ctx}: sending Confirm({}): {e}; closing", receipt.durable_seq);
                return;
            }
            if let Some(why) = receipt.error {
                log::error!("{ctx}: {why}; closing the connection");
                send_error(writer, &why);
                return;
            }
            if let Some(full) = receipt.full {
                // The engine keeps the records and tries again later.
                let _ = write_frame(writer, FrameType::JournalState, &encode_message(&full), &mut scratch);
                let _ = writer.flush();
                log::debug!("{ctx}: journal full; told the engine and closed the connection");
                return;
            }
            if let Some(notice) = group.take_notice() {
                if let Err(e) = write_frame(writer, FrameType::JournalState, &encode_message(&notice), &mut scratch) {
                    log::warn!("{ctx}: sending JournalState: {e}; closing");
                    return;
                }
            }
        }
        if let Some(payload) = hash_request.take() {
            // Answered once every record sent before the request is applied (`with_replicas`
            // waits for the applier): the hashes are of that prefix.
            let reply = match decode_message::<TargetHashRequest>("TargetHashRequest", &payload) {
                Ok(req) => crate::hashes::answer(group, &req),
                Err(e) => {
                    log::warn!("{ctx}: {e}; closing the connection");
                    send_error(writer, &e.to_string());
                    return;
                }
            };
            if let Err(e) = write_frame(writer, FrameType::TargetHashReply, &encode_message(&reply), &mut scratch) {
                log::warn!("{ctx}: sending TargetHashReply: {e}; closing");
                return;
            }
        }
        if let (Some(_), Some(why)) = (&pending_error, group.refusal()) {
            // The applier failed, or a failover fenced the group, while the loop waited for
            // frames (and woke it).
            log::error!("{ctx}: {why}; closing the connection");
            send_error(writer, &why);
            return;
        }
        match pending_error {
            None => {}
            Some((FrameError::Closed, _)) => {
                log::info!("{ctx}: the engine closed the connection");
                return;
            }
            Some((FrameError::Peer(msg), _)) => {
                log::warn!("{ctx}: the engine reported: {msg}; closing");
                return;
            }
            Some((e, tell)) => {
                if shared.stop.load(Ordering::SeqCst) {
                    log::info!("{ctx}: closed for shutdown");
                } else {
                    log::warn!("{ctx}: {e}; closing the connection, nothing of the bad frame is kept");
                    if tell || matches!(e, FrameError::Malformed(_)) {
                        send_error(writer, &format!("{e}"));
                    }
                }
                return;
            }
        }
    }
}
