//! Anomaly detection on a real kernel:
//! - a service port-scans a "remote host" (a network namespace with a
//!   documentation address), and the decision log gets a `fan_out` anomaly
//!   with the scan as its evidence; the metric counts it, and the OTLP
//!   exporter delivers it to a receiver on loopback (one-second intervals,
//!   no warm-up);
//! - a 400-port sweep is reported within 5 s of crossing the limit, with a
//!   60 s interval (so not by the interval's end);
//! - ten times the queries over one pooled connection that stays open is a
//!   `volume_spike` (its bytes come from the per-interval flow summaries).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::Value;

use integration_tests::{
    addr,
    anomaly::{anomalies, ktime_ns, port_scan_crossing_ns, wait_anomaly},
    conn,
    conn::monotonic_ns,
    events::wait_event,
    http::{http_get, metrics_addr},
    otlp::OtlpReceiver,
    probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, NetnsGuard, PolicyDir,
};

/// Ports scanned, and the fan-out limit: any split of the scan over two
/// one-second intervals leaves one above the limit.
const SCANNED: u16 = 40;
const MAX_PORTS: u16 = 10;

const CONFIG: &str = "\
[export]
otlp_endpoint = \"http://OTLP/v1/logs\"
events = \"anomalies\"
flush_interval_ms = 100
[anomaly]
interval_s = 1
warmup_intervals = 0
[anomaly.fan_out]
max_ports = 10
[anomaly.new_destination]
enabled = false
[anomaly.rate_spike]
enabled = false
";

/// A service allowed TCP to every port of a "remote host" (a namespace),
/// which it is about to scan.
struct Scan {
    remote: NetnsGuard,
    svc: CgroupGuard,
    target: Ipv4Addr,
    policies: PolicyDir,
}

impl Scan {
    fn new(service: &str) -> Self {
        let remote = NetnsGuard::new();
        let svc = CgroupGuard::new();
        let target = remote.v4(2);
        let rule = Egress::to([target]).protocol("tcp");
        let policy = service_policy(&svc, "enforce", &[rule]);
        let policies = PolicyDir::with(&[(&format!("{service}.toml"), &policy)]);
        Self {
            remote,
            svc,
            target,
            policies,
        }
    }
}

#[test]
fn port_scan_against_a_namespace_host_is_reported_with_its_evidence() {
    if !require_bpf() {
        return;
    }
    let Scan {
        remote: _remote,
        svc,
        target,
        policies,
    } = Scan::new("scanner");
    let config = policies.path().join("bulkhead.toml.conf");
    let otlp = OtlpReceiver::start();
    let text = CONFIG.replace("OTLP", &otlp.addr.to_string());
    fs::write(&config, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    let mut daemon = Daemon::spawn_run(&[
        std::ffi::OsStr::new("--policy-dir"),
        policies.path().as_os_str(),
        std::ffi::OsStr::new("--config"),
        config.as_os_str(),
    ]);
    daemon.wait_ready();

    // Nothing listens there: each connect is allowed, then refused by the
    // host (RST). What counts is the attempt.
    let probe = probe!()
        .in_cgroup(svc.path())
        .step_timeout(Duration::from_secs(2));
    // One process for the whole scan: the window is 1 s, and a process
    // per port takes longer than that in the emulated 6.1 guest.
    let ports: Vec<SocketAddr> = (1..=SCANNED)
        .map(|port| SocketAddr::from((target, port)))
        .collect();
    probe
        .tcp_connect_each(&ports)
        .assert_ok("the scan (its connects' outcomes do not matter)");

    let ev = wait_event(&daemon, "a fan_out anomaly of service scanner", |ev| {
        ev["type"] == "anomaly" && ev["service"] == "scanner" && ev["anomaly"]["kind"] == "fan_out"
    });
    let a = &ev["anomaly"];
    assert_eq!(a["state"], "started", "{ev:#}");
    assert_eq!(a["count"], 1, "{ev:#}");
    assert_eq!(a["evidence"]["window_s"], 1, "{ev:#}");
    assert_eq!(a["evidence"]["baseline"], f64::from(MAX_PORTS), "{ev:#}");
    let observed = a["evidence"]["observed"].as_f64().unwrap_or(0.0);
    assert!(
        observed > f64::from(MAX_PORTS) && observed <= f64::from(SCANNED),
        "observed distinct ports {observed}, expected in ({MAX_PORTS}, {SCANNED}]: {ev:#}"
    );
    let samples = a["evidence"]["sample_destinations"]
        .as_array()
        .unwrap_or_else(|| panic!("sample_destinations is not a list: {ev:#}"));
    assert_eq!(samples.len(), 5, "{ev:#}");
    for s in samples {
        let s = s.as_str().unwrap_or_default();
        let port = s
            .strip_prefix(&format!("{target}:"))
            .and_then(|rest| rest.strip_suffix("/tcp"))
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("sample {s:?} is not {target}:PORT/tcp: {ev:#}"));
        assert!((1..=SCANNED).contains(&port), "sample {s} outside the scan");
    }
    assert_eq!(ev["hook"], "anomaly");
    assert_eq!(ev["schema"], "bulkhead.event.v2");

    let (status, _, body) = http_get(metrics_addr(&daemon), "/metrics");
    assert_eq!(status, 200, "{body}");
    // Counted under the event's severity.
    let severity = ev["anomaly"]["severity"].as_str().unwrap_or("?");
    let series = format!(
        r#"bulkhead_anomalies_total{{service="scanner",kind="fan_out",severity="{severity}"}} "#
    );
    let line = body
        .lines()
        .find(|l| l.starts_with(&series))
        .unwrap_or_else(|| panic!("no anomaly counter {series} in:\n{body}"));
    let n: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(n >= 1, "{line}");

    // The same anomaly, as an OTLP log record (only anomalies are exported).
    let (_, record) = otlp.wait_record(|r| r.event["anomaly"]["kind"] == "fan_out");
    assert_eq!(record.event_name, "bulkhead.anomaly", "{record:#?}");
    let bodies: Vec<Value> = otlp.records().into_iter().map(|r| r.event).collect();
    assert!(
        bodies.iter().all(|b| b["type"] == "anomaly"),
        "only anomalies are exported: {bodies:#?}"
    );
}

