//! The metrics endpoint against a real kernel: exact counter deltas for the
//! connections a probe makes, and lost events counted exactly when the
//! consumer is held back on purpose (the daemon stopped with `SIGSTOP`).

use std::{ffi::OsStr, fs, net::SocketAddr, thread, time::Duration};

use integration_tests::{
    addr, bulkhead, eventually, http::metrics_addr, probe, process::signal, prometheus::Scrape,
    require_bpf, service_policy, CgroupGuard, Daemon, Egress, PolicyDir, ProgSnapshot, Proto,
};

/// How long the consumer (or the cgroup rescan) may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(10);

/// `bulkhead run ARGS` (plus the harness's own isolating flags), ready.
fn start_daemon(args: &[&OsStr]) -> Daemon {
    let mut daemon = Daemon::spawn_run(args);
    daemon.wait_ready();
    daemon
}

/// `GET path` on the metrics endpoint: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _head, body) = integration_tests::http::http_get(addr, path);
    (status, body)
}

/// Scrapes until `done` holds, for at most [`CATCH_UP`]; returns the last
/// scrape either way (the caller asserts on it).
fn scrape_until(addr: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(CATCH_UP, Duration::from_millis(50), || {
        let scrape = Scrape::get(addr);
        if done(&scrape) {
            Ok(scrape)
        } else {
            Err(scrape)
        }
    })
    .unwrap_or_else(|last| last)
}

const CONNECTIONS: &str = "bulkhead_connections_total";
const RECEIVED: &str = "bulkhead_events_received_total";
const LOST: &str = "bulkhead_events_lost_total";
const VERDICT_EVENTS: [(&str, &str); 1] = [("type", "verdict")];
const LOST_IN_RINGBUF: [(&str, &str); 1] = [("source", "kernel_ringbuf_verdict")];

/// Labels of an egress `bulkhead_connections_total` series.
fn egress<'a>(service: &'a str, protocol: &'a str, verdict: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("service", service),
        ("direction", "egress"),
        ("protocol", protocol),
        ("verdict", verdict),
    ]
}

/// SIGCONTs the daemon on `Drop`, so a panic while it is stopped cannot
/// leave it stopped (it could not handle the guard's SIGTERM then).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn connection_counters_move_by_exactly_the_connections_made() {
    if !require_bpf() {
        return;
    }
    let billing = CgroupGuard::new();
    let audited = CgroupGuard::new();
    let late = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let policies = three_services(&billing, &audited, &late, allowed.port());
    let daemon = start_daemon(&[OsStr::new("--policy-dir"), policies.path().as_os_str()]);
    let metrics = metrics_addr(&daemon);

    let (status, body) = http_get(metrics, "/healthz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/healthz while running"
    );
    assert_eq!(http_get(metrics, "/nothing-here").0, 404, "unknown path");

    let before = Scrape::get(metrics);
    let expected: [([(&str, &str); 4], u64); 4] = [
        (egress("billing", "tcp", "allow"), 5),
        (egress("billing", "tcp", "deny"), 3),
        (egress("billing", "udp", "deny"), 2),
        (egress("audited", "tcp", "audit"), 2),
    ];
    let client = probe!().in_cgroup(billing.path());
    for _ in 0..expected[0].1 {
        client
            .tcp_connect(allowed.addr())
            .assert_ok("billing's allowed port");
    }
    for _ in 0..expected[1].1 {
        client
            .tcp_connect(denied.addr())
            .assert_eperm("billing's unlisted TCP port");
    }
    for _ in 0..expected[2].1 {
        client
            .udp_sendto(udp.addr())
            .assert_eperm("billing's unlisted UDP port");
    }
    let client = probe!().in_cgroup(audited.path());
    for _ in 0..expected[3].1 {
        client
            .tcp_connect(allowed.addr())
            .assert_ok("audit mode lets it through");
    }
    let decisions: u64 = expected.iter().map(|(_, n)| n).sum();

    // The kernel counts before connect() returns; the events follow.
    let after = scrape_until(metrics, |s| {
        s.count(RECEIVED, &VERDICT_EVENTS) >= before.count(RECEIVED, &VERDICT_EVENTS) + decisions
    });
    assert_connection_deltas(&before, &after, &expected);
    assert_eq!(
        after.delta(&before, RECEIVED, &VERDICT_EVENTS),
        decisions,
        "one verdict event per attempt"
    );
    thread::sleep(Duration::from_millis(300));
    let settled = Scrape::get(metrics);
    assert_eq!(
        settled.delta(&before, RECEIVED, &VERDICT_EVENTS),
        decisions,
        "no further verdict events arrive"
    );
    for source in ["kernel_ringbuf_verdict", "decode"] {
        assert_eq!(
            settled.delta(&before, LOST, &[("source", source)]),
            0,
            "events lost at {source} with a large ring buffer"
        );
    }
    assert_inventory_and_process(&settled);

    assert_late_service_is_managed(metrics, &late);
    drop(daemon);
}

