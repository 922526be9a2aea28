//! Inbound enforcement (`[[ingress]]`), end to end: a service (a test cgroup
//! in the root namespace) serves TCP and UDP on the root side of a veth
//! pair; peers in a "remote host" namespace, from an allowed and a
//! disallowed source address, connect and send to it.
//!
//! - An allowed peer's connection is accepted and answered; a disallowed
//!   peer's SYN is dropped: its connect gets no answer at all (no reset)
//!   within a bounded time, and the service's socket never sees it.
//! - The same for UDP datagrams, which are echoed or silently dropped.
//! - The service's own outbound TCP and UDP (DNS-style request/reply, on
//!   unconnected and connected sockets) keep working while every inbound
//!   connection is refused: replies are never judged. A "reply" from
//!   another port of the same host is not a reply, and is dropped.
//! - Ports and protocol of a rule count; a policy without `ingress` leaves
//!   inbound alone; audit mode lets everything in and records the would-be
//!   drops.
//! - Every drop is in the decision log with the local end in `src_*`, the
//!   peer in `dst_*` and the rule `<file>#ingress-default-deny`.
//! - The inbound program is attached only while a policy needs it, and a
//!   reload that brings or takes away a restriction attaches or detaches
//!   it.
//!
//! Every test also reaches an unmanaged listener on the same address from
//! the disallowed source, so a drop is the policy's doing, not the network's.

use std::{fmt::Display, net::SocketAddr, time::Duration};

use integration_tests::{
    bpf, cgroup2_mount,
    events::{assert_fields, kernel_hostname, wait_event},
    eventually::settles_at,
    free_port_block,
    netns::Family,
    probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Ingress, NetnsGuard,
    PolicyDir, Proto,
};
use serde_json::Value;

/// How long a disallowed peer's TCP connect is given: long enough for the
/// first SYN retransmission (after 1 s), so two SYNs are dropped, not one.
const SYN_WAIT: Duration = Duration::from_secs(2);
/// How long a disallowed peer waits for an echo that must not come (an
/// answer over a veth pair takes well under a millisecond).
const DATAGRAM_WAIT: Duration = Duration::from_secs(1);
/// How long a served peer may take to show in the server's report.
const SERVED_WAIT: Duration = Duration::from_secs(2);

/// A policy for `svc`: `top` holds top-level keys (such as `ingress = []`,
/// which must come before any table), then `tables`.
fn policy(svc: &CgroupGuard, mode: &str, top: &str, tables: &[&dyn Display]) -> String {
    let mut text = service_policy(svc, mode, &[]);
    text.push_str(top);
    for table in tables {
        text.push('\n');
        text.push_str(&table.to_string());
    }
    text
}

/// Waits for the inbound verdict event about a packet from `peer`.
fn inbound_verdict(daemon: &Daemon, peer: SocketAddr) -> Value {
    wait_event(daemon, &format!("ingress verdict for peer {peer}"), |ev| {
        ev["type"] == "verdict"
            && ev["hook"] == "ingress"
            && ev["dst_ip"] == peer.ip().to_string()
            && ev["dst_port"] == peer.port()
    })
}

/// Asserts the exact fields of an inbound verdict: the local end (`local`)
/// in `src_*`, the peer in `dst_*`.
fn assert_inbound_verdict(
    ev: &Value,
    service: &str,
    svc: &CgroupGuard,
    (mode, verdict): (&str, &str),
    (protocol, local, peer): (&str, SocketAddr, SocketAddr),
) {
    assert_fields(
        ev,
        &[
            ("schema", "bulkhead.event.v2".into()),
            ("host", kernel_hostname().into()),
            ("service", service.into()),
            ("mode", mode.into()),
            ("cgroup_id", svc.id().into()),
            ("traffic_direction", "ingress".into()),
            ("hook", "ingress".into()),
            ("protocol", protocol.into()),
            ("src_ip", local.ip().to_string().into()),
            ("src_port", local.port().into()),
            ("dst_ip", peer.ip().to_string().into()),
            ("dst_port", peer.port().into()),
            ("verdict", verdict.into()),
            (
                "rule",
                format!("{service}.toml#ingress-default-deny").into(),
            ),
        ],
        &format!("{protocol} from {peer} to {local} ({mode} mode)"),
    );
}

/// Waits for the `tcp_established` event of the connection accepted from
/// `peer`.
fn accepted(daemon: &Daemon, peer: SocketAddr) -> Value {
    wait_event(
        daemon,
        &format!("tcp_established of the connection from {peer}"),
        |ev| {
            ev["type"] == "tcp_established"
                && ev["dst_ip"] == peer.ip().to_string()
                && ev["dst_port"] == peer.port()
        },
    )
}

