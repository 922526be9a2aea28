//! Ways to be reached from a source the service's policy does not allow.
//!
//! The service listens on the root side of a veth pair; peers in a "remote
//! host" namespace connect from an allowed and a disallowed source address
//! ([`Family`]). A refused SYN is dropped: the peer's connect gets no
//! answer within [`SYN_WAIT`], and the service's socket never sees it. Each
//! test first reaches an unmanaged listener on the same address the same
//! way, so that a drop is the policy's doing, not the network's.
//!
//! - SYNs and datagrams carrying IPv6 extension headers (Hop-by-Hop,
//!   Destination Options, a chain of both) or IPv4 options: the parser must
//!   walk to the TCP or UDP header, for `[[ingress]]` and for a quarantine.
//! - Listeners the service did not create: socket activation (an unmanaged
//!   parent listens, a child in the service accepts) and a listener passed
//!   over a Unix socket (`SCM_RIGHTS`). The service that holds and uses the
//!   socket is the one whose ingress and quarantine apply.
//! - Listeners `[bind]` never allowed: `listen()` without `bind()` (the
//!   kernel picks a port without any bind hook) and `bind()` to port 0.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    control::{assert_success, quarantine},
    eventually, free_port_block,
    netns::Family,
    policy::policy_with,
    probe,
    probe::SynOptions,
    process::output_with_timeout,
    require_bpf, CgroupGuard, Daemon, Egress, Ingress, NetnsGuard, Outcome, PolicyDir, Probe,
    Proto, Server,
};

/// How long a refused peer's TCP connect is given: long enough for the
/// first SYN retransmission (after 1 s), so two SYNs are dropped, not one.
const SYN_WAIT: Duration = Duration::from_secs(2);
/// How long a disallowed peer waits for an echo that must not come (an
/// answer over a veth pair takes well under a millisecond).
const DATAGRAM_WAIT: Duration = Duration::from_secs(1);
/// How long a served peer may take to show in the server's report.
const SERVED_WAIT: Duration = Duration::from_secs(2);
/// How long the daemon is given to learn that a service holds a listener it
/// did not create (it may find out by scanning the service's descriptors):
/// the allowed peer is checked again and again meanwhile.
const HOLDER_GRACE: Duration = Duration::from_secs(3);

/// Asserts `peers`, from the disallowed source `f.denied`, reach an
/// unmanaged `proto` server on `f`'s local address with `connect`: the
/// network carries what the test sends.
fn assert_unmanaged_reachable(
    peers: &Probe,
    (f, proto): (&Family, Proto),
    what: &str,
    connect: impl Fn(&Probe, SocketAddr) -> Outcome,
) {
    let unmanaged = probe!().serve(proto, f.local(0));
    connect(&peers.source(f.denied), unmanaged.addr()).assert_ok(&format!(
        "{}: {what} from the disallowed source reaches an unmanaged listener on the same address",
        f.name
    ));
}

/// Asserts a connect from `peers` to `server` gets no answer (the SYN is
/// dropped) and never reaches the server's accept queue.
fn assert_dropped(peers: &Probe, from: IpAddr, server: &Server, why: &str) {
    peers
        .source(from)
        .step_timeout(SYN_WAIT)
        .tcp_connect(server.addr())
        .assert_timed_out("connect", why);
    server.assert_never_served(from, why);
}

/// Connects from `peer` to `server` again and again for [`HOLDER_GRACE`]
/// (every connection must be accepted), so that the daemon has had that
/// long to learn who holds the listener.
fn keep_connecting(peer: &Probe, server: &Server, why: &str) {
    keep_connecting_until(peer, server, Instant::now() + HOLDER_GRACE, why);
}

/// [`keep_connecting`] with no connection started at or after `until`.
fn keep_connecting_until(peer: &Probe, server: &Server, until: Instant, why: &str) {
    while Instant::now() < until {
        let ok = peer.tcp_connect(server.addr());
        ok.assert_ok(why);
        server.wait_peer(ok.local_addr(), SERVED_WAIT);
        thread::sleep(Duration::from_millis(200));
    }
}

