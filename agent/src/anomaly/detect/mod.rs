//! The detectors: each reads one service's window and baselines at the end
//! of an interval and says whether it saw an anomaly.

mod deny;
mod fan_out;
mod new_dest;
mod rate;
mod volume;

use super::{config::AnomalyConfig, finding::Finding, service::ServiceState};

/// Every enabled detector's finding for `s`, in `Kind` order.
#[must_use]
pub fn run(cfg: &AnomalyConfig, s: &ServiceState) -> [Option<Finding>; 5] {
    [
        rate::check(cfg, s),
        new_dest::check(cfg, s),
        fan_out::check(cfg, s),
        deny::check(cfg, s),
        volume::check(cfg, s),
    ]
}
