//! Server side of the fixed newstyle handshake: greeting, client flags, option haggling.
//!
//! The handshake ends in one of three ways: the client picks an export (with
//! `NBD_OPT_EXPORT_NAME` or a successful `NBD_OPT_GO`) and transmission begins; the client
//! ends negotiation (`NBD_OPT_ABORT`, or closing between options); or the client breaks the
//! protocol and the server closes the connection.

use std::io::{self, Read, Write};

use log::{debug, info, warn};

use super::error::NbdError;
use super::proto::decode;
use super::proto::encode;
use super::proto::{
    option_name, CLIENT_FLAGS_LEN, FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY,
    FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, INFO_NAME, MAX_BLOCK_SIZE, MAX_OPTION_LEN, MAX_STRING_LEN,
    MIN_BLOCK_SIZE, OPTION_HEADER_LEN, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, PREFERRED_BLOCK_SIZE, REP_ACK,
    REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER,
};
use super::stream::read_or_eof;

/// Handshake flags this server advertises.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Transmission flags of every export. `CAN_MULTI_CONN` holds because a flush goes to the
/// device, whose flush covers every completed write whichever connection submitted it.
pub const TRANSMISSION_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients ask for.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Refuses writes: advertised with `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

impl ExportInfo {
    /// The transmission flags of this export.
    pub fn flags(&self) -> u16 {
        if self.read_only {
            TRANSMISSION_FLAGS | FLAG_READ_ONLY
        } else {
            TRANSMISSION_FLAGS
        }
    }
}

/// How a handshake ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enter transmission on the export at this index.
    Transmission {
        /// Index into the export list.
        export: usize,
    },
    /// The client ended negotiation (`NBD_OPT_ABORT`, or it closed between options).
    Closed,
}

/// Finds the export a client names. The empty name means the default export, which exists
/// only when the server has exactly one export.
pub fn find_export(exports: &[ExportInfo], name: &[u8]) -> Option<usize> {
    if let Some(i) = exports.iter().position(|e| e.name.as_bytes() == name) {
        return Some(i);
    }
    if name.is_empty() && exports.len() == 1 {
        return Some(0);
    }
    None
}

/// Runs the server side of the handshake on one connection. `peer` names the client in log
/// lines.
pub fn negotiate<R: Read, W: Write>(reader: &mut R, writer: &mut W, exports: &[ExportInfo], peer: &str) -> Result<Outcome, NbdError> {
    writer.write_all(&encode::greeting(HANDSHAKE_FLAGS)).and_then(|()| writer.flush()).map_err(NbdError::HandshakeIo)?;

    let mut flags = [0u8; CLIENT_FLAGS_LEN];
    if !read_or_eof(reader, &mut flags).map_err(NbdError::HandshakeIo)? {
        debug!("nbd {peer}: closed before sending client flags");
        return Ok(Outcome::Closed);
    }
    let client = decode::client_flags(&flags).map_err(NbdError::HandshakeProtocol)?;
    // Options are always answered in the fixed newstyle format: a client that did not set
    // NBD_FLAG_C_FIXED_NEWSTYLE can only send NBD_OPT_EXPORT_NAME, which has no option reply.
    if !client.fixed_newstyle {
        debug!("nbd {peer}: client does not announce fixed newstyle");
    }

    let mut out = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        if !read_or_eof(reader, &mut header).map_err(NbdError::HandshakeIo)? {
            debug!("nbd {peer}: closed during option haggling");
            return Ok(Outcome::Closed);
        }
        let header = decode::option_header(&header).map_err(NbdError::HandshakeProtocol)?;
        let option = header.option;
        debug!("nbd {peer}: option {} ({option}), {} bytes", option_name(option), header.length);

        out.clear();
        if header.length > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // No reply can carry an error here, and no name is this long.
                return Err(NbdError::UnknownExport(format!("<{} bytes>", header.length)));
            }
            warn!("nbd {peer}: option {} of {} bytes is over the {MAX_OPTION_LEN}-byte limit", option_name(option), header.length);
            // Skip the data with a fixed buffer so the stream stays in step.
            let skipped = io::copy(&mut reader.by_ref().take(u64::from(header.length)), &mut io::sink()).map_err(NbdError::HandshakeIo)?;
            if skipped != u64::from(header.length) {
                return Err(NbdError::HandshakeIo(io::ErrorKind::UnexpectedEof.into()));
            }
            reply(&mut out, option, REP_ERR_TOO_BIG, b"option data too large")?;
            send(writer, &out)?;
            continue;
        }

        // The length is at most MAX_OPTION_LEN, checked above.
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).map_err(NbdError::HandshakeIo)?;

        match option {
            OPT_EXPORT_NAME => {
                let Some(index) = find_export(exports, &data) else {
                    return Err(NbdError::UnknownExport(String::from_utf8_lossy(&data).into_owned()));
                };
                encode::export_name_reply(&mut out, exports[index].size, exports[index].flags(), client.no_zeroes);
                send(writer, &out)?;
                return Ok(Outcome::Transmission { export: index });
            }
            OPT_ABORT => {
                debug!("nbd {peer}: client aborted negotiation");
                reply(&mut out, option, REP_ACK, &[])?;
                // The client may already have closed without waiting for the ACK.
                if let Err(e) = writer.write_all(&out).and_then(|()| writer.flush()) {
                    debug!("nbd {peer}: ACK to NBD_OPT_ABORT not delivered: {e}");
                }
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if data.is_empty() {
                    for export in exports {
                        let server = encode::rep_server_data(&export.name).map_err(NbdError::HandshakeProtocol)?;
                        reply(&mut out, option, REP_SERVER, &server)?;
                    }
                    reply(&mut out, option, REP_ACK, &[])?;
                } else {
                    reply(&mut out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                }
                send(writer, &out)?;
            }
            OPT_INFO | OPT_GO => {
                let chosen = info_or_go(&mut out, option, &data, exports, peer)?;
                send(writer, &out)?;
                if let (OPT_GO, Some(index)) = (option, chosen) {
                    return Ok(Outcome::Transmission { export: index });
                }
            }
            // NBD_OPT_STRUCTURED_REPLY included: this server sends simple replies only, and
            // NBD_OPT_STARTTLS: it runs without TLS.
            _ => {
                reply(&mut out, option, REP_ERR_UNSUP, b"option not supported")?;
                send(writer, &out)?;
            }
        }
    }
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO` into `out`; returns the export chosen on success.
fn info_or_go(out: &mut Vec<u8>, option: u32, data: &[u8], exports: &[ExportInfo], peer: &str) -> Result<Option<usize>, NbdError> {
    let request = match decode::info_request(data) {
        Ok(r) => r,
        Err(e) => {
            warn!("nbd {peer}: {}: {e}", option_name(option));
            reply(out, option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(None);
        }
    };
    let Some(index) = find_export(exports, request.name) else {
        let name = String::from_utf8_lossy(request.name);
        info!("nbd {peer}: {} for unknown export {name:?}", option_name(option));
        let mut message = format!("unknown export {name:?}");
        message.truncate(MAX_STRING_LEN);
        reply(out, option, REP_ERR_UNKNOWN, message.as_bytes())?;
        return Ok(None);
    };
    let export = &exports[index];
    reply(out, option, REP_INFO, &encode::info_export(export.size, export.flags()))?;
    // Sent whether asked for or not: a client that did ask must then honour it, and the
    // 32 MiB maximum bounds every buffer a request makes this server allocate.
    reply(out, option, REP_INFO, &encode::info_block_size(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE))?;
    // The canonical name tells a client that asked for the default export what it got.
    if request.requests.contains(&INFO_NAME) {
        let name = encode::info_name(&export.name).map_err(NbdError::HandshakeProtocol)?;
        reply(out, option, REP_INFO, &name)?;
    }
    reply(out, option, REP_ACK, &[])?;
    Ok(Some(index))
}

fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) -> Result<(), NbdError> {
    encode::option_reply(out, option, reply_type, data).map_err(NbdError::HandshakeProtocol)
}

