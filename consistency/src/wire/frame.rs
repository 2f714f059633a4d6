//! The frame: the envelope of every message on both links.
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSWF"                      | version| type   | flags (u16)     |
//!    8  | len (u32)                         | crc32c (u32)                      |
//!   16  | payload (len bytes) ...                                               |
//! ```
//!
//! `{ magic | version | type | flags | len | crc32c | payload }`, the checksum covering header
//! bytes 0..12 and the payload.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::record::{read_u32, MAX_BODY_LEN};

/// Magic bytes opening every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"HSWF";
/// Frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Header size.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload accepted (32 MiB of data plus room for headers).
pub const MAX_FRAME_PAYLOAD: usize = MAX_BODY_LEN + (1 << 20);

/// Message types (docs/wire-protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameType {
    /// Agent introduces itself and its disks.
    AgentHello,
    /// Engine accepts the agent.
    AgentWelcome,
    /// Either side reports a fatal error, then closes.
    Error,
    /// One write from an agent.
    Write,
    /// The engine's answer to one write.
    WriteAck,
    /// Engine opens the shipping session of one group.
    TargetHello,
    /// Target says where to resume.
    TargetWelcome,
    /// The engine does not own a group of the agent's hello: connect to its owner.
    Redirect,
    /// One or more journal records.
    Records,
    /// Target confirms durability up to a sequence number.
    Confirm,
    /// Records compressed with LZ4.
    RecordsLz4,
    /// The target's journal is full, or its history was trimmed.
    JournalState,
    /// Engine asks the target for the hashes of some regions of a replica.
    TargetHashRequest,
    /// The target's hashes.
    TargetHashReply,
    /// An operator asks the engine to place a bookmark.
    BookmarkRequest,
    /// The engine says where it placed it.
    BookmarkReply,
    /// Engine asks an agent to quiesce its VM (freeze its file systems).
    Quiesce,
    /// Agent says whether it quiesced.
    Quiesced,
    /// Engine asks an agent to thaw.
    Thaw,
    /// Agent has re-sent every dirty region of some disks.
    ResyncDone,
    /// Agent reports how far a disk's resync has come.
    ResyncProgress,
    /// Agent asks for the replica's hashes of some regions of a disk.
    HashRequest,
    /// The engine's answer.
    HashReply,
    /// Engine tells an agent how far the target holds a group's records.
    TargetConfirmed,
    /// An operator asks the engine for the state of its groups.
    StatusRequest,
    /// The engine's answer.
    StatusReply,
    /// An operator changes a group's mode on the running engine.
    SetModeRequest,
    /// The engine's answer.
    SetModeReply,
}

impl FrameType {
    /// Encoded value.
    pub fn code(self) -> u8 {
        match self {
            FrameType::AgentHello => 0x01,
            FrameType::AgentWelcome => 0x02,
            FrameType::Error => 0x03,
            FrameType::Redirect => 0x04,
            FrameType::Write => 0x10,
            FrameType::WriteAck => 0x11,
            FrameType::TargetHello => 0x20,
            FrameType::TargetWelcome => 0x21,
            FrameType::Records => 0x22,
            FrameType::Confirm => 0x23,
            FrameType::RecordsLz4 => 0x24,
            FrameType::JournalState => 0x27,
            FrameType::TargetHashRequest => 0x25,
            FrameType::TargetHashReply => 0x26,
            FrameType::BookmarkRequest => 0x30,
            FrameType::BookmarkReply => 0x31,
            FrameType::Quiesce => 0x32,
            FrameType::Quiesced => 0x33,
            FrameType::Thaw => 0x34,
            FrameType::ResyncDone => 0x35,
            FrameType::ResyncProgress => 0x36,
            FrameType::HashRequest => 0x37,
            FrameType::HashReply => 0x38,
            FrameType::TargetConfirmed => 0x39,
            FrameType::StatusRequest => 0x40,
            FrameType::StatusReply => 0x41,
            FrameType::SetModeRequest => 0x42,
            FrameType::SetModeReply => 0x43,
        }
    }

