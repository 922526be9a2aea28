//! UDP reply pinholes: the datagrams an ingress-restricted service's
//! unconnected socket takes from a peer it sent to (an egress rule allowed
//! the send), although no ingress rule lets that peer in. A compromised
//! service (or a peer that learnt the pinhole) would like one to stay open
//! for good, to follow the service through a reload that forbids the peer,
//! or to come in numbers that crowd out another service's pinholes.
//!
//! The service's policy is `ingress = []` (nothing may come in unasked)
//! and egress UDP to the peer; the peer is a "remote host" ([`Family`]).
//!
//! - A pinhole unused (no send to the peer) for `[udp_replies]
//!   idle_timeout_secs` lets nothing in any more: the peer's answer at once
//!   arrives, its answer after the timeout does not. With the default
//!   timeout both arrive.
//! - A reload whose policy no longer allows the peer closes the pinhole at
//!   once: the peer's late answer, which arrives without the reload, does
//!   not.
//! - `[udp_replies] per_service` bounds one service's pinholes: of six
//!   peers sent to in turn, only the first four may answer; another
//!   service's pinholes are not touched by that bound.
//!
//! A pinhole passing a datagram makes no event (the decision log records
//! decisions, and a pass of a reply is none), so the log is not asserted;
//! the metric `bulkhead_udp_pinholes_closed_total{reason}` is.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    control::wait_status,
    eventually,
    http::metrics_addr,
    netns::Family,
    policy::policy_with,
    probe,
    prometheus::{sample_count, scrape, wait_sample},
    require_bpf, CgroupGuard, Daemon, Egress, NetnsGuard, PolicyDir, Probe, Proto, Server,
};

/// The idle timeout the aging test configures.
const IDLE_SECS: u64 = 2;
/// When the reflector of the aging test answers again: well past
/// [`IDLE_SECS`].
const LATE_IDLE: Duration = Duration::from_millis(3500);
/// When the reflector of the reload test answers again: time enough for
/// the reload (a 300 ms settle, then the switch) to apply first.
const LATE_RELOAD: Duration = Duration::from_secs(3);
/// How long the service takes datagrams after sending: the late answer
/// (at most [`LATE_IDLE`]) comes well within it.
const COLLECT: Duration = Duration::from_secs(5);
/// How long the service waits for answers that come at once (over a veth
/// pair they take well under a millisecond).
const DATAGRAM_WAIT: Duration = Duration::from_secs(1);
/// How long a reflector may take to show it received the service's datagram.
const SERVED_WAIT: Duration = Duration::from_secs(2);
/// How long a reload may take to apply.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a metric counted by the agent's sweep (every 5 s) may take.
const SWEEP_WAIT: Duration = Duration::from_secs(8);
/// The closed-pinholes counter.
const CLOSED: &str = "bulkhead_udp_pinholes_closed_total";

/// A policy for `svc`: nothing may come in unasked (`ingress = []`), UDP
/// may go to `to`.
fn sends_only(svc: &CgroupGuard, to: &[IpAddr]) -> String {
    let out = Egress::to(to).protocol("udp");
    policy_with(svc, "enforce", &[&"ingress = []", &out])
}

/// The peer a remote host sees for the service's socket `local` (which
/// reports its unbound address): the root side of the veth pair.
fn seen_as(f: &Family, local: SocketAddr) -> SocketAddr {
    SocketAddr::new(f.local, local.port())
}

