//! A line a local client sends to the control socket.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bulkhead::control::protocol::decode_request(data);
});