    /// Decodes a type value.
    pub fn from_code(code: u8) -> Option<FrameType> {
        Some(match code {
            0x01 => FrameType::AgentHello,
            0x02 => FrameType::AgentWelcome,
            0x03 => FrameType::Error,
            0x04 => FrameType::Redirect,
            0x10 => FrameType::Write,
            0x11 => FrameType::WriteAck,
            0x20 => FrameType::TargetHello,
            0x21 => FrameType::TargetWelcome,
            0x22 => FrameType::Records,
            0x23 => FrameType::Confirm,
            0x24 => FrameType::RecordsLz4,
            0x27 => FrameType::JournalState,
            0x25 => FrameType::TargetHashRequest,
            0x26 => FrameType::TargetHashReply,
            0x30 => FrameType::BookmarkRequest,
            0x31 => FrameType::BookmarkReply,
            0x32 => FrameType::Quiesce,
            0x33 => FrameType::Quiesced,
            0x34 => FrameType::Thaw,
            0x35 => FrameType::ResyncDone,
            0x36 => FrameType::ResyncProgress,
            0x37 => FrameType::HashRequest,
            0x38 => FrameType::HashReply,
            0x39 => FrameType::TargetConfirmed,
            0x40 => FrameType::StatusRequest,
            0x41 => FrameType::StatusReply,
            0x42 => FrameType::SetModeRequest,
            0x43 => FrameType::SetModeReply,
            _ => return None,
        })
    }
}

/// Why a frame could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A message body could not be decoded.
    #[error("malformed {what} message: {reason}")]
    BadMessage {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A frame of a type not expected at this point of the session.
    #[error("unexpected {got:?} frame, expected {expected}")]
    Unexpected {
        /// What arrived.
        got: FrameType,
        /// What was expected.
        expected: &'static str,
    },
    /// The peer sent an Error message.
    #[error("peer reported: {0}")]
    Peer(String),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub ftype: FrameType,
    /// Flags (0 in version 1).
    pub flags: u16,
    /// Payload length.
    pub len: u32,
    /// Checksum over header bytes 0..12 and payload.
    pub crc: u32,
}

/// Encodes a frame header for `payload`.
pub fn encode_header(ftype: FrameType, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    encode_header_parts(ftype, &[payload])
}

/// Encodes a frame header for a payload made of `parts` one after the other, for a sender
/// that writes them without joining them first.
pub fn encode_header_parts(ftype: FrameType, parts: &[&[u8]]) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = ftype.code();
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    let len = u32::try_from(parts.iter().map(|p| p.len()).sum::<usize>()).expect("payload length checked by caller");
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = parts.iter().fold(crc32c::crc32c(&h[0..12]), |crc, p| crc32c::crc32c_append(crc, p));
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and validates a frame header (not the payload checksum).
pub fn decode_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    if h[0..4] != FRAME_MAGIC {
        return Err(FrameError::Malformed("bad frame magic"));
    }
    if h[4] != FRAME_VERSION {
        return Err(FrameError::Malformed("unsupported frame version"));
    }
    let ftype = FrameType::from_code(h[5]).ok_or(FrameError::Malformed("unknown frame type"))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(FrameError::Malformed("unknown frame flags"));
    }
    let len = read_u32(h, 8);
    if len as usize > MAX_FRAME_PAYLOAD {
        return Err(FrameError::Malformed("frame payload too large"));
    }
    Ok(FrameHeader { ftype, flags, len, crc: read_u32(h, 12) })
}

/// True if `buf` starts with a whole frame (or with bytes that cannot start one, which the
/// next read reports): reading it from a buffered reader will not wait for the peer.
pub fn whole_frame_buffered(buf: &[u8]) -> bool {
    let Some(h) = buf.get(..FRAME_HEADER_LEN) else { return false };
    let h: &[u8; FRAME_HEADER_LEN] = h.try_into().expect("slice of header length");
    match decode_header(h) {
        Ok(hdr) => buf.len() >= FRAME_HEADER_LEN + hdr.len as usize,
        Err(_) => true,
    }
}

