//! Egress by DNS name, end to end (docs/dns-names.md): a real dnsmasq on
//! port 53 of a loopback address of its own, a real client (`dig`) in the
//! service's cgroup asking it, and real connects to the addresses it
//! answered (loopback listeners standing in for the named hosts); and
//! what the agent says of it: the decision event's `dst_name`, the
//! proxy's metrics, the graph and `bulkhead learn`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{
    addr,
    control::{cli, reload, SharedPins},
    dns_server::{dig, dig_addresses, dig_answers, dig_in, dig_status, dig_text},
    events::{events, wait_event},
    eventually,
    http::metrics_addr,
    maps,
    nft::NftTable,
    pinned_map::pinned_map_len,
    probe,
    process::{scaled, signal},
    prometheus::Scrape,
    require::require_tool,
    require_bpf, service_policy,
    state_files::assert_handled,
    CgroupGuard, Daemon, DnsServer, Egress, HeldSockets, Listener, PolicyDir, Probe, Proto,
};
use serde_json::Value;

/// One test's world: `api.example.test` answered as 127.0.6N.1, where a
/// TCP listener stands in for it; a resolver on port 53 of 127.0.53.N;
/// a service whose policy allows that resolver and the name on the
/// listener's port.
struct Named {
    api: Listener,
    server: DnsServer,
    svc: CgroupGuard,
    policies: PolicyDir,
}

impl Named {
    /// Test number `n` (its own addresses), with `more` names answered too.
    fn new(n: u8, more: &[(&str, IpAddr)]) -> Self {
        Self::at(
            SocketAddr::from(([127, 0, 53, n], 53)),
            addr(&format!("127.0.{}.1:0", 60 + n)),
            more,
        )
    }

    /// The resolver on `resolver`, api.example.test's listener on `api`.
    fn at(resolver: SocketAddr, api: SocketAddr, more: &[(&str, IpAddr)]) -> Self {
        let api = probe!().listen(Proto::Tcp, api);
        let mut hosts = vec![("api.example.test", api.addr().ip())];
        hosts.extend_from_slice(more);
        let server = DnsServer::start_at(resolver, &hosts, &[]);
        let svc = CgroupGuard::new();
        let named = Self {
            api,
            server,
            svc,
            policies: PolicyDir::new(),
        };
        named
            .policies
            .write("svc.toml", &named.policy(&named.svc, "api.example.test"));
        named
    }

    /// The policy of `svc`: the resolver, and `name` on the listener's port.
    fn policy(&self, svc: &CgroupGuard, name: &str) -> String {
        let dns = Egress::to([self.resolver().ip()]).ports([53]);
        let named = Egress::to([name]).ports([self.api.port()]).protocol("tcp");
        service_policy(svc, "enforce", &[dns, named])
    }

    fn resolver(&self) -> SocketAddr {
        self.server.addr()
    }

    fn client(&self) -> Probe {
        probe!().in_cgroup(self.svc.path())
    }

    /// `dig` of `name` from the service, which must answer `expect`.
    fn look_up(&self, name: &str, args: &[&str], expect: &str) -> String {
        let out = dig_in(self.svc.path(), self.resolver(), name, args);
        assert_eq!(dig_addresses(&out), [expect], "{}", dig_text(&out));
        dig_text(&out)
    }
}

#[test]
fn an_allowed_name_connects_right_after_the_services_own_lookup() {
    if !require_bpf() {
        return;
    }
    let other = probe!().listen(Proto::Tcp, addr("127.0.61.2:0"));
    let w = Named::new(1, &[("other.example.test", other.addr().ip())]);
    let bystander = CgroupGuard::new();
    w.policies
        .write("bystander.toml", &w.policy(&bystander, "api.example.test"));
    let _daemon = Daemon::start(&w.policies);

    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("api.example.test's address before any lookup");
    let answer = w.look_up("api.example.test", &[], "127.0.61.1");
    // The answer shows the resolver the client asked, not the proxy.
    assert!(
        answer.contains(&format!("SERVER: {}#53", w.resolver().ip())),
        "dig names its resolver: {answer}"
    );
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("api.example.test's address right after the service looked it up");

    w.look_up("other.example.test", &[], "127.0.61.2");
    w.client()
        .tcp_connect(other.addr())
        .assert_eperm("a name no rule allows, looked up");
    probe!()
        .in_cgroup(bystander.path())
        .tcp_connect(w.api.addr())
        .assert_eperm("an address another service looked up");
    // DNS over TLS to the service's own resolver is ordinary egress: its
    // rules allow port 53 there, not 853.
    w.client()
        .tcp_connect(SocketAddr::new(w.resolver().ip(), 853))
        .assert_eperm("DNS over TLS (853) to the resolver the rules allow on 53");
}

#[test]
fn a_lookup_sent_to_an_ipv6_resolver_teaches_as_one_over_ipv4() {
    if !require_bpf() {
        return;
    }
    let w = Named::at(addr("[::1]:53"), addr("[::1]:0"), &[]);
    let daemon = Daemon::start(&w.policies);
    assert!(
        daemon.log().contains("[::1]:"),
        "the proxy listens on IPv6 too:\n{}",
        daemon.log()
    );

    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("before the lookup");
    for transport in [&["AAAA"][..], &["AAAA", "+tcp"]] {
        let answer = w.look_up("api.example.test", transport, "::1");
        assert!(
            answer.contains("SERVER: ::1#53"),
            "dig names its resolver: {answer}"
        );
    }
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("right after the lookup from an IPv6 resolver");
}

