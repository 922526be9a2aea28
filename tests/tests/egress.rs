//! Egress enforcement, end to end: a service (a test cgroup) may reach what
//! its policy allows and gets EPERM at once for anything else, over TCP and
//! UDP (connected and unconnected), IPv4 and IPv6, to loopback listeners and
//! to a "remote host" behind a veth pair.

use std::net::{IpAddr, SocketAddr};

use integration_tests::{
    addr, probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Listener, NetnsGuard,
    PolicyDir, Proto,
};

#[test]
fn tcp4_loopback_allowed_and_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let same_ip_other_port = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let other_ip = probe!().listen(Proto::Tcp, addr("127.0.0.2:0"));
    let client = probe!().in_cgroup(svc.path());
    for target in [&allowed, &same_ip_other_port, &other_ip] {
        client
            .tcp_connect(target.addr())
            .assert_ok("baseline, before bulkhead runs");
    }

    let rule = Egress::to(["127.0.0.1"])
        .ports([allowed.port()])
        .protocol("tcp");
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    client
        .tcp_connect(allowed.addr())
        .assert_ok("127.0.0.1 on the allowed port");
    client
        .tcp_connect(same_ip_other_port.addr())
        .assert_eperm("127.0.0.1 on a port the rule does not list");
    client
        .tcp_connect(other_ip.addr())
        .assert_eperm("127.0.0.2 is not in the policy");
}

#[test]
fn tcp6_loopback_allowed_and_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let denied = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let client = probe!().in_cgroup(svc.path());
    client
        .tcp_connect(denied.addr())
        .assert_ok("baseline, before bulkhead runs");

    let rule = Egress::to(["::1"]).ports([allowed.port()]).protocol("tcp");
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    client
        .tcp_connect(allowed.addr())
        .assert_ok("[::1] on the allowed port");
    client
        .tcp_connect(denied.addr())
        .assert_eperm("[::1] on a port the rule does not list");
}

#[test]
fn udp_loopback_connected_and_unconnected() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let denied4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let allowed6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let denied6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let client = probe!().in_cgroup(svc.path());
    client
        .udp_sendto(denied4.addr())
        .assert_ok("baseline, before bulkhead runs");

    let rules = [
        Egress::to(["127.0.0.1"])
            .ports([allowed4.port()])
            .protocol("udp"),
        Egress::to(["::1"]).ports([allowed6.port()]).protocol("udp"),
    ];
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &rules))]);
    let _daemon = Daemon::start(&policies);

    for (allowed, denied) in [(&allowed4, &denied4), (&allowed6, &denied6)] {
        client
            .udp_connect(allowed.addr())
            .assert_ok("connected UDP to the allowed port");
        client
            .udp_sendto(allowed.addr())
            .assert_ok("unconnected UDP to the allowed port");
        client
            .udp_connect(denied.addr())
            .assert_eperm("connected UDP to a port the rule does not list");
        client
            .udp_sendto(denied.addr())
            .assert_eperm("unconnected UDP to a port the rule does not list");
    }
}

#[test]
fn service_without_rules_may_reach_nothing() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let tcp4 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let udp4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let udp6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    let why = "a service with no egress rule is denied everything";
    client.tcp_connect(tcp4.addr()).assert_eperm(why);
    client.tcp_connect(tcp6.addr()).assert_eperm(why);
    client.udp_connect(udp4.addr()).assert_eperm(why);
    client.udp_sendto(udp4.addr()).assert_eperm(why);
    client.udp_connect(udp6.addr()).assert_eperm(why);
    client.udp_sendto(udp6.addr()).assert_eperm(why);
}