fn send<W: Write>(writer: &mut W, bytes: &[u8]) -> Result<(), NbdError> {
    writer.write_all(bytes).and_then(|()| writer.flush()).map_err(NbdError::HandshakeIo)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::super::proto::{
        EXPORT_NAME_ZERO_PAD_LEN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
        OPTION_REPLY_MAGIC, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    };
    use super::*;

    fn exports(names: &[&str]) -> Vec<ExportInfo> {
        names.iter().enumerate().map(|(i, n)| ExportInfo { name: (*n).to_string(), size: (i as u64 + 1) << 20, read_only: false }).collect()
    }

    /// Bytes a client sends: flags, then options.
    struct Script(Vec<u8>);

    impl Script {
        fn new(flags: u32) -> Script {
            Script(flags.to_be_bytes().to_vec())
        }
        fn option(mut self, option: u32, data: &[u8]) -> Script {
            self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
            self.0.extend_from_slice(&option.to_be_bytes());
            self.0.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
            self.0.extend_from_slice(data);
            self
        }
        fn info(self, option: u32, name: &str, requests: &[u16]) -> Script {
            let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
            for r in requests {
                d.extend_from_slice(&r.to_be_bytes());
            }
            self.option(option, &d)
        }
    }

    fn run(script: Script, names: &[&str]) -> (Result<Outcome, NbdError>, Vec<u8>) {
        let mut reader = Cursor::new(script.0);
        let mut out = Vec::new();
        let r = negotiate(&mut reader, &mut out, &exports(names), "test");
        (r, out)
    }

    /// Splits the server's option replies (after the greeting) into (option, type, data).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while bytes.len() >= 20 {
            assert_eq!(&bytes[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            let typ = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            v.push((opt, typ, bytes[20..20 + len].to_vec()));
            bytes = &bytes[20 + len..];
        }
        assert!(bytes.is_empty(), "trailing bytes {bytes:?}");
        v
    }

    const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    #[test]
    fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
        let (r, out) = run(Script::new(BOTH), &["a"]);
        assert!(matches!(r, Ok(Outcome::Closed)));
        assert_eq!(out, encode::greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    }

    #[test]
    fn unknown_client_flags_close_the_connection() {
        let (r, _) = run(Script::new(BOTH | 4), &["a"]);
        assert!(matches!(r, Err(NbdError::HandshakeProtocol(_))));
    }

    #[test]
    fn export_name_with_no_zeroes_sends_ten_bytes() {
        let (r, out) = run(Script::new(BOTH).option(OPT_EXPORT_NAME, b"b"), &["a", "b"]);
        assert!(matches!(r, Ok(Outcome::Transmission { export: 1 })));
        let tail = &out[GREETING_LEN..];
        assert_eq!(tail.len(), 10);
        assert_eq!(&tail[0..8], &(2u64 << 20).to_be_bytes());
        assert_eq!(&tail[8..10], &TRANSMISSION_FLAGS.to_be_bytes());
    }

    #[test]
    fn export_name_without_no_zeroes_sends_padding() {
        let script = Script::new(FLAG_C_FIXED_NEWSTYLE).option(OPT_EXPORT_NAME, b"a");
        let (r, out) = run(script, &["a"]);
        assert!(matches!(r, Ok(Outcome::Transmission { export: 0 })));
        assert_eq!(out.len(), GREETING_LEN + 10 + EXPORT_NAME_ZERO_PAD_LEN);
    }

    #[test]
    fn export_name_unknown_closes_the_connection() {
        let (r, _) = run(Script::new(BOTH).option(OPT_EXPORT_NAME, b"zz"), &["a"]);
        assert!(matches!(r, Err(NbdError::UnknownExport(n)) if n == "zz"));
    }

    #[test]
    fn empty_name_is_the_default_export_only_when_there_is_one() {
        let (r, _) = run(Script::new(BOTH).option(OPT_EXPORT_NAME, b""), &["a"]);
        assert!(matches!(r, Ok(Outcome::Transmission { export: 0 })));
        let (r, out) = run(Script::new(BOTH).info(OPT_GO, "", &[]), &["a", "b"]);
        assert!(matches!(r, Ok(Outcome::Closed)));
        let reps = replies(&out[GREETING_LEN..]);
        assert_eq!(reps.len(), 1);
        assert_eq!(reps[0].1, REP_ERR_UNKNOWN);
    }

    #[test]
    fn abort_is_acknowledged() {
        let (r, out) = run(Script::new(BOTH).option(OPT_ABORT, &[]), &["a"]);
        assert!(matches!(r, Ok(Outcome::Closed)));
        assert_eq!(replies(&out[GREETING_LEN..]), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }

    #[test]
    fn list_names_every_export_then_acks() {
        let (_, out) = run(Script::new(BOTH).option(OPT_LIST, &[]), &["a", "bb"]);
        let reps = replies(&out[GREETING_LEN..]);
        assert_eq!(
            reps,
            vec![
                (OPT_LIST, REP_SERVER, vec![0, 0, 0, 1, b'a']),
                (OPT_LIST, REP_SERVER, vec![0, 0, 0, 2, b'b', b'b']),
                (OPT_LIST, REP_ACK, vec![]),
            ]
        );
    }

    #[test]
    fn list_with_data_is_invalid() {
        let (_, out) = run(Script::new(BOTH).option(OPT_LIST, b"x"), &["a"]);
        let reps = replies(&out[GREETING_LEN..]);
        assert_eq!(reps.len(), 1);
        assert_eq!(reps[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn info_then_go_describe_the_export_and_go_enters_transmission() {
        let script = Script::new(BOTH).info(OPT_INFO, "b", &[INFO_BLOCK_SIZE, INFO_NAME]).info(OPT_GO, "b", &[]);
        let (r, out) = run(script, &["a", "b"]);
        assert!(matches!(r, Ok(Outcome::Transmission { export: 1 })));
        let reps = replies(&out[GREETING_LEN..]);
        let export = encode::info_export(2 << 20, TRANSMISSION_FLAGS).to_vec();
        let sizes = encode::info_block_size(1, 4096, 32 << 20).to_vec();
        assert_eq!(
            reps,
            vec![
                (OPT_INFO, REP_INFO, export.clone()),
                (OPT_INFO, REP_INFO, sizes.clone()),
                (OPT_INFO, REP_INFO, vec![0, 1, b'b']),
                (OPT_INFO, REP_ACK, vec![]),
                (OPT_GO, REP_INFO, export),
                (OPT_GO, REP_INFO, sizes),
                (OPT_GO, REP_ACK, vec![]),
            ]
        );
        assert_eq!(u16::from_be_bytes([reps[0].2[0], reps[0].2[1]]), INFO_EXPORT);
    }

    #[test]
    fn go_for_unknown_export_errors_and_haggling_continues() {
        let script = Script::new(BOTH).info(OPT_GO, "nope", &[]).info(OPT_GO, "a", &[]);
        let (r, out) = run(script, &["a"]);
        assert!(matches!(r, Ok(Outcome::Transmission { export: 0 })));
        let reps = replies(&out[GREETING_LEN..]);
        assert_eq!(reps[0].1, REP_ERR_UNKNOWN);
        assert_eq!(reps.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn malformed_go_is_invalid() {
        // Name length 100 with 2 bytes of data.
        let script = Script::new(BOTH).option(OPT_GO, &[0, 0, 0, 100, 0, 0]);
        let (r, out) = run(script, &["a"]);
        assert!(matches!(r, Ok(Outcome::Closed)));
        assert_eq!(replies(&out[GREETING_LEN..])[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn unsupported_options_get_err_unsup() {
        let script = Script::new(BOTH).option(OPT_STRUCTURED_REPLY, &[]).option(OPT_STARTTLS, &[]).option(0x7777, b"some data");
        let (_, out) = run(script, &["a"]);
        let types: Vec<_> = replies(&out[GREETING_LEN..]).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(types, vec![(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP), (OPT_STARTTLS, REP_ERR_UNSUP), (0x7777, REP_ERR_UNSUP),]);
    }

    #[test]
    fn oversized_option_is_skipped_with_too_big() {
        let big = vec![7u8; MAX_OPTION_LEN as usize + 1];
        let script = Script::new(BOTH).option(0x42, &big).option(OPT_ABORT, &[]);
        let (r, out) = run(script, &["a"]);
        assert!(matches!(r, Ok(Outcome::Closed)));
        let types: Vec<_> = replies(&out[GREETING_LEN..]).iter().map(|r| r.1).collect();
        assert_eq!(types, vec![REP_ERR_TOO_BIG, REP_ACK]);
    }

    #[test]
    fn truncated_option_data_is_an_io_error() {
        let mut script = Script::new(BOTH).option(OPT_LIST, b"abcdef");
        script.0.truncate(script.0.len() - 3);
        let (r, _) = run(script, &["a"]);
        assert!(matches!(r, Err(NbdError::HandshakeIo(_))));
    }

    #[test]
    fn bad_option_magic_closes_the_connection() {
        let mut script = Script::new(BOTH).option(OPT_LIST, &[]);
        script.0[4] ^= 0x55;
        let (r, _) = run(script, &["a"]);
        assert!(matches!(r, Err(NbdError::HandshakeProtocol(_))));
    }
}