/// A service allowing `f.allowed` in over TCP serves on `f.local`; a SYN
/// with `options` from the allowed source connects (the parser walks past
/// the options to TCP), one from the disallowed source is dropped.
fn syn_with_options(f: fn(&NetnsGuard) -> Family, options: SynOptions) {
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = f(&remote);
    let rule = Ingress::from([f.allowed]).protocol("tcp");
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[&rule]))]);
    let _daemon = Daemon::start(&policies);
    let server = probe!().in_cgroup(svc.path()).serve(Proto::Tcp, f.local(0));
    let peers = probe!().in_netns(remote.name());
    let what = format!("a SYN with {options:?}");
    assert_unmanaged_reachable(&peers, (&f, Proto::Tcp), &what, |p, a| {
        p.tcp_connect_opts(options, a)
    });

    let ok = peers
        .source(f.allowed)
        .tcp_connect_opts(options, server.addr());
    ok.assert_ok(&format!("{}: {what} from the allowed source", f.name));
    server.wait_peer(ok.local_addr(), SERVED_WAIT);

    let why = format!(
        "{}: {what} from a source no rule allows is dropped (no answer)",
        f.name
    );
    peers
        .source(f.denied)
        .step_timeout(SYN_WAIT)
        .tcp_connect_opts(options, server.addr())
        .assert_timed_out("connect", &why);
    server.assert_never_served(f.denied, &why);
}

#[test]
fn tcp6_syn_with_hop_by_hop_options_from_disallowed_source_is_dropped() {
    if !require_bpf() {
        return;
    }
    syn_with_options(Family::v6, SynOptions::HopByHop);
}

#[test]
fn tcp6_syn_with_destination_options_from_disallowed_source_is_dropped() {
    if !require_bpf() {
        return;
    }
    syn_with_options(Family::v6, SynOptions::Destination);
}

#[test]
fn tcp6_syn_with_a_chain_of_extension_headers_from_disallowed_source_is_dropped() {
    if !require_bpf() {
        return;
    }
    syn_with_options(Family::v6, SynOptions::HopByHopAndDestination);
}

#[test]
fn tcp4_syn_with_ip_options_from_disallowed_source_is_dropped() {
    if !require_bpf() {
        return;
    }
    syn_with_options(Family::v4, SynOptions::Ipv4Nops);
}

/// The same for datagrams: one carrying extension headers from the allowed
/// source is echoed, from the disallowed source it is dropped.
#[test]
fn udp6_datagram_with_extension_headers_from_disallowed_source_is_dropped() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v6(&remote);
    let rule = Ingress::from([f.allowed]).protocol("udp");
    // The echo is the service's own sendto(), judged as egress: allowed to
    // both peers, so that only the inbound drop can stop the disallowed one.
    let echo = Egress::to([f.allowed, f.denied]).protocol("udp");
    let policies = PolicyDir::with(&[("dns.toml", &policy_with(&svc, "enforce", &[&rule, &echo]))]);
    let _daemon = Daemon::start(&policies);
    let server = probe!().in_cgroup(svc.path()).serve(Proto::Udp, f.local(0));
    let peers = probe!().in_netns(remote.name());
    let chain = SynOptions::HopByHopAndDestination;
    assert_unmanaged_reachable(
        &peers,
        (&f, Proto::Udp),
        "a datagram with two extension headers",
        |p, a| p.udp_sendto_opts(chain, a),
    );
    for options in [
        SynOptions::HopByHop,
        SynOptions::Destination,
        SynOptions::HopByHopAndDestination,
    ] {
        let what = format!("a datagram with {options:?}");
        let ok = peers
            .source(f.allowed)
            .udp_sendto_opts(options, server.addr());
        ok.assert_ok(&format!("{what} from the allowed source is echoed"));
        server.wait_peer(ok.local_addr(), SERVED_WAIT);
        peers
            .source(f.denied)
            .step_timeout(DATAGRAM_WAIT)
            .udp_sendto_opts(options, server.addr())
            .assert_timed_out(
                "recv",
                &format!("{what} from a source no rule allows is dropped"),
            );
    }
    server.assert_never_served(f.denied, "datagrams from a source no rule allows");
}

