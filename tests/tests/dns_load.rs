//! Egress by DNS name under the load (docs/dns-names.md, Tests):
//! real clients (glibc's `getaddrinfo` in the probe, `curl`, `dig`) in the
//! service's cgroup, a real dnsmasq on port 53 of 127.0.53.N answering with
//! TTL 1, and one TCP listener on `0.0.0.0` standing in for every named
//! host (any 127.0.0.0/8 address reaches it). Clients that read
//! `/etc/resolv.conf` get one of the test's own in a mount namespace of
//! their own ([`ClientResolver`]); the host's is never touched.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use integration_tests::{
    addr, conn,
    dns_server::{dig, dig_addresses, dig_flags, dig_in, dig_text},
    events::{events, wait_event},
    http::metrics_addr,
    maps, probe,
    process::rss_kib,
    prometheus::{sample_count, scrape},
    require::server_binary,
    require_bpf,
    resolving::{exec_in, ClientResolver, ResolveLoop},
    service_policy, CgroupGuard, Daemon, DnsServer, Egress, Listener, PolicyDir, Probe, Proto,
};
use serde_json::Value;

/// Expiry as short as it goes: answers have TTL 1 and so do learnt
/// addresses (the default `min_ttl_secs` is 60).
const SHORT_TTL: &str = "[dns]\nmin_ttl_secs = 1\n";

/// One test's world: a resolver on 127.0.53.N:53 answering `hosts`, one
/// TCP listener on 0.0.0.0 for every named address, a service allowed
/// that resolver and `allowed` (a name pattern) on the listener's port.
struct World {
    listener: Listener,
    server: DnsServer,
    svc: CgroupGuard,
    policies: PolicyDir,
}

impl World {
    fn new(n: u8, allowed: &str, hosts: &[(&str, IpAddr)]) -> Self {
        Self::with_listener(
            n,
            allowed,
            hosts,
            probe!().listen(Proto::Tcp, addr("0.0.0.0:0")),
        )
    }

    fn with_listener(n: u8, allowed: &str, hosts: &[(&str, IpAddr)], listener: Listener) -> Self {
        let server = DnsServer::start_at(SocketAddr::from(([127, 0, 53, n], 53)), hosts, &[]);
        let svc = CgroupGuard::new();
        let policies = PolicyDir::new();
        let dns = Egress::to([server.addr().ip()]).ports([53]);
        let named = Egress::to([allowed])
            .ports([listener.port()])
            .protocol("tcp");
        policies.write("svc.toml", &service_policy(&svc, "enforce", &[dns, named]));
        Self {
            listener,
            server,
            svc,
            policies,
        }
    }

    fn port(&self) -> u16 {
        self.listener.port()
    }

    fn at(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.port())
    }

    /// The service's process, plain.
    fn client(&self) -> Probe {
        probe!().in_cgroup(self.svc.path())
    }

    /// The service's process with its own resolv.conf naming the resolver.
    fn glibc_client(&self, files: &ClientResolver) -> Probe {
        files.apply(&self.client())
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test bug: {text:?} is not an address: {e}"))
}

/// Loopback address number `i` of a block: 127.B.(i / 250).(i % 250 + 1).
fn nth(block: u8, i: usize) -> IpAddr {
    let hi = u8::try_from(i / 250).unwrap_or_else(|e| panic!("test bug: {i}: {e}"));
    let lo = u8::try_from(i % 250 + 1).unwrap_or_else(|e| panic!("test bug: {i}: {e}"));
    IpAddr::from([127, block, hi, lo])
}

