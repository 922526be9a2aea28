//! The saved anomaly baselines (`anomaly.json`), restored into detectors.
#![no_main]

use bulkhead::anomaly::{AnomalyConfig, Detector};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(saved) = bulkhead::anomaly::state::parse(data) {
        let mut d = Detector::new(AnomalyConfig::default());
        d.restore(saved);
        let _ = d.save_state();
    }
});