#[test]
fn remote_host_over_veth_v4_and_v6() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let (allowed4, denied4) = (remote.v4(2), remote.add_addr_v4(3));
    let (allowed6, denied6) = (remote.v6(2), remote.add_addr_v6(3));
    let there = probe!().in_netns(remote.name());
    let ips: [IpAddr; 4] = [
        allowed4.into(),
        denied4.into(),
        allowed6.into(),
        denied6.into(),
    ];
    let tcp: Vec<_> = ips
        .iter()
        .map(|&ip| there.listen(Proto::Tcp, SocketAddr::new(ip, 0)))
        .collect();
    let udp: Vec<_> = ips
        .iter()
        .map(|&ip| there.listen(Proto::Udp, SocketAddr::new(ip, 0)))
        .collect();
    let client = probe!().in_cgroup(svc.path());
    for l in &tcp {
        client
            .tcp_connect(l.addr())
            .assert_ok("baseline: the remote host answers before bulkhead runs");
    }

    let rule = Egress::to([allowed4.to_string(), allowed6.to_string()]);
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    for (i, family) in [(0, "IPv4"), (2, "IPv6")] {
        let (ok_tcp, no_tcp) = (tcp[i].addr(), tcp[i + 1].addr());
        let (ok_udp, no_udp) = (udp[i].addr(), udp[i + 1].addr());
        let allowed = format!("{family}: the allowed remote address");
        let denied = format!("{family}: a remote address the policy does not list");
        client.tcp_connect(ok_tcp).assert_ok(&allowed);
        client.udp_connect(ok_udp).assert_ok(&allowed);
        client.udp_sendto(ok_udp).assert_ok(&allowed);
        client.tcp_connect(no_tcp).assert_eperm(&denied);
        client.udp_connect(no_udp).assert_eperm(&denied);
        client.udp_sendto(no_udp).assert_eperm(&denied);
    }
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    if !require_bpf() {
        return;
    }
    let v4_only = CgroupGuard::new();
    let v6_only = CgroupGuard::new();
    let tcp = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let other = probe!().listen(Proto::Tcp, addr("127.0.0.2:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let mapped = |l: &Listener| match l.addr() {
        SocketAddr::V4(a) => SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port()),
        SocketAddr::V6(a) => SocketAddr::V6(a),
    };

    let policies = PolicyDir::with(&[
        (
            "v4-only.toml",
            &service_policy(&v4_only, "enforce", &[Egress::to(["127.0.0.1"])]),
        ),
        (
            "v6-only.toml",
            &service_policy(&v6_only, "enforce", &[Egress::to(["::/0"])]),
        ),
    ]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(v4_only.path());
    let why = "::ffff:127.0.0.1 is 127.0.0.1, which the IPv4 rule allows";
    client.tcp_connect(mapped(&tcp)).assert_ok(why);
    client.udp_connect(mapped(&udp)).assert_ok(why);
    client.udp_sendto(mapped(&udp)).assert_ok(why);
    client
        .tcp_connect(mapped(&other))
        .assert_eperm("::ffff:127.0.0.2 is 127.0.0.2, which no rule allows");

    let client = probe!().in_cgroup(v6_only.path());
    client
        .tcp_connect(tcp6.addr())
        .assert_ok("[::1] is inside the allowed ::/0");
    let why = "::ffff:127.0.0.1 is IPv4, so the IPv6 rule ::/0 must not allow it";
    client.tcp_connect(mapped(&tcp)).assert_eperm(why);
    client.udp_connect(mapped(&udp)).assert_eperm(why);
    client.udp_sendto(mapped(&udp)).assert_eperm(why);
}

#[test]
fn connected_udp_socket_cannot_sendto_elsewhere() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let denied4 = probe!().listen(Proto::Udp, addr("127.0.0.2:0"));
    let allowed6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let denied6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let rules = [
        Egress::to(["127.0.0.1"]).ports([allowed4.port()]),
        Egress::to(["::1"]).ports([allowed6.port()]),
    ];
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &rules))]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    for (allowed, denied) in [(&allowed4, &denied4), (&allowed6, &denied6)] {
        client
            .udp_connect_sendto(allowed.addr(), allowed.addr())
            .assert_ok("sendto() the connected, allowed peer");
        client
            .udp_connect_sendto(allowed.addr(), denied.addr())
            .assert_eperm("sendto() an unlisted address from a socket connected to an allowed one");
    }
}

/// A whole address (kept in the kernel's hash of addresses) inside a
/// network (kept in the LPM trie): the address gets its own rule and the
/// network's, its neighbours only the network's, and the lookup never
/// falls through from the hash to a wider answer.
#[test]
fn a_whole_address_inside_a_network_has_its_rules_and_the_networks() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let net_port = probe!().listen(Proto::Tcp, addr("127.0.0.3:0"));
    let host_port = probe!().listen(Proto::Tcp, addr("127.0.0.3:0"));
    let neighbour_net_port =
        probe!().listen(Proto::Tcp, addr(&format!("127.0.0.4:{}", net_port.port())));
    let neighbour_host_port =
        probe!().listen(Proto::Tcp, addr(&format!("127.0.0.4:{}", host_port.port())));
    let outside = probe!().listen(Proto::Tcp, addr(&format!("127.0.1.3:{}", net_port.port())));
    let client = probe!().in_cgroup(svc.path());

    let network = Egress::to(["127.0.0.0/24"])
        .ports([net_port.port()])
        .protocol("tcp");
    let host = Egress::to(["127.0.0.3"])
        .ports([host_port.port()])
        .protocol("tcp");
    let policies = PolicyDir::with(&[(
        "svc.toml",
        &service_policy(&svc, "enforce", &[network, host]),
    )]);
    let _daemon = Daemon::start(&policies);

    client
        .tcp_connect(net_port.addr())
        .assert_ok("127.0.0.3 on the network's port");
    client
        .tcp_connect(host_port.addr())
        .assert_ok("127.0.0.3 on its own port");
    client
        .tcp_connect(neighbour_net_port.addr())
        .assert_ok("127.0.0.4 on the network's port");
    client
        .tcp_connect(neighbour_host_port.addr())
        .assert_eperm("127.0.0.4 on 127.0.0.3's own port");
    client
        .tcp_connect(outside.addr())
        .assert_eperm("127.0.1.3 is outside the network");
}