/// TCP from an allowed and a disallowed source to a service listening on
/// the veth address, one family.
fn tcp_allowed_and_dropped(family: fn(&NetnsGuard) -> Family) {
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = family(&remote);
    let rule = Ingress::from([f.allowed]).protocol("tcp");
    let policies = PolicyDir::with(&[("web.toml", &policy(&svc, "enforce", "", &[&rule]))]);
    let daemon = Daemon::start(&policies);
    // Started after the daemon, so that bind() records the owner.
    let server = probe!().in_cgroup(svc.path()).serve(Proto::Tcp, f.local(0));
    let unmanaged = probe!().serve(Proto::Tcp, f.local(0));
    let peers = probe!().in_netns(remote.name());

    peers
        .source(f.denied)
        .tcp_connect(unmanaged.addr())
        .assert_ok(&format!(
            "{}: the disallowed source reaches an unmanaged listener on the same address",
            f.name
        ));

    let ok = peers.source(f.allowed).tcp_connect(server.addr());
    ok.assert_ok(&format!("{}: connect from the allowed source", f.name));
    server.wait_peer(ok.local_addr(), SERVED_WAIT);

    let dropped = peers
        .source(f.denied)
        .step_timeout(SYN_WAIT)
        .tcp_connect(server.addr());
    dropped.assert_timed_out(
        "connect",
        &format!(
            "{}: the SYN of a source no rule allows is dropped (no reset, no answer)",
            f.name
        ),
    );
    server.assert_never_served(f.denied, "a dropped SYN never reaches the accept queue");

    let ev = inbound_verdict(&daemon, dropped.local_addr());
    assert_inbound_verdict(
        &ev,
        "web",
        &svc,
        ("enforce", "deny"),
        ("tcp", server.addr(), dropped.local_addr()),
    );
    // The owner of the listener, recorded when it was bound.
    assert_fields(
        &ev,
        &[
            ("type", "verdict".into()),
            ("pid", server.pid().into()),
            ("comm", "bulkhead-probe".into()),
        ],
        "the drop names the process that owns the listener",
    );

    let ev = accepted(&daemon, ok.local_addr());
    assert_fields(
        &ev,
        &[
            ("service", "web".into()),
            ("traffic_direction", "ingress".into()),
            ("protocol", "tcp".into()),
            ("src_ip", f.local.to_string().into()),
            ("src_port", server.port().into()),
            ("pid", server.pid().into()),
        ],
        "the accepted connection from the allowed source",
    );
}

#[test]
fn tcp4_allowed_source_connects_disallowed_gets_no_answer() {
    if !require_bpf() {
        return;
    }
    tcp_allowed_and_dropped(Family::v4);
}

#[test]
fn tcp6_allowed_source_connects_disallowed_gets_no_answer() {
    if !require_bpf() {
        return;
    }
    tcp_allowed_and_dropped(Family::v6);
}

#[test]
fn udp_allowed_source_is_echoed_disallowed_is_dropped() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let families = [Family::v4(&remote), Family::v6(&remote)];
    let rule = Ingress::from(families.iter().map(|f| f.allowed)).protocol("udp");
    // The echo is the service's own sendto(), judged as egress: allow it to
    // both peers, so that only the inbound drop can stop the disallowed one.
    let echo = Egress::to(families.iter().flat_map(|f| [f.allowed, f.denied])).protocol("udp");
    let policies = PolicyDir::with(&[("dns.toml", &policy(&svc, "enforce", "", &[&rule, &echo]))]);
    let daemon = Daemon::start(&policies);
    let peers = probe!().in_netns(remote.name());

    for f in &families {
        let server = probe!().in_cgroup(svc.path()).serve(Proto::Udp, f.local(0));
        let unmanaged = probe!().serve(Proto::Udp, f.local(0));
        peers
            .source(f.denied)
            .udp_sendto(unmanaged.addr())
            .assert_ok(&format!(
                "{}: the disallowed source gets an echo from an unmanaged socket on the same \
                 address",
                f.name
            ));

        let ok = peers.source(f.allowed).udp_sendto(server.addr());
        ok.assert_ok(&format!("{}: datagram from the allowed source", f.name));
        server.wait_peer(ok.local_addr(), SERVED_WAIT);
        peers
            .source(f.allowed)
            .udp_connect(server.addr())
            .assert_ok(&format!(
                "{}: datagram from the allowed source, connected socket",
                f.name
            ));

        let silent = peers.source(f.denied).step_timeout(DATAGRAM_WAIT);
        let dropped = silent.udp_sendto(server.addr());
        dropped.assert_timed_out(
            "recv",
            &format!(
                "{}: a datagram from a source no rule allows is dropped",
                f.name
            ),
        );
        silent.udp_connect(server.addr()).assert_timed_out(
            "recv",
            &format!(
                "{}: the same from a connected socket (the peer's side does not matter)",
                f.name
            ),
        );
        server.assert_never_served(f.denied, "a dropped datagram never reaches the socket");

        let ev = inbound_verdict(&daemon, dropped.local_addr());
        assert_inbound_verdict(
            &ev,
            "dns",
            &svc,
            ("enforce", "deny"),
            ("udp", server.addr(), dropped.local_addr()),
        );
    }
}

