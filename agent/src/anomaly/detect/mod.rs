//! The detectors: each reads one service's window and baselines and says
//! whether it saw an anomaly. All run at the end of an interval; the
//! threshold ones (`EARLY`) also while it fills.

mod deny;
mod fan_out;
mod new_dest;
mod rate;
mod volume;

use super::{
    config::AnomalyConfig,
    dest::Samples,
    ewma::Ewma,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

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

/// The threshold detectors: absolute limits that a window's counts only
/// ever cross upwards, so a crossing seen mid-interval is that interval's
/// anomaly already (`Detector::check` reports it at once).
pub const EARLY: [Kind; 2] = [Kind::FanOut, Kind::DenyBurst];

/// The finding of threshold detector `kind` on the window so far.
#[must_use]
pub fn early(cfg: &AnomalyConfig, s: &ServiceState, kind: Kind) -> Option<Finding> {
    match kind {
        Kind::FanOut => fan_out::check(cfg, s),
        Kind::DenyBurst => deny::check(cfg, s),
        Kind::RateSpike | Kind::NewDestination | Kind::VolumeSpike => None,
    }
}

/// The finding of a spike detector (rate, volume): `observed` this interval
/// at `factor` x the EWMA `baseline` and at least `floor`.
#[expect(clippy::cast_precision_loss, reason = "counts as rough ratios")]
fn spike(
    kind: Kind,
    baseline: &Ewma,
    observed: u64,
    (factor, floor): (u64, u64),
    samples: &Samples,
) -> Option<Finding> {
    if !baseline.spike(observed, factor, floor) {
        return None;
    }
    let threshold = (factor as f64 * baseline.mean).max(floor as f64);
    Some(Finding {
        kind,
        severity: Severity::of_ratio(observed as f64, threshold),
        baseline: baseline.mean,
        observed: observed as f64,
        samples: samples.render(),
    })
}