/// billing (enforce) may reach `allowed_port` on loopback by TCP only;
/// audited (audit) may reach only 192.0.2.1:443, which no test traffic goes
/// to; waiting names `late`'s child `later`, which does not exist yet.
fn three_services(
    billing: &CgroupGuard,
    audited: &CgroupGuard,
    late: &CgroupGuard,
    allowed_port: u16,
) -> PolicyDir {
    let only_allowed = [Egress::to(["127.0.0.1"])
        .ports([allowed_port])
        .protocol("tcp")];
    let elsewhere = [Egress::to(["192.0.2.1"]).ports([443]).protocol("tcp")];
    PolicyDir::with(&[
        (
            "billing.toml",
            &service_policy(billing, "enforce", &only_allowed),
        ),
        (
            "audited.toml",
            &service_policy(audited, "audit", &elsewhere),
        ),
        // A cgroup that does not exist yet: the service waits for it.
        (
            "waiting.toml",
            &format!(
                "cgroup = \"{}/later\"\nmode = \"enforce\"\n",
                late.policy_path()
            ),
        ),
    ])
}

/// Each `expected` series moved by exactly its count; every other series
/// of the same services did not move.
fn assert_connection_deltas(
    before: &Scrape,
    after: &Scrape,
    expected: &[([(&str, &str); 4], u64)],
) {
    for (labels, n) in expected {
        assert_eq!(
            after.delta(before, CONNECTIONS, labels),
            *n,
            "{CONNECTIONS}{labels:?}"
        );
    }
    for service in ["billing", "audited"] {
        let series = after.label_sets(CONNECTIONS, ("service", service));
        assert_eq!(
            series.len(),
            12,
            "2 directions x 2 protocols x 3 verdicts of {service}"
        );
        for labels in series {
            let moved = expected
                .iter()
                .any(|(l, _)| l.iter().all(|pair| labels.contains(pair)));
            if !moved {
                assert_eq!(after.delta(before, CONNECTIONS, &labels), 0, "{labels:?}");
            }
        }
    }
}

/// The waiting service's cgroup appears: the daemon manages it (the
/// periodic rescan), and the metrics say so.
fn assert_late_service_is_managed(metrics: SocketAddr, late: &CgroupGuard) {
    let _later = late.child("later");
    let managed = scrape_until(metrics, |s| {
        s.count("bulkhead_services", &[("state", "managed")]) >= 3
    });
    assert_eq!(
        managed.count("bulkhead_services", &[("state", "managed")]),
        3
    );
    assert_eq!(
        managed.count("bulkhead_services", &[("state", "waiting")]),
        0
    );
    // The info series keeps its labels; the state gauge moves.
    let info = [("service", "waiting"), ("mode", "enforce")];
    assert_eq!(managed.count("bulkhead_service_info", &info), 1);
    let state = |s: &'static str| [("service", "waiting"), ("state", s)];
    assert_eq!(
        managed.count("bulkhead_service_state", &state("managed")),
        1
    );
    assert_eq!(
        managed.count("bulkhead_service_state", &state("waiting")),
        0
    );
    assert_eq!(
        managed.count("bulkhead_bpf_map_entries", &[("map", "SERVICES")]),
        3
    );
}