#[test]
fn a_lookup_over_tcp_teaches_as_one_over_udp() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(2, &[]);
    let _daemon = Daemon::start(&w.policies);

    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("before the lookup");
    w.look_up("api.example.test", &["+tcp"], "127.0.62.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("right after a lookup over TCP");
}

#[test]
fn learnt_addresses_stay_allowed_across_an_agent_restart() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(3, &[]);
    let shared = SharedPins::new();

    let mut first = shared.start(&w.policies);
    w.look_up("api.example.test", &[], "127.0.63.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt, first agent");
    assert!(first.stop().success(), "first agent: {}", first.log());
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt, no agent running (the pinned map holds it)");
    let second = shared.start(&w.policies);
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt under the first agent, the second one running");
    assert!(
        second
            .log()
            .contains("learnt addresses of name rules carried over"),
        "the second agent says it carried them over:\n{}",
        second.log()
    );
    // The second agent's cache holds what the first saved: the address's
    // name is on both decisions it logs (the one made while no agent ran,
    // which it reads back from the previous programs before it serves,
    // and its own), and the address is counted as learnt.
    let api = w.api.addr().ip().to_string();
    let allowed = || -> Vec<Value> {
        events(&second)
            .into_iter()
            .filter(|ev| {
                ev["type"] == "verdict" && ev["verdict"] == "allow" && ev["dst_ip"] == api.as_str()
            })
            .collect()
    };
    integration_tests::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        let got = allowed();
        if got.len() >= 2 {
            Ok(())
        } else {
            Err(got)
        }
    })
    .unwrap_or_else(|got| {
        panic!(
            "the second agent logged {} allowed connects, not 2: {got:#?}",
            got.len()
        )
    });
    let got = allowed();
    // (At least two: the first agent's own connect may come back with
    // its leftovers too, named as well.)
    assert!(
        got.len() >= 2 && got.iter().all(|ev| ev["dst_name"] == "api.example.test"),
        "the connect made while no agent ran and the one under the second agent, all named: {got:#?}"
    );
    let scrape = Scrape::get(metrics_addr(&second));
    assert_eq!(
        scrape.count("bulkhead_dns_learnt_addresses", &[("service", "svc")]),
        1,
        "{}",
        scrape.text()
    );
    assert!(
        second.log().contains("restored=1"),
        "the second agent restored the saved entry:\n{}",
        second.log()
    );
}

/// The "agent gone for longer": once the proxy's heartbeat is
/// older than its grace (`DNS_HEARTBEAT_GRACE_NS`, 30 s), the kernel stops
/// redirecting lookups, and nothing sweeps what was learnt (the programs
/// read no expiry). The learnt address still connects though its TTL ran
/// out; a lookup goes to the resolver directly and is answered, but
/// teaches nothing, so the address of a name the rule allows and no lookup
/// taught stays denied (fail closed). An agent back does not carry the
/// expired entry over: denied at once.
#[test]
fn past_the_grace_with_no_agent_learnt_addresses_keep_working_and_new_names_fail_closed() {
    if !require_bpf() {
        return;
    }
    // Short enough to be long past after the grace, long enough that the
    // first agent's sweep cannot revoke the address before it stops.
    let config = "[dns]\nmin_ttl_secs = 5\n";
    let w = Named::new(13, &[("new.example.test", addr("127.0.73.2:0").ip())]);
    // On the port the name rule allows (api's).
    let fresh = probe!().listen(
        Proto::Tcp,
        SocketAddr::from(([127, 0, 73, 2], w.api.addr().port())),
    );
    w.policies
        .write("svc.toml", &w.policy(&w.svc, "*.example.test"));
    let shared = SharedPins::new();
    let mut first = shared.start_with_config(&w.policies, config);
    w.look_up("api.example.test", &[], "127.0.73.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt, the agent running");
    assert!(first.stop().success(), "first agent: {}", first.log());

    // Past the grace, and long past the address's expiry (5 s).
    std::thread::sleep(
        Duration::from_nanos(agent_common::DNS_HEARTBEAT_GRACE_NS) + Duration::from_secs(2),
    );
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt, expired, the agent gone past the grace: frozen, still allowed");
    // Answered (by the resolver itself: nothing redirects it any more)...
    w.look_up("new.example.test", &[], "127.0.73.2");
    // ...and nothing learnt from it.
    w.client()
        .tcp_connect(fresh.addr())
        .assert_eperm("a name the rule allows, looked up while no agent runs: nothing learnt");

    let second = shared.start_with_config(&w.policies, config);
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("expired, with an agent back");
    w.look_up("new.example.test", &[], "127.0.73.2");
    let back = w.client().tcp_connect(fresh.addr());
    assert!(
        back.ok,
        "looked up through the agent back: {}\n{}",
        back.json,
        second.log()
    );
}

/// A damaged `dns-learnt.json` changes nothing the kernel enforces: the
/// next agent sets it aside (logged, counted) and the address the pinned
/// map carried over still connects, unnamed.
#[test]
fn a_damaged_saved_cache_is_set_aside_and_what_was_learnt_stays_allowed() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(9, &[]);
    let shared = SharedPins::new();
    let mut first = shared.start(&w.policies);
    w.look_up("api.example.test", &[], "127.0.69.1");
    assert!(first.stop().success(), "first agent: {}", first.log());

    let state = shared.state_dir();
    let garbage = b"{\"boot_id\": \"x\", \"entries\": [{\"service\": 1";
    std::fs::write(state.join("dns-learnt.json"), garbage).expect("damage dns-learnt.json");
    let second = shared.start(&w.policies);
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("learnt under the first agent, its saved cache damaged");
    assert_handled(&second, &state, "dns-learnt.json", garbage);
    let scrape = Scrape::get(metrics_addr(&second));
    assert_eq!(
        scrape.count("bulkhead_dns_learnt_addresses", &[("service", "svc")]),
        0,
        "nothing restored from the damaged file: {}",
        scrape.text()
    );
}

