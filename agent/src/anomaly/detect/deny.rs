//! Deny burst: at least `threshold` denied attempts in one interval
//! (someone probing the boundary). Absolute: no warm-up needed.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

#[expect(clippy::cast_precision_loss, reason = "small counts")]
pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.deny_burst;
    let observed = s.window.denies;
    if !c.enabled || observed < c.threshold {
        return None;
    }
    Some(Finding {
        kind: Kind::DenyBurst,
        severity: Severity::of_ratio(observed as f64, c.threshold as f64),
        baseline: c.threshold as f64,
        observed: observed as f64,
        samples: s.window.deny_samples.render(),
    })
}