/// `ingress = []` refuses every inbound connection and datagram, yet the
/// service's own outbound TCP connections and UDP request/reply exchanges
/// (the replies come from a source that may not open anything) still work.
#[test]
fn outbound_tcp_and_udp_replies_pass_while_inbound_is_refused() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let families = [Family::v4(&remote), Family::v6(&remote)];
    // The far end lives on the peer address inbound rules would refuse.
    let there = probe!().in_netns(remote.name());
    let far: Vec<_> = families
        .iter()
        .map(|f| {
            (
                there.listen(Proto::Tcp, SocketAddr::new(f.denied, 0)),
                there.listen(Proto::Udp, SocketAddr::new(f.denied, 0)),
            )
        })
        .collect();
    let out = Egress::to(families.iter().map(|f| f.denied));
    let policies = PolicyDir::with(&[(
        "client.toml",
        &policy(&svc, "enforce", "ingress = []\n", &[&out]),
    )]);
    let daemon = Daemon::start(&policies);

    // Inbound is refused for this service: a datagram from that very peer
    // to a socket the service did not send to is dropped.
    let f4 = &families[0];
    let server = probe!()
        .in_cgroup(svc.path())
        .serve(Proto::Udp, f4.local(0));
    let unsolicited = there
        .source(f4.denied)
        .step_timeout(DATAGRAM_WAIT)
        .udp_sendto(server.addr());
    unsolicited.assert_timed_out("recv", "ingress = [] drops an unsolicited datagram");
    server.assert_never_served(f4.denied, "ingress = [] drops an unsolicited datagram");
    let ev = inbound_verdict(&daemon, unsolicited.local_addr());
    assert_inbound_verdict(
        &ev,
        "client",
        &svc,
        ("enforce", "deny"),
        ("udp", server.addr(), unsolicited.local_addr()),
    );

    let client = probe!().in_cgroup(svc.path());
    for (f, (tcp, udp)) in families.iter().zip(&far) {
        client.tcp_connect(tcp.addr()).assert_ok(&format!(
            "{}: the service's own TCP connection (the SYN-ACK is a reply)",
            f.name
        ));
        client.udp_sendto(udp.addr()).assert_ok(&format!(
            "{}: DNS-style query with unconnected sendto(): the reply passes as a reply",
            f.name
        ));
        client.udp_connect(udp.addr()).assert_ok(&format!(
            "{}: query on a connected UDP socket: the reply passes",
            f.name
        ));
    }
}