/// The restart test: 20 agent restarts while the service looks the
/// name up at least 20 times a second (six clients, each a dig of ten
/// names every second: 60/s when no batch waits, 47-58/s measured; the
/// restarts half a second apart: back to back, every batch waited through
/// one and the rate fell to 18-20/s on a slower VM) and connects to the
/// address after each batch, the proxy's sockets held
/// between agents as systemd's `bulkhead-dns.socket` holds them. A lookup
/// sent while no agent runs waits in the held socket and is answered by
/// the next agent (dig tries once, waiting up to 8 s, scaled in a guest); the learnt address
/// is allowed throughout.
#[test]
fn lookups_made_during_twenty_agent_restarts_are_answered_and_never_denied() {
    const RESTARTS: usize = 20;
    const BATCH: u32 = 10;
    const CLIENTS: usize = 6;
    if !require_bpf() {
        return;
    }
    let w = Named::new(6, &[]);
    let held = HeldSockets::bind(addr("127.0.0.1:0"));
    let shared = SharedPins::new();
    let mut agent = shared.start_holding(&w.policies, &held);
    assert!(
        agent.log().contains(&format!("listen={}", held.addr())),
        "the agent serves on the sockets it was given:\n{}",
        agent.log()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let client = |i: usize| {
        let (stop, svc, resolver, api) = (
            Arc::clone(&stop),
            w.svc.path().to_owned(),
            w.resolver(),
            w.api.addr(),
        );
        std::thread::spawn(move || {
            let (mut lookups, mut connects, mut failures) = (0u32, 0u32, Vec::new());
            let time = format!("+time={}", scaled(Duration::from_secs(8)).as_secs());
            // A source address of each client's own (in the test's
            // 127.0.66.0/24): dig sets SO_REUSEPORT on the socket of each
            // query, so two clients' sockets bound to 0.0.0.0 could share
            // a port, and one took the other's answer (";; Warning: ID
            // mismatch") while that one timed out (seen at 60 lookups/s).
            let source = format!("127.0.66.{}", 11 + i);
            let mut args = vec![time.as_str(), "-b", source.as_str()];
            args.extend(["api.example.test"; BATCH as usize - 1]);
            while !stop.load(Ordering::Relaxed) {
                let batch_started = Instant::now();
                let out = dig_in(&svc, resolver, "api.example.test", &args);
                let answers = dig_answers(&out);
                lookups += BATCH;
                let good = answers
                    .iter()
                    .filter(|(status, addrs)| {
                        status == "NOERROR" && *addrs == [api.ip().to_string()]
                    })
                    .count();
                // An answer meant for another socket: the proxy answered
                // the wrong client (the clients share no address or port).
                let text = dig_text(&out);
                if good != BATCH as usize || text.contains("ID mismatch") {
                    failures.push(format!(
                        "{} of {BATCH} lookups failed: {answers:?}\n{text}",
                        BATCH as usize - good,
                    ));
                }
                connects += 1;
                let connect = probe!().in_cgroup(&svc).tcp_connect(api);
                if !connect.ok {
                    failures.push(format!("connect: {}", connect.json));
                }
                std::thread::sleep(Duration::from_secs(1).saturating_sub(batch_started.elapsed()));
            }
            (lookups, connects, failures)
        })
    };
    let clients: Vec<_> = (0..CLIENTS).map(client).collect();
    // Each agent's warnings and errors, for a failure's message: the query
    // lost may have been the business of any of them.
    let mut warnings = Vec::new();
    for restart in 1..=RESTARTS {
        assert!(agent.stop().success(), "agent {restart}: {}", agent.log());
        warnings.extend(
            agent
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(|l| format!("agent {restart}: {l}")),
        );
        agent = shared.start_holding(&w.policies, &held);
        // Half a second of serving between restarts: back to back, every
        // batch waited through one and the load fell to the floor.
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (mut lookups, mut connects, mut failures) = (0, 0, Vec::new());
    for client in clients {
        let (l, c, f) = client.join().expect("a client thread");
        (lookups, connects) = (lookups + l, connects + c);
        failures.extend(f);
    }
    let rate = f64::from(lookups) / started.elapsed().as_secs_f64();
    assert!(
        failures.is_empty(),
        "{} failures in {lookups} lookups and {connects} connects across {RESTARTS} restarts:\n{}\nthe agents' warnings:\n{}\nlast agent:\n{}",
        failures.len(),
        failures.join("\n"),
        warnings.join("\n"),
        agent.log()
    );
    eprintln!(
        "{lookups} lookups ({rate:.1}/s) and {connects} connects across {RESTARTS} restarts, none failed"
    );
    // The 20/s on the host; a guest under emulation (scaled
    // timeouts) spawns its clients that much more slowly (1.2/s measured
    // with four clients on 6.1 under TCG).
    let floor = 20.0 / scaled(Duration::from_secs(1)).as_secs_f64();
    assert!(
        rate >= floor,
        "the load was too light to mean anything: {lookups} lookups, {rate:.1}/s (< {floor:.1}/s)"
    );
}

/// A learnt address's rule bits are positions in the service's list of
/// name rules. Reordered while no agent ran, the old bits would pick the
/// other rule's ports: the next agent must allow nothing learnt under the
/// old list (fail closed until the next lookup).
#[test]
fn name_rules_reordered_while_no_agent_ran_allow_nothing_learnt_under_the_old_order() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(7, &[]);
    let second_port = probe!().listen(Proto::Tcp, addr("127.0.67.1:0"));
    let (api, other) = (w.api.addr(), second_port.addr());
    let policy = |names: [(&str, u16); 2]| {
        let dns = Egress::to([w.resolver().ip()]).ports([53]);
        let [a, b] = names.map(|(name, port)| Egress::to([name]).ports([port]).protocol("tcp"));
        service_policy(&w.svc, "enforce", &[dns, a, b])
    };
    w.policies.write(
        "svc.toml",
        &policy([
            ("api.example.test", api.port()),
            ("other.example.test", other.port()),
        ]),
    );
    let shared = SharedPins::new();
    let mut first = shared.start(&w.policies);
    w.look_up("api.example.test", &[], "127.0.67.1");
    w.client()
        .tcp_connect(api)
        .assert_ok("learnt by the first rule");
    w.client()
        .tcp_connect(other)
        .assert_eperm("the second rule's port: its name was not looked up");
    assert!(first.stop().success(), "first agent: {}", first.log());

    w.policies.write(
        "svc.toml",
        &policy([
            ("other.example.test", other.port()),
            ("api.example.test", api.port()),
        ]),
    );
    let _second = shared.start(&w.policies);
    w.client()
        .tcp_connect(other)
        .assert_eperm("learnt under the first rule, which is now other.example.test's");
    w.client()
        .tcp_connect(api)
        .assert_eperm("learnt under the old list, not looked up since");
    w.look_up("api.example.test", &[], "127.0.67.1");
    w.client().tcp_connect(api).assert_ok("looked up again");
    w.client()
        .tcp_connect(other)
        .assert_eperm("still only api.example.test's port");
}

/// What a previous agent learnt is carried over into the kernel map at a
/// restart, unknown to the new agent's cache: it is removed from the map
/// once expired, and then denied (the programs read no expiry: removal is
/// what ends a learnt address's TTL).
#[test]
fn learnt_addresses_carried_over_are_swept_from_the_kernel_map_once_expired() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(8, &[]);
    let shared = SharedPins::new();
    let learnt = shared.pin_dir().join("current/maps/LEARNT_V4");
    // Long enough to be carried over (only entries not yet expired are):
    // the next agent reads them about 1 s after the lookup here, but 15 s
    // after it in the emulated guest (CI, 2026-12-07: the 6.1 verifier
    // under emulation), where 15 s let the entry expire first.
    let in_guest = scaled(Duration::from_secs(1)) > Duration::from_secs(1);
    let min_ttl = if in_guest { 35 } else { 15 };
    let mut first =
        shared.start_with_config(&w.policies, &format!("[dns]\nmin_ttl_secs = {min_ttl}\n"));
    w.look_up("api.example.test", &[], "127.0.68.1");
    assert_eq!(pinned_map_len(&learnt), 1, "learnt by the first agent");
    assert!(first.stop().success(), "first agent: {}", first.log());

    let second = shared.start(&w.policies);
    assert!(
        second
            .log()
            .contains("learnt addresses of name rules carried over"),
        "{}",
        second.log()
    );
    // Expired `min_ttl` after the lookup; the new agent removes each entry
    // it carried over at its expiry (its sweep runs each second).
    eventually(
        scaled(Duration::from_secs(20)),
        Duration::from_millis(500),
        || match pinned_map_len(&learnt) {
            0 => Ok(()),
            n => Err(n),
        },
    )
    .unwrap_or_else(|n| {
        panic!(
            "{n} expired entries left in the kernel map:\n{}",
            second.log()
        )
    });
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("expired, not looked up again");
}

