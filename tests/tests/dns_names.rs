//! Egress by DNS name, end to end (docs/dns-names.md): a real dnsmasq on
//! port 53 of a loopback address of its own, a real client (`dig`) in the
//! service's cgroup asking it, and real connects to the addresses it
//! answered (loopback listeners standing in for the named hosts).

use std::net::{IpAddr, SocketAddr};

use integration_tests::{
    addr,
    control::{reload, SharedPins},
    dns_server::{dig, dig_addresses, dig_in, dig_status, dig_text},
    probe, require_bpf, service_policy, CgroupGuard, Daemon, DnsServer, Egress, PolicyDir, Proto,
};

/// Where each test's resolver listens (port 53, as resolv.conf has it).
fn resolver(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 53, n], 53))
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test bug: address")
}

/// The policy of a service that may ask `resolver` and reach
/// `api.example.test` on `port` over TCP.
fn named_policy(svc: &CgroupGuard, resolver: SocketAddr, port: u16) -> String {
    let dns = Egress::to([resolver.ip()]).ports([53]);
    let named = Egress::to(["api.example.test"])
        .ports([port])
        .protocol("tcp");
    service_policy(svc, "enforce", &[dns, named])
}

#[test]
fn an_allowed_name_connects_right_after_the_services_own_lookup() {
    if !require_bpf() {
        return;
    }
    let api = probe!().listen(Proto::Tcp, addr("127.0.61.1:0"));
    let other = probe!().listen(Proto::Tcp, addr("127.0.61.2:0"));
    let at = resolver(1);
    let server = DnsServer::start_at(
        at,
        &[
            ("api.example.test", ip("127.0.61.1")),
            ("other.example.test", ip("127.0.61.2")),
        ],
        &[],
    );
    let svc = CgroupGuard::new();
    let bystander = CgroupGuard::new();
    let policies = PolicyDir::with(&[
        ("svc.toml", &named_policy(&svc, at, api.port())),
        ("bystander.toml", &named_policy(&bystander, at, api.port())),
    ]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    let api_at = SocketAddr::new(ip("127.0.61.1"), api.port());

    client
        .tcp_connect(api_at)
        .assert_eperm("api.example.test's address before any lookup");
    let out = dig_in(svc.path(), at, "api.example.test", &[]);
    assert_eq!(
        dig_addresses(&out),
        ["127.0.61.1"],
        "the lookup through the agent answers as the resolver does: {}\nagent log:\n{}\ndnsmasq log:\n{}",
        dig_text(&out),
        daemon.log(),
        server.log()
    );
    // The answer shows the resolver the client asked, not the proxy.
    assert!(
        dig_text(&out).contains(&format!("SERVER: {}#53", at.ip())),
        "dig names its resolver: {}",
        dig_text(&out)
    );
    client
        .tcp_connect(api_at)
        .assert_ok("api.example.test's address right after the service looked it up");

    let out = dig_in(svc.path(), at, "other.example.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.0.61.2"], "{}", dig_text(&out));
    client
        .tcp_connect(SocketAddr::new(ip("127.0.61.2"), other.port()))
        .assert_eperm("a name no rule allows, looked up");
    probe!()
        .in_cgroup(bystander.path())
        .tcp_connect(api_at)
        .assert_eperm("an address another service looked up");
}

#[test]
fn a_lookup_over_tcp_teaches_as_one_over_udp() {
    if !require_bpf() {
        return;
    }
    let api = probe!().listen(Proto::Tcp, addr("127.0.62.1:0"));
    let at = resolver(2);
    let _server = DnsServer::start_at(at, &[("api.example.test", ip("127.0.62.1"))], &[]);
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &named_policy(&svc, at, api.port()))]);
    let _daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    let api_at = SocketAddr::new(ip("127.0.62.1"), api.port());

    client.tcp_connect(api_at).assert_eperm("before the lookup");
    let out = dig_in(svc.path(), at, "api.example.test", &["+tcp"]);
    assert_eq!(dig_addresses(&out), ["127.0.62.1"], "{}", dig_text(&out));
    client
        .tcp_connect(api_at)
        .assert_ok("right after a lookup over TCP");
}

