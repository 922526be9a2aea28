//! Ways to reach a destination the policy does not allow: address forms,
//! send paths, source routing, other tasks, received sockets, `io_uring`.

use std::net::{IpAddr, SocketAddr};

use integration_tests::{
    addr, cgroup2_mount, probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Listener,
    NetnsGuard, Outcome, PolicyDir, Probe, Proto,
};

/// Starts the daemon with one policy: `svc` enforcing `rules`.
fn enforce(svc: &CgroupGuard, rules: &[Egress]) -> (PolicyDir, Daemon) {
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(svc, "enforce", rules))]);
    let daemon = Daemon::start(&policies);
    (policies, daemon)
}

/// A rule allowing exactly `l`'s address and port.
fn only(l: &Listener) -> Egress {
    Egress::to([l.addr().ip()]).ports([l.port()])
}

#[test]
fn connected_udp_sendmsg_with_control_messages_reaches_allowed_peer() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let udp4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let udp6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let _agent = enforce(&svc, &[only(&udp4), only(&udp6)]);

    let client = probe!().in_cgroup(svc.path());
    let mut refused: Vec<Outcome> = Vec::new();
    for (cmsgs, l) in [
        (&["tos", "pktinfo", "segment"][..], &udp4),
        (&["tclass", "segment"][..], &udp6),
    ] {
        client
            .udp_connect(l.addr())
            .assert_ok("plain send() on a socket connected to the allowed peer");
        refused.extend(
            cmsgs
                .iter()
                .map(|cmsg| client.udp_cmsg(cmsg, l.addr()))
                .filter(|o| !o.ok),
        );
    }
    let refused: Vec<String> = refused
        .iter()
        .map(|o| format!("{}: {}", o.what, o.json))
        .collect();
    assert!(
        refused.is_empty(),
        "sendmsg() with a control message on a socket connected to an allowed peer goes to \
         that peer, so it must be delivered; these were not: {refused:#?}"
    );
}

/// A source-route case: a remote host with an allowed address (a UDP
/// listener on it) and a second address, the first hop a source route
/// would send through, which no rule allows; and the service, enforcing.
struct SourceRoute {
    _agent: (PolicyDir, Daemon),
    udp: Listener,
    hop: IpAddr,
    svc: CgroupGuard,
    _remote: NetnsGuard,
}

impl SourceRoute {
    fn new(v6: bool) -> Self {
        let remote = NetnsGuard::new();
        let (allowed, hop): (IpAddr, IpAddr) = if v6 {
            (remote.v6(2).into(), remote.add_addr_v6(3).into())
        } else {
            (remote.v4(2).into(), remote.add_addr_v4(3).into())
        };
        let udp = probe!()
            .in_netns(remote.name())
            .listen(Proto::Udp, SocketAddr::new(allowed, 0));
        let svc = CgroupGuard::new();
        let agent = enforce(&svc, &[Egress::to([allowed])]);
        probe!()
            .in_cgroup(svc.path())
            .udp_sendto(udp.addr())
            .assert_ok("the allowed destination, without a source route");
        Self {
            _agent: agent,
            udp,
            hop,
            svc,
            _remote: remote,
        }
    }

    fn client(&self) -> Probe {
        probe!().in_cgroup(self.svc.path())
    }
}

#[test]
fn ip_options_source_route_refused_at_setsockopt() {
    if !require_bpf() {
        return;
    }
    let case = SourceRoute::new(false);
    let IpAddr::V4(hop) = case.hop else {
        unreachable!("an IPv4 case")
    };
    case.client()
        .ip_options_lsrr(hop, case.udp.addr())
        .assert_eperm_at(
            "setsockopt",
            "IP_OPTIONS with a loose source route sends the datagram to its first hop",
        );
    probe!()
        .ip_options_lsrr(hop, case.udp.addr())
        .assert_ok("an unmanaged process may set a source route");
}

#[test]
fn ipv6_routing_header_refused_at_setsockopt() {
    if !require_bpf() {
        return;
    }
    let case = SourceRoute::new(true);
    let IpAddr::V6(hop) = case.hop else {
        unreachable!("an IPv6 case")
    };
    case.client()
        .ipv6_rthdr(hop, case.udp.addr())
        .assert_eperm_at(
            "setsockopt",
            "IPV6_RTHDR (segment routing) sends the datagram to its first segment",
        );
    probe!()
        .ipv6_rthdr(hop, case.udp.addr())
        .assert_ok("an unmanaged process may set a routing header");
}

#[test]
fn ip_retopts_source_route_refused_at_sendmsg() {
    if !require_bpf() {
        return;
    }
    let case = SourceRoute::new(false);
    let IpAddr::V4(hop) = case.hop else {
        unreachable!("an IPv4 case")
    };
    case.client()
        .retopts_sendmsg(hop, case.udp.addr())
        .assert_eperm_at(
            "sendmsg",
            "an IP_RETOPTS control message with a loose source route sends the datagram \
             to its first hop, which no rule allows",
        );
}

#[test]
fn ipv4_mapped_ipv6_destination_judged_as_ipv4() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let tcp = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let mapped = |l: &Listener| {
        SocketAddr::new(
            IpAddr::V6(match l.addr().ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            }),
            l.port(),
        )
    };
    // Every IPv6 destination, no IPv4 one.
    let _agent = enforce(&svc, &[Egress::to(["::/0"])]);

    let client = probe!().in_cgroup(svc.path());
    client
        .tcp_connect(tcp6.addr())
        .assert_ok("[::1] is in ::/0");
    let why = "::ffff:127.0.0.1 is 127.0.0.1, which no rule allows";
    client
        .tcp_connect(mapped(&tcp))
        .assert_eperm_at("connect", why);
    client
        .udp_connect(mapped(&udp))
        .assert_eperm_at("connect", why);
    client.udp_sendto(mapped(&udp)).assert_eperm_at("send", why);
}

