//! Rate spike: attempts per interval at `factor` x the EWMA baseline, with
//! a floor, after warm-up.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind},
    service::ServiceState,
};

pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.rate_spike;
    if !c.enabled || !s.warm(cfg) {
        return None;
    }
    super::spike(
        Kind::RateSpike,
        &s.rate,
        s.window.conns,
        (c.factor, c.min_count),
        &s.window.conn_samples,
    )
}