/// `dig` straight to the resolver (not through any service), until it
/// answers exactly `want` (in any order): dnsmasq rereads its hosts file on
/// SIGHUP, and this is how a test knows it has.
fn wait_answers(server: &DnsServer, name: &str, want: &[IpAddr]) {
    let want: BTreeSet<String> = want.iter().map(ToString::to_string).collect();
    integration_tests::eventually(Duration::from_secs(10), Duration::from_millis(20), || {
        let out = dig(server.addr(), name, &[]);
        let got: BTreeSet<String> = dig_addresses(&out).into_iter().collect();
        if got == want {
            Ok(())
        } else {
            Err(dig_text(&out))
        }
    })
    .unwrap_or_else(|last| panic!("{name} never answered {want:?}; last: {last}"));
}

/// The deny verdicts of service `svc` in `daemon`'s decision log.
fn denials(daemon: &Daemon) -> Vec<Value> {
    events(daemon)
        .into_iter()
        .filter(|ev| {
            ev["service"] == "svc"
                && ev["verdict"] == "deny"
                && matches!(ev["type"].as_str(), Some("verdict" | "flow"))
        })
        .collect()
}

/// Makes one denial the test can wait for (a connect to `marker`, an
/// address never answered), so that every decision made before it has
/// reached the decision log; then returns every denial of the service.
fn denials_up_to(daemon: &Daemon, w: &World, marker: SocketAddr) -> Vec<Value> {
    w.client()
        .tcp_connect(marker)
        .assert_eperm("the marker: an address no lookup answered");
    let marker_ip = marker.ip().to_string();
    let _ = wait_event(daemon, "the marker's denial", |ev| {
        ev["verdict"] == "deny" && ev["dst_ip"] == marker_ip.as_str()
    });
    denials(daemon)
}

