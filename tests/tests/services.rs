//! Who a policy applies to: each service its own, descendants of a service's
//! cgroup included (and its cgroup when systemd makes it again), everyone
//! else untouched; and audit mode.

use std::time::{Duration, Instant};

use integration_tests::{
    addr, eventually, probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Outcome,
    PolicyDir, Proto, EPERM,
};

#[test]
fn two_services_with_different_policies() {
    if !require_bpf() {
        return;
    }
    let billing = CgroupGuard::new();
    let search = CgroupGuard::new();
    let to_a = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let to_b = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let only = |port: u16| [Egress::to(["127.0.0.1"]).ports([port])];
    let policies = PolicyDir::with(&[
        (
            "billing.toml",
            &service_policy(&billing, "enforce", &only(to_a.port())),
        ),
        (
            "search.toml",
            &service_policy(&search, "enforce", &only(to_b.port())),
        ),
    ]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(billing.path());
    client
        .tcp_connect(to_a.addr())
        .assert_ok("billing may reach A");
    client
        .tcp_connect(to_b.addr())
        .assert_eperm("billing may not reach B (only search may)");
    let client = probe!().in_cgroup(search.path());
    client
        .tcp_connect(to_b.addr())
        .assert_ok("search may reach B");
    client
        .tcp_connect(to_a.addr())
        .assert_eperm("search may not reach A (only billing may)");
}

#[test]
fn nested_child_cgroup_follows_the_service_policy() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let worker = svc.child("worker");
    let inner = svc.child("worker/inner");
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let rule = Egress::to(["127.0.0.1"]).ports([allowed.port()]);
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[rule]))]);
    let _daemon = Daemon::start(&policies);

    for (dir, where_) in [
        (svc.path(), "the service's cgroup"),
        (worker.as_path(), "child cgroup worker/"),
        (inner.as_path(), "grandchild cgroup worker/inner/"),
    ] {
        let client = probe!().in_cgroup(dir);
        client
            .tcp_connect(allowed.addr())
            .assert_ok(&format!("allowed port, from {where_}"));
        client
            .tcp_connect(denied.addr())
            .assert_eperm(&format!("unlisted port, from {where_}"));
        client
            .udp_sendto(udp.addr())
            .assert_eperm(&format!("unlisted UDP port, from {where_}"));
    }
}

#[test]
fn unmanaged_processes_are_untouched() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let sibling = CgroupGuard::new();
    let tcp4 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let udp4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let udp6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let _daemon = Daemon::start(&policies);

    probe!()
        .in_cgroup(svc.path())
        .tcp_connect(tcp4.addr())
        .assert_eperm("the managed service is denied everything");
    for (client, who) in [
        (probe!(), "a process in the test's own cgroup"),
        (
            probe!().in_cgroup(sibling.path()),
            "a process in a cgroup no policy names",
        ),
    ] {
        let why = format!("{who} is not managed");
        client.tcp_connect(tcp4.addr()).assert_ok(&why);
        client.tcp_connect(tcp6.addr()).assert_ok(&why);
        client.udp_connect(udp4.addr()).assert_ok(&why);
        client.udp_sendto(udp4.addr()).assert_ok(&why);
        client.udp_connect(udp6.addr()).assert_ok(&why);
        client.udp_sendto(udp6.addr()).assert_ok(&why);
    }
}

#[test]
fn audit_mode_lets_denied_traffic_through() {
    if !require_bpf() {
        return;
    }
    let audited = CgroupGuard::new();
    let enforced = CgroupGuard::new();
    let tcp4 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let tcp6 = probe!().listen(Proto::Tcp, addr("[::1]:0"));
    let udp4 = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let udp6 = probe!().listen(Proto::Udp, addr("[::1]:0"));
    // Both allow only 192.0.2.1, which no test traffic goes to.
    let rule = [Egress::to(["192.0.2.1"]).ports([443]).protocol("tcp")];
    let policies = PolicyDir::with(&[
        ("audited.toml", &service_policy(&audited, "audit", &rule)),
        (
            "enforced.toml",
            &service_policy(&enforced, "enforce", &rule),
        ),
    ]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(audited.path());
    let why = "audit mode records a would-be denial but lets it through";
    client.tcp_connect(tcp4.addr()).assert_ok(why);
    client.tcp_connect(tcp6.addr()).assert_ok(why);
    client.udp_connect(udp4.addr()).assert_ok(why);
    client.udp_sendto(udp4.addr()).assert_ok(why);
    client.udp_connect(udp6.addr()).assert_ok(why);
    client.udp_sendto(udp6.addr()).assert_ok(why);
    // The same rules in enforce mode deny it: audit mode is per service.
    probe!()
        .in_cgroup(enforced.path())
        .tcp_connect(tcp4.addr())
        .assert_eperm("the same policy in enforce mode");
}

#[test]
fn unit_names_a_service_under_system_slice() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::unit();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policy = format!(
        "unit = {:?}\nmode = \"enforce\"\n\n{}",
        svc.unit_name(),
        Egress::to(["127.0.0.1"]).ports([allowed.port()])
    );
    let policies = PolicyDir::with(&[("unit.toml", &policy)]);
    let _daemon = Daemon::start(&policies);

    let client = probe!().in_cgroup(svc.path());
    let unit = svc.policy_path();
    client
        .tcp_connect(allowed.addr())
        .assert_ok(&format!("allowed port, from the unit's cgroup {unit}"));
    client
        .tcp_connect(denied.addr())
        .assert_eperm(&format!("unlisted port, from the unit's cgroup {unit}"));
}

/// How long bulkhead may take to notice a service cgroup made while it runs.
const NEW_CGROUP_GRACE: Duration = Duration::from_secs(2);

/// Tries `connect` until it is denied or [`NEW_CGROUP_GRACE`] has passed;
/// returns the last outcome and how long it took.
fn denied_within_grace(connect: impl Fn() -> Outcome) -> (Outcome, Duration) {
    let start = Instant::now();
    let outcome = eventually(NEW_CGROUP_GRACE, Duration::from_millis(50), || {
        let outcome = connect();
        if outcome.errno == Some(EPERM) {
            Ok(outcome)
        } else {
            // Boxed: an `Outcome` is large (clippy::result_large_err).
            Err(Box::new(outcome))
        }
    })
    .unwrap_or_else(|last| *last);
    (outcome, start.elapsed())
}

/// systemd removes a unit's cgroup when the unit stops and makes a new one
/// (same path, new cgroup id) when it starts again.
#[test]
fn restarted_service_is_enforced_again() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let target = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let _daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    client
        .tcp_connect(target.addr())
        .assert_eperm("before the restart");

    svc.remove();
    svc.create_again();
    let (outcome, took) = denied_within_grace(|| client.tcp_connect(target.addr()));
    outcome.assert_eperm(&format!(
        "service cgroup {} made again while bulkhead runs (a unit restart), \
         {took:?} later",
        svc.policy_path()
    ));
}

/// At boot the agent starts before the services it manages: their cgroups
/// appear after it is ready.
#[test]
fn service_started_after_bulkhead_is_enforced() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    svc.remove();
    let target = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let _daemon = Daemon::start(&policies);

    svc.create_again();
    let client = probe!().in_cgroup(svc.path());
    let (outcome, took) = denied_within_grace(|| client.tcp_connect(target.addr()));
    outcome.assert_eperm(&format!(
        "service cgroup {} made after bulkhead was ready, {took:?} later",
        svc.policy_path()
    ));
}
