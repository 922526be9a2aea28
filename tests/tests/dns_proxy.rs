//! The DNS proxy of name rules (agent/src/dns, docs/dns-names.md) against a
//! real server (`dnsmasq`, TTL 1) and a real client (`dig`). No BPF: the
//! kernel side does not exist yet, so the proxy is given its route (service,
//! resolver, patterns) directly, and the learnt addresses go into a map of
//! the kernel map's shape. Without `dnsmasq` or `dig` these tests fail
//! (never skip), saying to run `cargo xtask setup`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    str::FromStr,
    sync::Arc,
    thread,
    time::Duration,
};

use bulkhead::dns::{
    answer::{inspect, DnsName},
    learnt::{LearntCache, LearntLimits, MemoryMap, ServiceId},
    name::NamePattern,
    proxy::{Proxy, ProxyConfig, Route, Router},
};
use domain::base::{iana::Rcode, Message, MessageBuilder, Name, Rtype};
use integration_tests::{
    dns_server::{dig, dig_addresses, dig_flags, dig_status, dig_text},
    eventually, DnsServer,
};
use tokio::runtime::Runtime;

const SERVICE: ServiceId = 7;
const CAP: usize = 16;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test bug: address")
}

fn name(text: &str) -> DnsName {
    DnsName::from_ascii(text).expect("test bug: name")
}

/// A proxy on 127.0.0.1 (free port) sending every client's queries to
/// `upstream` as service [`SERVICE`] with `patterns`, on its own runtime
/// (kept alive with it) so the test thread can run `dig`.
struct Running {
    proxy: Proxy<MemoryMap>,
    _runtime: Runtime,
}

fn start_proxy(upstream: SocketAddr, patterns: &[&str], timeout: Duration) -> Running {
    // One name rule with every pattern.
    let rules: Arc<[Vec<NamePattern>]> = Arc::new([patterns
        .iter()
        .map(|p| NamePattern::parse(p).unwrap_or_else(|e| panic!("test bug: {p}: {e}")))
        .collect()]);
    let router: Router = Arc::new(move |_transport, _client, _mark| {
        Some(Route {
            service: SERVICE,
            upstream,
            rules: rules.clone(),
        })
    });
    start_with_router("127.0.0.1:0", router, timeout)
}

fn start_with_router(bind: &str, router: Router, timeout: Duration) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let config = ProxyConfig {
        upstream_timeout: timeout,
        ..ProxyConfig::default()
    };
    let cache = LearntCache::new(LearntLimits {
        min_ttl: Duration::from_secs(30),
        max_per_name: CAP,
        ..LearntLimits::default()
    });
    let proxy = runtime
        .block_on(Proxy::bind(
            bind.parse().expect("test bug: address"),
            router,
            config,
            cache,
            MemoryMap::new(),
        ))
        .expect("proxy binds");
    Running {
        proxy,
        _runtime: runtime,
    }
}

/// What the kernel map would hold: the (service, address) keys.
fn kernel_keys(p: &Proxy<MemoryMap>) -> BTreeSet<(ServiceId, IpAddr)> {
    p.with_learnt(|_, map| map.keys().copied().collect())
}

fn set(addrs: &[&str]) -> BTreeSet<(ServiceId, IpAddr)> {
    addrs.iter().map(|a| (SERVICE, ip(a))).collect()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

fn hosts() -> Vec<(&'static str, IpAddr)> {
    vec![
        ("api.example.test", ip("198.51.100.1")),
        ("api.example.test", ip("198.51.100.2")),
        ("api.example.test", ip("2001:db8::1")),
        ("other.example.test", ip("198.51.100.9")),
        ("lb.cdn.test", ip("203.0.113.20")),
    ]
}

#[test]
fn an_allowed_names_answer_is_the_servers_and_exactly_its_addresses_are_learnt() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;

    let direct = dig(server.addr(), "api.example.test", &[]);
    let proxied = dig(p.addr(), "api.example.test", &[]);
    assert_eq!(
        dig_status(&proxied).as_deref(),
        Some("NOERROR"),
        "{}",
        dig_text(&proxied)
    );
    let mut want = dig_addresses(&direct);
    want.sort();
    let mut got = dig_addresses(&proxied);
    got.sort();
    assert_eq!(
        got,
        vec!["198.51.100.1", "198.51.100.2"],
        "{}",
        dig_text(&proxied)
    );
    assert_eq!(got, want);
    assert_eq!(kernel_keys(p), set(&["198.51.100.1", "198.51.100.2"]));

    let v6 = dig(p.addr(), "api.example.test", &["AAAA"]);
    assert_eq!(dig_addresses(&v6), vec!["2001:db8::1"], "{}", dig_text(&v6));
    assert_eq!(
        kernel_keys(p),
        set(&["198.51.100.1", "198.51.100.2", "2001:db8::1"])
    );
    p.with_learnt(|cache, _| {
        let mut held = cache.addresses(SERVICE, &name("api.example.test"));
        held.sort();
        assert_eq!(
            held,
            vec![ip("198.51.100.1"), ip("198.51.100.2"), ip("2001:db8::1")]
        );
    });
    assert_eq!(count(&p.stats().learnt), 3);
    assert_eq!(count(&p.stats().answered), 2);
}

