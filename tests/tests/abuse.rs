//! What a local user can do to the daemon through its metrics listener
//! (issue 15): none of it may reach enforcement or the control socket.

use std::{
    io::Read as _,
    time::{Duration, Instant},
};

use integration_tests::{
    addr,
    control::{assert_success, quarantine},
    http::{hold_idle, http_get, http_request, metrics_addr},
    probe,
    process::{raise_own_nofile, set_nofile},
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, Egress, Enforced, Proto,
};

/// Idle connections held on the metrics port: more than systemd's default
/// soft limit of open files (1024) that the daemon is given below.
const IDLE: usize = 1100;
/// systemd's default soft `LimitNOFILE` for a service that sets none.
const SYSTEMD_DEFAULT_NOFILE: u64 = 1024;
/// What the issue asks of `bulkhead quarantine` under that load.
const QUARANTINE_BOUND: Duration = Duration::from_secs(5);

/// 1,100 idle connections to the metrics port of a daemon limited to 1024
/// open files: `bulkhead quarantine` still answers within 5 s and the
/// quarantined service's next `connect()` gets EPERM.
#[test]
fn idle_metrics_connections_leave_quarantine_working() {
    if !require_bpf() {
        return;
    }
    let server = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let rules = [Egress::to(["127.0.0.1"]).ports([server.port()])];
    let web = Enforced::start("web.toml", |web| service_policy(web, "enforce", &rules));
    let daemon = &web.daemon;
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    set_nofile(pid, SYSTEMD_DEFAULT_NOFILE);
    let client = web.client(&probe!());
    client
        .tcp_connect(server.addr())
        .assert_ok("allowed before the quarantine");

    raise_own_nofile(u64::try_from(IDLE).unwrap_or(u64::MAX) + 256);
    let idle = hold_idle(metrics_addr(daemon), IDLE);

    let asked = Instant::now();
    let out = quarantine(daemon, "web", &[]);
    let took = asked.elapsed();
    // For the record (docs/testing.md): what the load cost the daemon.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    eprintln!("quarantine answered in {took:?}; the daemon had {fds} files open");
    assert_success(&out, "bulkhead quarantine web");
    assert!(
        took < QUARANTINE_BOUND,
        "bulkhead quarantine took {took:?} with {IDLE} idle metrics connections"
    );
    client
        .tcp_connect(server.addr())
        .assert_eperm("quarantined while the metrics port is held");
    drop(idle);
}

/// A request naming a host that is not an address, `localhost` or listed
/// (what a DNS-rebound page sends) gets 421 and is counted.
#[test]
fn a_foreign_host_header_is_refused() {
    if !require_bpf() {
        return;
    }
    let web = Enforced::start("web.toml", |web| service_policy(web, "enforce", &[]));
    let daemon = &web.daemon;
    let metrics = metrics_addr(daemon);
    let port = metrics.port();
    for path in ["/graph.json", "/metrics"] {
        let (status, _, body) = http_request(
            metrics,
            &format!("GET {path} HTTP/1.0\r\nHost: rebound.example:{port}\r\n\r\n"),
        );
        assert_eq!(status, 421, "GET {path} as rebound.example: {body}");
    }
    let (status, _, body) = http_request(
        metrics,
        &format!("GET /healthz HTTP/1.0\r\nHost: localhost:{port}\r\n\r\n"),
    );
    assert_eq!(status, 200, "localhost: {body}");
    let refused = sample_count(
        &scrape(metrics),
        "bulkhead_http_refused_total",
        &[("reason", "host")],
    );
    assert_eq!(refused, Some(2));
}

/// A connection that sends nothing is closed by the daemon after the
/// header timeout (5 s), not held.
#[test]
fn an_idle_connection_is_closed_after_the_header_timeout() {
    if !require_bpf() {
        return;
    }
    let web = Enforced::start("web.toml", |web| service_policy(web, "enforce", &[]));
    let daemon = &web.daemon;
    let mut idle = hold_idle(metrics_addr(daemon), 1);
    let conn = &mut idle[0];
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap_or_else(|e| panic!("set_read_timeout: {e}"));
    let from = Instant::now();
    let mut buf = [0u8; 64];
    let read = conn.read(&mut buf);
    let after = from.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "expected the daemon to close the idle connection, got {read:?} after {after:?}"
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(8)).contains(&after),
        "closed after {after:?}, not about 5 s"
    );
}

/// Two `/graph.json` requests within the cache's second are one rendering:
/// the same body, and the rendering counter moves once.
#[test]
fn graph_requests_within_a_second_are_served_from_one_rendering() {
    if !require_bpf() {
        return;
    }
    let web = Enforced::start("web.toml", |web| service_policy(web, "enforce", &[]));
    let daemon = &web.daemon;
    let metrics = metrics_addr(daemon);
    let renders = || {
        sample_count(&scrape(metrics), "bulkhead_http_graph_renders_total", &[])
            .unwrap_or_else(|| panic!("no bulkhead_http_graph_renders_total"))
    };
    let before = renders();
    let (status, _, first) = http_get(metrics, "/graph.json");
    assert_eq!(status, 200, "{first}");
    let (status, _, second) = http_get(metrics, "/graph.json");
    assert_eq!(status, 200, "{second}");
    assert_eq!(first, second, "the second request was rendered again");
    assert_eq!(renders() - before, 1);
}
