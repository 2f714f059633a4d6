//! A write as it goes to the engine: what it carries ([`WriteBody`]), the write kept for
//! sending ([`Outgoing`]), and its `Write` frame.

use std::sync::Arc;

use hindsight_consistency::wire::frame::encode_header_parts;
use hindsight_consistency::wire::{FrameType, WriteMsg};
use hindsight_consistency::WriteKind;

/// What one write carries to the engine. The data is shared so that it can stay in the
/// pending map, for re-sending after a reconnection, while the local write uses it.
#[derive(Debug, Clone)]
pub enum WriteBody {
    /// These bytes.
    Data(Arc<Vec<u8>>),
    /// This many bytes read back as zeroes.
    Zeroes(u32),
    /// This many bytes are discarded.
    Trim(u32),
    /// These bytes, re-sent from the local disk by a resync (not in the guest's order).
    Resync(Arc<Vec<u8>>),
}

impl WriteBody {
    /// The record kind on the wire.
    pub fn kind(&self) -> WriteKind {
        match self {
            WriteBody::Data(_) => WriteKind::Data,
            WriteBody::Zeroes(_) => WriteKind::Zeroes,
            WriteBody::Trim(_) => WriteKind::Trim,
            WriteBody::Resync(_) => WriteKind::Resync,
        }
    }

    /// Bytes of the volume covered (`None` when too many for one write).
    pub(super) fn length(&self) -> Option<u32> {
        match self {
            WriteBody::Data(d) | WriteBody::Resync(d) => u32::try_from(d.len()).ok(),
            WriteBody::Zeroes(len) | WriteBody::Trim(len) => Some(*len),
        }
    }

    pub(super) fn data(&self) -> &[u8] {
        match self {
            WriteBody::Data(d) | WriteBody::Resync(d) => d,
            WriteBody::Zeroes(_) | WriteBody::Trim(_) => &[],
        }
    }
}

/// One write as it goes on the wire; kept until acknowledged, to be sent again after a
/// reconnection.
#[derive(Clone)]
pub(super) struct Outgoing {
    pub(super) disk: u16,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) body: WriteBody,
}

/// Appends the whole `Write` frame of `p` to `out`.
pub(super) fn encode_write(out: &mut Vec<u8>, req_id: u64, p: &Outgoing) {
    encode_write_head(out, req_id, p);
    out.extend_from_slice(p.body.data());
}

/// Appends the `Write` frame of `p` up to its data (which follows it on the wire).
pub(super) fn encode_write_head(out: &mut Vec<u8>, req_id: u64, p: &Outgoing) {
    let msg = WriteMsg { req_id, offset: p.offset, length: p.length, disk: p.disk, kind: p.body.kind() }.encode_header();
    out.extend_from_slice(&encode_header_parts(FrameType::Write, &[&msg, p.body.data()]));
    out.extend_from_slice(&msg);
}

/// Writes of at least this many bytes go on the wire from their own buffer, after their
/// frame's head, instead of being copied into the frames held for sending.
pub(super) const SEND_IN_PLACE: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::wire::frame::FRAME_HEADER_LEN;
    use hindsight_consistency::wire::read_frame;

    #[test]
    fn a_write_sent_in_place_is_the_same_frame_on_the_wire() {
        let data: Vec<u8> = (0..SEND_IN_PLACE + 3).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let p = Outgoing { disk: 1, offset: 1 << 20, length: u32::try_from(data.len()).unwrap(), body: WriteBody::Data(Arc::new(data)) };
        let mut joined = Vec::new();
        encode_write(&mut joined, 9, &p);
        let mut split = Vec::new();
        encode_write_head(&mut split, 9, &p);
        split.extend_from_slice(p.body.data());
        assert_eq!(split, joined);
    }

    #[test]
    fn write_frame_decodes_back() {
        let p = Outgoing { disk: 3, offset: 8192, length: 5, body: WriteBody::Data(Arc::new(b"hello".to_vec())) };
        let mut scratch = Vec::new();
        encode_write(&mut scratch, 42, &p);
        let mut payload = Vec::new();
        let ftype = read_frame(&mut &scratch[..], &mut payload).unwrap();
        assert_eq!(ftype, FrameType::Write);
        let (msg, data) = WriteMsg::decode(&payload).unwrap();
        assert_eq!(msg, WriteMsg { req_id: 42, offset: 8192, length: 5, disk: 3, kind: WriteKind::Data });
        assert_eq!(data, b"hello");
    }

    #[test]
    fn zeroes_frame_carries_no_data() {
        let p = Outgoing { disk: 0, offset: 0, length: 1 << 20, body: WriteBody::Trim(1 << 20) };
        let mut scratch = Vec::new();
        encode_write(&mut scratch, 7, &p);
        assert_eq!(scratch.len(), FRAME_HEADER_LEN + 24);
        let mut payload = Vec::new();
        read_frame(&mut &scratch[..], &mut payload).unwrap();
        let (msg, data) = WriteMsg::decode(&payload).unwrap();
        assert_eq!((msg.kind, msg.length, data.len()), (WriteKind::Trim, 1 << 20, 0));
    }

    #[test]
    fn held_frames_follow_each_other_in_order() {
        let mut held = Vec::new();
        for (req_id, byte) in [(1u64, b'a'), (2, b'b'), (3, b'c')] {
            let p = Outgoing { disk: 0, offset: req_id * 4096, length: 3, body: WriteBody::Data(Arc::new(vec![byte; 3])) };
            encode_write(&mut held, req_id, &p);
        }
        let mut stream = &held[..];
        let mut payload = Vec::new();
        for (req_id, byte) in [(1u64, b'a'), (2, b'b'), (3, b'c')] {
            assert_eq!(read_frame(&mut stream, &mut payload).unwrap(), FrameType::Write);
            let (msg, data) = WriteMsg::decode(&payload).unwrap();
            assert_eq!((msg.req_id, msg.offset, data), (req_id, req_id * 4096, &[byte; 3][..]));
        }
        assert!(stream.is_empty());
    }
}
