//! A ring-buffer record as the kernel programs write it, decoded with
//! names for a few services and rules (ids in and out of range).
#![no_main]

use std::sync::{Arc, OnceLock};

use bulkhead::events::{Decoder, Names};
use libfuzzer_sys::fuzz_target;

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        Decoder::new(Arc::new(Names {
            service_base: 1,
            rule_base: 2,
            services: vec![("billing".into(), "billing.toml".into())],
            rules: vec!["billing.toml#egress[0]".into()],
        }))
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(ev) = decoder().decode(data) {
        let _ = serde_json::to_vec(&ev);
    }
});