/// The first load test: 10,000 rounds of glibc `getaddrinfo` then
/// `connect()` by one service process, the name's two addresses rotated
/// (hosts file rewritten, SIGHUP) every 200 rounds, every answer with TTL
/// 1 and learnt for 1 s: every round connects, none is refused, and the
/// decision log holds no denial of the service.
#[test]
fn ten_thousand_lookups_then_connects_with_rotating_addresses_all_connect() {
    const BATCHES: usize = 50;
    const PER_BATCH: u64 = 200;
    if !require_bpf() {
        return;
    }
    let name = "api.load.test";
    let pair = |b: usize| [nth(71, 2 * b), nth(71, 2 * b + 1)];
    let first = pair(0);
    let w = World::new(21, name, &[(name, first[0]), (name, first[1])]);
    let files = ClientResolver::new(w.server.addr());
    let daemon = Daemon::start_with_config(&w.policies, SHORT_TTL);

    w.client()
        .tcp_connect(w.at(first[0]))
        .assert_eperm("before any lookup");
    let mut rounds = ResolveLoop::start(&w.glibc_client(&files), name, w.port());
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    for b in 0..BATCHES {
        let now = pair(b);
        if b > 0 {
            w.server.set_hosts(&[(name, now[0]), (name, now[1])]);
            wait_answers(&w.server, name, &now);
        }
        let got = rounds.batch(PER_BATCH, Duration::from_mins(2));
        let want: BTreeSet<String> = now.iter().map(ToString::to_string).collect();
        assert!(
            got.rounds == PER_BATCH
                && got.connected == PER_BATCH
                && got.eperm == 0
                && got.resolve_failed == 0
                && got.other_failed == 0,
            "batch {b}: every round must look up and connect: {}",
            got.json
        );
        assert!(
            got.peers.keys().all(|p| want.contains(p)),
            "batch {b}: connected only to the addresses answered now ({want:?}): {}",
            got.json
        );
        assert_eq!(got.peers.values().sum::<u64>(), PER_BATCH, "{}", got.json);
        seen.extend(got.peers.into_keys());
    }
    let took = started.elapsed();
    eprintln!(
        "{} rounds in {took:?}, {} distinct addresses connected",
        BATCHES as u64 * PER_BATCH,
        seen.len()
    );
    // Each batch connected to an address of its own pair.
    assert!(seen.len() >= BATCHES, "addresses connected: {seen:?}");

    let marker = "127.71.250.1";
    let denied = denials_up_to(&daemon, &w, w.at(ip(marker)));
    // glibc's getaddrinfo sorts two or more answers by RFC 6724: it
    // connect()s a UDP socket to port 0 of each (no packet is sent) to
    // learn the source address it would use. The name rule allows TCP to
    // the listener's port only, so those probes are denied and logged
    // (docs/dns-names.md, Failure modes); they never fail the lookup or
    // the service's own connect. Every other denial is a failure.
    let before = first[0].to_string();
    let made_by_test = |ev: &Value| {
        ev["protocol"] == "tcp"
            && ev["type"] == "verdict"
            && (ev["dst_ip"] == marker || ev["dst_ip"] == before.as_str())
    };
    assert_eq!(
        denied.iter().filter(|ev| made_by_test(ev)).count(),
        2,
        "the test's own two denials (before the lookups, and the marker): {denied:#?}"
    );
    let (probes, others): (Vec<&Value>, Vec<&Value>) = denied
        .iter()
        .filter(|ev| !made_by_test(ev))
        .partition(|ev| {
            ev["protocol"] == "udp"
                && ev["hook"] == "connect"
                && ev["dst_port"] == 0
                && ev["dst_ip"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.71."))
        });
    assert!(
        others.is_empty(),
        "the decision log holds denials of the service besides the two the test made \
         and glibc's source-address probes: {others:#?}"
    );
    let probed_addrs: BTreeSet<&str> = probes
        .iter()
        .filter_map(|ev| ev["dst_ip"].as_str())
        .collect();
    eprintln!(
        "glibc's RFC 6724 source-address probes denied (UDP connect to port 0): \
         {} events, {} addresses",
        probes.len(),
        probed_addrs.len()
    );
}

/// The second test: `curl` and glibc's `getaddrinfo`, reading a
/// resolv.conf of their own, reach an allowed name; a name no rule allows
/// resolves but its connect gets EPERM.
#[test]
fn curl_and_getaddrinfo_reach_an_allowed_name_and_not_another() {
    if !require_bpf() {
        return;
    }
    let api = ip("127.73.0.1");
    let other = ip("127.73.0.2");
    // An HTTP listener: the probe's reads one byte, curl needs HTTP.
    let w = World::with_listener(
        22,
        "api.load.test",
        &[("api.load.test", api), ("other.load.test", other)],
        probe!().listen_http(addr("0.0.0.0:0")),
    );
    let files = ClientResolver::new(w.server.addr());
    let _daemon = Daemon::start(&w.policies);
    let client = w.glibc_client(&files);

    client
        .resolve_connect("api.load.test", w.port())
        .assert_ok("getaddrinfo then connect to an allowed name");
    client
        .resolve_connect("other.load.test", w.port())
        .assert_eperm("getaddrinfo then connect to a name no rule allows");

    // Missing, the test fails saying how to install it (never skips).
    let curl_bin = server_binary("BULKHEAD_CURL", "curl", "/usr/bin")
        .to_string_lossy()
        .into_owned();
    let curl = |name: &str| {
        let url = format!("http://{name}:{}/", w.port());
        exec_in(
            &client,
            &[&curl_bin, "-sS", "-v", "--max-time", "10", "-o", "-", &url],
            Duration::from_secs(30),
        )
    };
    let text = |out: &std::process::Output| {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let allowed = curl("api.load.test");
    assert!(
        allowed.status.success() && allowed.stdout == b"k",
        "curl of an allowed name: {}",
        text(&allowed)
    );
    let denied = curl("other.load.test");
    assert_eq!(
        denied.status.code(),
        Some(7),
        "curl of a name no rule allows: exit 7 (could not connect): {}",
        text(&denied)
    );
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Operation not permitted"),
        "curl says why: {}",
        text(&denied)
    );
}

/// The third test: an answer too big for UDP (no EDNS: 512 bytes)
/// comes back truncated and teaches nothing; dig retries over TCP, as
/// glibc does, and every address of that answer connects. glibc itself
/// (no `edns0` in its resolv.conf: 512 bytes) gets another such name and
/// connects to it.
#[test]
fn a_truncated_udp_answer_teaches_nothing_and_its_tcp_retry_does() {
    const COUNT: usize = 40;
    if !require_bpf() {
        return;
    }
    let name = "wide.load.test";
    let addrs: Vec<IpAddr> = (0..COUNT).map(|i| nth(74, i)).collect();
    let by_glibc: Vec<IpAddr> = (COUNT..2 * COUNT).map(|i| nth(74, i)).collect();
    let mut hosts: Vec<(&str, IpAddr)> = addrs.iter().map(|a| (name, *a)).collect();
    hosts.extend(by_glibc.iter().map(|a| ("glibc.load.test", *a)));
    let w = World::new(23, "*.load.test", &hosts);
    let files = ClientResolver::new(w.server.addr());
    let _daemon = Daemon::start(&w.policies);

    // UDP only: TC set, the answer passed on, nothing learnt.
    let out = dig_in(w.svc.path(), w.server.addr(), name, &["+noedns", "+ignore"]);
    assert!(
        dig_flags(&out).contains(&"tc".to_owned()),
        "a {COUNT}-address answer without EDNS is truncated: {}",
        dig_text(&out)
    );
    for a in &addrs {
        w.client()
            .tcp_connect(w.at(*a))
            .assert_eperm("an address of a truncated answer");
    }

    // dig's default: retry over TCP on TC.
    let out = dig_in(w.svc.path(), w.server.addr(), name, &["+noedns"]);
    let text = dig_text(&out);
    assert!(
        text.contains("Truncated, retrying in TCP mode"),
        "dig retried over TCP: {text}"
    );
    let got: BTreeSet<String> = dig_addresses(&out).into_iter().collect();
    let want: BTreeSet<String> = addrs.iter().map(ToString::to_string).collect();
    assert_eq!(got, want, "{text}");
    for a in &addrs {
        w.client()
            .tcp_connect(w.at(*a))
            .assert_ok("an address of the answer over TCP");
    }

    // glibc: truncated over UDP, retried over TCP, learnt, connected.
    for a in &by_glibc {
        w.client()
            .tcp_connect(w.at(*a))
            .assert_eperm("glibc.load.test's addresses before its lookup");
    }
    w.glibc_client(&files)
        .resolve_connect("glibc.load.test", w.port())
        .assert_ok("getaddrinfo of a name whose answer does not fit 512 bytes, then connect");
}

/// The fourth test: a name with 1,000 addresses, looked up again
/// and again, never holds more than `max_per_name` (64) in the kernel, the
/// client is given only those (the answer trimmed to what was learnt), each
/// of them connects, and the agent's memory stays flat; glibc's own
/// lookups of it then connect every time.
#[test]
fn a_name_with_a_thousand_addresses_stays_within_the_cap_with_flat_memory() {
    const COUNT: usize = 1_000;
    const CAP: usize = 64;
    const LOOKUPS: usize = 100;
    /// RSS growth allowed from the first lookup to the last (KiB).
    const RSS_SLACK_KIB: u64 = 8 * 1024;
    if !require_bpf() {
        return;
    }
    let name = "wide.load.test";
    let addrs: Vec<IpAddr> = (0..COUNT).map(|i| nth(75, i)).collect();
    let hosts: Vec<(&str, IpAddr)> = addrs.iter().map(|a| (name, *a)).collect();
    let w = World::new(24, name, &hosts);
    let daemon = Daemon::start(&w.policies);
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon has no pid"));
    let in_block = |a: &IpAddr| matches!(a, IpAddr::V4(v4) if v4.octets()[..2] == [127, 75]);
    let learnt = || -> BTreeSet<String> {
        maps::learnt(&daemon)
            .into_iter()
            .filter(|(_, a)| in_block(a))
            .map(|(_, a)| a.to_string())
            .collect()
    };

    let mut rss_first = 0;
    let mut last_answer = Vec::new();
    for i in 0..LOOKUPS {
        // UDP (EDNS 1232 bytes) is truncated; dig retries over TCP.
        let out = dig_in(w.svc.path(), w.server.addr(), name, &[]);
        let answer = dig_addresses(&out);
        assert_eq!(
            answer.len(),
            CAP,
            "lookup {i}: the answer is trimmed to the {CAP} addresses learnt: {}",
            dig_text(&out)
        );
        let held = learnt();
        assert_eq!(held.len(), CAP, "lookup {i}: LEARNT holds {held:?}");
        let answered: BTreeSet<String> = answer.iter().cloned().collect();
        assert_eq!(
            answered, held,
            "lookup {i}: the client gets exactly what the kernel allows"
        );
        if i == 0 {
            rss_first = rss_kib(pid);
        }
        last_answer = answer;
    }
    let rss_last = rss_kib(pid);
    eprintln!("agent RSS after the first lookup {rss_first} KiB, after {LOOKUPS}: {rss_last} KiB");
    assert!(
        rss_last <= rss_first + RSS_SLACK_KIB,
        "the agent's RSS grew from {rss_first} KiB to {rss_last} KiB over {LOOKUPS} lookups"
    );
    for a in &last_answer {
        w.client()
            .tcp_connect(w.at(ip(a)))
            .assert_ok("every address the client was given connects");
    }

    // glibc (UDP truncated, then TCP): whichever address it picks of the
    // trimmed answer connects, every time.
    let files = ClientResolver::new(w.server.addr());
    let mut rounds = ResolveLoop::start(&w.glibc_client(&files), name, w.port());
    let got = rounds.batch(50, Duration::from_mins(1));
    assert!(
        got.connected == 50 && got.eperm == 0 && got.resolve_failed == 0 && got.other_failed == 0,
        "getaddrinfo then connect, 50 times, a name of 1,000 addresses: {}",
        got.json
    );
    assert_eq!(
        learnt().len(),
        CAP,
        "still at the cap after glibc's lookups"
    );
}

/// Lookups of a name with more addresses than the cap, by two clients at
/// the same time, while the client of the first lookup keeps connecting
/// to what it was given: no later answer takes any of it back (no eviction, no
/// denial), and every answer is trimmed to those same 64. Before answers
/// were learnt as a whole, each of them evicted and re-learnt the 64 held,
/// revoking the previous answer's addresses in the kernel while it ran.
#[test]
fn later_lookups_of_a_name_over_the_cap_never_take_back_what_a_client_was_given() {
    const COUNT: usize = 1_000;
    const CAP: usize = 64;
    const LOOKUPS: usize = 30;
    if !require_bpf() {
        return;
    }
    let name = "wide2.load.test";
    let hosts: Vec<(&str, IpAddr)> = (0..COUNT).map(|i| (name, nth(77, i))).collect();
    let w = World::new(26, name, &hosts);
    let daemon = Daemon::start(&w.policies);
    let metrics = metrics_addr(&daemon);

    let out = dig_in(w.svc.path(), w.server.addr(), name, &[]);
    let given: BTreeSet<String> = dig_addresses(&out).into_iter().collect();
    assert_eq!(given.len(), CAP, "the first answer: {}", dig_text(&out));
    let peers: Vec<SocketAddr> = given.iter().map(|a| w.at(ip(a))).collect();

    // Two clients look the name up at the same time, LOOKUPS / 2 each.
    let look_up = || {
        (0..LOOKUPS / 2)
            .map(|_| {
                let out = dig_in(w.svc.path(), w.server.addr(), name, &[]);
                dig_addresses(&out)
                    .into_iter()
                    .collect::<BTreeSet<String>>()
            })
            .collect::<Vec<_>>()
    };
    let answers: Vec<BTreeSet<String>> = std::thread::scope(|scope| {
        let lookups = [scope.spawn(look_up), scope.spawn(look_up)];
        // The first client connects to each address it was given, again
        // and again, for as long as the later lookups run.
        let mut sweeps = 0;
        while !lookups
            .iter()
            .all(std::thread::ScopedJoinHandle::is_finished)
            || sweeps < 3
        {
            let _ = w.client().tcp_connect_each(&peers);
            sweeps += 1;
        }
        lookups
            .into_iter()
            .flat_map(|l| {
                l.join()
                    .unwrap_or_else(|_| panic!("a lookups' thread panicked"))
            })
            .collect()
    });
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &given, "lookup {i} after the first");
    }
    let samples = scrape(metrics);
    let evictions = |reason: &str| {
        sample_count(
            &samples,
            "bulkhead_dns_learnt_evictions_total",
            &[("service", "svc"), ("reason", reason)],
        )
    };
    assert_eq!(evictions("per_name_cap"), Some(0), "nothing evicted");
    assert_eq!(
        evictions("per_name_in_use"),
        Some(((LOOKUPS + 1) * (COUNT - CAP)) as u64),
        "every answer left out the {} addresses past the cap",
        COUNT - CAP
    );
    let denied: Vec<Value> = denials_up_to(&daemon, &w, w.at(nth(78, 0)))
        .into_iter()
        .filter(|ev| ev["dst_ip"].as_str().is_some_and(|a| given.contains(a)))
        .collect();
    assert!(
        denied.is_empty(),
        "connects to addresses the first answer gave were denied: {denied:#?}"
    );
}