/// A quarantined service is reached by no SYN, whatever headers it carries.
#[test]
fn tcp6_syn_with_extension_headers_does_not_reach_a_quarantined_service() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v6(&remote);
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[]))]);
    let daemon = Daemon::start(&policies);
    let server = probe!().in_cgroup(svc.path()).serve(Proto::Tcp, f.local(0));
    let peers = probe!().in_netns(remote.name());
    let chain = SynOptions::HopByHopAndDestination;
    assert_unmanaged_reachable(
        &peers,
        (&f, Proto::Tcp),
        "a SYN with two extension headers",
        |p, a| p.tcp_connect_opts(chain, a),
    );
    peers
        .source(f.allowed)
        .tcp_connect_opts(chain, server.addr())
        .assert_ok("a policy without `ingress`: anyone connects, before the quarantine");

    assert_success(&quarantine(&daemon, "web", &[]), "bulkhead quarantine web");
    let quiet = peers.source(f.denied).step_timeout(SYN_WAIT);
    let plain = quiet.tcp_connect(server.addr());
    plain.assert_timed_out("connect", "a plain SYN to the quarantined service");
    assert_no_half_open(server.port(), &plain, "a plain SYN");
    for options in [
        SynOptions::HopByHop,
        SynOptions::Destination,
        SynOptions::HopByHopAndDestination,
    ] {
        let what = format!("a SYN with {options:?}");
        let attempt = quiet.tcp_connect_opts(options, server.addr());
        attempt.assert_timed_out("connect", &format!("{what} to the quarantined service"));
        assert_no_half_open(server.port(), &attempt, &what);
    }
    server.assert_never_served(f.denied, "the quarantined service is reached by nobody");
}

/// Asserts TCP on local `port` holds no half-open connection (`SYN_RECV`)
/// from the client of `attempt`. A quarantined service's SYN-ACK is dropped
/// on its way out too, so a connect that timed out does not show on its own
/// that the SYN was dropped on its way in, before TCP made any state for it.
fn assert_no_half_open(port: u16, attempt: &Outcome, what: &str) {
    let peer = attempt.local_addr();
    let mut ss = Command::new("ss");
    ss.args([
        "-Htn",
        "state",
        "syn-recv",
        "sport",
        "=",
        &format!(":{port}"),
    ]);
    let out = output_with_timeout(&mut ss, Duration::from_secs(10));
    assert!(out.status.success(), "{ss:?} failed: {out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    let half_open: Vec<&str> = listed
        .lines()
        .filter(|l| l.split_whitespace().any(|a| a.parse() == Ok(peer)))
        .collect();
    assert!(
        half_open.is_empty(),
        "{what} to the quarantined service is dropped before TCP sees it, but TCP holds a \
         half-open connection (SYN_RECV) from {peer}: {half_open:?}"
    );
}

/// How a test's listener comes to the service: made by an unmanaged process
/// and inherited or received by a process of cgroup `service`.
type Handover = fn(&Probe, &Path, SocketAddr) -> Server;

/// A service allowing `f.allowed` in over TCP gets a listener it did not
/// create (`handover`): once the daemon has had [`HOLDER_GRACE`] to learn
/// who holds it, the disallowed source's SYN is dropped.
fn listener_not_created_by_the_service(f: fn(&NetnsGuard) -> Family, handover: Handover) {
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = f(&remote);
    let rule = Ingress::from([f.allowed]).protocol("tcp");
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[&rule]))]);
    let _daemon = Daemon::start(&policies);
    let server = handover(&probe!(), svc.path(), f.local(0));
    assert!(
        svc.pids().iter().any(|&pid| pid != server.pid()),
        "the process serving on the handed-over listener is in the service: {:?}",
        svc.pids()
    );
    let peers = probe!().in_netns(remote.name());
    assert_unmanaged_reachable(&peers, (&f, Proto::Tcp), "a SYN", Probe::tcp_connect);

    keep_connecting(
        &peers.source(f.allowed),
        &server,
        &format!(
            "{}: the allowed source connects to the service's listener",
            f.name
        ),
    );
    assert_dropped(
        &peers,
        f.denied,
        &server,
        &format!(
            "{}: the service accepts on a listener it did not create: a source its ingress \
             does not allow is dropped all the same",
            f.name
        ),
    );
}

#[test]
fn tcp4_socket_activated_listener_obeys_the_services_ingress() {
    if !require_bpf() {
        return;
    }
    listener_not_created_by_the_service(Family::v4, Probe::serve_activated);
}

