//! Floods of denials: a compromised service that makes thousands of denied
//! `connect()` calls as fast as it can, to drown the decision log (and the
//! agent, and the disk) or to hide one attempt among many.
//!
//! Every call is still denied and counted exactly. Calls to one destination
//! are one flow: its first denial is a record, the others are counted in
//! the kernel and summarised (`flow` events). A scan of many destinations
//! makes many flows, and their first records are held to at most
//! [`EVENTS_PER_SEC`] a second per service; a flow whose record the limit
//! held back is counted too, summed with the others of its process in one
//! `flow` event per interval (no destination; `suppressed`: how many flows,
//! each counted once, in the interval of its first call). Nothing is lost
//! from the sum: the `calls` of every event add up to the denials made.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use integration_tests::{
    events::{calls_of, wait_calls, wait_event},
    eventually, free_port_block,
    http::metrics_addr,
    probe,
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, PolicyDir, Proto,
};
use serde_json::Value;

/// Denied connects in the flood, and the ports they go to in turn.
const N: u64 = 5_000;
const PORTS: u16 = 1_000;
/// The decision log's limit of denial records per service per second.
const EVENTS_PER_SEC: u64 = 100;
/// The pause after the flood: longer than the limit's one-second window,
/// so that the next denial is logged again.
const QUIET: Duration = Duration::from_millis(1_200);
/// How long the metrics may take to catch up with the kernel's counters.
const CATCH_UP: Duration = Duration::from_secs(10);
/// Flow summaries every second; how long they may take, and the wait after
/// for a call too many.
const CONFIG: &str = "[flows]\ninterval_secs = 1\n";
/// The scan's pause halfway, two summary intervals: its flows go on in a
/// later epoch, and each must still be counted once (a slow machine's scan
/// spans intervals anyway; this makes the fast one's do too).
const HALFWAY: Duration = Duration::from_millis(2_200);
const REPORTED: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_millis(2500);

/// The policy's service name (its file's stem).
const SERVICE: &str = "noisy";

/// A default-deny service scans `ip` (closed ports: nothing listens, and
/// nothing is allowed) with `N` `connect()` calls of `proto` over `PORTS`
/// ports, pinned to CPU 0 and pausing halfway, pauses, then makes one more
/// on the same CPU to another port.
fn deny_flood(proto: Proto, ip: IpAddr) {
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[(
        &format!("{SERVICE}.toml"),
        &service_policy(&svc, "enforce", &[]),
    )]);
    let daemon = Daemon::start_with_config(&policies, CONFIG);
    let port = free_port_block(ip, PORTS + 1);
    let (flooded, after) = (SocketAddr::new(ip, port), SocketAddr::new(ip, port + PORTS));
    let service = probe!().in_cgroup(svc.path());
    let proto_name = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };

    let flood = service.deny_scan(proto, N, PORTS, HALFWAY, flooded);
    flood.assert_all_eperm(N, "a flood of denied connects: every one is denied");
    eprintln!(
        "noise: {N} denied {proto_name} connects to {PORTS} ports in {:?}",
        flood.elapsed
    );
    thread::sleep(QUIET);
    service
        .deny_flood(proto, 1, after)
        .assert_all_eperm(1, "the connect after the flood");
    let _last = wait_event(
        &daemon,
        "the verdict of the connect after the flood (a new second: it is logged)",
        |ev| is_denial(ev) && ev["dst_port"] == after.port(),
    );

    let logged = wait_calls(&daemon, "denials", N + 1, REPORTED, SETTLE, |ev| {
        ev["service"] == SERVICE && (ev["type"] == "verdict" || ev["type"] == "flow")
    });
    assert_eq!(
        calls_of(&logged),
        N + 1,
        "the records and summaries report every denial exactly once"
    );
    assert!(
        logged.iter().all(|ev| ev["verdict"] == "deny"),
        "the service made denied connects only: {logged:#?}"
    );
    // However the limit's one-second windows fall, a stretch of calls of
    // d seconds touches at most ceil(d) + 1 of them; the pause makes two
    // stretches (`elapsed` is both, without the pause).
    let windows = u64::try_from(flood.elapsed.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .saturating_add(2);
    let records: Vec<&Value> = logged
        .iter()
        .filter(|ev| ev["type"] == "verdict" && ev["dst_port"] != after.port())
        .collect();
    assert!(
        u64::try_from(records.len()).unwrap_or(u64::MAX) <= EVENTS_PER_SEC * windows,
        "a scan of {PORTS} ports in {:?} has its first records logged at most \
         {EVENTS_PER_SEC} a second ({} at most), got {}",
        flood.elapsed,
        EVENTS_PER_SEC * windows,
        records.len()
    );
    let held_back: u64 = logged
        .iter()
        .filter(|ev| ev["type"] == "flow" && ev["dst_ip"].is_null())
        .map(|ev| ev["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        u64::try_from(records.len()).unwrap_or(u64::MAX) + held_back,
        u64::from(PORTS),
        "every flow of the scan is either recorded or counted as held back"
    );
    // Events grow with flows and intervals, not calls: a recorded flow has
    // its record and a summary per sweep that found calls of it (two
    // stretches of calls meet at most `windows` + 1 one-second sweeps), the
    // held-back flows one summary per sweep, and the last connect its record.
    let sweeps = windows + 1;
    let bound = (u64::try_from(records.len()).unwrap_or(u64::MAX) + 1) * (1 + sweeps) + sweeps;
    assert!(
        u64::try_from(logged.len()).unwrap_or(u64::MAX) <= bound,
        "the log stays bounded: {} events for {N} denials (at most {bound})",
        logged.len()
    );

    assert_counted_exactly(&daemon, proto_name, held_back);
}

/// The kernel counted every denial (`N` + 1), and the held-back flows are
/// the suppressed count of the metrics.
fn assert_counted_exactly(daemon: &Daemon, proto_name: &str, held_back: u64) {
    let metrics = metrics_addr(daemon);
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
        (held_back > 0).then_some(held_back),
        "bulkhead_events_suppressed_total{suppressed_labels:?} counts the flows whose record \
         the limit held back"
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
