//! Flows, not calls (issue 17, docs/events.md "Flows"): the kernel counts a
//! flow's repeated calls, the decision log gets its first call as a
//! `verdict` record and the rest as `flow` summaries, and the counts add up
//! to exactly the calls made: allowed or denied, with a table too small to
//! hold every flow, and with TCP connections still reported one by one.

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    addr, bulkhead, conn,
    control::SharedPins,
    events::{calls_of, wait_calls, wait_counted},
    free_port_block,
    http::metrics_addr,
    probe,
    prometheus::Scrape,
    require_bpf, service_policy, CgroupGuard, Daemon, Egress, PolicyDir,
};
use serde_json::Value;

/// Summaries every second, so a test waits about one.
const CONFIG: &str = "[flows]\ninterval_secs = 1\nidle_timeout_secs = 30\n";
/// How long every call may take to be reported (a debug build of the agent
/// on a loaded machine), and the wait after for a call too many: two sweeps.
const REPORTED: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_millis(2500);

/// The events of `service` to `port` that report calls (records and summaries).
fn flow_events(service: &str, port: u16) -> impl Fn(&Value) -> bool + '_ {
    move |ev| {
        ev["service"] == service
            && ev["dst_port"] == port
            && (ev["type"] == "verdict" || ev["type"] == "flow")
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|ev| ev["type"] == kind).collect()
}