#[test]
fn a_name_not_allowed_is_answered_but_teaches_nothing() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    let out = dig(p.addr(), "other.example.test", &[]);
    // A name never denies: the client gets its answer, and its connect()
    // is judged by the address rules alone.
    assert_eq!(
        dig_addresses(&out),
        vec!["198.51.100.9"],
        "{}",
        dig_text(&out)
    );
    assert_eq!(kernel_keys(p), BTreeSet::new());
    assert_eq!(count(&p.stats().learnt), 0);
    assert_eq!(count(&p.stats().answered), 1);
}

#[test]
fn a_cname_chain_teaches_the_targets_addresses_for_the_name_asked() {
    let server = DnsServer::start(&hosts(), &[("www.example.test", "lb.cdn.test")]);
    let run = start_proxy(server.addr(), &["*.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    let out = dig(p.addr(), "www.example.test", &[]);
    let text = dig_text(&out);
    assert!(text.contains("CNAME"), "dnsmasq sent no CNAME: {text}");
    assert_eq!(dig_addresses(&out), vec!["203.0.113.20"], "{text}");
    assert_eq!(kernel_keys(p), set(&["203.0.113.20"]));
    p.with_learnt(|cache, _| {
        assert_eq!(
            cache.addresses(SERVICE, &name("www.example.test")),
            vec![ip("203.0.113.20")]
        );
    });
    // Asked directly, the target is not an allowed name.
    let run2 = start_proxy(server.addr(), &["*.example.test"], Duration::from_secs(2));
    let out = dig(run2.proxy.addr(), "lb.cdn.test", &[]);
    assert_eq!(
        dig_addresses(&out),
        vec!["203.0.113.20"],
        "{}",
        dig_text(&out)
    );
    assert_eq!(kernel_keys(&run2.proxy), BTreeSet::new());
}

#[test]
fn a_query_over_tcp_is_forwarded_over_tcp_and_learnt_from() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    let out = dig(p.addr(), "api.example.test", &["+tcp"]);
    let mut got = dig_addresses(&out);
    got.sort();
    assert_eq!(
        got,
        vec!["198.51.100.1", "198.51.100.2"],
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&p.stats().tcp_queries), 1);
    assert_eq!(count(&p.stats().udp_queries), 0);
    assert_eq!(kernel_keys(p), set(&["198.51.100.1", "198.51.100.2"]));
}

#[test]
fn a_thousand_addresses_are_truncated_on_udp_and_capped_over_tcp() {
    let wide: Vec<(&str, IpAddr)> = (0..1_000u16)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            ("wide.example.test", IpAddr::from([198, 18, hi, lo]))
        })
        .collect();
    let server = DnsServer::start(&wide, &[]);
    let run = start_proxy(
        server.addr(),
        &["wide.example.test"],
        Duration::from_secs(5),
    );
    let p = &run.proxy;

    // UDP: the server truncates; the answer passes, TC set, nothing learnt.
    let out = dig(p.addr(), "wide.example.test", &["+ignore"]);
    assert!(
        dig_flags(&out).contains(&"tc".to_owned()),
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&p.stats().truncated), 1);
    assert_eq!(kernel_keys(p), BTreeSet::new());

    // dig's own retry over TCP (as glibc does on TC): the whole answer
    // reaches the proxy, which learns its first CAP, leaves the rest out
    // (an answer never evicts what it gives itself) and gives the client
    // exactly those: an address not held would be denied.
    let out = dig(p.addr(), "wide.example.test", &[]);
    assert_eq!(dig_addresses(&out).len(), CAP, "{}", dig_text(&out));
    assert_eq!(dig_status(&out).as_deref(), Some("NOERROR"));
    assert_eq!(count(&p.stats().tcp_queries), 1);
    assert_eq!(count(&p.stats().trimmed_answers), 1);
    assert_eq!(count(&p.stats().trimmed_addresses), 1_000 - CAP as u64);
    let held = p.with_learnt(|cache, map| {
        assert_eq!(cache.len(), CAP);
        assert_eq!(cache.evictions(), 0);
        assert_eq!(
            cache.left_out_by_service().get(&SERVICE),
            Some(&(1_000 - CAP as u64))
        );
        assert_eq!(map.len(), CAP);
        cache.addresses(SERVICE, &name("wide.example.test"))
    });
    let held: BTreeSet<String> = held.iter().map(ToString::to_string).collect();
    let given: BTreeSet<String> = dig_addresses(&out).into_iter().collect();
    assert_eq!(given, held);
}

