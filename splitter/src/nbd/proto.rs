//! The NBD wire format: every constant, and pure encoders and decoders. No I/O happens here.
//!
//! Follows the NBD protocol document (`doc/proto.md` of the reference implementation). All
//! integers on the wire are big-endian ("network byte order"). Only the parts a fixed-newstyle
//! server with simple replies needs are covered; structured replies, metadata contexts, TLS
//! and extended headers are refused during option haggling.
//!
//! Handshake (fixed newstyle):
//!
//! ```text
//! S: { NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16 }                       18 bytes
//! C: { client flags u32 }                                                          4 bytes
//! C: { IHAVEOPT u64 | option u32 | length u32 } · length bytes of option data   16 + n bytes
//! S: { REPLY_MAGIC u64 | option u32 | reply type u32 | length u32 } · data     20 + n bytes
//!    (one or more replies per option; NBD_OPT_EXPORT_NAME gets instead:)
//! S: { export size u64 | transmission flags u16 } · [124 zero bytes unless NO_ZEROES]
//! ```
//!
//! Transmission (simple replies):
//!
//! ```text
//!          0        4        8                16               24       28
//! request: | magic  | flags,type | handle     | offset         | length |  · data if WRITE
//!            u32      u16   u16    u64          u64              u32
//! reply:   | magic  | error  | handle          |  · data if READ and error == 0
//!            u32      u32      u64              16 bytes
//! ```
//!
//! [`decode`] parses what the client sends; [`encode`] builds what the server sends.

pub mod decode;
pub mod encode;

use thiserror::Error;

// ---- Magic values ----

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word from the server, and the first word of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first word of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first word of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---- Handshake flags (server, 16 bits) ----

/// The server speaks fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags (32 bits) ----

/// The client speaks fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client asks the server to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag a server that advertises both handshake flags understands.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---- Transmission flags (16 bits) ----

/// Always set: the other flags are meaningful.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// The server accepts `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server honours `NBD_CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational disk.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// The server accepts `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// The server accepts `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The server honours `NBD_CMD_FLAG_DF` (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA on one connection are visible on every connection to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The server accepts `NBD_CMD_RESIZE` (experimental).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// The server accepts `NBD_CMD_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// The server honours `NBD_CMD_FLAG_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Option types ----

/// Choose an export and enter transmission; cannot report errors.
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation; the server acknowledges and closes.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn extension, never used.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe one export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe one export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Ask for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Ask for extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option reply types ----

/// The option succeeded, or a list of replies has ended.
pub const REP_ACK: u32 = 1;
/// One export in answer to `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of information in answer to `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option is known but its data is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The requested export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request block sizes before `NBD_OPT_GO`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---- Information types (NBD_REP_INFO) ----

/// Export size and transmission flags; mandatory before `NBD_REP_ACK`.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Command types ----

/// Read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Write the `length` bytes that follow the request.
pub const CMD_WRITE: u16 = 1;
/// Disconnect after the outstanding requests; no reply.
pub const CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range.
pub const CMD_TRIM: u16 = 4;
/// Prefetch a range.
pub const CMD_CACHE: u16 = 5;
/// Make a range read back as zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata (structured replies only).
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---- Command flags ----

/// Force unit access: reply only once the data is durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes without punching a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// One extent per metadata context in a block-status reply.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fail a write-zeroes fast if it would be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Error values (reply `error` field) ----

/// Operation not permitted.
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---- Message lengths ----

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client flags.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Reply to `NBD_OPT_EXPORT_NAME` without the zero padding: size, transmission flags.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_ZERO_PAD_LEN: usize = 124;
/// Transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub const INFO_EXPORT_LEN: usize = 12;
/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_LEN: usize = 14;

// ---- Limits this server advertises and enforces ----

/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Longest option data this server reads into memory; longer options get `NBD_REP_ERR_TOO_BIG`.
/// The largest legitimate option we accept (`NBD_OPT_GO`) needs 4 + 4096 + 2 + 2·n bytes.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Minimum block size: any byte-aligned request is accepted.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred block size: below this the local disk does read-modify-write.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum payload of one READ or WRITE (32 MiB, the size every client supports); it also
/// bounds every buffer a request makes the server allocate.
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;

/// A message from the client that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Fewer bytes than the message needs.
    #[error("{what} truncated: need {needed} bytes, got {got}")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes the message needs.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// The message does not start with its magic number.
    #[error("{what} has bad magic {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The value found instead.
        found: u64,
    },
    /// The client set flags this server did not advertise.
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An `NBD_OPT_INFO`/`NBD_OPT_GO` payload whose lengths do not add up.
    #[error("malformed info request: {0}")]
    MalformedInfoRequest(&'static str),
    /// Reply data whose length does not fit the reply's 32-bit length field.
    #[error("reply data of {0} bytes does not fit a 32-bit length")]
    ReplyTooLong(usize),
    /// A string longer than the protocol allows.
    #[error("{what} is {len} bytes, more than the {max} the protocol allows")]
    StringTooLong {
        /// Which string.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Maps an errno value to an NBD error value: the spec allows only a small set, and asks
/// that `EDQUOT` and `EFBIG` be reported as `ENOSPC`; anything else becomes `EIO`.
pub fn error_value(errno: i32) -> u32 {
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    match errno {
        1 => EPERM,
        5 => EIO,
        12 => ENOMEM,
        22 => EINVAL,
        28 | EFBIG | EDQUOT => ENOSPC,
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

/// Names a command type for log lines.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Names an option type for log lines.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_PEEK_EXPORT => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_value_passes_nbd_values_and_folds_the_rest() {
        for v in [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN] {
            assert_eq!(error_value(i32::try_from(v).unwrap()), v);
        }
        assert_eq!(error_value(27), ENOSPC); // EFBIG
        assert_eq!(error_value(122), ENOSPC); // EDQUOT
        assert_eq!(error_value(2), EIO); // ENOENT
        assert_eq!(error_value(-1), EIO);
    }

    #[test]
    fn magic_values_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn largest_go_option_fits_the_option_limit() {
        // name length, name, request count, every information type once.
        let go = 4 + MAX_STRING_LEN + 2 + 2 * 4;
        assert!(go <= MAX_OPTION_LEN as usize);
    }
}