/// An agent before `LEARNT_V4` kept learnt IPv4 addresses in `LEARNT` (its
/// 32-byte key, family IPv4): this agent's programs do not read them
/// there, and its start carries them over into `LEARNT_V4`, so an upgrade
/// keeps allowed what was learnt.
#[test]
fn learnt_ipv4_addresses_an_older_agent_kept_in_learnt_are_carried_over() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(14, &[]);
    let shared = SharedPins::new();
    let maps_dir = shared.pin_dir().join("current/maps");
    let (key, name_key, old_value) = learnt_by_a_first_agent(&w, &shared, "127.0.74.1");

    // The entry as the older agent held it: name key, family, 7 bytes of
    // padding, the address in the first 4 of 16.
    let mut old_key = name_key.to_vec();
    old_key.push(agent_common::FAMILY_V4);
    old_key.extend([0; 7]);
    old_key.extend(&key[4..8]);
    old_key.extend([0; 12]);
    maps::delete(&maps_dir.join("LEARNT_V4"), &key);
    maps::update(&maps_dir.join("LEARNT"), &old_key, &old_value);
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("an IPv4 address is looked up in LEARNT_V4 only");

    let second = shared.start(&w.policies);
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("carried over from the older agent's LEARNT");
    assert_eq!(
        pinned_map_len(&maps_dir.join("LEARNT_V4")),
        1,
        "in the new agent's LEARNT_V4: {}",
        second.log()
    );
    assert_eq!(
        pinned_map_len(&maps_dir.join("LEARNT")),
        0,
        "nothing IPv4 in the new agent's LEARNT: {}",
        second.log()
    );
}