/// Ports of the sweep, and the fan-out limit it crosses (the default).
const SWEPT: u16 = 400;
const SWEEP_LIMIT: usize = 25;
/// The longest a crossed threshold may wait for its report.
const EARLY_REPORT: Duration = Duration::from_secs(5);

#[test]
fn a_port_sweep_is_reported_within_seconds_of_crossing_the_limit_not_at_the_interval_end() {
    if !require_bpf() {
        return;
    }
    let Scan {
        remote: _remote,
        svc,
        target,
        policies,
    } = Scan::new("sweeper");
    // One 60 s interval: the first interval's end comes 60 s after the
    // start, long after the sweep's report must have come.
    let started_ns = monotonic_ns();
    let daemon = Daemon::start_with_config(
        &policies,
        "[anomaly]\ninterval_s = 60\n[anomaly.fan_out]\nmax_ports = 25\n",
    );
    let ports: Vec<SocketAddr> = (1..=SWEPT)
        .map(|port| SocketAddr::from((target, port)))
        .collect();
    probe!()
        .in_cgroup(svc.path())
        .step_timeout(Duration::from_secs(2))
        .tcp_connect_each(&ports)
        .assert_ok("the sweep (its connects' outcomes do not matter)");

    let crossed_ns = port_scan_crossing_ns(&daemon, "sweeper", &target.to_string(), SWEEP_LIMIT);
    let ev = wait_anomaly(&daemon, "sweeper", "fan_out", Duration::from_secs(10));
    let reported_ns = ktime_ns(&ev);
    let delay = Duration::from_nanos(reported_ns.saturating_sub(crossed_ns));
    eprintln!("sweep: fan_out reported {delay:?} after the limit was crossed");
    assert!(
        reported_ns >= crossed_ns && delay <= EARLY_REPORT,
        "reported {delay:?} after the crossing (at most {EARLY_REPORT:?}): {ev:#}"
    );
    assert!(
        reported_ns < started_ns + 60_000_000_000,
        "reported after the first interval could have ended: {ev:#}"
    );
    let a = &ev["anomaly"];
    assert_eq!(a["state"], "started", "{ev:#}");
    assert_eq!(a["evidence"]["window_s"], 60, "{ev:#}");
    assert_eq!(a["evidence"]["baseline"], 25.0, "{ev:#}");
    let observed = a["evidence"]["observed"].as_f64().unwrap_or(0.0);
    assert!(
        observed > 25.0 && observed <= f64::from(SWEPT),
        "observed distinct ports {observed}: {ev:#}"
    );
    // Reported once so far: later checks of the same interval say nothing.
    std::thread::sleep(Duration::from_secs(3));
    let fan_outs: Vec<_> = anomalies(&daemon, "sweeper")
        .into_iter()
        .filter(|ev| ev["anomaly"]["kind"] == "fan_out")
        .collect();
    assert_eq!(fan_outs.len(), 1, "{fan_outs:#?}");
}

