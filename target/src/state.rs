//! The `state` file of a group: how far the replicas are durably applied and where the base
//! images stand.
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSTS"                      | version (u32) = 1                 |
//!    8  | applied_seq (u64)                                                     |
//!   16  | base_seq (u64)                                                        |
//!   24  | base_time_ns (u64)                                                    |
//!   32  | crc32c (u32)                      |
//! ```
//!
//! `{ magic | version | applied_seq | base_seq | base_time_ns | crc32c }`, 36 bytes, all
//! integers little-endian, the CRC-32C covering bytes 0..32.
//!
//! - `applied_seq`: every record up to here is applied to the replica images and synced.
//! - `base_seq`: the base images hold the volumes exactly as they were after this record
//!   (0: blank volumes); the oldest point that can be recovered.
//! - `base_time_ns`: the time of that record (for 0: when the group was created).
//!
//! The file is replaced atomically (temporary file, fsync, rename, directory fsync). The same
//! encoding is used for `state.next`, written before the base images are rolled forward and
//! removed after `state` records the new base: while it exists the base images may hold any
//! mix of the records between the two `base_seq`s (see the crate overview).

use std::io;
use std::path::Path;

use hindsight_consistency::storage::{write_file_atomic, OpenMode, Storage};
use hindsight_consistency::Seq;

use crate::error::TargetError;

/// Magic bytes opening a state file.
pub(crate) const STATE_MAGIC: [u8; 4] = *b"HSTS";
/// State format version.
pub(crate) const STATE_VERSION: u32 = 1;
/// Encoded size.
pub(crate) const STATE_LEN: usize = 36;

/// The decoded state of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupState {
    /// Replicas hold (durably) every record up to here.
    pub applied_seq: Seq,
    /// The base images hold the volumes as of this record.
    pub base_seq: Seq,
    /// Time of the base point.
    pub base_time_ns: u64,
}

impl GroupState {
    /// Encodes `{ magic | version | applied_seq | base_seq | base_time_ns | crc32c }`.
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0..4].copy_from_slice(&STATE_MAGIC);
        b[4..8].copy_from_slice(&STATE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.applied_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_time_ns.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a state file's bytes.
    pub fn decode(b: &[u8]) -> Result<GroupState, &'static str> {
        if b.len() != STATE_LEN {
            return Err("wrong length");
        }
        if b[0..4] != STATE_MAGIC {
            return Err("bad magic");
        }
        if u32_at(b, 4) != STATE_VERSION {
            return Err("unknown version");
        }
        if crc32c::crc32c(&b[0..32]) != u32_at(b, 32) {
            return Err("checksum mismatch");
        }
        let s = GroupState { applied_seq: u64_at(b, 8), base_seq: u64_at(b, 16), base_time_ns: u64_at(b, 24) };
        if s.applied_seq < s.base_seq {
            return Err("applied_seq is below base_seq");
        }
        Ok(s)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Why a state file could not be read.
#[derive(Debug)]
pub(crate) enum StateReadError {
    Io(io::Error),
    Corrupt(&'static str),
}

/// Reads a state file; `Ok(None)` if it does not exist.
pub(crate) fn read_state(fs: &dyn Storage, path: &Path) -> Result<Option<GroupState>, StateReadError> {
    let f = match fs.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateReadError::Io(e)),
    };
    let len = f.len().map_err(StateReadError::Io)?;
    if len != STATE_LEN as u64 {
        return Err(StateReadError::Corrupt("wrong length"));
    }
    let mut b = [0u8; STATE_LEN];
    f.read_exact_at(&mut b, 0).map_err(StateReadError::Io)?;
    GroupState::decode(&b).map(Some).map_err(StateReadError::Corrupt)
}

/// Replaces a state file atomically and durably.
pub(crate) fn write_state(fs: &dyn Storage, path: &Path, s: &GroupState) -> io::Result<()> {
    write_file_atomic(fs, path, &s.encode())
}

/// Reads `state` or `state.next`.
pub(crate) fn load_state(fs: &dyn Storage, group: &str, path: &Path) -> Result<Option<GroupState>, TargetError> {
    read_state(fs, path).map_err(|e| match e {
        StateReadError::Io(source) => TargetError::DataDir { path: path.to_owned(), step: "read state", source },
        StateReadError::Corrupt(reason) => TargetError::StateCorrupt { group: group.to_owned(), path: path.to_owned(), reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_detected() {
        let s = GroupState { applied_seq: 1234, base_seq: 1000, base_time_ns: 1_800_000_000_000_000_000 };
        let b = s.encode();
        assert_eq!(GroupState::decode(&b).unwrap(), s);
        for byte in 0..STATE_LEN {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert!(GroupState::decode(&c).is_err(), "flip at byte {byte} bit {bit} went unnoticed");
            }
        }
        assert!(GroupState::decode(&b[..35]).is_err());
    }

    /// A version 1 state file, byte for byte: the layout must never change under this version.
    const FIXTURE_V1: [u8; STATE_LEN] = [
        0x48, 0x53, 0x54, 0x53, 0x01, 0x00, 0x00, 0x00, // "HSTS", version 1
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // applied_seq 7
        0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // base_seq 5
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // base_time_ns
        0x9a, 0xb9, 0xc6, 0xf5, // crc32c
    ];

    #[test]
    fn version_1_fixture_decodes_and_encodes_identically() {
        let s = GroupState { applied_seq: 7, base_seq: 5, base_time_ns: 0x1122_3344_5566_7788 };
        assert_eq!(GroupState::decode(&FIXTURE_V1), Ok(s));
        assert_eq!(s.encode(), FIXTURE_V1);
        let mut v2 = FIXTURE_V1;
        v2[4] = 2;
        assert_eq!(GroupState::decode(&v2), Err("unknown version"));
    }

    #[test]
    fn applied_below_base_is_corrupt() {
        let b = GroupState { applied_seq: 1, base_seq: 2, base_time_ns: 0 }.encode();
        assert_eq!(GroupState::decode(&b), Err("applied_seq is below base_seq"));
    }

    #[test]
    fn missing_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let fs = hindsight_consistency::storage::StdStorage;
        assert!(matches!(read_state(&fs, &dir.path().join("state")), Ok(None)));
        let s = GroupState { applied_seq: 5, base_seq: 0, base_time_ns: 7 };
        write_state(&fs, &dir.path().join("state"), &s).unwrap();
        assert_eq!(read_state(&fs, &dir.path().join("state")).unwrap(), Some(s));
    }
}