/// The one `LEARNT_V4` entry a first agent learnt from the service's
/// lookup of api.example.test (answered `expect`) and left pinned when it
/// stopped: its key, and its value split as [`before_v4_value`] does.
fn learnt_by_a_first_agent(
    w: &Named,
    shared: &SharedPins,
    expect: &str,
) -> (Vec<u8>, [u8; 8], Vec<u8>) {
    let mut first = shared.start(&w.policies);
    w.look_up("api.example.test", &[], expect);
    let held = maps::dump(&shared.pin_dir().join("current/maps/LEARNT_V4"));
    assert_eq!(held.len(), 1, "learnt by the first agent: {held:?}");
    assert!(first.stop().success(), "first agent: {}", first.log());
    let (key, value) = &held[0];
    let (name_key, old_value) = before_v4_value(value);
    (key.clone(), name_key, old_value)
}

/// A `LEARNT_V4` value (expiry, name key, rule bits, padding) split into
/// the name key and the value before `LEARNT_V4`'s 8-byte key (expiry,
/// rule bits, padding: what `LEARNT` still holds).
fn before_v4_value(value: &[u8]) -> ([u8; 8], Vec<u8>) {
    assert_eq!(value.len(), 24, "a LEARNT_V4 value: {value:?}");
    let mut name_key = [0u8; 8];
    name_key.copy_from_slice(&value[8..16]);
    let mut old = value[..8].to_vec();
    old.extend(&value[16..24]);
    (name_key, old)
}

/// An agent before `LEARNT_V4`'s 8-byte key kept its IPv4 addresses under
/// a 12-byte key (the whole name key, then the address) with the 16-byte
/// value `LEARNT` has: its start carries them over, so an upgrade keeps
/// allowed what was learnt.
#[test]
fn learnt_ipv4_addresses_an_older_agent_kept_under_a_12_byte_key_are_carried_over() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(15, &[]);
    let shared = SharedPins::new();
    let learnt_v4 = shared.pin_dir().join("current/maps/LEARNT_V4");
    let (key, name_key, old_value) = learnt_by_a_first_agent(&w, &shared, "127.0.75.1");

    // The older agent's map in place of the first agent's pin (its
    // programs keep their own map until the next agent detaches them).
    let mut old_key = name_key.to_vec();
    old_key.extend(&key[4..8]);
    std::fs::remove_file(&learnt_v4).expect("unpin the first agent's LEARNT_V4");
    maps::create_hash(&learnt_v4, "LEARNT_V4", 12, 16, 64);
    maps::update(&learnt_v4, &old_key, &old_value);

    let second = shared.start(&w.policies);
    assert!(
        second.log().contains(
            "learnt addresses of name rules carried over from the previous agent restored=1"
        ),
        "the second agent carries the entry over:\n{}",
        second.log()
    );
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("carried over from the older agent's 12-byte-key LEARNT_V4");
    let now = maps::dump(&learnt_v4);
    assert_eq!(now.len(), 1, "in the new agent's LEARNT_V4: {now:?}");
    assert_eq!(now[0].0.len(), 8, "the new agent's key is 8 bytes: {now:?}");
    assert_eq!(now[0].1[8..16], name_key, "under the same service: {now:?}");
}

