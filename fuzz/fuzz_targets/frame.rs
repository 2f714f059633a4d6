//! Frames and every message body decoded from arbitrary bytes: never a panic, never an
//! allocation beyond the checked limits.
#![no_main]

use hindsight_consistency::record::decode_record;
use hindsight_consistency::wire::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut payload = Vec::new();
    // A stream of frames, as a peer would send them.
    while let Ok(ftype) = read_frame(&mut input, &mut payload) {
        match ftype {
            FrameType::Write => {
                let _ = WriteMsg::decode(&payload);
            }
            FrameType::WriteAck => {
                let _ = WriteAck::decode(&payload);
            }
            FrameType::Confirm => {
                let _ = decode_confirm(&payload);
            }
            FrameType::Records => {
                let mut at = 0;
                while at < payload.len() {
                    match decode_record(&payload[at..]) {
                        Ok((_, used)) => at += used,
                        Err(_) => break,
                    }
                }
            }
            FrameType::AgentHello => {
                let _ = decode_message::<AgentHello>("AgentHello", &payload);
            }
            FrameType::TargetHello => {
                let _ = decode_message::<TargetHello>("TargetHello", &payload);
            }
            FrameType::BookmarkRequest => {
                let _ = decode_message::<BookmarkRequest>("BookmarkRequest", &payload);
            }
            FrameType::Quiesce => {
                let _ = decode_message::<QuiesceMsg>("Quiesce", &payload);
            }
            FrameType::ResyncDone => {
                let _ = decode_message::<ResyncDoneMsg>("ResyncDone", &payload);
            }
            FrameType::JournalState => {
                let _ = decode_message::<JournalStateMsg>("JournalState", &payload);
            }
            FrameType::ResyncProgress => {
                let _ = decode_message::<ResyncProgressMsg>("ResyncProgress", &payload);
            }
            FrameType::HashRequest => {
                let _ = decode_message::<HashRequest>("HashRequest", &payload);
            }
            FrameType::TargetHashRequest => {
                let _ = decode_message::<TargetHashRequest>("TargetHashRequest", &payload);
            }
            FrameType::HashReply | FrameType::TargetHashReply => {
                let _ = decode_message::<HashReply>("HashReply", &payload);
            }
            _ => {
                let _ = decode_message::<ErrorMessage>("Error", &payload);
            }
        }
    }
    // The record decoder on raw bytes too (the journal reads records without frames).
    let _ = decode_record(data);
});
