//! Messages the server sends, encoded into caller-owned buffers.

use super::{
    ProtoError, EXPORT_NAME_REPLY_LEN, EXPORT_NAME_ZERO_PAD_LEN, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE, INFO_BLOCK_SIZE_LEN,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_EXPORT_LEN, INFO_NAME, MAX_STRING_LEN, NBDMAGIC, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
};

/// The server greeting: `{ NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16 }`.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Appends an option reply: `{ REPLY_MAGIC u64 | option u32 | reply type u32 | length u32 }
/// · data`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ProtoError> {
    let len = u32::try_from(data.len()).map_err(|_| ProtoError::ReplyTooLong(data.len()))?;
    out.reserve(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Checks a string against the protocol's limit; returns its bytes and its length as sent.
fn checked_string<'a>(what: &'static str, s: &'a str) -> Result<(&'a [u8], u32), ProtoError> {
    let too_long = ProtoError::StringTooLong { what, len: s.len(), max: MAX_STRING_LEN };
    if s.len() > MAX_STRING_LEN {
        return Err(too_long);
    }
    let len = u32::try_from(s.len()).map_err(|_| too_long)?;
    Ok((s.as_bytes(), len))
}

/// Data of an `NBD_REP_SERVER` reply: `{ name length u32 | name }` (no description).
pub fn rep_server_data(name: &str) -> Result<Vec<u8>, ProtoError> {
    let (name, len) = checked_string("export name", name)?;
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(name);
    Ok(b)
}

/// Data of an `NBD_INFO_EXPORT` reply: `{ INFO_EXPORT u16 | size u64 | transmission flags u16 }`.
pub fn info_export(size: u64, transmission_flags: u16) -> [u8; INFO_EXPORT_LEN] {
    let mut b = [0u8; INFO_EXPORT_LEN];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// Data of an `NBD_INFO_BLOCK_SIZE` reply:
/// `{ INFO_BLOCK_SIZE u16 | minimum u32 | preferred u32 | maximum u32 }`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; INFO_BLOCK_SIZE_LEN] {
    let mut b = [0u8; INFO_BLOCK_SIZE_LEN];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// Data of an `NBD_INFO_NAME` reply: `{ INFO_NAME u16 | name }`.
pub fn info_name(name: &str) -> Result<Vec<u8>, ProtoError> {
    info_string(INFO_NAME, "export name", name)
}

/// Data of an `NBD_INFO_DESCRIPTION` reply: `{ INFO_DESCRIPTION u16 | description }`.
pub fn info_description(description: &str) -> Result<Vec<u8>, ProtoError> {
    info_string(INFO_DESCRIPTION, "export description", description)
}

fn info_string(info: u16, what: &'static str, s: &str) -> Result<Vec<u8>, ProtoError> {
    let (s, _) = checked_string(what, s)?;
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s);
    Ok(b)
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: `{ size u64 | transmission flags u16 }`,
/// then 124 zero bytes unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(out: &mut Vec<u8>, size: u64, transmission_flags: u16, no_zeroes: bool) {
    out.reserve(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZERO_PAD_LEN);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZERO_PAD_LEN]);
    }
}

/// A simple reply header: `{ SIMPLE_REPLY_MAGIC u32 | error u32 | handle u64 }`.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::super::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT_LIST, REP_SERVER};
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn option_reply_layout() {
        let mut out = Vec::new();
        let data = rep_server_data("disk0").unwrap();
        option_reply(&mut out, OPT_LIST, REP_SERVER, &data).unwrap();
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN + 4 + 5);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
        assert_eq!(&out[24..], b"disk0");
    }

    #[test]
    fn info_payload_layouts() {
        let e = info_export(0x0102_0304_0506_0708, 0x0145);
        assert_eq!(e, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x45]);
        let b = info_block_size(1, 4096, 32 << 20);
        assert_eq!(b, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(info_name("ab").unwrap(), vec![0, 1, b'a', b'b']);
        assert_eq!(info_description("").unwrap(), vec![0, 2]);
    }

    #[test]
    fn overlong_strings_are_refused() {
        let long = "x".repeat(MAX_STRING_LEN + 1);
        assert!(matches!(rep_server_data(&long), Err(ProtoError::StringTooLong { .. })));
        assert!(matches!(info_name(&long), Err(ProtoError::StringTooLong { .. })));
        assert!(rep_server_data(&long[..MAX_STRING_LEN]).is_ok());
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        let mut out = Vec::new();
        export_name_reply(&mut out, 1 << 20, 1, false);
        assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZERO_PAD_LEN);
        assert!(out[EXPORT_NAME_REPLY_LEN..].iter().all(|&b| b == 0));
        out.clear();
        export_name_reply(&mut out, 1 << 20, 1, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(22, 0xdead_beef);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &22u32.to_be_bytes());
        assert_eq!(&r[8..16], &0xdead_beefu64.to_be_bytes());
    }
}