#[test]
fn learnt_addresses_stay_allowed_across_an_agent_restart() {
    if !require_bpf() {
        return;
    }
    let api = probe!().listen(Proto::Tcp, addr("127.0.63.1:0"));
    let at = resolver(3);
    let _server = DnsServer::start_at(at, &[("api.example.test", ip("127.0.63.1"))], &[]);
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &named_policy(&svc, at, api.port()))]);
    let shared = SharedPins::new();
    let client = probe!().in_cgroup(svc.path());
    let api_at = SocketAddr::new(ip("127.0.63.1"), api.port());

    let mut first = shared.start(&policies);
    let out = dig_in(svc.path(), at, "api.example.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.0.63.1"], "{}", dig_text(&out));
    client.tcp_connect(api_at).assert_ok("learnt, first agent");
    assert!(first.stop().success(), "first agent: {}", first.log());
    client
        .tcp_connect(api_at)
        .assert_ok("learnt, no agent running (the pinned map holds it)");
    let second = shared.start(&policies);
    client
        .tcp_connect(api_at)
        .assert_ok("learnt under the first agent, the second one running");
    assert!(
        second
            .log()
            .contains("learnt addresses of name rules carried over"),
        "the second agent says it carried them over:\n{}",
        second.log()
    );
}

#[test]
fn changed_name_rules_revoke_what_the_service_learnt_under_them() {
    if !require_bpf() {
        return;
    }
    let api = probe!().listen(Proto::Tcp, addr("127.0.64.1:0"));
    let at = resolver(4);
    let _server = DnsServer::start_at(at, &[("api.example.test", ip("127.0.64.1"))], &[]);
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &named_policy(&svc, at, api.port()))]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    let api_at = SocketAddr::new(ip("127.0.64.1"), api.port());

    let out = dig_in(svc.path(), at, "api.example.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.0.64.1"], "{}", dig_text(&out));
    client.tcp_connect(api_at).assert_ok("learnt");

    // The name rule now allows another name only.
    let dns = Egress::to([at.ip()]).ports([53]);
    let named = Egress::to(["web.example.test"])
        .ports([api.port()])
        .protocol("tcp");
    policies.write("svc.toml", &service_policy(&svc, "enforce", &[dns, named]));
    let out = reload(&daemon);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    client
        .tcp_connect(api_at)
        .assert_eperm("an address learnt for a name the policy no longer allows");
    let out = dig_in(svc.path(), at, "api.example.test", &[]);
    assert_eq!(dig_addresses(&out), ["127.0.64.1"], "{}", dig_text(&out));
    client
        .tcp_connect(api_at)
        .assert_eperm("looked up again, but no rule allows the name now");
}

#[test]
fn a_query_sent_to_the_proxy_directly_is_refused_and_teaches_nothing() {
    if !require_bpf() {
        return;
    }
    let api = probe!().listen(Proto::Tcp, addr("127.0.65.1:0"));
    let at = resolver(5);
    let _server = DnsServer::start_at(at, &[("api.example.test", ip("127.0.65.1"))], &[]);
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &named_policy(&svc, at, api.port()))]);
    let daemon = Daemon::start(&policies);
    let log = daemon.log();
    let proxy: SocketAddr = log
        .split("DNS proxy: lookups of services with name rules go through it listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the agent logs where its proxy listens:\n{log}"));

    // From outside every service: no redirect recorded who asks.
    let out = dig(proxy, "api.example.test", &[]);
    assert_eq!(dig_status(&out).as_deref(), Some("REFUSED"), "{}", dig_text(&out));
    assert!(dig_addresses(&out).is_empty(), "{}", dig_text(&out));
    probe!()
        .in_cgroup(svc.path())
        .tcp_connect(SocketAddr::new(ip("127.0.65.1"), api.port()))
        .assert_eperm("nothing was learnt for the service");
}
