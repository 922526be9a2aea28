//! Volume spike: bytes sent per interval (open connections' byte summaries
//! and closes, each byte once) at `factor` x the EWMA baseline, with a
//! floor, after warm-up: the exfiltration shape.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind},
    service::ServiceState,
};

pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.volume_spike;
    if !c.enabled || !s.warm(cfg) {
        return None;
    }
    super::spike(
        Kind::VolumeSpike,
        &s.volume,
        s.window.bytes,
        (c.factor, c.min_bytes),
        &s.window.byte_samples,
    )
}
