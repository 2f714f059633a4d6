//! The point-in-time index file decoded from arbitrary bytes: never a panic, never an
//! allocation from an unchecked count; whatever decodes encodes back to the same bytes.
#![no_main]

use hindsight_target::point_index::file::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(run) = decode(data) {
        assert_eq!(decode(&encode(&run)), Ok(run));
    }
});