/// The reply allowance of an unconnected UDP socket is for the exact peer
/// it sent to, address and port: a datagram from another port of the same
/// host is judged like any other, and dropped.
#[test]
fn udp_reply_passes_only_from_the_exact_peer_sent_to() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let families = [Family::v4(&remote), Family::v6(&remote)];
    let there = probe!().in_netns(remote.name());
    let reflectors: Vec<_> = families
        .iter()
        .map(|f| there.reflect_udp(SocketAddr::new(f.denied, 0)))
        .collect();
    let out = Egress::to(families.iter().map(|f| f.denied)).protocol("udp");
    let policies = PolicyDir::with(&[(
        "resolver.toml",
        &policy(&svc, "enforce", "ingress = []\n", &[&out]),
    )]);
    let daemon = Daemon::start(&policies);

    for (f, reflector) in families.iter().zip(&reflectors) {
        // Unmanaged, both answers arrive: the reflector works.
        let both = probe!()
            .step_timeout(DATAGRAM_WAIT)
            .udp_sendto_all(reflector.addr());
        both.assert_ok(&format!("{}: unmanaged query to the reflector", f.name));
        let mut senders = both.received_from.clone();
        senders.sort_unstable();
        senders.dedup();
        let others: Vec<SocketAddr> = senders
            .iter()
            .copied()
            .filter(|&s| s != reflector.addr())
            .collect();
        assert!(
            senders.contains(&reflector.addr()) && others.len() == 1 && others[0].ip() == f.denied,
            "{}: an unmanaged socket gets the echo from {} and one answer from another port \
             of {}; it got {:?}",
            f.name,
            reflector.addr(),
            f.denied,
            both.received_from
        );
        let other = others[0];

        let query = probe!()
            .in_cgroup(svc.path())
            .step_timeout(DATAGRAM_WAIT)
            .udp_sendto_all(reflector.addr());
        query.assert_ok(&format!("{}: the service's query goes out", f.name));
        assert_eq!(
            query.received_from,
            [reflector.addr()],
            "{}: the service's unconnected socket gets the reply from the peer it sent to, \
             and not the datagram from {other} (same host, another port)",
            f.name
        );
        let local = SocketAddr::new(f.local, query.local_addr().port());
        let ev = inbound_verdict(&daemon, other);
        assert_inbound_verdict(
            &ev,
            "resolver",
            &svc,
            ("enforce", "deny"),
            ("udp", local, other),
        );
    }
}

/// A rule's ports and protocol count; a dual-stack listener judges IPv4
/// peers by IPv4 rules; a service whose policy has no `ingress` is not
/// restricted inbound.
#[test]
fn ports_protocol_and_policies_without_ingress() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let open = CgroupGuard::new();
    let f = Family::v4(&remote);
    let port = free_port_block(f.local, 2);
    let rule = Ingress::from([f.allowed]).ports([port]).protocol("tcp");
    let echo = Egress::to([f.allowed]).protocol("udp");
    let policies = PolicyDir::with(&[
        ("web.toml", &policy(&svc, "enforce", "", &[&rule, &echo])),
        ("open.toml", &policy(&open, "enforce", "", &[])),
    ]);
    let daemon = Daemon::start(&policies);
    let listed = probe!()
        .in_cgroup(svc.path())
        .serve(Proto::Tcp, f.local(port));
    let unlisted = probe!()
        .in_cgroup(svc.path())
        .serve(Proto::Tcp, f.local(port + 1));
    let udp = probe!()
        .in_cgroup(svc.path())
        .serve(Proto::Udp, f.local(port));
    let dual_stack = probe!().in_cgroup(svc.path()).serve(
        Proto::Tcp,
        "[::]:0".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    let not_restricted = probe!()
        .in_cgroup(open.path())
        .serve(Proto::Tcp, f.local(0));
    let allowed = probe!().in_netns(remote.name()).source(f.allowed);
    let denied = probe!().in_netns(remote.name()).source(f.denied);

    allowed
        .tcp_connect(listed.addr())
        .assert_ok("the allowed source on the listed port");
    let wrong_port = allowed.step_timeout(SYN_WAIT).tcp_connect(unlisted.addr());
    wrong_port.assert_timed_out(
        "connect",
        "the allowed source on a port the rule does not list",
    );
    unlisted.assert_never_served(f.allowed, "a port the rule does not list");
    let ev = inbound_verdict(&daemon, wrong_port.local_addr());
    assert_inbound_verdict(
        &ev,
        "web",
        &svc,
        ("enforce", "deny"),
        ("tcp", unlisted.addr(), wrong_port.local_addr()),
    );

    allowed
        .step_timeout(DATAGRAM_WAIT)
        .udp_sendto(udp.addr())
        .assert_timed_out(
            "recv",
            "UDP to the listed port of a `protocol = \"tcp\"` rule",
        );
    udp.assert_never_served(f.allowed, "UDP to a TCP-only rule's port");

    // The dual-stack socket sees IPv4 packets: IPv4 rules judge them.
    let dual = SocketAddr::new(f.local, dual_stack.port());
    denied
        .step_timeout(SYN_WAIT)
        .tcp_connect(dual)
        .assert_timed_out(
            "connect",
            "an IPv4 peer no rule allows, to a dual-stack listener",
        );
    dual_stack.assert_never_served(
        f.denied,
        "an IPv4 peer no rule allows, to a dual-stack listener",
    );

    denied
        .tcp_connect(not_restricted.addr())
        .assert_ok("a service whose policy has no `ingress` accepts any peer");
    denied
        .step_timeout(SYN_WAIT)
        .tcp_connect(listed.addr())
        .assert_timed_out("connect", "the disallowed source on the listed port");
}