#[test]
fn a_names_aaaa_answer_never_evicts_what_its_a_answer_gave() {
    // More than CAP of each family, asked A then AAAA (as glibc does).
    let mut dual: Vec<(&str, IpAddr)> = Vec::new();
    for i in 0..20u8 {
        dual.push(("dual.example.test", IpAddr::from([198, 51, 100, i + 1])));
        dual.push((
            "dual.example.test",
            IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(i) + 1]),
        ));
    }
    let server = DnsServer::start(&dual, &[]);
    let run = start_proxy(
        server.addr(),
        &["dual.example.test"],
        Duration::from_secs(5),
    );
    let p = &run.proxy;
    let a = dig_addresses(&dig(p.addr(), "dual.example.test", &["+tcp", "A"]));
    let aaaa = dig_addresses(&dig(p.addr(), "dual.example.test", &["+tcp", "AAAA"]));
    assert_eq!((a.len(), aaaa.len()), (CAP, CAP), "trimmed: {a:?} {aaaa:?}");
    let given: BTreeSet<(ServiceId, IpAddr)> =
        a.iter().chain(&aaaa).map(|x| (SERVICE, ip(x))).collect();
    assert_eq!(kernel_keys(p), given, "both answers are held whole");
}

#[test]
fn rotated_addresses_are_learnt_as_the_server_gives_them() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    let _ = dig(p.addr(), "api.example.test", &[]);
    server.set_hosts(&[("api.example.test", ip("198.51.100.3"))]);
    let out = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let out = dig(p.addr(), "api.example.test", &[]);
        if dig_addresses(&out) == ["198.51.100.3"] {
            Ok(out)
        } else {
            Err(dig_text(&out))
        }
    })
    .unwrap_or_else(|last| panic!("the new address was never answered: {last}"));
    assert_eq!(dig_status(&out).as_deref(), Some("NOERROR"));
    // The old addresses stay until their (minimum) TTL runs out.
    assert_eq!(
        kernel_keys(p),
        set(&["198.51.100.1", "198.51.100.2", "198.51.100.3"])
    );
}

#[test]
fn a_resolver_that_is_down_gives_servfail_at_once() {
    // A port nobody listens on: the kernel says so (ICMP), no waiting.
    let closed = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    };
    let run = start_proxy(closed, &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    let out = dig(p.addr(), "api.example.test", &[]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("SERVFAIL"),
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&p.stats().upstream_errors), 1);
    assert_eq!(count(&p.stats().upstream_timeouts), 0);
    let out = dig(p.addr(), "api.example.test", &["+tcp"]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("SERVFAIL"),
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&p.stats().upstream_errors), 2);
}

#[test]
fn a_resolver_that_never_answers_gives_servfail_after_the_timeout() {
    // Bound and kept, never read: queries vanish.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let run = start_proxy(
        silent.local_addr().expect("addr"),
        &["api.example.test"],
        Duration::from_millis(300),
    );
    let p = &run.proxy;
    let out = dig(p.addr(), "api.example.test", &[]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("SERVFAIL"),
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&p.stats().upstream_timeouts), 1);
    assert_eq!(kernel_keys(p), BTreeSet::new());
}

#[test]
fn a_client_of_no_known_service_is_refused() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_with_router(
        "127.0.0.1:0",
        Arc::new(|_, _, _| None),
        Duration::from_secs(2),
    );
    let _ = &server;
    let out = dig(run.proxy.addr(), "api.example.test", &[]);
    assert_eq!(
        dig_status(&out).as_deref(),
        Some("REFUSED"),
        "{}",
        dig_text(&out)
    );
    assert_eq!(count(&run.proxy.stats().unknown_clients), 1);
}