/// The fifth test: a connection made while its address was learnt
/// is not cut when the address expires; a new connect after that, without a
/// new lookup, is denied.
#[test]
fn an_open_connection_outlives_its_addresss_expiry_and_a_new_connect_does_not() {
    if !require_bpf() {
        return;
    }
    let sink = conn!().sink(addr("127.76.0.1:0"));
    let w = World::new(25, "api.load.test", &[("api.load.test", sink.addr().ip())]);
    // The name rule must allow the sink's port, not the world's listener's.
    let dns = Egress::to([w.server.addr().ip()]).ports([53]);
    let named = Egress::to(["api.load.test"])
        .ports([sink.addr().port()])
        .protocol("tcp");
    w.policies.write(
        "svc.toml",
        &service_policy(&w.svc, "enforce", &[dns, named]),
    );
    // Short, but long enough for dig to exit and another process to
    // connect on a loaded machine.
    let daemon = Daemon::start_with_config(&w.policies, "[dns]\nmin_ttl_secs = 3\n");
    let mut sink = sink;

    let out = dig_in(w.svc.path(), w.server.addr(), "api.load.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.76.0.1"], "{}", dig_text(&out));
    let mut held = conn!().in_cgroup(w.svc.path()).hold(sink.addr());
    sink.wait_accepted(held.local(), Duration::from_secs(10));

    // Expired: the agent's sweep removed it from the kernel's map.
    let target = sink.addr().ip();
    integration_tests::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        let all = maps::learnt(&daemon);
        if all.iter().any(|(_, a)| *a == target) {
            Err(all)
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|all| panic!("{target} never expired from LEARNT: {all:?}"));

    held.send("after-expiry");
    assert!(
        sink.received_within(held.local(), "after-expiry", Duration::from_secs(10)),
        "the open connection still carries data out: {:?}",
        sink.lines()
    );
    sink.send("reply");
    assert!(
        held.received_within("reply", Duration::from_secs(10)),
        "the open connection still carries data in: {:?}",
        held.lines()
    );
    w.client()
        .tcp_connect(sink.addr())
        .assert_eperm("a new connect after expiry, without a new lookup");
}
