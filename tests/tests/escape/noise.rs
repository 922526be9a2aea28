//! Floods of denials: a compromised service that makes thousands of denied
//! `connect()` calls as fast as it can, to drown the decision log (and the
//! agent, and the disk) or to hide one attempt among many.
//!
//! Every call is still denied and counted exactly; the decision log holds
//! at most [`EVENTS_PER_SEC`] denial events of the service per second, each
//! verdict event saying in `suppressed` how many denials of that service
//! were left out on its CPU since the one before; nothing is lost from the
//! sum: (events logged) + (their `suppressed`) = (denials made).

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use integration_tests::{
    events::{events, wait_event},
    eventually, free_port_block,
    http::metrics_addr,
    probe,
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, PolicyDir, Proto,
};
use serde_json::Value;

/// Denied connects in the flood.
const N: u64 = 5_000;
/// The decision log's limit of denial events per service per second.
const EVENTS_PER_SEC: u64 = 100;
/// The pause after the flood: longer than the limit's one-second window,
/// so that the next denial is logged again.
const QUIET: Duration = Duration::from_millis(1_200);
/// How long the metrics may take to catch up with the kernel's counters.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The policy's service name (its file's stem).
const SERVICE: &str = "noisy";

/// A default-deny service floods `ip` (closed ports: nothing listens, and
/// nothing is allowed) with `N` `connect()` calls of `proto` pinned to CPU
/// 0, pauses, then makes one more on the same CPU to another port.
fn deny_flood(proto: Proto, ip: IpAddr) {
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[(
        &format!("{SERVICE}.toml"),
        &service_policy(&svc, "enforce", &[]),
    )]);
    let daemon = Daemon::start(&policies);
    let port = free_port_block(ip, 2);
    let (flooded, after) = (SocketAddr::new(ip, port), SocketAddr::new(ip, port + 1));
    let service = probe!().in_cgroup(svc.path());
    let proto_name = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };

    let flood = service.deny_flood(proto, N, flooded);
    flood.assert_all_eperm(N, "a flood of denied connects: every one is denied");
    eprintln!(
        "noise: {N} denied {proto_name} connects in {:?}",
        flood.elapsed
    );
    thread::sleep(QUIET);
    service
        .deny_flood(proto, 1, after)
        .assert_all_eperm(1, "the connect after the flood");
    let last = wait_event(
        &daemon,
        "the verdict of the connect after the flood (a new second: it is logged)",
        |ev| is_denial(ev) && ev["dst_port"] == after.port(),
    );

    let logged: Vec<Value> = events(&daemon)
        .into_iter()
        .filter(|ev| ev["type"] == "verdict" && ev["service"] == SERVICE)
        .collect();
    // However the limit's one-second windows fall, a flood of d seconds
    // touches at most ceil(d) + 1 of them.
    let windows = u64::try_from(flood.elapsed.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let in_flood = logged
        .iter()
        .filter(|ev| ev["dst_port"] == flooded.port())
        .count();
    assert!(
        u64::try_from(in_flood).unwrap_or(u64::MAX) <= EVENTS_PER_SEC * windows,
        "a flood of {N} denials in {:?} is logged at most {EVENTS_PER_SEC} a second ({} \
         events at most), got {in_flood} events",
        flood.elapsed,
        EVENTS_PER_SEC * windows
    );
    let suppressed: Vec<u64> = logged
        .iter()
        .map(|ev| {
            ev["suppressed"].as_u64().unwrap_or_else(|| {
                panic!("every verdict event says how many were suppressed before it: {ev:#}")
            })
        })
        .collect();
    assert!(
        logged.iter().all(is_denial),
        "the service made denied connects only: {logged:#?}"
    );
    let total_suppressed: u64 = suppressed.iter().sum();
    assert_eq!(
        u64::try_from(logged.len()).unwrap_or(u64::MAX) + total_suppressed,
        N + 1,
        "events logged ({}) + their suppressed counts ({total_suppressed}) = every denial \
         (the last event says {})",
        logged.len(),
        last["suppressed"]
    );

    let metrics = metrics_addr(&daemon);
    let connections = [
        ("service", SERVICE),
        ("direction", "egress"),
        ("protocol", proto_name),
        ("verdict", "deny"),
    ];
    let samples = eventually(CATCH_UP, Duration::from_millis(100), || {
        let samples = scrape(metrics);
        let counted = sample_count(&samples, "bulkhead_connections_total", &connections);
        if counted == Some(N + 1) {
            Ok(samples)
        } else {
            Err(samples)
        }
    })
    .unwrap_or_else(|last| last);
    assert_eq!(
        sample_count(&samples, "bulkhead_connections_total", &connections),
        Some(N + 1),
        "bulkhead_connections_total{connections:?} counts every denial"
    );
    let suppressed_labels = [("service", SERVICE), ("direction", "egress")];
    assert_eq!(
        sample_count(
            &samples,
            "bulkhead_events_suppressed_total",
            &suppressed_labels
        ),
        Some(total_suppressed),
        "bulkhead_events_suppressed_total{suppressed_labels:?} is the sum of the events' \
         `suppressed`"
    );
}

fn is_denial(ev: &Value) -> bool {
    ev["type"] == "verdict"
        && ev["service"] == SERVICE
        && ev["verdict"] == "deny"
        && ev["hook"] == "connect"
}

#[test]
fn udp4_flood_of_denied_connects_is_counted_exactly_and_logged_at_a_bounded_rate() {
    if !require_bpf() {
        return;
    }
    deny_flood(Proto::Udp, IpAddr::from([127, 0, 0, 1]));
}

#[test]
fn tcp6_flood_of_denied_connects_is_counted_exactly_and_logged_at_a_bounded_rate() {
    if !require_bpf() {
        return;
    }
    deny_flood(Proto::Tcp, "::1".parse().unwrap_or_else(|e| panic!("{e}")));
}