#[test]
fn many_clients_at_once_all_get_their_answers() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(5));
    let addr = run.proxy.addr();
    let clients: Vec<_> = (0..40)
        .map(|i| {
            thread::spawn(move || {
                let tcp: &[&str] = if i % 4 == 0 { &["+tcp"] } else { &[] };
                let out = dig(addr, "api.example.test", tcp);
                let mut got = dig_addresses(&out);
                got.sort();
                (got, dig_text(&out))
            })
        })
        .collect();
    for client in clients {
        let (got, text) = client.join().expect("client thread");
        assert_eq!(got, vec!["198.51.100.1", "198.51.100.2"], "{text}");
    }
    let stats = run.proxy.stats();
    assert_eq!(count(&stats.udp_queries) + count(&stats.tcp_queries), 40);
    assert_eq!(count(&stats.answered), 40);
    assert_eq!(count(&stats.overload_drops), 0);
}

/// One UDP exchange with `to`: the raw reply, or `None` after 500 ms.
fn exchange(to: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    socket.send_to(query, to).expect("send");
    let mut buf = vec![0u8; 65_535];
    let (len, _) = socket.recv_from(&mut buf).ok()?;
    buf.truncate(len);
    Some(buf)
}

fn query_bytes(id: u16, qname: &str, qtype: Rtype) -> Vec<u8> {
    let mut b = MessageBuilder::new_vec();
    b.header_mut().set_id(id);
    b.header_mut().set_rd(true);
    let mut q = b.question();
    let qname: Name<Vec<u8>> = Name::from_str(qname).expect("test bug: name");
    q.push((qname, qtype)).expect("question");
    q.finish()
}

#[test]
fn a_real_servers_answer_is_read_on_the_questions_chain() {
    // The answer module on dnsmasq's own bytes, CNAME and all, no proxy.
    let server = DnsServer::start(&hosts(), &[("www.example.test", "lb.cdn.test")]);
    let query = query_bytes(0x5151, "WWW.example.test", Rtype::A);
    let reply = exchange(server.addr(), &query).expect("dnsmasq answers");
    let got = inspect(&query, &reply).expect("it answers the query");
    assert_eq!(got.rcode, 0);
    assert!(!got.truncated);
    assert_eq!(got.off_chain, 0);
    assert_eq!(got.addresses.len(), 1, "{got:?}");
    let found = &got.addresses[0];
    assert_eq!(found.addr, ip("203.0.113.20"));
    // --local-ttl=1 on both records.
    assert_eq!(found.ttl, 1);
    assert_eq!(
        found.chain,
        vec![name("www.example.test"), name("lb.cdn.test")]
    );
    // Another query's answer is not taken for this one's.
    let other = query_bytes(0x5152, "www.example.test", Rtype::A);
    assert!(inspect(&other, &reply).is_err());
}

#[test]
fn what_is_not_a_query_gets_formerr_or_nothing() {
    let server = DnsServer::start(&hosts(), &[]);
    let run = start_proxy(server.addr(), &["api.example.test"], Duration::from_secs(2));
    let p = &run.proxy;
    // A header with no question: FORMERR with the same ID.
    let mut no_question = MessageBuilder::new_vec();
    no_question.header_mut().set_id(0x0a0b);
    let reply = exchange(p.addr(), &no_question.finish()).expect("a FORMERR answer");
    let reply = Message::from_octets(reply).expect("a DNS message");
    assert_eq!(reply.header().id(), 0x0a0b);
    assert!(reply.header().qr());
    assert_eq!(reply.header().rcode(), Rcode::FORMERR);
    // Not even a header: no answer at all.
    assert_eq!(exchange(p.addr(), &[1, 2, 3, 4, 5]), None);
    assert_eq!(count(&p.stats().malformed_queries), 2);
    assert_eq!(count(&p.stats().answered), 0);
}

#[test]
fn the_proxy_serves_on_ipv6_loopback_too() {
    let server = DnsServer::start(&hosts(), &[]);
    let rules: Arc<[Vec<NamePattern>]> = Arc::new([vec![
        NamePattern::parse("api.example.test").expect("pattern")
    ]]);
    let upstream = server.addr();
    let clients = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = clients.clone();
    let router: Router = Arc::new(move |_, client: SocketAddr, _| {
        seen.lock().expect("client list").push(client);
        Some(Route {
            service: SERVICE,
            upstream,
            rules: rules.clone(),
        })
    });
    let run = start_with_router("[::1]:0", router, Duration::from_secs(2));
    let out = dig(run.proxy.addr(), "api.example.test", &[]);
    let mut got = dig_addresses(&out);
    got.sort();
    assert_eq!(
        got,
        vec!["198.51.100.1", "198.51.100.2"],
        "{}",
        dig_text(&out)
    );
    assert_eq!(
        kernel_keys(&run.proxy),
        set(&["198.51.100.1", "198.51.100.2"])
    );
    let clients = clients.lock().expect("client list").clone();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].ip(), ip("::1"));
}
