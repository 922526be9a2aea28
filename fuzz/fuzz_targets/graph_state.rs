//! The saved service graph (`graph.json` in the state directory).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(graph) = bulkhead::graph::store::from_json(data) {
        let _ = bulkhead::graph::store::to_json(&graph);
    }
});