#[test]
fn tcp6_socket_activated_listener_obeys_the_services_ingress() {
    if !require_bpf() {
        return;
    }
    listener_not_created_by_the_service(Family::v6, Probe::serve_activated);
}

#[test]
fn tcp4_listener_received_over_unix_socket_obeys_the_services_ingress() {
    if !require_bpf() {
        return;
    }
    listener_not_created_by_the_service(Family::v4, Probe::serve_passed);
}

#[test]
fn tcp6_listener_received_over_unix_socket_obeys_the_services_ingress() {
    if !require_bpf() {
        return;
    }
    listener_not_created_by_the_service(Family::v6, Probe::serve_passed);
}

/// A socket-activated listener the daemon has seen in the service stays
/// the service's when the process hides it: its main thread exits alone
/// (`SYS_exit`) while a second thread keeps accepting, so no `/proc/PID/fd`
/// shows the listener any more.
#[test]
fn tcp4_socket_activated_listener_stays_the_services_when_the_main_thread_exits() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let rule = Ingress::from([f.allowed]).protocol("tcp");
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[&rule]))]);
    let _daemon = Daemon::start(&policies);
    let server = probe!().serve_activated_leader_exits(svc.path(), f.local(0), HOLDER_GRACE / 2);
    let peers = probe!().in_netns(remote.name());
    assert_unmanaged_reachable(&peers, (&f, Proto::Tcp), "a SYN", Probe::tcp_connect);
    keep_connecting(
        &peers.source(f.allowed),
        &server,
        "the allowed source connects, before and after the main thread exits",
    );
    let pids = svc.pids();
    let shown = socket_links(pids.iter().map(|pid| format!("/proc/{pid}/fd").into()));
    assert!(
        !pids.is_empty() && shown.is_empty(),
        "the service's processes {pids:?} show no socket in /proc/PID/fd once the main \
         thread has exited: {shown:?}"
    );
    assert_dropped(
        &peers,
        f.denied,
        &server,
        "the main thread that held the listener exited, a second thread accepts on it: a \
         source the service's ingress does not allow is dropped all the same",
    );
}

/// The `socket:[...]` links in the descriptor directories `dirs`.
fn socket_links(dirs: impl Iterator<Item = std::path::PathBuf>) -> Vec<String> {
    dirs.flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|link| link.to_string_lossy().into_owned())
        .filter(|link| link.starts_with("socket:"))
        .collect()
}

/// A socket-activated listener the daemon has seen in the service stays
/// the service's once the process hides it completely: it keeps the
/// listener as an `io_uring` fixed file and closes its descriptor, so no
/// descriptor table of the service shows it.
#[test]
fn tcp4_socket_activated_listener_stays_the_services_when_hidden_in_io_uring() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let rule = Ingress::from([f.allowed]).protocol("tcp");
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[&rule]))]);
    let _daemon = Daemon::start(&policies);
    let peers = probe!().in_netns(remote.name());
    assert_unmanaged_reachable(&peers, (&f, Proto::Tcp), "a SYN", Probe::tcp_connect);
    // The probe serves (accepts and answers) for `serving`, then hides the
    // listener and accepts no more: the last connection must be made with
    // room to spare, even in an emulated guest where one takes a second or
    // two, or it would queue unanswered.
    let serving = HOLDER_GRACE + Duration::from_secs(4);
    let started = Instant::now();
    let server = probe!().serve_activated_then_hidden(svc.path(), f.local(0), serving);
    keep_connecting_until(
        &peers.source(f.allowed),
        &server,
        started + HOLDER_GRACE,
        "the allowed source connects while the service still shows the listener",
    );
    let wait = serving + Duration::from_secs(5);
    eventually(wait, Duration::from_millis(50), || {
        if server.lines().iter().any(|l| l == "hidden") {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| panic!("the probe never hid its listener: {:?}", server.lines()));
    let pids = svc.pids();
    let tasks = pids.iter().flat_map(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|task| task.path().join("fd"))
    });
    let shown = socket_links(tasks);
    assert!(
        !pids.is_empty() && shown.is_empty(),
        "no thread of the service's processes {pids:?} shows a socket once the listener is \
         hidden: {shown:?}"
    );
    // Let scans run that no longer see the listener anywhere.
    thread::sleep(Duration::from_secs(1));
    // Connected, but nobody accepts: the byte a served peer gets never comes.
    peers
        .source(f.allowed)
        .step_timeout(DATAGRAM_WAIT)
        .tcp_connect(server.addr())
        .assert_timed_out(
            "recv",
            "the hidden listener still listens: the allowed source's connection is made and \
             queues",
        );
    assert_dropped(
        &peers,
        f.denied,
        &server,
        "the service hid the listener in an io_uring fixed file: a source the service's \
         ingress does not allow is dropped all the same",
    );
}

