//! Volume spike: bytes sent per interval (from tcp_closed) at `factor` x
//! the EWMA baseline, with a floor, after warm-up: the exfiltration shape.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

#[expect(clippy::cast_precision_loss, reason = "byte counts as rough ratios")]
pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.volume_spike;
    let observed = s.window.bytes;
    if !c.enabled || !s.warm(cfg) || !s.volume.spike(observed, c.factor, c.min_bytes) {
        return None;
    }
    let threshold = (c.factor as f64 * s.volume.mean).max(c.min_bytes as f64);
    Some(Finding {
        kind: Kind::VolumeSpike,
        severity: Severity::of_ratio(observed as f64, threshold),
        baseline: s.volume.mean,
        observed: observed as f64,
        samples: s.window.byte_samples.render(),
    })
}