fn assert_inventory_and_process(s: &Scrape) {
    assert_eq!(s.count("bulkhead_services", &[("state", "managed")]), 2);
    assert_eq!(s.count("bulkhead_services", &[("state", "waiting")]), 1);
    assert_eq!(
        s.count("bulkhead_policy_rules", &[("service", "billing")]),
        1
    );
    assert_eq!(
        s.count("bulkhead_policy_rules", &[("service", "waiting")]),
        0
    );
    let audited = [("service", "audited"), ("mode", "audit")];
    assert_eq!(s.count("bulkhead_service_info", &audited), 1);
    let state =
        |service: &'static str, state: &'static str| [("service", service), ("state", state)];
    assert_eq!(
        s.count("bulkhead_service_state", &state("audited", "managed")),
        1
    );
    // The same info series as once it is managed (assert_late_service_is_managed).
    let waiting_info = [("service", "waiting"), ("mode", "enforce")];
    assert_eq!(s.count("bulkhead_service_info", &waiting_info), 1);
    assert_eq!(
        s.count("bulkhead_service_state", &state("waiting", "waiting")),
        1
    );
    assert_eq!(
        s.count("bulkhead_service_state", &state("waiting", "managed")),
        0
    );
    assert_eq!(
        s.count("bulkhead_bpf_map_entries", &[("map", "SERVICES")]),
        2
    );
    assert_eq!(s.count("bulkhead_programs_attached", &[]), 1);
    assert_eq!(s.count("bulkhead_event_consumer_alive", &[]), 1);
    assert!(
        s.series()
            .keys()
            .any(|(name, labels)| name == "bulkhead_build_info"
                && labels.iter().any(|(k, _)| k == "version")),
        "bulkhead_build_info{{version}} in\n{}",
        s.text()
    );
    assert!(s.count("process_resident_memory_bytes", &[]) > 0);
    assert!(s.count("process_open_fds", &[]) > 0);
    assert!(s.real("process_cpu_seconds_total", &[]) > 0.0);
    assert!(s.real("process_start_time_seconds", &[]) > 1e9);
}

