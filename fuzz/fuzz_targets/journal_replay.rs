//! Journal replay of arbitrary segment contents: `Journal::open` recovers (or refuses with an
//! error) and a reader walks what is left, without panicking; whatever it returns is a run of
//! consecutive sequence numbers from the segment's first.
#![no_main]

use std::sync::Arc;

use hindsight_consistency::journal::{segment_name, Journal, JournalOptions, JournalReader};
use hindsight_consistency::storage::{StdStorage, Storage};
use libfuzzer_sys::fuzz_target;

/// A valid segment header for first_seq 1, so that the fuzzer spends its time on records.
fn header() -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[0..8].copy_from_slice(b"HSJOURNL");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&1u64.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    // The first byte chooses between a valid header followed by the data, and raw data.
    let bytes = match data.split_first() {
        Some((0, rest)) => rest.to_vec(),
        Some((_, rest)) => [header(), rest.to_vec()].concat(),
        None => return,
    };
    std::fs::write(dir.path().join(segment_name(1)), &bytes).unwrap();
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let Ok(journal) = Journal::open(fs.clone(), dir.path(), JournalOptions::default()) else { return };
    let next = journal.next_seq();
    drop(journal);
    let Ok(mut reader) = JournalReader::open(fs, dir.path(), 1) else { return };
    let mut expect = 1;
    while let Ok(Some(rec)) = reader.next() {
        assert_eq!(rec.header.seq, expect, "records after recovery must be consecutive");
        expect += 1;
    }
    assert_eq!(expect, next, "the reader sees exactly what the writer recovered");
});