/// Two service names (`fold-N`, the policy file's stem) whose name keys,
/// with one name rule allowing `pattern`, fold to the same 32 bits: the
/// first pair the agent's key (FNV-1a of the service name and its name
/// rules' patterns, `Service::names_key`) gives, found by a birthday
/// search. The test checks the keys the agent wrote, so a change of the
/// key fails it rather than testing nothing.
fn names_folding_alike(pattern: &str) -> (String, String) {
    let key = |name: &str| {
        format!("{name}\n {pattern}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
    };
    let mut seen = std::collections::HashMap::new();
    for i in 0..2_000_000_u32 {
        let name = format!("fold-{i}");
        if let Some(first) = seen.insert(agent_common::fold(key(&name)), name.clone()) {
            return (first, name);
        }
    }
    panic!("no two of 2,000,000 names fold alike")
}

/// Two services whose name keys fold to the same 32 bits share the
/// `LEARNT_V4` slot of an address both may learn (`agent_common`'s
/// `LearntV4Key`): the programs compare the whole key, so the one that
/// did not look the name up is denied, whichever learnt it last (a false
/// denial of the other, documented, never an allow of the other's).
#[test]
fn a_service_whose_name_key_folds_like_anothers_is_never_allowed_what_the_other_learnt() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(16, &[]);
    let other = CgroupGuard::new();
    let (a, b) = names_folding_alike("api.example.test");
    std::fs::remove_file(w.policies.path().join("svc.toml")).expect("remove svc.toml");
    w.policies
        .write(&format!("{a}.toml"), &w.policy(&w.svc, "api.example.test"));
    w.policies
        .write(&format!("{b}.toml"), &w.policy(&other, "api.example.test"));
    let daemon = Daemon::start(&w.policies);
    let name_key = |cgroup: &CgroupGuard| {
        let entry = maps::service_entry(&daemon, cgroup.id())
            .unwrap_or_else(|| panic!("no SERVICES entry for {}", cgroup.path().display()));
        let mut key = [0u8; 8];
        key.copy_from_slice(&entry[16..24]);
        u64::from_ne_bytes(key)
    };
    let (key_a, key_b) = (name_key(&w.svc), name_key(&other));
    assert_ne!(key_a, key_b, "two services, two name keys");
    assert_eq!(
        agent_common::fold(key_a),
        agent_common::fold(key_b),
        "{a} and {b} must fold alike for this test: the agent's name key changed?"
    );
    assert!(
        daemon.log().contains("fold to the same 32 bits"),
        "the agent warns of the pair:\n{}",
        daemon.log()
    );
    let b_client = || probe!().in_cgroup(other.path());
    let b_look_up = || {
        let out = dig_in(other.path(), w.resolver(), "api.example.test", &[]);
        assert_eq!(dig_addresses(&out), ["127.0.76.1"], "{}", dig_text(&out));
    };

    w.look_up("api.example.test", &[], "127.0.76.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("a looked it up");
    b_client()
        .tcp_connect(w.api.addr())
        .assert_eperm("b never looked it up, though a's entry sits in the slot b's key names");

    b_look_up();
    b_client()
        .tcp_connect(w.api.addr())
        .assert_ok("b looked it up");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("the slot holds b's entry now: a is denied until it looks it up again");

    w.look_up("api.example.test", &[], "127.0.76.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("a looked it up again");
    b_client()
        .tcp_connect(w.api.addr())
        .assert_eperm("and b is denied again");
}

#[test]
fn changed_name_rules_revoke_what_the_service_learnt_under_them() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(4, &[]);
    let daemon = Daemon::start(&w.policies);

    w.look_up("api.example.test", &[], "127.0.64.1");
    w.client().tcp_connect(w.api.addr()).assert_ok("learnt");

    // The name rule now allows another name only.
    w.policies
        .write("svc.toml", &w.policy(&w.svc, "web.example.test"));
    let out = reload(&daemon);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("an address learnt for a name the policy no longer allows");
    w.look_up("api.example.test", &[], "127.0.64.1");
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("looked up again, but no rule allows the name now");
}

#[test]
fn a_query_sent_to_the_proxy_directly_is_refused_and_teaches_nothing() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(5, &[]);
    let daemon = Daemon::start(&w.policies);
    let log = daemon.log();
    let proxy: SocketAddr = log
        .split("DNS proxy: lookups of services with name rules go through it listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the agent logs where its proxy listens:\n{log}"));

    // From outside every service: no redirect recorded who asks.
    let out = dig(proxy, "api.example.test", &[]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("REFUSED"),
        "{}",
        dig_text(&out)
    );
    assert!(dig_addresses(&out).is_empty(), "{}", dig_text(&out));
    // From the service itself, over UDP and TCP: its call to the proxy's
    // address is not judged (a lookup redirected by a program beside ours
    // arrives there too), but its socket was never redirected, so nothing
    // routes the query.
    for transport in [&[][..], &["+tcp"]] {
        let out = dig_in(w.svc.path(), proxy, "api.example.test", transport);
        assert_eq!(
            dig_status(&out).as_deref(),
            Some("REFUSED"),
            "{}",
            dig_text(&out)
        );
    }
    w.client()
        .tcp_connect(w.api.addr())
        .assert_eperm("nothing was learnt for the service");
}

/// A query waits in the proxy's socket (the agent stopped) while its
/// client's port passes to another service's socket, whose own query
/// rewrites what the kernel says of that port (`DNS_CLIENTS`). The waiting
/// query must not be routed as the second service's: that one would then
/// learn an address from a lookup it never made. The mark each query
/// carries says who sent it; the waiting query is refused.
#[test]
fn a_waiting_query_whose_port_passed_to_another_service_is_not_routed_as_that_one() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(10, &[]);
    let other = CgroupGuard::new();
    // The other service's rules allow the same name: routed as it, the
    // first service's lookup would teach it the address.
    w.policies
        .write("other.toml", &w.policy(&other, "api.example.test"));
    let daemon = Daemon::start(&w.policies);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port();
    let from = format!("127.0.0.1#{port}");
    let pid = daemon.pid().expect("the agent runs");

    assert!(signal(pid, libc::SIGSTOP), "stop the agent");
    // Both give up unanswered (the proxy is stopped); their queries wait.
    let first = dig_in(
        w.svc.path(),
        w.resolver(),
        "api.example.test",
        &["-b", &from, "+time=1"],
    );
    let second = dig_in(
        other.path(),
        w.resolver(),
        "nothing.example.test",
        &["-b", &from, "+time=1"],
    );
    assert!(signal(pid, libc::SIGCONT), "resume the agent");
    assert!(dig_status(&first).is_none(), "{}", dig_text(&first));
    assert!(dig_status(&second).is_none(), "{}", dig_text(&second));

    // Both queries read: one refused (no service named), one routed.
    let lookups = |scrape: &Scrape| -> u64 {
        scrape
            .series()
            .iter()
            .filter(|((name, _), _)| name == "bulkhead_dns_lookups_total")
            .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
            .sum()
    };
    let scrape = eventually(
        scaled(Duration::from_secs(10)),
        Duration::from_millis(100),
        || {
            let scrape = Scrape::get(metrics_addr(&daemon));
            if lookups(&scrape) >= 2 {
                Ok(scrape)
            } else {
                Err(scrape.text().to_owned())
            }
        },
    )
    .unwrap_or_else(|text| panic!("the proxy did not read both queries:\n{text}"));
    assert_eq!(lookups(&scrape), 2, "{}", scrape.text());
    probe!()
        .in_cgroup(other.path())
        .tcp_connect(w.api.addr())
        .assert_eperm("the address of a name only the first service looked up");
    assert_eq!(
        scrape.count(
            "bulkhead_dns_lookups_total",
            &[("service", ""), ("result", "refused")]
        ),
        1,
        "the waiting query refused: {}",
        scrape.text()
    );
}

