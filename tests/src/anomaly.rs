//! Reading the anomaly events of a test daemon's decision log, and the
//! times that say how fast one came: the daemon stamps each event with
//! `ktime_ns` (`CLOCK_MONOTONIC`, the kernel's for decisions, its own for
//! anomalies), so a delay is measured on the daemon's own clock, not the
//! test's polling.

use std::{collections::HashSet, time::Duration};

use serde_json::Value;

use crate::{
    daemon::Daemon,
    events::{events, EVENT_TIMEOUT},
    eventually::eventually,
};

/// The anomaly events of `service` so far (any kind), oldest first.
#[must_use]
pub fn anomalies(daemon: &Daemon, service: &str) -> Vec<Value> {
    events(daemon)
        .into_iter()
        .filter(|ev| ev["type"] == "anomaly" && ev["service"] == service)
        .collect()
}

/// Waits up to `timeout` for an anomaly of `kind` of `service`; panics
/// with every anomaly seen if none came.
#[must_use]
pub fn wait_anomaly(daemon: &Daemon, service: &str, kind: &str, timeout: Duration) -> Value {
    eventually(timeout, Duration::from_millis(50), || {
        let all = anomalies(daemon, service);
        all.iter()
            .find(|ev| ev["anomaly"]["kind"] == kind)
            .cloned()
            .ok_or(all)
    })
    .unwrap_or_else(|all| panic!("no {kind} anomaly of {service} within {timeout:?}; got {all:#?}"))
}

/// An event's `ktime_ns`; panics if it has none.
#[must_use]
pub fn ktime_ns(ev: &Value) -> u64 {
    ev["ktime_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without ktime_ns: {ev:#}"))
}

/// When `service`'s connects to `host` reached `limit + 1` distinct ports
/// (a port scan crossing a fan-out limit of `limit`): the `ktime_ns` of the
/// decision that made it so. Waits for the decisions to be logged; panics
/// if fewer ports than that were ever tried.
#[must_use]
pub fn port_scan_crossing_ns(daemon: &Daemon, service: &str, host: &str, limit: usize) -> u64 {
    eventually(EVENT_TIMEOUT, Duration::from_millis(50), || {
        let mut connects: Vec<(u64, u64)> = events(daemon)
            .iter()
            .filter(|ev| {
                ev["type"] == "verdict"
                    && ev["hook"] == "connect"
                    && ev["service"] == service
                    && ev["dst_ip"] == host
            })
            .map(|ev| (ktime_ns(ev), ev["dst_port"].as_u64().unwrap_or(0)))
            .collect();
        connects.sort_unstable();
        let mut ports = HashSet::new();
        connects
            .iter()
            .find(|(_, port)| ports.insert(*port) && ports.len() > limit)
            .map(|(t, _)| *t)
            .ok_or(ports.len())
    })
    .unwrap_or_else(|seen| {
        panic!("{service} tried {seen} distinct ports of {host}, not more than {limit}")
    })
}