/// A quarantined service is reached on no listener it holds, however it
/// got it: inherited from an unmanaged parent or received over a Unix
/// socket.
#[test]
fn tcp4_listeners_not_created_by_a_quarantined_service_are_cut_too() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[]))]);
    let daemon = Daemon::start(&policies);
    let activated = probe!().serve_activated(svc.path(), f.local(0));
    let passed = probe!().serve_passed(svc.path(), f.local(0));
    let peers = probe!().in_netns(remote.name());
    for server in [&activated, &passed] {
        keep_connecting(
            &peers.source(f.allowed),
            server,
            "a policy without `ingress`: anyone connects, before the quarantine",
        );
    }

    assert_success(&quarantine(&daemon, "web", &[]), "bulkhead quarantine web");
    for (server, what) in [
        (&activated, "socket-activated"),
        (&passed, "received over a Unix socket"),
    ] {
        assert_dropped(
            &peers,
            f.denied,
            server,
            &format!("a SYN to the quarantined service's listener ({what})"),
        );
    }
}

/// A service whose `[bind]` lists `bind_ports` listens on ports it never
/// bound by number: `listen()` on an unbound socket (the kernel picks the
/// port; no bind hook runs) and `bind()` to port 0 then `listen()`. No peer
/// may connect to either; the same `listen()` in a service without `[bind]`
/// is reached.
fn listeners_bind_never_allowed(f: fn(&NetnsGuard) -> Family, v6: bool, listed: Option<u16>) {
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let open = CgroupGuard::new();
    let f = f(&remote);
    let bind = format!(
        "[bind]\nports = [{}]\nprotocol = \"tcp\"\n",
        listed.map(|p| p.to_string()).unwrap_or_default()
    );
    let policies = PolicyDir::with(&[
        ("web.toml", &policy_with(&svc, "enforce", &[&bind])),
        ("open.toml", &policy_with(&open, "enforce", &[])),
    ]);
    let _daemon = Daemon::start(&policies);
    let service = probe!().in_cgroup(svc.path());
    let unbound = service.serve_unbound(v6);
    let ephemeral = service.serve(Proto::Tcp, f.local(0));
    let free = probe!().in_cgroup(open.path()).serve_unbound(v6);
    let peers = probe!().in_netns(remote.name()).source(f.allowed);

    peers
        .tcp_connect(f.local(free.port()))
        .assert_ok("listen() without bind() in a service without [bind]");
    if let Some(port) = listed {
        let bound = service.serve(Proto::Tcp, f.local(port));
        peers
            .tcp_connect(bound.addr())
            .assert_ok(&format!("{}: the port [bind] lists", f.name));
    }
    for (server, what) in [
        (&unbound, "listen() without bind()"),
        (&ephemeral, "bind() to port 0, then listen()"),
    ] {
        let why = format!(
            "{}: {what} on port {} in a service whose [bind] is {bind:?}: no connection",
            f.name,
            server.port()
        );
        peers
            .step_timeout(SYN_WAIT)
            .tcp_connect(f.local(server.port()))
            .assert_timed_out("connect", &why);
        server.assert_never_served(f.allowed, &why);
    }
}

#[test]
fn tcp4_listen_without_bind_gets_no_connection_with_bind_ports_empty() {
    if !require_bpf() {
        return;
    }
    listeners_bind_never_allowed(Family::v4, false, None);
}

#[test]
fn tcp6_listen_without_bind_gets_no_connection_on_a_port_bind_does_not_list() {
    if !require_bpf() {
        return;
    }
    let listed = free_port_block("::".parse().unwrap_or_else(|e| panic!("{e}")), 1);
    listeners_bind_never_allowed(Family::v6, true, Some(listed));
}