/// Waits until the reflector has sent its late answer to `peer`, so that
/// a missing answer is a drop, not a reflector that never sent.
fn wait_late_sent(reflector: &Server, peer: SocketAddr) {
    let late = format!("late {peer}");
    eventually(SERVED_WAIT, Duration::from_millis(20), || {
        if reflector.lines().contains(&late) {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| {
        panic!(
            "the reflector {} never sent its late answer to {peer}: {:?}",
            reflector.addr(),
            reflector.lines()
        )
    });
}

/// The service sends once to `reflector` and takes datagrams for
/// [`COLLECT`]; returns who answered, after checking the reflector got the
/// datagram and sent both answers.
fn one_exchange(client: &Probe, f: &Family, reflector: &Server) -> Vec<SocketAddr> {
    let out = client
        .step_timeout(COLLECT)
        .udp_sendto_each(&[reflector.addr()]);
    out.assert_ok("the service's datagram to the peer goes out");
    let peer = seen_as(f, out.local_addr());
    reflector.wait_peer(peer, SERVED_WAIT);
    wait_late_sent(reflector, peer);
    out.received_from
}

/// With `idle_timeout_secs = 2`, the answer 3.5 s after the service's only
/// send is dropped (and the sweep counts the pinhole closed as idle); with
/// the default timeout, both answers arrive.
#[test]
fn udp_pinhole_unused_for_the_idle_timeout_lets_no_late_answer_in() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let reflector = probe!()
        .in_netns(remote.name())
        .reflect_late_udp(SocketAddr::new(f.denied, 0), LATE_IDLE);
    let policies = PolicyDir::with(&[("client.toml", &sends_only(&svc, &[f.denied]))]);
    let client = probe!().in_cgroup(svc.path());
    let r = reflector.addr();

    {
        let daemon = Daemon::start(&policies);
        assert_eq!(
            one_exchange(&client, &f, &reflector),
            [r, r],
            "default idle timeout (120 s): the answer at once and the one {LATE_IDLE:?} later \
             both pass the pinhole"
        );
        let samples = scrape(metrics_addr(&daemon));
        assert_eq!(
            sample_count(&samples, CLOSED, &[("reason", "idle")]),
            Some(0),
            "default idle timeout: no pinhole closed as idle"
        );
    }

    let daemon = Daemon::start_with_config(
        &policies,
        &format!("[udp_replies]\nidle_timeout_secs = {IDLE_SECS}\n"),
    );
    assert_eq!(
        one_exchange(&client, &f, &reflector),
        [r],
        "idle_timeout_secs = {IDLE_SECS}: the answer at once passes; the one {LATE_IDLE:?} \
         after the only send finds the pinhole closed and is dropped"
    );
    wait_sample(
        metrics_addr(&daemon),
        (CLOSED, &[("reason", "idle")]),
        "the idle pinhole counted as closed",
        SWEEP_WAIT,
        |n| n >= 1,
    );
}

/// A reload that no longer allows the peer closes the pinhole at once: the
/// late answer, which passes without a reload, is dropped.
#[test]
fn udp_pinhole_closes_when_a_reload_no_longer_allows_the_peer() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let svc = CgroupGuard::new();
    let f = Family::v4(&remote);
    let reflector = probe!()
        .in_netns(remote.name())
        .reflect_late_udp(SocketAddr::new(f.denied, 0), LATE_RELOAD);
    let policies = PolicyDir::with(&[("client.toml", &sends_only(&svc, &[f.denied]))]);
    let daemon = Daemon::start(&policies);
    let metrics = metrics_addr(&daemon);
    let client = probe!().in_cgroup(svc.path());
    let r = reflector.addr();

    assert_eq!(
        one_exchange(&client, &f, &reflector),
        [r, r],
        "no reload: the answer at once and the one {LATE_RELOAD:?} later both pass"
    );

    let exchange = {
        let client = client.step_timeout(COLLECT);
        thread::spawn(move || client.udp_sendto_each(&[r]))
    };
    // Once the reflector has the datagram, the pinhole is open.
    eventually(SERVED_WAIT, Duration::from_millis(10), || {
        if reflector.peers().len() < 2 {
            Err(())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|()| {
        panic!(
            "the service's second datagram never reached the reflector: {:?}",
            reflector.lines()
        )
    });
    let sent = Instant::now();
    // The service may now only send to the other address: not this peer.
    policies.write("client.toml", &sends_only(&svc, &[f.allowed]));
    let st = wait_status(&daemon, "the reload applied", RELOAD_TIMEOUT, |st| {
        st["reloads_applied"] == 1 || st["reloads_refused"] != 0
    });
    assert_eq!(
        st["reloads_applied"], 1,
        "the new policy is refused: {st:#}"
    );
    let took = sent.elapsed();
    assert!(
        took + Duration::from_millis(500) < LATE_RELOAD,
        "the reload took {took:?}, too close to the late answer ({LATE_RELOAD:?}) to tell \
         whether it closed the pinhole"
    );

    let out = exchange
        .join()
        .unwrap_or_else(|_| panic!("the service's exchange panicked"));
    out.assert_ok("the service's datagram to the peer goes out (before the reload)");
    wait_late_sent(&reflector, seen_as(&f, out.local_addr()));
    assert_eq!(
        out.received_from,
        [r],
        "the answer at once passes; the one after the reload that no longer allows the peer \
         finds the pinhole closed and is dropped"
    );
    wait_sample(
        metrics,
        (CLOSED, &[("reason", "policy")]),
        "the pinhole counted as closed by the policy",
        SWEEP_WAIT,
        |n| n >= 1,
    );
    client
        .udp_sendto(r)
        .assert_eperm("the new policy no longer lets the service send to the peer");
}

/// `per_service = 4`: one socket of service A sends to six peers in turn;
/// the first four answer, the last two's answers are dropped (they got no
/// pinhole). Service B then sends to those two and gets both answers.
#[test]
fn udp_pinholes_are_bounded_per_service() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let a = CgroupGuard::new();
    let b = CgroupGuard::new();
    let f = Family::v4(&remote);
    let there = probe!().in_netns(remote.name());
    let servers: Vec<Server> = (0..6)
        .map(|_| there.serve(Proto::Udp, SocketAddr::new(f.denied, 0)))
        .collect();
    let peers: Vec<SocketAddr> = servers.iter().map(Server::addr).collect();
    let policies = PolicyDir::with(&[
        ("a.toml", &sends_only(&a, &[f.denied])),
        ("b.toml", &sends_only(&b, &[f.denied])),
    ]);
    let daemon = Daemon::start_with_config(&policies, "[udp_replies]\nper_service = 4\n");

    let out = probe!()
        .in_cgroup(a.path())
        .step_timeout(DATAGRAM_WAIT)
        .udp_sendto_each(&peers);
    out.assert_ok("service A's datagrams to six peers go out");
    for server in &servers {
        // Every peer got A's datagram and echoed it: a missing echo is a drop.
        server.wait_peer(seen_as(&f, out.local_addr()), SERVED_WAIT);
    }
    let mut answered = out.received_from.clone();
    answered.sort_unstable();
    let mut first_four = peers[..4].to_vec();
    first_four.sort_unstable();
    assert_eq!(
        answered,
        first_four,
        "per_service = 4: exactly the first four peers A sent to ({:?}) answer; the fifth and \
         sixth ({:?}) got no pinhole (A received {:?})",
        &peers[..4],
        &peers[4..],
        out.received_from
    );

    let out = probe!()
        .in_cgroup(b.path())
        .step_timeout(DATAGRAM_WAIT)
        .udp_sendto_each(&peers[4..]);
    out.assert_ok("service B's datagrams go out");
    let mut answered = out.received_from.clone();
    answered.sort_unstable();
    let mut last_two = peers[4..].to_vec();
    last_two.sort_unstable();
    assert_eq!(
        answered, last_two,
        "service B's pinholes are its own: both peers answer B (A's bound is full)"
    );
    wait_sample(
        metrics_addr(&daemon),
        ("bulkhead_udp_pinholes", &[]),
        "A's 4 and B's 2 pinholes open",
        SWEEP_WAIT,
        |n| n == 6,
    );
}