/// Checks a payload against its header's checksum.
pub fn verify_payload(raw_header: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> Result<(), FrameError> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&raw_header[0..12]), payload);
    if crc != read_u32(raw_header, 12) {
        return Err(FrameError::Malformed("frame checksum mismatch"));
    }
    Ok(())
}

/// Writes one frame (header and payload) with a single `write_all` of `scratch`.
pub fn write_frame<W: Write>(w: &mut W, ftype: FrameType, payload: &[u8], scratch: &mut Vec<u8>) -> io::Result<()> {
    let header = frame_header(ftype, payload)?;
    scratch.clear();
    scratch.extend_from_slice(&header);
    scratch.extend_from_slice(payload);
    w.write_all(scratch)
}

/// The header of a frame carrying `payload`, for a writer that sends the two itself; refuses
/// a payload over [`MAX_FRAME_PAYLOAD`].
pub fn frame_header(ftype: FrameType, payload: &[u8]) -> io::Result<[u8; FRAME_HEADER_LEN]> {
    if payload.len() > MAX_FRAME_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"));
    }
    Ok(encode_header(ftype, payload))
}

/// Reads one frame into `payload` (reused between calls); returns its type.
/// A clean close before the first header byte is [`FrameError::Closed`].
pub fn read_frame<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<FrameType, FrameError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let header = decode_header(&h)?;
    read_exact_to_vec(r, header.len as usize, payload)?;
    verify_payload(&h, payload)?;
    Ok(header.ftype)
}

/// Replaces the contents of `buf` with exactly `len` bytes read from `r`, without zeroing the
/// buffer first (zero-filling every payload before reading over it cost more CPU than the
/// checksum). `len` must already be checked against a limit.
pub fn read_exact_to_vec<R: Read>(r: &mut R, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.reserve(len);
    let got = r.take(len as u64).read_to_end(buf)?;
    if got != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ftype: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        write_frame(&mut out, ftype, payload, &mut scratch).unwrap();
        out
    }

    #[test]
    fn round_trip() {
        let bytes = frame(FrameType::Write, b"hello frame");
        let mut payload = Vec::new();
        let t = read_frame(&mut &bytes[..], &mut payload).unwrap();
        assert_eq!(t, FrameType::Write);
        assert_eq!(payload, b"hello frame");
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let bytes = frame(FrameType::Confirm, &[1, 2, 3, 4, 5, 6, 7, 8]);
        for cut in 0..bytes.len() {
            let mut payload = Vec::new();
            let res = read_frame(&mut &bytes[..cut], &mut payload);
            if cut == 0 {
                assert!(matches!(res, Err(FrameError::Closed)));
            } else {
                assert!(matches!(res, Err(FrameError::Io(_))), "cut {cut}: {res:?}");
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let bytes = frame(FrameType::Records, b"some payload bytes");
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[byte] ^= 1 << bit;
                let mut payload = Vec::new();
                assert!(read_frame(&mut &b[..], &mut payload).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_type_code_round_trips() {
        for code in 0..=u8::MAX {
            if let Some(t) = FrameType::from_code(code) {
                assert_eq!(t.code(), code, "{t:?}");
            }
        }
        assert_eq!(FrameType::from_code(0x35), Some(FrameType::ResyncDone));
        assert_eq!(FrameType::from_code(0x25), Some(FrameType::TargetHashRequest));
        assert_eq!(FrameType::from_code(0x26), Some(FrameType::TargetHashReply));
        assert_eq!(FrameType::from_code(0x37), Some(FrameType::HashRequest));
        assert_eq!(FrameType::from_code(0x38), Some(FrameType::HashReply));
        assert_eq!(FrameType::from_code(0x27), Some(FrameType::JournalState));
        assert_eq!(FrameType::from_code(0x28), None, "unassigned");
    }

    #[test]
    fn oversized_length_rejected_before_allocation() {
        let mut b = frame(FrameType::Write, b"x");
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut payload = Vec::new();
        assert!(matches!(read_frame(&mut &b[..], &mut payload), Err(FrameError::Malformed(_))));
        assert!(payload.capacity() < 1024);
    }
}
