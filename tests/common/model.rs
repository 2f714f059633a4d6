//! The model of a volume (what the acknowledged writes made of it), seeded random data and
//! comparisons for assertion messages.

use std::path::Path;

/// A seeded random generator: the seed comes from HS_SEED or is drawn, and is printed so that
/// a failing run can be repeated.
pub fn seeded_rng() -> rand::rngs::StdRng {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("HS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed} (HS_SEED={seed} repeats this run)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `len` random bytes.
pub fn random_bytes(rng: &mut impl rand::RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rng.fill_bytes(&mut v);
    v
}

/// True if two files hold the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A model of a volume: what every acknowledged write made of it.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model { bytes: vec![0; usize::try_from(size).unwrap()] }
    }

    pub fn fill(&mut self, off: u64, len: u64, byte: u8) {
        let (o, l) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
        self.bytes[o..o + l].fill(byte);
    }
}

/// Fails with where `got` first differs from `want`, unless they are equal.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert!(got == want, "{what}: {}", first_difference(got, want));
}

/// Describes where two images differ first, for assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths differ: {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}: {:#04x} vs {:#04x}", a[i], b[i]),
        None => "equal".into(),
    }
}