/// A host whose netfilter rewrites the mark of the packets it receives
/// (wg-quick's full-tunnel rule: `meta mark set ct mark` in prerouting,
/// which zeroes it; iptables' `CONNMARK --restore-mark`): lookups still
/// go through, because the mark the proxy checks is set as the query
/// reaches the proxy's socket, after netfilter (with the mark set on the
/// way out instead, the proxy refused every UDP lookup here).
#[test]
fn lookups_go_through_on_a_host_whose_netfilter_rewrites_marks() {
    if !require_bpf() {
        return;
    }
    let Some(nft) = require_tool("nft", "nftables") else {
        return;
    };
    let w = Named::new(12, &[]);
    let _daemon = Daemon::start(&w.policies);
    let _premangle = NftTable::load(
        nft,
        "inet",
        "bulkhead_test_mark",
        "chain premangle {\n type filter hook prerouting priority mangle;\n meta l4proto udp meta mark set ct mark\n}",
    );
    let out = dig_in(w.svc.path(), w.resolver(), "api.example.test", &[]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("NOERROR"),
        "{}",
        dig_text(&out)
    );
    assert_eq!(dig_addresses(&out), ["127.0.72.1"], "{}", dig_text(&out));
    w.client()
        .tcp_connect(w.api.addr())
        .assert_ok("right after a lookup the rule's mark rewrite did not refuse");
}

/// After the service's own lookup and connect: the decision event names
/// the name and the name rule; the metrics count the lookup under the
/// service as answered and show one learnt address; the graph draws the
/// address under the name; `bulkhead learn` proposes the name, not the
/// address. The lookup's own decision (to the resolver, by address) and
/// a connect of another service to the same address carry no name.
#[test]
fn a_lookup_names_the_decision_the_metrics_the_graph_and_learn() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(6, &[]);
    let bystander = CgroupGuard::new();
    let bystander_rule = Egress::to([w.api.addr().ip()])
        .ports([w.api.port()])
        .protocol("tcp");
    let bystander_dns = Egress::to([w.resolver().ip()]).ports([53]);
    w.policies.write(
        "bystander.toml",
        &service_policy(&bystander, "enforce", &[bystander_rule, bystander_dns]),
    );
    let daemon = Daemon::start(&w.policies);
    let api = w.api.addr();

    // A service without name rules is not touched: its lookup goes to its
    // resolver, not through the proxy (the metrics below count none).
    let out = dig_in(bystander.path(), w.resolver(), "api.example.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.0.66.1"], "{}", dig_text(&out));
    w.look_up("api.example.test", &[], "127.0.66.1");
    w.client()
        .tcp_connect(api)
        .assert_ok("api.example.test's address right after the lookup");
    probe!()
        .in_cgroup(bystander.path())
        .tcp_connect(api)
        .assert_ok("the same address, by address, from another service");

    // The decision event.
    let allowed_to = |ev: &Value, service: &str, to: SocketAddr| {
        ev["type"] == "verdict"
            && ev["service"] == service
            && ev["verdict"] == "allow"
            && ev["dst_ip"] == to.ip().to_string()
            && ev["dst_port"] == to.port()
    };
    let ev = wait_event(&daemon, "the allowed connect to the learnt address", |ev| {
        allowed_to(ev, "svc", api)
    });
    assert_eq!(ev["dst_name"], "api.example.test", "{ev:#}");
    assert_eq!(ev["rule"], "svc.toml#egress[1]", "the name rule: {ev:#}");
    let lookup = wait_event(&daemon, "the lookup's own decision", |ev| {
        allowed_to(ev, "svc", w.resolver())
    });
    assert_eq!(lookup["dst_name"], Value::Null, "{lookup:#}");
    let other = wait_event(&daemon, "the other service's connect", |ev| {
        allowed_to(ev, "bystander", api)
    });
    assert_eq!(other["dst_name"], Value::Null, "{other:#}");
    // The connection's establishment and close (its bytes) are named too.
    for kind in ["tcp_established", "tcp_closed"] {
        let of = |service: &'static str| {
            move |ev: &Value| {
                ev["type"] == kind
                    && ev["service"] == service
                    && ev["dst_ip"] == api.ip().to_string()
                    && ev["dst_port"] == api.port()
            }
        };
        let ev = wait_event(&daemon, kind, of("svc"));
        assert_eq!(ev["dst_name"], "api.example.test", "{ev:#}");
        let other = wait_event(&daemon, kind, of("bystander"));
        assert_eq!(other["dst_name"], Value::Null, "{other:#}");
    }

    // The metrics.
    assert_the_proxys_metrics(&daemon);
    assert_the_graph_draws_the_name(&daemon, api);
    assert_learn_proposes_the_name(&daemon, api);
}

