//! The NBD decoders of the agent on arbitrary bytes: request headers, option headers, info
//! requests and client flags. Never a panic.
#![no_main]

use hindsight_splitter::nbd::proto::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::request(data);
    let _ = decode::option_header(data);
    let _ = decode::info_request(data);
    let _ = decode::client_flags(data);
});