#[test]
fn audit_mode_lets_everyone_in_and_records_would_be_drops() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let rule = Ingress::from([f.allowed]);
    let policies = PolicyDir::with(&[("trial.toml", &policy(&svc, "audit", "", &[&rule]))]);
    let daemon = Daemon::start(&policies);
    let tcp = probe!().in_cgroup(svc.path()).serve(Proto::Tcp, f.local(0));
    let udp = probe!().in_cgroup(svc.path()).serve(Proto::Udp, f.local(0));
    let denied = probe!().in_netns(remote.name()).source(f.denied);

    let conn = denied.tcp_connect(tcp.addr());
    conn.assert_ok("audit mode: a source no rule allows still connects");
    tcp.wait_peer(conn.local_addr(), SERVED_WAIT);
    let datagram = denied.udp_sendto(udp.addr());
    datagram.assert_ok("audit mode: a source no rule allows still gets its echo");
    udp.wait_peer(datagram.local_addr(), SERVED_WAIT);

    let ev = inbound_verdict(&daemon, conn.local_addr());
    assert_inbound_verdict(
        &ev,
        "trial",
        &svc,
        ("audit", "audit"),
        ("tcp", tcp.addr(), conn.local_addr()),
    );
    let ev = inbound_verdict(&daemon, datagram.local_addr());
    assert_inbound_verdict(
        &ev,
        "trial",
        &svc,
        ("audit", "audit"),
        ("udp", udp.addr(), datagram.local_addr()),
    );
    let ev = accepted(&daemon, conn.local_addr());
    assert_fields(
        &ev,
        &[
            ("service", "trial".into()),
            ("traffic_direction", "ingress".into()),
            ("src_port", tcp.port().into()),
        ],
        "the audited connection was accepted",
    );
}

/// Whether the inbound program of `daemon` (one of the programs it holds)
/// is attached at the cgroup2 root, once that has been `want` for up to
/// 10 s (a policy file's change is applied within a second).
fn inbound_attached_becomes(daemon: &Daemon, want: bool) -> bool {
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon has exited"));
    let root = cgroup2_mount();
    let attached = || {
        let ours = bpf::prog_ids_held_by(pid);
        !bpf::attached_at(&root, "cgroup_inet_ingress").is_disjoint(&ours)
    };
    settles_at(
        Duration::from_secs(10),
        Duration::from_millis(50),
        &want,
        attached,
    )
}

/// The inbound program runs for every packet the host receives, so it is
/// attached only while a policy needs it (`agent/src/kernel/loader/on_demand.rs`): not
/// for a policy without `ingress`; attached by the reload that brings a
/// restriction, which is then enforced at once; detached by the reload
/// that takes it away, after which inbound is open again.
#[test]
fn inbound_program_is_attached_only_while_a_policy_restricts_inbound() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let open = policy(&svc, "enforce", "", &[]);
    let restricted = policy(
        &svc,
        "enforce",
        "",
        &[&Ingress::from([f.allowed]).protocol("tcp")],
    );
    let policies = PolicyDir::with(&[("web.toml", &open)]);
    let daemon = Daemon::start(&policies);
    let server = probe!().in_cgroup(svc.path()).serve(Proto::Tcp, f.local(0));
    let peers = probe!().in_netns(remote.name());

    assert!(
        !inbound_attached_becomes(&daemon, false),
        "no policy restricts inbound traffic: bulkhead_ingress must not be attached"
    );
    peers
        .source(f.denied)
        .tcp_connect(server.addr())
        .assert_ok("a policy without `ingress`: any peer connects");

    policies.write("web.toml", &restricted);
    assert!(
        inbound_attached_becomes(&daemon, true),
        "the reload to a policy with `ingress` must attach bulkhead_ingress"
    );
    let dropped = peers
        .source(f.denied)
        .step_timeout(SYN_WAIT)
        .tcp_connect(server.addr());
    dropped.assert_timed_out(
        "connect",
        "once attached, the SYN of a source no rule allows is dropped",
    );
    let ok = peers.source(f.allowed).tcp_connect(server.addr());
    ok.assert_ok("the allowed source connects");
    server.wait_peer(ok.local_addr(), SERVED_WAIT);

    policies.write("web.toml", &open);
    assert!(
        !inbound_attached_becomes(&daemon, false),
        "the reload back to a policy without `ingress` must detach bulkhead_ingress"
    );
    peers
        .source(f.denied)
        .tcp_connect(server.addr())
        .assert_ok("inbound is open again after the restriction went");
}