#[test]
fn lost_events_are_counted_exactly_when_the_consumer_is_held_back() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[("held.toml", &service_policy(&svc, "enforce", &[]))]);
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // The smallest ring buffer: 4096 bytes, about 24 records.
    let config = work.path().join("bulkhead.toml");
    fs::write(
        &config,
        format!(
            "policy_dir = {:?}\n[events]\nring_buffer_bytes = 4096\n",
            policies.path()
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    let daemon = start_daemon(&[OsStr::new("--config"), config.as_os_str()]);
    let metrics = metrics_addr(&daemon);
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon has no pid"));

    let denials = egress("held", "tcp", "deny");
    let before = Scrape::get(metrics);
    let attempts: u64 = 300;
    {
        assert!(
            signal(pid, libc::SIGSTOP),
            "cannot SIGSTOP the daemon ({pid})"
        );
        let _resume = Resume(pid);
        let client = probe!().in_cgroup(svc.path());
        for _ in 0..attempts {
            client
                .tcp_connect(denied.addr())
                .assert_eperm("denied while the daemon is stopped (the kernel still enforces)");
        }
    }

    let after = scrape_until(metrics, |s| {
        s.delta(&before, RECEIVED, &VERDICT_EVENTS) + s.delta(&before, LOST, &LOST_IN_RINGBUF)
            >= attempts
    });
    let received = after.delta(&before, RECEIVED, &VERDICT_EVENTS);
    let lost = after.delta(&before, LOST, &LOST_IN_RINGBUF);
    assert_eq!(
        after.delta(&before, CONNECTIONS, &denials),
        attempts,
        "the kernel counted every denial"
    );
    assert!(
        lost > 0,
        "a 4 KiB ring buffer cannot hold {attempts} records: some must be lost (received {received})"
    );
    assert!(
        received > 0,
        "the records that fit are delivered after SIGCONT"
    );
    assert_eq!(
        received + lost,
        attempts,
        "every decision is either received or counted as lost (received {received}, lost {lost})"
    );
    assert_eq!(
        after.delta(&before, LOST, &[("source", "decode")]),
        0,
        "no undecodable records"
    );
    let (status, body) = http_get(metrics, "/healthz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/healthz after SIGCONT"
    );
    drop(daemon);
}

#[test]
fn a_taken_metrics_address_stops_the_daemon_before_it_loads_anything() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let config = work.path().join("bulkhead.toml");
    fs::write(&config, "# all defaults\n")
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    // Held until the end of the test, so the port stays taken.
    let holder = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    let taken = holder
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .to_string();
    let before = ProgSnapshot::take();
    let out = bulkhead(&[
        OsStr::new("run"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--policy-dir"),
        policies.path().as_os_str(),
        OsStr::new("--events"),
        work.path().join("events.jsonl").as_os_str(),
        OsStr::new("--control-socket"),
        work.path().join("control.sock").as_os_str(),
        OsStr::new("--metrics-listen"),
        OsStr::new(&taken),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "bulkhead run must refuse a taken metrics address ({}): {stderr}",
        out.status
    );
    let expected = format!("cannot listen for metrics on {taken}");
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in: {stderr}"
    );
    let orphans = before.orphans_since(Duration::from_secs(5));
    assert!(orphans.is_empty(), "programs left behind: {orphans:?}");
    drop(holder);
}

#[test]
fn counters_carry_over_policy_reloads() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let rule = Egress::to(["127.0.0.1"])
        .ports([allowed.port()])
        .protocol("tcp");
    let policies = PolicyDir::with(&[(
        "svc.toml",
        &service_policy(&svc, "enforce", std::slice::from_ref(&rule)),
    )]);
    let daemon = start_daemon(&[OsStr::new("--policy-dir"), policies.path().as_os_str()]);
    let metrics = metrics_addr(&daemon);
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon has no pid"));
    let client = probe!().in_cgroup(svc.path());
    let allow = egress("svc", "tcp", "allow");
    let deny = egress("svc", "tcp", "deny");
    let changes = [("type", "policy_change")];
    let before = Scrape::get(metrics);
    let mut expected = (0, 0);
    let mut connect = |allowed_n: u64, denied_n: u64| {
        for _ in 0..allowed_n {
            client.tcp_connect(allowed.addr()).assert_ok("allowed port");
        }
        for _ in 0..denied_n {
            client
                .tcp_connect(denied.addr())
                .assert_eperm("unlisted port");
        }
        expected = (expected.0 + allowed_n, expected.1 + denied_n);
        expected
    };

    let mut now = connect(3, 1);
    // Each reload stages the policy in the other half of the maps, where
    // the service gets another id and other kernel counters.
    for (round, rules) in [2_u64, 1, 2].into_iter().enumerate() {
        let round = u64::try_from(round).unwrap_or(u64::MAX) + 1;
        let mut list = vec![rule.clone()];
        if rules == 2 {
            list.push(Egress::to(["192.0.2.1"]).ports([443]).protocol("tcp"));
        }
        policies.write("svc.toml", &service_policy(&svc, "enforce", &list));
        assert!(
            signal(pid, libc::SIGHUP),
            "cannot SIGHUP the daemon ({pid})"
        );
        let reloaded = scrape_until(metrics, |s| {
            s.delta(&before, RECEIVED, &changes) >= round
                && s.count("bulkhead_policy_rules", &[("service", "svc")]) == rules
        });
        assert_eq!(
            reloaded.count("bulkhead_policy_rules", &[("service", "svc")]),
            rules,
            "reload {round} applied"
        );
        let counted = (
            reloaded.delta(&before, CONNECTIONS, &allow),
            reloaded.delta(&before, CONNECTIONS, &deny),
        );
        assert_eq!(counted, now, "(allowed, denied) right after reload {round}");
        now = connect(2, 1);
        let after = Scrape::get(metrics);
        let counted = (
            after.delta(&before, CONNECTIONS, &allow),
            after.delta(&before, CONNECTIONS, &deny),
        );
        assert_eq!(counted, now, "(allowed, denied) after reload {round}");
    }
    drop(daemon);
}