/// The metrics after [`a_lookup_names_the_decision_the_metrics_the_graph_and_learn`]'s
/// lookups: `svc`'s one lookup answered, learnt and timed; none of
/// `bystander`'s (no name rules: never redirected).
fn assert_the_proxys_metrics(daemon: &Daemon) {
    let scrape = Scrape::get(metrics_addr(daemon));
    let lookups = |result: &str| {
        scrape.count(
            "bulkhead_dns_lookups_total",
            &[("service", "svc"), ("result", result)],
        )
    };
    assert_eq!(lookups("answered"), 1, "{}", scrape.text());
    assert!(
        scrape
            .label_sets("bulkhead_dns_lookups_total", ("result", "refused"))
            .is_empty(),
        "nothing refused: {}",
        scrape.text()
    );
    assert_eq!(
        scrape.count("bulkhead_dns_learnt_addresses", &[("service", "svc")]),
        1,
        "{}",
        scrape.text()
    );
    assert!(
        scrape
            .label_sets("bulkhead_dns_lookups_total", ("service", "bystander"))
            .is_empty(),
        "the service without name rules made no lookup through the proxy: {}",
        scrape.text()
    );
    assert_eq!(
        scrape.count("bulkhead_dns_proxy_added_seconds_count", &[]),
        1,
        "one answered lookup timed (the other service's was not redirected): {}",
        scrape.text()
    );
    let added = scrape.real("bulkhead_dns_proxy_added_seconds_sum", &[]);
    assert!(
        added > 0.0 && added < 1.0,
        "the proxy's added latency of that lookup, {added} s: {}",
        scrape.text()
    );
    // The sweep runs each second (what ends a learnt address's TTL).
    let sweep_age = scrape.real("bulkhead_dns_sweep_age_seconds", &[]);
    assert!(
        (0.0..3.0).contains(&sweep_age),
        "swept {sweep_age} s ago: {}",
        scrape.text()
    );
    assert_eq!(
        scrape.count(
            "bulkhead_dns_learnt_evictions_total",
            &[("service", "svc"), ("reason", "per_name_cap")]
        ),
        0
    );
}

/// A service in audit mode with no name rules, `observe_lookups = true`:
/// its lookups go through the proxy, which learns nothing (the service
/// has no rule a name could widen) but notes which name each address
/// came from, so that its decisions carry `dst_name` and `bulkhead learn`
/// proposes the name from scratch, not its address.
#[test]
fn observed_lookups_of_a_service_without_name_rules_let_learn_propose_the_name() {
    if !require_bpf() {
        return;
    }
    let w = Named::new(11, &[]);
    w.policies.write(
        "svc.toml",
        &format!(
            "{}observe_lookups = true\n",
            service_policy(&w.svc, "audit", &[])
        ),
    );
    let daemon = Daemon::start(&w.policies);
    let api = w.api.addr();

    w.look_up("api.example.test", &[], "127.0.71.1");
    w.client().tcp_connect(api).assert_ok("audit mode");
    let ev = wait_event(
        &daemon,
        "the audited connect to the looked-up address",
        |ev| {
            ev["type"] == "verdict"
                && ev["service"] == "svc"
                && ev["dst_ip"] == api.ip().to_string()
                && ev["dst_port"] == api.port()
        },
    );
    assert_eq!(ev["verdict"], "audit", "{ev:#}");
    assert_eq!(ev["dst_name"], "api.example.test", "{ev:#}");
    let scrape = Scrape::get(metrics_addr(&daemon));
    assert_eq!(
        scrape.count(
            "bulkhead_dns_lookups_total",
            &[("service", "svc"), ("result", "answered")]
        ),
        1,
        "{}",
        scrape.text()
    );
    assert_eq!(
        scrape.count("bulkhead_dns_learnt_addresses", &[("service", "svc")]),
        0,
        "observed, not learnt: {}",
        scrape.text()
    );
    assert_learn_proposes_the_name(&daemon, api);
}

/// `bulkhead graph`: `svc`'s edge to `api` goes to the name's node and
/// carries the name; the bystander's goes to the bare address.
fn assert_the_graph_draws_the_name(daemon: &Daemon, api: SocketAddr) {
    // The graph: the address under its name.
    let name_node = format!("name:api.example.test:{}/tcp", api.port());
    let graph = eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        let text = cli(daemon, &["graph", "--format", "json"]);
        let g: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bulkhead graph: not JSON ({e}): {text}"));
        let found = g["edges"].as_array().is_some_and(|edges| {
            edges
                .iter()
                .any(|e| e["from"] == "service:svc" && e["to"] == name_node.as_str())
        });
        if found {
            Ok(g)
        } else {
            Err(g)
        }
    })
    .unwrap_or_else(|g| panic!("no edge service:svc -> {name_node} in {g:#}"));
    let edge = graph["edges"]
        .as_array()
        .and_then(|edges| edges.iter().find(|e| e["to"] == name_node.as_str()))
        .unwrap_or_else(|| panic!("{graph:#}"));
    assert_eq!(edge["dest"], format!("{api}/tcp"), "{edge:#}");
    assert_eq!(edge["dst_name"], "api.example.test", "{edge:#}");
    // Its edge to the api address (it also looked the name up, straight
    // from its resolver, which is an edge of its own).
    let bystander_edge = graph["edges"]
        .as_array()
        .and_then(|edges| {
            edges.iter().find(|e| {
                e["from"] == "service:bystander" && e["dest"] == format!("{api}/tcp").as_str()
            })
        })
        .unwrap_or_else(|| panic!("{graph:#}"));
    assert_eq!(
        bystander_edge["to"],
        format!("endpoint:{api}/tcp"),
        "the other service reached an address, not a name: {bystander_edge:#}"
    );
}

/// `bulkhead learn svc`: the name, not the address, and it checks.
fn assert_learn_proposes_the_name(daemon: &Daemon, api: SocketAddr) {
    // `bulkhead learn`: the name, not the address, and it checks.
    let scratch = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = scratch.path().join("learned.toml");
    let said = cli(
        daemon,
        &["learn", "svc", "--output", &out.to_string_lossy()],
    );
    assert!(said.contains("passes `bulkhead check`"), "{said}");
    let learned = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        learned.contains(&format!(
            "to = [\"api.example.test\"]\nports = [{}]\nprotocol = \"tcp\"",
            api.port()
        )),
        "{learned}"
    );
    assert!(
        !learned
            .lines()
            .any(|l| l.starts_with("to = ") && l.contains(&api.ip().to_string())),
        "the name's address is not learned as an address: {learned}"
    );
}