/// The pooled-connection case: an anomaly interval of 4 s over flow
/// summaries every second; 3 intervals of warm-up and baselines over about
/// 3 intervals, so the steady phase teaches the baseline in seconds.
const POOLED: &str = "\
[flows]
interval_secs = 1
[anomaly]
interval_s = 4
warmup_intervals = 3
baseline_intervals = 3
[anomaly.volume_spike]
factor = 5
min_bytes = 10000
";
const INTERVAL: Duration = Duration::from_secs(4);
/// One "query": its bytes, and how many a second, steady then 10x.
const QUERY: usize = 4000;
const STEADY_QPS: u32 = 1;
const SPIKE_QPS: u32 = 10;

#[test]
fn ten_times_the_queries_over_one_open_connection_is_a_volume_spike() {
    if !require_bpf() {
        return;
    }
    let db = conn!().sink(addr("127.0.0.1:0"));
    let svc = CgroupGuard::new();
    let rule = Egress::to(["127.0.0.1"])
        .ports([db.addr().port()])
        .protocol("tcp");
    let policies = PolicyDir::with(&[("orders.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let daemon = Daemon::start_with_config(&policies, POOLED);
    // One connection for the whole test: it never closes, so every byte the
    // detector sees comes from its per-interval summaries.
    let mut pool = conn!().in_cgroup(svc.path()).hold(db.addr());

    // Steady: warm-up, then three more intervals that must raise nothing
    // (factor 5 leaves room for the intervals' uneven share of summaries;
    // 10x the queries is well past it).
    pool.query_for(QUERY, STEADY_QPS, INTERVAL * 6);
    let steady = anomalies(&daemon, "orders");
    assert!(
        steady.is_empty(),
        "anomalies in the steady phase: {steady:#?}"
    );

    // 10x the queries, on the same connection, until the report (or long
    // after it was due).
    let rise_ns = monotonic_ns();
    let due = INTERVAL * 2 + Duration::from_secs(2);
    let start = std::time::Instant::now();
    while anomalies(&daemon, "orders").is_empty() && start.elapsed() < due * 2 {
        pool.query_for(QUERY, SPIKE_QPS, Duration::from_secs(1));
    }
    let ev = wait_anomaly(&daemon, "orders", "volume_spike", Duration::from_secs(1));
    let delay = Duration::from_nanos(ktime_ns(&ev).saturating_sub(rise_ns));
    eprintln!("pooled: volume_spike reported {delay:?} after the queries rose");
    // The first whole interval of the rise begins within one interval of its
    // start; its end, plus a summary's way (1 s) and a second of slack, is
    // when the report is due.
    assert!(
        delay <= due,
        "volume_spike {delay:?} after the rise (due within {due:?}): {ev:#}"
    );
    let a = &ev["anomaly"];
    assert_eq!(a["state"], "started", "{ev:#}");
    assert_eq!(
        a["evidence"]["sample_destinations"],
        serde_json::json!([format!("{}/tcp", db.addr())]),
        "{ev:#}"
    );
    let (baseline, observed) = (
        a["evidence"]["baseline"].as_f64().unwrap_or(0.0),
        a["evidence"]["observed"].as_f64().unwrap_or(0.0),
    );
    // The baseline is the steady connection's bytes per interval (4 s of
    // 4,000-byte queries, about 16 kB), not zero: it was learnt from the
    // open connection too.
    assert!(
        (8_000.0..=32_000.0).contains(&baseline) && observed >= 5.0 * baseline,
        "baseline {baseline}, observed {observed}: {ev:#}"
    );
    let others: Vec<_> = anomalies(&daemon, "orders")
        .into_iter()
        .filter(|ev| ev["anomaly"]["kind"] != "volume_spike")
        .collect();
    assert!(others.is_empty(), "only the volume spike: {others:#?}");
}
