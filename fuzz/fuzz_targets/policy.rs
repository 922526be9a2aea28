//! A policy file: any bytes, loaded as the daemon loads one, and compiled
//! for the kernel when valid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8(data.to_vec()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    });
    let files = vec![(std::path::PathBuf::from("/fuzz/svc.toml"), text)];
    if let Ok(set) = bulkhead::policy::load_texts(files) {
        let _ = bulkhead::kernel::compile(&set);
    }
});
