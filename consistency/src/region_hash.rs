//! The hash of a region, as an initial sync compares it between the agent's disk and the
//! target's replica (docs/wire-protocol.md, "Sessions", item 6): the 32-byte BLAKE3 hash of the
//! region's bytes. A region that is all zeroes (a hole reads as zeroes) hashes as such without
//! running the hash over it: checking for zeroes is several times faster than hashing, and
//! blank regions are the common case of a new disk or replica.

/// Region hashes are 32 bytes.
pub const HASH_LEN: usize = 32;

/// A region hash.
pub type RegionHash = [u8; HASH_LEN];

/// Most regions one hash request may name.
pub const MAX_HASH_REGIONS: usize = 1024;

/// The hash of `bytes`.
pub fn region_hash(bytes: &[u8]) -> RegionHash {
    if is_zero(bytes) {
        return zero_hash(bytes.len());
    }
    *blake3::hash(bytes).as_bytes()
}

/// The hash of `len` zero bytes (a hole of that length), without reading anything.
pub fn zero_hash(len: usize) -> RegionHash {
    thread_local! {
        /// The last length asked for and its hash: regions have one length but the last.
        static LAST: std::cell::Cell<Option<(usize, RegionHash)>> = const { std::cell::Cell::new(None) };
    }
    if let Some((l, h)) = LAST.get() {
        if l == len {
            return h;
        }
    }
    let mut hasher = blake3::Hasher::new();
    let zeroes = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeroes.len());
        hasher.update(&zeroes[..n]);
        left -= n;
    }
    let h = *hasher.finalize().as_bytes();
    LAST.set(Some((len, h)));
    h
}

/// True if every byte is zero (compared 16 bytes at a time).
fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(16);
    let tail = words.remainder();
    words.into_iter().all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_regions_hash_like_blake3_of_zeroes() {
        for len in [0usize, 1, 15, 16, 17, 4096, (1 << 20) + 3, 1 << 20] {
            let z = vec![0u8; len];
            assert_eq!(region_hash(&z), *blake3::hash(&z).as_bytes(), "len {len}");
            assert_eq!(zero_hash(len), *blake3::hash(&z).as_bytes(), "len {len}");
        }
    }

    #[test]
    fn one_byte_changes_the_hash() {
        let mut a = vec![0u8; 1 << 20];
        let zero = region_hash(&a);
        for at in [0, 17, (1 << 20) - 1] {
            a[at] = 1;
            let h = region_hash(&a);
            assert_ne!(h, zero, "byte {at}");
            assert_eq!(h, *blake3::hash(&a).as_bytes());
            a[at] = 0;
        }
        assert_eq!(region_hash(&a), zero);
    }
}
