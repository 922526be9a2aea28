//! New destination: an (address group, port, protocol) the service never
//! used before, after warm-up.

use super::super::{
    config::AnomalyConfig,
    dest::SAMPLES,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

#[expect(clippy::cast_precision_loss, reason = "small counts")]
pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let fresh = &s.window.new_dests;
    if !cfg.new_destination.enabled || !s.warm(cfg) || fresh.is_empty() {
        return None;
    }
    let mut samples: Vec<String> = fresh.iter().map(ToString::to_string).collect();
    samples.sort();
    samples.truncate(SAMPLES);
    Some(Finding {
        kind: Kind::NewDestination,
        severity: if fresh.len() >= SAMPLES {
            Severity::High
        } else {
            Severity::Medium
        },
        baseline: s.known.len() as f64,
        observed: fresh.len() as f64,
        samples,
    })
}
