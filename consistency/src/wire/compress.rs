//! LZ4 compression of `Records` payloads on the engine → target link (`RecordsLz4`,
//! docs/wire-protocol.md).

use super::frame::{FrameError, MAX_FRAME_PAYLOAD};

/// The compression name negotiated in the hello.
pub const LZ4: &str = "lz4";

/// A compressed payload is sent only when it is at most this share of the raw one (in
/// hundredths): smaller gains are not worth the receiver's work.
const WORTH_PERCENT: usize = 97;

/// Compresses a `Records` payload into `out` (`raw_len` + LZ4 block). Returns false, leaving
/// `out` unspecified, when compression does not save at least 3 %: send `raw` as `Records`.
pub fn compress_records(raw: &[u8], out: &mut Vec<u8>) -> bool {
    let Ok(raw_len) = u32::try_from(raw.len()) else { return false };
    out.clear();
    out.extend_from_slice(&raw_len.to_le_bytes());
    let bound = lz4_flex::block::get_maximum_output_size(raw.len());
    out.resize(4 + bound, 0);
    match lz4_flex::block::compress_into(raw, &mut out[4..]) {
        Ok(n) => {
            out.truncate(4 + n);
            out.len() * 100 <= raw.len() * WORTH_PERCENT
        }
        Err(_) => false,
    }
}

/// The raw LZ4 block of `raw` (no length prefix), whatever its size.
pub fn lz4_block(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
    let n = lz4_flex::block::compress_into(raw, out).expect("the buffer has the maximum output size");
    out.truncate(n);
}

/// Decompresses a `RecordsLz4` payload into `out` (replacing its contents).
pub fn decompress_records(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let (len, block) = payload.split_first_chunk::<4>().ok_or(FrameError::Malformed("RecordsLz4 shorter than its length field"))?;
    let raw_len = u32::from_le_bytes(*len) as usize;
    if raw_len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::Malformed("RecordsLz4 declares more than the largest payload"));
    }
    out.clear();
    out.resize(raw_len, 0);
    match lz4_flex::block::decompress_into(block, out) {
        Ok(n) if n == raw_len => Ok(()),
        _ => Err(FrameError::Malformed("RecordsLz4 block does not decompress to its declared length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let raw: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 / 8).collect();
        let mut packed = Vec::new();
        assert!(compress_records(&raw, &mut packed));
        assert!(packed.len() < raw.len() / 4, "{} of {}", packed.len(), raw.len());
        let mut back = vec![1, 2, 3];
        decompress_records(&packed, &mut back).unwrap();
        assert_eq!(back, raw);

        // Every truncation fails cleanly (never a panic, never a wrong length).
        for cut in 0..packed.len().min(300) {
            assert!(decompress_records(&packed[..cut], &mut back).is_err(), "cut at {cut}");
        }
        // A length that lies.
        let mut lying = packed.clone();
        lying[..4].copy_from_slice(&(raw.len() as u32 + 1).to_le_bytes());
        assert!(decompress_records(&lying, &mut back).is_err());
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress_records(&lying, &mut back).is_err());
    }

    #[test]
    fn incompressible_input_is_not_sent_compressed() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let raw: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!compress_records(&raw, &mut Vec::new()));
    }
}
