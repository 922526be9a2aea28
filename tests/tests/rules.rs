//! How one rule matches: the edges of a CIDR prefix and of a port range,
//! and the protocol field.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use integration_tests::{
    free_port_block, probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Listener,
    NetnsGuard, PolicyDir, Probe, Proto,
};

/// A TCP and a UDP listener on `ip`, each on a port of its own.
fn tcp_and_udp(p: &Probe, ip: IpAddr) -> (Listener, Listener) {
    (
        p.listen(Proto::Tcp, SocketAddr::new(ip, 0)),
        p.listen(Proto::Udp, SocketAddr::new(ip, 0)),
    )
}

#[test]
fn cidr_v4_edges_on_loopback() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let ip = |d: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 10, d));
    // 127.0.10.8/29 is .8 to .15; .7 and .16 are just outside.
    let below = tcp_and_udp(&probe!(), ip(7));
    let first = tcp_and_udp(&probe!(), ip(8));
    let last = tcp_and_udp(&probe!(), ip(15));
    let above = tcp_and_udp(&probe!(), ip(16));
    // A single address is a /32.
    let single = tcp_and_udp(&probe!(), IpAddr::V4(Ipv4Addr::new(127, 0, 11, 1)));
    let next_to_single = tcp_and_udp(&probe!(), IpAddr::V4(Ipv4Addr::new(127, 0, 11, 2)));

    let rule = Egress::to(["127.0.10.8/29", "127.0.11.1"]);
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    for ((tcp, udp), why) in [
        (&first, "first address of 127.0.10.8/29"),
        (&last, "last address of 127.0.10.8/29"),
        (&single, "the single address 127.0.11.1"),
    ] {
        client.tcp_connect(tcp.addr()).assert_ok(why);
        client.udp_sendto(udp.addr()).assert_ok(why);
    }
    for ((tcp, udp), why) in [
        (&below, "127.0.10.7 is just below 127.0.10.8/29"),
        (&above, "127.0.10.16 is just above 127.0.10.8/29"),
        (
            &next_to_single,
            "127.0.11.2 is next to the single 127.0.11.1",
        ),
    ] {
        client.tcp_connect(tcp.addr()).assert_eperm(why);
        client.udp_sendto(udp.addr()).assert_eperm(why);
    }
}

#[test]
fn cidr_v6_edges_on_remote_host() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    // <prefix>::8/125 is ::8 to ::f; ::7 and ::10 are just outside.
    let hosts = [0x7, 0x8, 0xf, 0x10];
    for h in hosts {
        remote.add_addr_v6(h);
    }
    let there = probe!().in_netns(remote.name());
    let listeners: Vec<_> = hosts
        .iter()
        .map(|&h| tcp_and_udp(&there, IpAddr::V6(remote.v6(h))))
        .collect();
    let [below, first, last, above] = &listeners[..] else {
        unreachable!("four hosts, four listener pairs");
    };

    let prefix = format!("{}/125", remote.v6(0x8));
    let rule = Egress::to([&prefix]);
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    for ((tcp, udp), why) in [
        (first, format!("first address of {prefix}")),
        (last, format!("last address of {prefix}")),
    ] {
        client.tcp_connect(tcp.addr()).assert_ok(&why);
        client.udp_connect(udp.addr()).assert_ok(&why);
        client.udp_sendto(udp.addr()).assert_ok(&why);
    }
    for ((tcp, udp), why) in [
        (below, format!("{} is just below {prefix}", remote.v6(0x7))),
        (above, format!("{} is just above {prefix}", remote.v6(0x10))),
    ] {
        client.tcp_connect(tcp.addr()).assert_eperm(&why);
        client.udp_connect(udp.addr()).assert_eperm(&why);
        client.udp_sendto(udp.addr()).assert_eperm(&why);
    }
}

#[test]
fn port_range_edges() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let base = free_port_block(lo, 6);
    let at = |i: u16, proto| probe!().listen(proto, SocketAddr::new(lo, base + i));
    let tcp: Vec<_> = (0..6).map(|i| at(i, Proto::Tcp)).collect();
    let udp: Vec<_> = (0..6).map(|i| at(i, Proto::Udp)).collect();

    // Ports base+1 ..= base+3 as a range, and base+5 on its own.
    let range = format!("{}-{}", base + 1, base + 3);
    let single = (base + 5).to_string();
    let rule = Egress::to(["127.0.0.1"]).ports([&range, &single]);
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    for (i, allowed, why) in [
        (0, false, "the port just below the range"),
        (1, true, "the first port of the range"),
        (2, true, "a port inside the range"),
        (3, true, "the last port of the range"),
        (4, false, "the port just beyond the range"),
        (5, true, "the single listed port"),
    ] {
        let why = format!("{why} ({range}, {single})");
        let (t, u) = (
            client.tcp_connect(tcp[i].addr()),
            client.udp_sendto(udp[i].addr()),
        );
        if allowed {
            t.assert_ok(&why);
            u.assert_ok(&why);
        } else {
            t.assert_eperm(&why);
            u.assert_eperm(&why);
        }
    }
}

#[test]
fn protocol_limits_the_rule() {
    if !require_bpf() {
        return;
    }
    let tcp_svc = CgroupGuard::new();
    let udp_svc = CgroupGuard::new();
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // One port number with both a TCP and a UDP listener on it.
    let port = free_port_block(lo, 1);
    let tcp = probe!().listen(Proto::Tcp, SocketAddr::new(lo, port));
    let udp = probe!().listen(Proto::Udp, SocketAddr::new(lo, port));

    let rule = |proto| Egress::to(["127.0.0.1"]).ports([port]).protocol(proto);
    let policies = PolicyDir::with(&[
        (
            "tcp-only.toml",
            &service_policy(&tcp_svc, "enforce", &[rule("tcp")]),
        ),
        (
            "udp-only.toml",
            &service_policy(&udp_svc, "enforce", &[rule("udp")]),
        ),
    ]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(tcp_svc.path());
    client
        .tcp_connect(tcp.addr())
        .assert_ok("TCP under a tcp-only rule");
    client
        .udp_connect(udp.addr())
        .assert_eperm("connected UDP under a tcp-only rule");
    client
        .udp_sendto(udp.addr())
        .assert_eperm("unconnected UDP under a tcp-only rule");

    let client = probe!().in_cgroup(udp_svc.path());
    client
        .udp_connect(udp.addr())
        .assert_ok("connected UDP under a udp-only rule");
    client
        .udp_sendto(udp.addr())
        .assert_ok("unconnected UDP under a udp-only rule");
    client
        .tcp_connect(tcp.addr())
        .assert_eperm("TCP under a udp-only rule");
}
