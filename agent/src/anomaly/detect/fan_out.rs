//! Fan-out: more distinct remote hosts (a sweep) or ports (a scan) in one
//! interval than the limits. Absolute limits: no warm-up needed.

use super::super::{
    config::AnomalyConfig,
    finding::{Finding, Kind, Severity},
    service::ServiceState,
};

#[expect(clippy::cast_precision_loss, reason = "small counts")]
pub fn check(cfg: &AnomalyConfig, s: &ServiceState) -> Option<Finding> {
    let c = &cfg.fan_out;
    if !c.enabled {
        return None;
    }
    let hosts = s.window.hosts.len() as u64;
    let ports = s.window.ports.len() as u64;
    // Whichever limit is passed further decides the evidence.
    let over = |n: u64, limit: u64| (n > limit).then(|| n as f64 / (limit.max(1)) as f64);
    let (observed, limit) = match (over(hosts, c.max_hosts), over(ports, c.max_ports)) {
        (None, None) => return None,
        (Some(h), Some(p)) if h >= p => (hosts, c.max_hosts),
        (Some(_), None) => (hosts, c.max_hosts),
        _ => (ports, c.max_ports),
    };
    Some(Finding {
        kind: Kind::FanOut,
        severity: Severity::of_ratio(observed as f64, limit as f64),
        baseline: limit as f64,
        observed: observed as f64,
        samples: s.window.conn_samples.render(),
    })
}
