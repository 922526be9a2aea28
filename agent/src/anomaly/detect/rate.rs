//! Rate spike: attempts per interval at `factor` x the EWMA baseline, with
//! a floor, after warm-up.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.rate_spike;
    let observed = s.window.conns;
    if !c.enabled || !s.warm(cfg) || !s.rate.spike(observed, c.factor, c.min_count) {
        return None;
    }
    let threshold = (c.factor as f64 * s.rate.mean).max(c.min_count as f64);
    Some(Finding {
        kind: Kind::RateSpike,
        severity: Severity::of_ratio(observed as f64, threshold),
        baseline: s.rate.mean,
        observed: observed as f64,
        samples: s.window.conn_samples.render(),
    })
}
