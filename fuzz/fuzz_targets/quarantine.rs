//! Quarantine exceptions (`CIDR[:PORT]`, from the command line and
//! `quarantine.json`): what parses prints back to itself.
#![no_main]

use bulkhead::quarantine::{Exception, Quarantines};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(e) = text.parse::<Exception>() {
            let again: Exception = e.to_string().parse().expect("printed exception parses");
            assert_eq!(e, again);
        }
    }
    let _ = Quarantines::parse(data);
});