#[test]
fn tcp_fast_open_to_denied_destination() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let tcp4 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let client = probe!().in_cgroup(svc.path());
    client
        .tcp_fastopen(tcp4.addr())
        .assert_ok("baseline: fast open works before bulkhead runs");
    let _agent = enforce(&svc, &[only(&allowed)]);

    client
        .tcp_fastopen(allowed.addr())
        .assert_ok("sendto(MSG_FASTOPEN) to the allowed port");
    for l in [&tcp4, &tcp6] {
        client
            .tcp_fastopen(l.addr())
            .assert_eperm_at("send", "sendto(MSG_FASTOPEN) connects without connect()");
    }
}

#[test]
fn af_unspec_disconnect_then_sendto_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let denied4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let allowed6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let denied6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let _agent = enforce(&svc, &[only(&allowed4), only(&allowed6)]);

    let client = probe!().in_cgroup(svc.path());
    for (allowed, denied) in [(&allowed4, &denied4), (&allowed6, &denied6)] {
        client
            .udp_unspec_sendto(allowed.addr(), allowed.addr())
            .assert_ok("connect, dissolve, sendto() the allowed peer");
        client
            .udp_unspec_sendto(allowed.addr(), denied.addr())
            .assert_eperm_at(
                "sendto",
                "a socket once connected to an allowed peer, dissolved with AF_UNSPEC, \
                 sends to a port no rule allows",
            );
    }
}

#[test]
fn nested_cgroup_below_service_still_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let nested = svc.child("worker/inner");
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let _agent = enforce(&svc, &[only(&allowed)]);

    let client = probe!().in_cgroup(&nested);
    client
        .tcp_connect(allowed.addr())
        .assert_ok("the service's rule applies below it");
    let why = "a cgroup made below the service is still the service";
    client
        .tcp_connect(denied.addr())
        .assert_eperm_at("connect", why);
    client.udp_sendto(udp.addr()).assert_eperm_at("send", why);
}

#[test]
fn threads_forks_and_vfork_children_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let _agent = enforce(&svc, &[only(&allowed)]);

    let client = probe!().in_cgroup(svc.path());
    for via in ["thread", "fork", "vfork"] {
        client
            .tcp_connect_via(via, allowed.addr())
            .assert_ok(&format!("a {via} of the service, to the allowed port"));
        client
            .tcp_connect_via(via, denied.addr())
            .assert_eperm_at("connect", &format!("a {via} of the service"));
    }
}

#[test]
fn unprivileged_service_cannot_move_to_another_cgroup() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let _agent = enforce(&svc, &[]);

    let client = probe!().in_cgroup(svc.path());
    let root = cgroup2_mount();
    // cgroup.procs of the root is root's, mode 0644: opening it for
    // writing as uid 65534 fails the permission check.
    client.drop_privs_move(&root, None).assert_errno_at(
        libc::EACCES,
        "move",
        "uid 65534 writing its pid into the cgroup2 root's cgroup.procs",
    );
    client
        .drop_privs_move(&root, Some(denied.addr()))
        .assert_eperm_at(
            "connect",
            "after the failed move the process is still the service",
        );
}

#[test]
fn socket_passed_in_with_scm_rights_judged_by_its_user() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let tcp = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    // The probe itself stays unmanaged: it makes the sockets and hands
    // them to its child, which joins the service.
    let outside = probe!();
    outside
        .scm_rights(svc.path(), "tcp-connect", tcp.addr())
        .assert_ok("baseline: the passed socket works before bulkhead runs");
    let _agent = enforce(&svc, &[]);

    let why = "a socket made outside the service, used inside it";
    outside
        .scm_rights(svc.path(), "tcp-connect", tcp.addr())
        .assert_eperm_at("connect", why);
    outside
        .scm_rights(svc.path(), "udp-sendto", udp.addr())
        .assert_eperm_at("sendto", why);
}

#[test]
fn io_uring_connect_and_sendmsg_denied() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let tcp = [
        probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
        probe!().listen(Proto::Tcp, addr("[::1]:0")),
    ];
    let udp = [
        probe!().listen(Proto::Udp, addr("127.0.0.1:0")),
        probe!().listen(Proto::Udp, addr("[::1]:0")),
    ];
    let client = probe!().in_cgroup(svc.path());
    client
        .uring_connect("inline", tcp[0].addr())
        .assert_ok("baseline: IORING_OP_CONNECT before bulkhead runs");
    client
        .uring_sendmsg("inline", udp[0].addr())
        .assert_ok("baseline: IORING_OP_SENDMSG before bulkhead runs");
    let _agent = enforce(&svc, &[]);

    // Inline, the submitting task runs the request; with IOSQE_ASYNC an
    // io-wq worker thread of the service does.
    for mode in ["inline", "worker"] {
        for (t, u) in tcp.iter().zip(&udp) {
            client.uring_connect(mode, t.addr()).assert_eperm_at(
                "connect",
                &format!("IORING_OP_CONNECT ({mode}) from the service"),
            );
            client.uring_sendmsg(mode, u.addr()).assert_eperm_at(
                "sendmsg",
                &format!("IORING_OP_SENDMSG ({mode}) from the service"),
            );
        }
    }
}
