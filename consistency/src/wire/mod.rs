//! The wire protocol between agent, engine and target (docs/wire-protocol.md).
//!
//! [`frame`] is the envelope every message travels in; [`messages`] holds the message bodies.
//! Neither does I/O beyond the small blocking helpers [`frame::read_frame`] and
//! [`frame::write_frame`], which work on any `Read` / `Write`.

pub mod compress;
pub mod frame;
pub mod messages;

pub use compress::{compress_records, decompress_records, LZ4};
pub use frame::{read_exact_to_vec, read_frame, write_frame, FrameError, FrameHeader, FrameType};
pub use messages::*;

/// Protocol version spoken by this build (in hello messages).
pub const PROTOCOL_VERSION: u16 = 1;