/// (`bytes_sent`, `bytes_received`) of the connection from `local_port`: its
/// byte summaries (`flow` from `sock_ops`) with `kind` `flow`, its close
/// with `tcp_closed`.
fn tcp_bytes(daemon: &Daemon, kind: &str, local_port: u16) -> Vec<(u64, u64)> {
    integration_tests::events::events(daemon)
        .iter()
        .filter(|ev| ev["type"] == kind && ev["hook"] == "sock_ops" && ev["src_port"] == local_port)
        .map(|ev| {
            (
                ev["bytes_sent"].as_u64().unwrap_or(u64::MAX),
                ev["bytes_received"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Asserts that each byte summary of the connection from `local_port`
/// names the executable that made it (`bulkhead-conn`), as its
/// `tcp_established` does.
fn assert_summaries_name_the_exe(daemon: &Daemon, local_port: u16) {
    let events = integration_tests::events::events(daemon);
    let summaries: Vec<&Value> = events
        .iter()
        .filter(|ev| {
            ev["type"] == "flow" && ev["hook"] == "sock_ops" && ev["src_port"] == local_port
        })
        .collect();
    assert!(!summaries.is_empty());
    for ev in summaries {
        assert!(
            ev["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/bulkhead-conn")),
            "a summary without its executable: {ev}"
        );
    }
}

/// [`tcp_bytes`] once there are at least `n`.
fn wait_tcp_bytes(daemon: &Daemon, kind: &str, local_port: u16, n: usize) -> Vec<(u64, u64)> {
    integration_tests::eventually(REPORTED, Duration::from_millis(100), || {
        let found = tcp_bytes(daemon, kind, local_port);
        if found.len() >= n {
            Ok(found)
        } else {
            Err(found)
        }
    })
    .unwrap_or_else(|found| panic!("{n} {kind} records of the connection: {found:?}"))
}

fn loopback_ports(n: u16) -> (u16, SocketAddr) {
    let first = free_port_block(addr("127.0.0.1:0").ip(), n);
    (first, addr(&format!("127.0.0.1:{first}")))
}

/// A service allowed `udp` to the first of `allowed` ports from `first`,
/// its agent summarising every second.
fn udp_service(
    name: &str,
    first: u16,
    allowed: u16,
    config: &str,
) -> (CgroupGuard, PolicyDir, Daemon) {
    let svc = CgroupGuard::new();
    let rule = Egress::to(["127.0.0.1"])
        .ports([format!("{first}-{}", first + allowed - 1)])
        .protocol("udp");
    let policies = PolicyDir::with(&[(
        &format!("{name}.toml"),
        &service_policy(&svc, "enforce", &[rule]),
    )]);
    let daemon = Daemon::start_with_config(&policies, config);
    (svc, policies, daemon)
}

#[test]
fn five_thousand_sendto_to_one_destination_are_one_record_and_exact_summaries() {
    if !require_bpf() {
        return;
    }
    let (port, target) = loopback_ports(1);
    let (svc, _policies, daemon) = udp_service("statsd", port, 1, CONFIG);
    let (sent, eperm) = conn!().in_cgroup(svc.path()).udp_sendto(5000, 1, target);
    assert_eq!((sent, eperm), (5000, 0), "every datagram is allowed");

    let events = wait_calls(
        &daemon,
        "allowed sendto",
        5000,
        REPORTED,
        SETTLE,
        flow_events("statsd", port),
    );
    assert_eq!(
        calls_of(&events),
        5000,
        "the records and summaries report every call exactly once: {events:#?}"
    );
    let verdicts = of_type(&events, "verdict");
    assert_eq!(
        verdicts.len(),
        1,
        "one record, the flow's first call: {verdicts:#?}"
    );
    assert_eq!(verdicts[0]["calls"], 1);
    assert_eq!(verdicts[0]["verdict"], "allow");
    assert_eq!(verdicts[0]["hook"], "sendmsg");
    let summaries = of_type(&events, "flow");
    assert!(
        !summaries.is_empty() && summaries.len() <= 20,
        "a handful of summaries (one a second at most): {}",
        summaries.len()
    );
    for s in &summaries {
        assert_eq!(s["verdict"], "allow", "{s}");
        assert_eq!(s["rule"], verdicts[0]["rule"], "{s}");
        assert_eq!(s["pid"], verdicts[0]["pid"], "{s}");
        assert_eq!(s["src_port"], verdicts[0]["src_port"], "{s}");
    }
    // The kernel's own counter (every decision) agrees.
    let scrape = Scrape::get(metrics_addr(&daemon));
    let labels = [
        ("service", "statsd"),
        ("direction", "egress"),
        ("protocol", "udp"),
        ("verdict", "allow"),
    ];
    assert_eq!(scrape.count("bulkhead_connections_total", &labels), 5000);
}

#[test]
fn five_thousand_denied_sendto_are_one_record_and_exact_summaries() {
    if !require_bpf() {
        return;
    }
    // Allowed: the port after; denied: this one.
    let (port, target) = loopback_ports(2);
    let (svc, _policies, daemon) = udp_service("denied", port + 1, 1, CONFIG);
    let (sent, eperm) = conn!().in_cgroup(svc.path()).udp_sendto(5000, 1, target);
    assert_eq!((sent, eperm), (0, 5000), "every datagram is refused");

    let events = wait_calls(
        &daemon,
        "denied sendto",
        5000,
        REPORTED,
        SETTLE,
        flow_events("denied", port),
    );
    assert_eq!(calls_of(&events), 5000, "{events:#?}");
    let verdicts = of_type(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "one denial record: {verdicts:#?}");
    assert_eq!(verdicts[0]["verdict"], "deny");
    assert_eq!(verdicts[0]["rule"], "denied.toml#default-deny");
    assert_eq!(
        verdicts[0]["suppressed"], 0,
        "the flow's other denials are counted in its summaries, not as suppressed"
    );
    for s in of_type(&events, "flow") {
        assert_eq!(s["verdict"], "deny", "{s}");
    }
    let scrape = Scrape::get(metrics_addr(&daemon));
    let labels = [
        ("service", "denied"),
        ("direction", "egress"),
        ("protocol", "udp"),
        ("verdict", "deny"),
    ];
    assert_eq!(scrape.count("bulkhead_connections_total", &labels), 5000);
    assert!(
        scrape
            .label_sets("bulkhead_events_suppressed_total", ("service", "denied"))
            .is_empty(),
        "no denial was held back by the rate limit: the flow counted them"
    );
}

#[test]
fn a_flow_table_too_small_for_the_flows_still_reports_every_call() {
    const PORTS: u16 = 40;
    const PER_PORT: u64 = 50;
    if !require_bpf() {
        return;
    }
    let (first, target) = loopback_ports(PORTS);
    let config = format!("{CONFIG}table_size = 16\n");
    let (svc, _policies, daemon) = udp_service("crowded", first, PORTS, &config);
    // Round robin over the ports: 40 flows at once in a table of 16.
    let (sent, eperm) =
        conn!()
            .in_cgroup(svc.path())
            .udp_sendto(u64::from(PORTS) * PER_PORT, PORTS, target);
    assert_eq!((sent, eperm), (u64::from(PORTS) * PER_PORT, 0));

    let all = wait_calls(
        &daemon,
        "sendto over 40 ports",
        u64::from(PORTS) * PER_PORT,
        REPORTED,
        SETTLE,
        |ev| ev["service"] == "crowded" && (ev["type"] == "verdict" || ev["type"] == "flow"),
    );
    for port in first..first + PORTS {
        let of_port: Vec<Value> = all
            .iter()
            .filter(|ev| ev["dst_port"] == port)
            .cloned()
            .collect();
        assert_eq!(
            calls_of(&of_port),
            PER_PORT,
            "port {port}: every call reported once: {of_port:#?}"
        );
    }
    let scrape = Scrape::get(metrics_addr(&daemon));
    assert_eq!(scrape.count("bulkhead_flow_table_capacity", &[]), 16);
    assert!(
        scrape.count("bulkhead_flow_table_full_total", &[]) > 0,
        "calls that found no room are counted"
    );
    // 16 flows in the table, at most 8 carried across a sweep: the rest
    // were let go (their calls all reported above), and counted.
    assert!(
        scrape.count("bulkhead_flows_ended_total", &[("reason", "evicted")]) > 0,
        "evictions are counted"
    );
}

/// Denials of more new flows than a tiny table holds, faster than the rate
/// limit on denial records (100 a second per service, direction and CPU;
/// the sender runs on one CPU, as the limit's state is per CPU): a call
/// that finds no room is a record of its own or, past the limit, counted
/// as suppressed, and the next record the limit lets through carries that
/// count. So the records' and summaries' calls plus the records'
/// suppressed counts add up to the calls made.
#[test]
fn denials_that_find_the_flow_table_full_past_the_rate_limit_are_all_counted() {
    const PORTS: u16 = 40;
    const PER_PORT: u64 = 50;
    if !require_bpf() {
        return;
    }
    // Ports first..first+39 flooded, first+40 the one allowed (never
    // called), first+41 the last denial.
    let (first, target) = loopback_ports(PORTS + 2);
    let config = format!("{CONFIG}table_size = 16\n");
    let (svc, _policies, daemon) = udp_service("crowded_denied", first + PORTS, 1, &config);
    let sender = conn!().in_cgroup(svc.path()).on_cpu(0);
    let flood = u64::from(PORTS) * PER_PORT;
    assert_eq!(sender.udp_sendto(flood, PORTS, target), (0, flood));
    // A new second of the rate limit, then one more denial on that CPU.
    std::thread::sleep(Duration::from_millis(1100));
    let last = addr(&format!("127.0.0.1:{}", first + PORTS + 1));
    assert_eq!(sender.udp_sendto(1, 1, last), (0, 1));

    let ours = |ev: &Value| {
        let port = ev["dst_port"].as_u64();
        ev["service"] == "crowded_denied"
            && (ev["type"] == "verdict" || ev["type"] == "flow")
            && port.is_none_or(|p| p != u64::from(first + PORTS))
    };
    let counted = |events: &[Value]| {
        calls_of(events)
            + of_type(events, "verdict")
                .iter()
                .map(|ev| ev["suppressed"].as_u64().unwrap_or(0))
                .sum::<u64>()
    };
    let made = flood + 1;
    let settled = wait_counted(&daemon, "denials", made, counted, REPORTED, SETTLE, ours);
    assert_eq!(counted(&settled), made, "{settled:#?}");
    let last_record = of_type(&settled, "verdict")
        .into_iter()
        .find(|ev| ev["dst_port"] == first + PORTS + 1)
        .unwrap_or_else(|| panic!("no record of the last denial: {settled:#?}"));
    assert!(
        last_record["suppressed"].as_u64().unwrap_or(0) > 0,
        "the last denial's record carries the held-back ones: {last_record}"
    );
}

#[test]
fn tcp_connections_keep_their_own_records_and_the_connects_are_one_flow() {
    if !require_bpf() {
        return;
    }
    let server = conn!().sink(addr("127.0.0.1:0"));
    let port = server.addr().port();
    let svc = CgroupGuard::new();
    let rule = Egress::to(["127.0.0.1"]).ports([port]).protocol("tcp");
    let policies = PolicyDir::with(&[("pool.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let daemon = Daemon::start_with_config(&policies, CONFIG);
    let looping = conn!()
        .in_cgroup(svc.path())
        .connect_loop(&[server.addr()], Duration::from_millis(5));
    let _first = looping.wait_attempt(Duration::from_secs(10), |_| true);
    while looping.count() < 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let attempts = looping.stop();
    let made = attempts.len() as u64;
    assert!(
        attempts.iter().all(|a| a.verdict == conn::Verdict::Ok),
        "every connect is allowed: {attempts:?}"
    );

    let events = wait_calls(
        &daemon,
        "TCP connects",
        made,
        REPORTED,
        SETTLE,
        flow_events("pool", port),
    );
    assert_eq!(calls_of(&events), made, "{events:#?}");
    assert_eq!(
        of_type(&events, "verdict").len(),
        1,
        "one record for the connects"
    );
    // Each connection is still reported established and closed, with its bytes.
    let all = integration_tests::events::events(&daemon);
    let lifecycle = |kind: &str| {
        all.iter()
            .filter(|ev| ev["type"] == kind && ev["service"] == "pool" && ev["dst_port"] == port)
            .count() as u64
    };
    assert_eq!(lifecycle("tcp_established"), made);
    assert_eq!(lifecycle("tcp_closed"), made);
}

#[test]
fn an_open_tcp_connection_reports_its_bytes_each_interval() {
    if !require_bpf() {
        return;
    }
    let (server, svc, _policies, daemon) = tcp_service("pooled");
    let mut held = conn!().in_cgroup(svc.path()).hold(server.addr());
    let local_port = held.local().port();
    let wait_summaries = |n: usize| wait_tcp_bytes(&daemon, "flow", local_port, n);

    held.send(&"a".repeat(1000));
    assert_eq!(
        wait_summaries(1),
        vec![(1000, 0)],
        "the interval's payload, SYN excluded"
    );
    assert_summaries_name_the_exe(&daemon, local_port);
    held.send(&"b".repeat(500));
    assert_eq!(wait_summaries(2), vec![(1000, 0), (500, 0)]);
    std::thread::sleep(SETTLE);
    assert_eq!(
        tcp_bytes(&daemon, "flow", local_port).len(),
        2,
        "a quiet interval has no summary"
    );

    // 200 more, then the close: its total (1,700) carries what the
    // summaries reported, and the graph adds each byte once.
    held.send(&"c".repeat(200));
    drop(held);
    let edge_bytes = || -> Option<u64> {
        let out = bulkhead(&[
            "graph".as_ref(),
            "--format".as_ref(),
            "json".as_ref(),
            "--socket".as_ref(),
            daemon.control_socket().as_os_str(),
        ]);
        let graph: Value = serde_json::from_slice(&out.stdout).ok()?;
        let dest = server.addr().to_string() + "/tcp";
        graph["edges"]
            .as_array()?
            .iter()
            .find(|e| e["from"] == "service:pooled" && e["dest"] == dest.as_str())?["bytes_sent"]
            .as_u64()
    };
    let closed = integration_tests::eventually(REPORTED, Duration::from_millis(200), || {
        match edge_bytes() {
            Some(n) if n >= 1_700 => Ok(n),
            other => Err(other),
        }
    })
    .unwrap_or_else(|n| panic!("the graph's bytes after the close: {n:?}, not 1,700"));
    std::thread::sleep(SETTLE);
    assert_eq!(
        (closed, edge_bytes()),
        (1_700, Some(1_700)),
        "the summaries and the close count each byte once"
    );
}

/// The client closes first and the server never does: the client's socket
/// leaves the kernel from `FIN_WAIT2` without the peer's FIN, so nothing of
/// what it received may be taken for that FIN. (The graph's probe
/// connections close the other way round, the server first.)
#[test]
fn a_tcp_connection_its_client_closes_first_reports_exactly_the_bytes_it_received() {
    if !require_bpf() {
        return;
    }
    let (mut server, svc, _policies, daemon) = tcp_service("client");
    let mut held = conn!().in_cgroup(svc.path()).hold(server.addr());
    exchange(&mut server, &mut held, 300, 700);
    let local_port = held.local().port();
    drop(held);
    assert_eq!(
        wait_tcp_bytes(&daemon, "tcp_closed", local_port, 1),
        vec![(300, 700)],
        "payload only, both ways, SYN and FINs excluded"
    );
}

/// The server closes its side first and the client keeps the connection
/// open: a byte summary taken then (`CLOSE_WAIT`, the server's FIN received)
/// counts the payload only, and with the close they add up to it.
#[test]
fn a_summary_after_the_peers_fin_counts_the_payload_only() {
    if !require_bpf() {
        return;
    }
    let (mut server, svc, _policies, daemon) = tcp_service("half_closed");
    let mut held = conn!().in_cgroup(svc.path()).hold(server.addr());
    let local_port = held.local().port();
    exchange(&mut server, &mut held, 300, 700);
    server.close_to(held.local());
    assert!(
        held.eof_within(Duration::from_secs(10)),
        "the client saw the server's FIN: {:?}",
        held.lines()
    );
    let total = |summaries: Vec<(u64, u64)>| {
        summaries
            .iter()
            .fold((0, 0), |(s, r), (sent, received)| (s + sent, r + received))
    };
    integration_tests::eventually(REPORTED, Duration::from_millis(100), || {
        let sum = total(tcp_bytes(&daemon, "flow", local_port));
        if sum.1 >= 700 {
            Ok(())
        } else {
            Err(sum)
        }
    })
    .unwrap_or_else(|sum| panic!("summaries of the 700 bytes received: {sum:?}"));
    // Two more sweeps with the connection half closed (CLOSE_WAIT).
    std::thread::sleep(SETTLE);
    assert_eq!(
        total(tcp_bytes(&daemon, "flow", local_port)),
        (300, 700),
        "the FIN is not a byte"
    );
    drop(held);
    assert_eq!(
        wait_tcp_bytes(&daemon, "tcp_closed", local_port, 1),
        vec![(300, 700)]
    );
}

/// A `sink` server on loopback and a service `name` allowed TCP to it.
fn tcp_policy(name: &str) -> (conn::Sink, CgroupGuard, PolicyDir) {
    let server = conn!().sink(addr("127.0.0.1:0"));
    let svc = CgroupGuard::new();
    let rule = Egress::to(["127.0.0.1"])
        .ports([server.addr().port()])
        .protocol("tcp");
    let policies = PolicyDir::with(&[(
        &format!("{name}.toml"),
        &service_policy(&svc, "enforce", &[rule]),
    )]);
    (server, svc, policies)
}

/// [`tcp_policy`], its agent summarising every second.
fn tcp_service(name: &str) -> (conn::Sink, CgroupGuard, PolicyDir, Daemon) {
    let (server, svc, policies) = tcp_policy(name);
    let daemon = Daemon::start_with_config(&policies, CONFIG);
    (server, svc, policies, daemon)
}

/// `sent` bytes from the client, `received` from the server, each seen
/// arrive.
fn exchange(server: &mut conn::Sink, held: &mut conn::HeldConn, sent: usize, received: usize) {
    server.wait_accepted(held.local(), Duration::from_secs(10));
    let out = "a".repeat(sent);
    held.send(&out);
    assert!(server.received_within(held.local(), &out, Duration::from_secs(10)));
    let back = "b".repeat(received);
    server.send(&back);
    assert!(
        held.received_within(&back, Duration::from_secs(10)),
        "the client got the server's {received} bytes: {:?}",
        held.lines()
    );
}

/// A pooled connection outlives the agent: the next one follows it from
/// what the first saved, so the bytes sent after the restart get their
/// summary, and only those (not the connection's whole counters again).
#[test]
fn an_open_tcp_connection_keeps_its_byte_summaries_across_a_restart() {
    if !require_bpf() {
        return;
    }
    let (server, svc, policies) = tcp_policy("pooled");
    let shared = SharedPins::new();
    let mut first = shared.start_with_config(&policies, CONFIG);
    let mut held = conn!().in_cgroup(svc.path()).hold(server.addr());
    let local_port = held.local().port();
    held.send(&"a".repeat(1000));
    assert_eq!(
        wait_tcp_bytes(&first, "flow", local_port, 1),
        vec![(1000, 0)]
    );
    let exit = first.stop();
    assert_eq!(exit.code(), Some(0), "the first agent on SIGTERM: {exit}");

    let second = shared.start_with_config(&policies, CONFIG);
    held.send(&"b".repeat(500));
    assert_eq!(
        wait_tcp_bytes(&second, "flow", local_port, 1),
        vec![(500, 0)],
        "the bytes since the first agent's last summary"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(tcp_bytes(&second, "flow", local_port), vec![(500, 0)]);
    assert_summaries_name_the_exe(&second, local_port);
}

/// `[flows] tcp_table_size`: the kernel's table of connecting TCP sockets'
/// owners (`SOCK_OWNERS`), made tiny.
const TCP_TABLE: usize = 16;

/// A service allowed TCP to a loopback sink and to `others`, its agent
/// summarising every second with a TCP table of [`TCP_TABLE`].
fn tcp_table_service(
    name: &str,
    others: &[String],
    ports: &[u16],
    extra: &str,
) -> (conn::Sink, CgroupGuard, PolicyDir, Daemon) {
    let server = conn!().sink(addr("127.0.0.1:0"));
    let svc = CgroupGuard::new();
    let mut to = vec!["127.0.0.1".to_owned()];
    to.extend_from_slice(others);
    let mut allowed = vec![server.addr().port()];
    allowed.extend_from_slice(ports);
    let rule = Egress::to(to).ports(allowed).protocol("tcp");
    let policies = PolicyDir::with(&[(
        &format!("{name}.toml"),
        &format!("{}\n{extra}", service_policy(&svc, "enforce", &[rule])),
    )]);
    let config = format!("{CONFIG}tcp_table_size = {TCP_TABLE}\n");
    let daemon = Daemon::start_with_config(&policies, &config);
    (server, svc, policies, daemon)
}

/// Holds `n` connections from `svc` to `server`, each reported established.
fn hold_established(
    daemon: &Daemon,
    svc: &CgroupGuard,
    server: &conn::Sink,
    n: usize,
) -> Vec<conn::HeldConn> {
    let held: Vec<conn::HeldConn> = (0..n)
        .map(|_| conn!().in_cgroup(svc.path()).hold(server.addr()))
        .collect();
    for conn in &held {
        wait_tcp_established(daemon, conn.local().port());
    }
    held
}

fn wait_tcp_established(daemon: &Daemon, local_port: u16) {
    integration_tests::eventually(REPORTED, Duration::from_millis(100), || {
        let found = integration_tests::events::events(daemon)
            .iter()
            .filter(|ev| ev["type"] == "tcp_established" && ev["src_port"] == local_port)
            .count();
        if found == 1 {
            Ok(())
        } else {
            Err(found)
        }
    })
    .unwrap_or_else(|found| panic!("{found} tcp_established of the connection from {local_port}"));
}

/// `bulkhead_tcp_table_full_total` once the sweeps report `want` (or the
/// last value seen).
fn tcp_table_full(daemon: &Daemon, want: u64) -> u64 {
    metric_reaching(daemon, "bulkhead_tcp_table_full_total", want)
}

/// Metric `name` once the sweeps report `want` (or the last value seen).
fn metric_reaching(daemon: &Daemon, name: &str, want: u64) -> u64 {
    integration_tests::eventually::settles_at(REPORTED, Duration::from_millis(100), &want, || {
        Scrape::get(metrics_addr(daemon)).count(name, &[])
    })
}

/// A connecting socket's owner is kept in a table, not on the socket, so
/// a socket that never gets established must not leave its entry behind:
/// connects refused by a reset, connects that fail before any packet (no
/// route to a multicast address), and connects given up in their
/// handshake (the peer never answers). After many of each, the whole
/// table is free: as many connections as it holds are all in it.
#[test]
fn connects_that_never_get_established_leave_the_tcp_table_free() {
    const EACH: usize = 20;
    if !require_bpf() {
        return;
    }
    let remote = integration_tests::NetnsGuard::new();
    let (first, _) = loopback_ports(3);
    let (refused, unroutable, unanswered) = (first, first + 1, first + 2);
    let silent = remote.silent_v4(6);
    let (server, svc, _policies, daemon) = tcp_table_service(
        "failing",
        &["224.0.0.1".to_owned(), silent.to_string()],
        &[refused, unroutable, unanswered],
        "",
    );
    let targets = [
        addr(&format!("127.0.0.1:{refused}")),
        addr(&format!("224.0.0.1:{unroutable}")),
        addr(&format!("{silent}:{unanswered}")),
    ];
    let looping = conn!()
        .in_cgroup(svc.path())
        .connect_timeout(Duration::from_millis(100))
        .connect_loop(&targets, Duration::ZERO);
    integration_tests::eventually(Duration::from_secs(30), Duration::from_millis(50), || {
        if looping.count() >= 3 * EACH {
            Ok(())
        } else {
            Err(looping.count())
        }
    })
    .unwrap_or_else(|n| panic!("only {n} attempts"));
    let attempts = looping.stop();
    let outcome = |port: u16| -> Vec<conn::Verdict> {
        attempts
            .iter()
            .filter(|a| a.port == port)
            .map(|a| a.verdict)
            .collect()
    };
    assert!(outcome(refused).len() >= EACH, "{attempts:?}");
    for (port, verdict) in [
        (refused, conn::Verdict::Errno(libc::ECONNREFUSED)),
        (unroutable, conn::Verdict::Errno(libc::ENETUNREACH)),
        (unanswered, conn::Verdict::Timeout),
    ] {
        let got = outcome(port);
        assert!(
            got.len() >= EACH - 1 && got.iter().all(|v| *v == verdict),
            "port {port}: every attempt {verdict:?}: {got:?}"
        );
    }

    // Refused sockets kept open: their entries went at the reset (the
    // close of a socket armed when its SYN left), not at their release.
    let _refused = conn!()
        .in_cgroup(svc.path())
        .refused_hold(TCP_TABLE, addr(&format!("127.0.0.1:{refused}")));
    let held = hold_established(&daemon, &svc, &server, TCP_TABLE);
    // A sweep after the connects refreshes the count.
    std::thread::sleep(SETTLE);
    assert_eq!(
        tcp_table_full(&daemon, 0),
        0,
        "{TCP_TABLE} connections found a table of {TCP_TABLE} with room"
    );
    // The control: one more does not fit.
    let more = hold_established(&daemon, &svc, &server, 1);
    assert_eq!(
        tcp_table_full(&daemon, 1),
        1,
        "the {}th did not fit",
        TCP_TABLE + 1
    );
    drop((held, more));
}

/// More connections at once than the table holds: those that find it full
/// keep their owner on the socket instead, and every connection is still
/// reported established and closed, with its bytes; once they closed, the
/// table has room for as many again.
#[test]
fn connections_past_a_full_tcp_table_are_all_reported() {
    const EXTRA: usize = 4;
    if !require_bpf() {
        return;
    }
    let (server, svc, _policies, daemon) = tcp_table_service("pooled-many", &[], &[], "");
    let mut held = hold_established(&daemon, &svc, &server, TCP_TABLE + EXTRA);
    assert_eq!(tcp_table_full(&daemon, EXTRA as u64), EXTRA as u64);
    for conn in &mut held {
        server.wait_accepted(conn.local(), Duration::from_secs(10));
        conn.send("hello");
        assert!(server.received_within(conn.local(), "hello", Duration::from_secs(10)));
    }
    let ports: Vec<u16> = held.iter().map(|c| c.local().port()).collect();
    drop(held);
    for port in ports {
        assert_eq!(
            wait_tcp_bytes(&daemon, "tcp_closed", port, 1),
            vec![(5, 0)],
            "the connection from {port} closed with its 5 bytes"
        );
    }
    let again = hold_established(&daemon, &svc, &server, TCP_TABLE);
    std::thread::sleep(SETTLE);
    assert_eq!(
        tcp_table_full(&daemon, EXTRA as u64),
        EXTRA as u64,
        "the closes freed the table"
    );
    drop(again);
}

/// A socket bound, then connected (a self-connect: a simultaneous open with
/// itself, established by the kernel's passive path) has an owner record
/// of its bind and one of its connect: the connect's is the one reported,
/// established and closed, with its bytes.
#[test]
fn a_bound_socket_that_connects_is_reported_established_and_closed() {
    if !require_bpf() {
        return;
    }
    let (port, target) = loopback_ports(1);
    let svc = CgroupGuard::new();
    let rule = Egress::to(["127.0.0.1"]).ports([port]).protocol("tcp");
    let policies = PolicyDir::with(&[("selfish.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let daemon = Daemon::start_with_config(&policies, CONFIG);
    conn!().in_cgroup(svc.path()).self_connect(target);
    assert_eq!(wait_tcp_bytes(&daemon, "tcp_closed", port, 1), vec![(5, 5)]);
    let established: Vec<Value> = integration_tests::events::events(&daemon)
        .into_iter()
        .filter(|ev| ev["type"] == "tcp_established" && ev["src_port"] == port)
        .collect();
    assert_eq!(established.len(), 1, "{established:#?}");
    assert_eq!(established[0]["service"], "selfish");
}

/// The kernel never releases its own sockets through the agent's hook:
/// an MPTCP subflow whose connect failed before any packet (no route to a
/// multicast address) leaves its owner entry, unarmed. The agent's sweep
/// removes an entry unarmed three sweeps in a row, so the table comes
/// back free.
#[test]
fn entries_of_kernel_sockets_that_never_connected_are_swept() {
    if !require_bpf() {
        return;
    }
    let (port, _) = loopback_ports(1);
    let (server, svc, _policies, daemon) = tcp_table_service(
        "mptcp-failing",
        &["224.0.0.1".to_owned()],
        &[port],
        "[sockets]\nprotocols = [\"mptcp\"]\n",
    );
    let client = probe!().in_cgroup(svc.path());
    let target = addr(&format!("224.0.0.1:{port}"));
    for _ in 0..TCP_TABLE {
        let outcome = client.proto_connect("stream", "mptcp", target);
        assert_eq!(
            (outcome.stage.as_deref(), outcome.errno),
            (Some("connect"), Some(libc::ENETUNREACH)),
            "{outcome:?}"
        );
    }
    // Each failed subflow left its entry (not asserted as a count at one
    // sweep: one probe process per connect may take longer than the two
    // sweeps an entry outlives), and the sweeps removed each.
    assert_eq!(
        metric_reaching(&daemon, "bulkhead_tcp_table_stale_total", TCP_TABLE as u64),
        TCP_TABLE as u64,
        "and the sweeps removed each"
    );
    let held = hold_established(&daemon, &svc, &server, TCP_TABLE);
    std::thread::sleep(SETTLE);
    assert_eq!(tcp_table_full(&daemon, 0), 0, "the table was free again");
    drop(held);
}
