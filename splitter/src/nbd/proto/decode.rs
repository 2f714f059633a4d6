//! Messages the client sends, parsed from bytes already read. Every parser checks the length
//! it is given and never trusts a length field to size an allocation.

use super::{
    ProtoError, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, KNOWN_CLIENT_FLAGS, MAX_STRING_LEN, OPTION_HEADER_LEN, REQUEST_LEN,
    REQUEST_MAGIC,
};

/// The client's answer to the greeting: `{ client flags u32 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// An option header: `{ IHAVEOPT u64 | option u32 | length u32 }`; `length` bytes of data
/// follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option type (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`:
/// `{ name length u32 | name | request count u16 | count × info type u16 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name as sent (meant to be UTF-8, compared as bytes).
    pub name: &'a [u8],
    /// Information types the client asked for (`INFO_*`), in the order sent.
    pub requests: Vec<u16>,
}

/// A transmission request header:
/// `{ magic u32 | flags u16 | type u16 | handle u64 | offset u64 | length u32 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// Opaque value the reply must echo.
    pub handle: u64,
    /// Byte offset on the export.
    pub offset: u64,
    /// Byte count; for WRITE also the length of the payload that follows.
    pub length: u32,
}

fn need(what: &'static str, buf: &[u8], needed: usize) -> Result<(), ProtoError> {
    if buf.len() < needed {
        return Err(ProtoError::Truncated { what, needed, got: buf.len() });
    }
    Ok(())
}

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Parses the client flags. Unknown bits are an error: the spec has the server drop the
/// connection then.
pub fn client_flags(buf: &[u8]) -> Result<ClientFlags, ProtoError> {
    need("client flags", buf, 4)?;
    let flags = be_u32(buf, 0);
    let unknown = flags & !KNOWN_CLIENT_FLAGS;
    if unknown != 0 {
        return Err(ProtoError::UnknownClientFlags(unknown));
    }
    Ok(ClientFlags { fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// Parses an option header.
pub fn option_header(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
    need("option header", buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic { what: "option header", found: magic });
    }
    Ok(OptionHeader { option: be_u32(buf, 8), length: be_u32(buf, 12) })
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`. The lengths inside must add up to
/// exactly `data.len()`.
pub fn info_request(data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    need("info request", data, 6)?;
    let name_len = usize::try_from(be_u32(data, 0)).unwrap_or(usize::MAX);
    // The spec: the name length MUST be no larger than the option length - 6.
    if name_len > data.len() - 6 {
        return Err(ProtoError::MalformedInfoRequest("name length runs past the option data"));
    }
    if name_len > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong { what: "export name", len: name_len, max: MAX_STRING_LEN });
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let count = usize::from(be_u16(rest, 0));
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(ProtoError::MalformedInfoRequest("request count does not match the option length"));
    }
    let requests = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, requests })
}

/// Parses a transmission request header.
pub fn request(buf: &[u8]) -> Result<Request, ProtoError> {
    need("request", buf, REQUEST_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic { what: "request", found: u64::from(magic) });
    }
    Ok(Request { flags: be_u16(buf, 4), command: be_u16(buf, 6), handle: be_u64(buf, 8), offset: be_u64(buf, 16), length: be_u32(buf, 24) })
}

#[cfg(test)]
mod tests {
    use super::super::{CMD_FLAG_FUA, CMD_WRITE, INFO_BLOCK_SIZE, INFO_NAME, OPT_GO};
    use super::*;

    fn request_bytes(magic: u32, flags: u16, command: u16, handle: u64, off: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn request_parses_every_field() {
        let b = request_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 1 << 40, 4096);
        assert_eq!(
            request(&b).unwrap(),
            Request { flags: CMD_FLAG_FUA, command: CMD_WRITE, handle: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096 }
        );
    }

    #[test]
    fn request_truncated_is_rejected() {
        let b = request_bytes(REQUEST_MAGIC, 0, 0, 1, 0, 512);
        for cut in 0..REQUEST_LEN {
            assert!(matches!(
                request(&b[..cut]),
                Err(ProtoError::Truncated { needed: REQUEST_LEN, got, .. }) if got == cut
            ));
        }
    }

    #[test]
    fn request_bad_magic_is_rejected() {
        let b = request_bytes(0x1256_0953, 0, 0, 1, 0, 512);
        assert!(matches!(request(&b), Err(ProtoError::BadMagic { what: "request", found: 0x1256_0953 })));
    }

    #[test]
    fn client_flags_accepts_known_and_rejects_unknown_bits() {
        assert_eq!(client_flags(&3u32.to_be_bytes()).unwrap(), ClientFlags { fixed_newstyle: true, no_zeroes: true });
        assert_eq!(client_flags(&0u32.to_be_bytes()).unwrap(), ClientFlags { fixed_newstyle: false, no_zeroes: false });
        assert!(matches!(client_flags(&5u32.to_be_bytes()), Err(ProtoError::UnknownClientFlags(4))));
        assert!(matches!(client_flags(&[0, 0, 1]), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&10u32.to_be_bytes());
        assert_eq!(option_header(&b).unwrap(), OptionHeader { option: OPT_GO, length: 10 });
        assert!(matches!(option_header(&b[..15]), Err(ProtoError::Truncated { .. })));
        b[0] ^= 0xff;
        assert!(matches!(option_header(&b), Err(ProtoError::BadMagic { .. })));
    }

    fn info_bytes(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut b = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
        for r in requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        let b = info_bytes(b"disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let r = info_request(&b).unwrap();
        assert_eq!(r.name, b"disk0");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        let empty = info_bytes(b"", &[]);
        let r = info_request(&empty).unwrap();
        assert!(r.name.is_empty() && r.requests.is_empty());
    }

    #[test]
    fn info_request_with_inconsistent_lengths_is_rejected() {
        // Name length past the end (would need 4 GiB of data).
        let mut b = info_bytes(b"disk0", &[]);
        b[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(info_request(&b), Err(ProtoError::MalformedInfoRequest(_))));
        // Count says two requests, one present.
        let mut b = info_bytes(b"disk0", &[INFO_NAME]);
        let at = 4 + 5;
        b[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(info_request(&b), Err(ProtoError::MalformedInfoRequest(_))));
        // Trailing garbage.
        let mut b = info_bytes(b"disk0", &[INFO_NAME]);
        b.push(0);
        assert!(matches!(info_request(&b), Err(ProtoError::MalformedInfoRequest(_))));
        // Too short for the fixed fields.
        assert!(matches!(info_request(&[0, 0, 0, 0, 0]), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn info_request_with_overlong_name_is_rejected() {
        let name = vec![b'a'; MAX_STRING_LEN + 1];
        let b = info_bytes(&name, &[]);
        assert!(matches!(info_request(&b), Err(ProtoError::StringTooLong { .. })));
    }
}
