//! `[sockets]`, end to end: a managed service gets `EPERM` from `socket()`
//! for a raw inet socket (IPv4 and IPv6) unless its policy says `raw = true`,
//! and the refusal is in the decision log; audit mode lets it through and
//! records it. Packet sockets (`AF_PACKET`) are only visible to BPF LSM:
//! where the daemon loads it they get `EPERM` too, and where it cannot the
//! daemon must say so at start (that log line is the documented coverage).

use integration_tests::{
    control::{status, status_feature},
    events::{assert_fields, wait_event},
    http::metrics_addr,
    policy_with, probe,
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, PolicyDir,
};
use serde_json::Value;

/// What the daemon logs at start when packet sockets are judged.
const PACKET_JUDGED: &str = "packet sockets (AF_PACKET) are judged through BPF LSM";
/// What it logs when they are not, followed by the reason.
const PACKET_NOT_JUDGED: &str = "packet sockets (AF_PACKET) are NOT judged: ";

/// Waits for the socket-creation verdict of service `service` from hook
/// `hook`, over IP protocol number `protocol` if given.
fn socket_verdict(daemon: &Daemon, service: &str, hook: &str, protocol: Option<&str>) -> Value {
    wait_event(
        daemon,
        &format!("{hook} verdict of service {service}, protocol {protocol:?}"),
        |ev| {
            ev["type"] == "verdict"
                && ev["hook"] == hook
                && ev["service"] == service
                && protocol.is_none_or(|p| ev["protocol"] == p)
        },
    )
}

fn assert_socket_verdict(ev: &Value, service: &str, svc: &CgroupGuard, mode: &str, verdict: &str) {
    assert_fields(
        ev,
        &[
            ("schema", "bulkhead.event.v2".into()),
            ("mode", mode.into()),
            ("cgroup_id", svc.id().into()),
            ("comm", "bulkhead-probe".into()),
            ("verdict", verdict.into()),
            ("rule", format!("{service}.toml#sockets").into()),
            ("src_ip", Value::Null),
            ("dst_ip", Value::Null),
        ],
        &format!("the refused socket() of service {service}"),
    );
}

#[test]
fn raw_sockets_get_eperm_unless_allowed() {
    if !require_bpf() {
        return;
    }
    let default = CgroupGuard::new();
    let denied = CgroupGuard::new();
    let allowed = CgroupGuard::new();
    let unmanaged = probe!();
    for v6 in [false, true] {
        unmanaged
            .raw_socket(v6)
            .assert_ok("baseline: the test itself (root) may open a raw socket");
    }
    let policies = PolicyDir::with(&[
        ("plain.toml", &service_policy(&default, "enforce", &[])),
        (
            "noraw.toml",
            &policy_with(&denied, "enforce", &[&"[sockets]\nraw = false\n"]),
        ),
        (
            "pinger.toml",
            &policy_with(&allowed, "enforce", &[&"[sockets]\nraw = true\n"]),
        ),
    ]);
    let daemon = Daemon::start(&policies);

    for v6 in [false, true] {
        let family = if v6 { "AF_INET6" } else { "AF_INET" };
        probe!()
            .in_cgroup(default.path())
            .raw_socket(v6)
            .assert_eperm_at(
                "socket",
                &format!(
                    "{family} SOCK_RAW in a service without [sockets] (raw defaults to false)"
                ),
            );
        probe!()
            .in_cgroup(denied.path())
            .raw_socket(v6)
            .assert_eperm_at("socket", &format!("{family} SOCK_RAW with `raw = false`"));
        probe!()
            .in_cgroup(allowed.path())
            .raw_socket(v6)
            .assert_ok(&format!("{family} SOCK_RAW with `raw = true`"));
        unmanaged
            .raw_socket(v6)
            .assert_ok(&format!("{family} SOCK_RAW from an unmanaged process"));
    }

    // The raw sockets of the probe: IPPROTO_ICMP and IPPROTO_ICMPV6.
    for protocol in ["icmp", "icmpv6"] {
        let ev = socket_verdict(&daemon, "plain", "sock_create", Some(protocol));
        assert_socket_verdict(&ev, "plain", &default, "enforce", "deny");
    }
}

#[test]
fn audit_mode_lets_raw_sockets_through_and_records_them() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("trial.toml", &service_policy(&svc, "audit", &[]))]);
    let daemon = Daemon::start(&policies);
    probe!()
        .in_cgroup(svc.path())
        .raw_socket(false)
        .assert_ok("audit mode: a raw socket the policy does not allow is created");
    let ev = socket_verdict(&daemon, "trial", "sock_create", Some("icmp"));
    assert_socket_verdict(&ev, "trial", &svc, "audit", "audit");
}

/// On a host where the daemon loads its BPF LSM program, a packet socket
/// gets `EPERM` unless `packet = true`. Where it cannot, the daemon must
/// say so at start, and the socket opens (for a process with `CAP_NET_RAW`,
/// as this test is): exactly the gap `docs/threat-model.md` documents.
#[test]
fn packet_sockets_are_refused_or_the_gap_is_reported() {
    if !require_bpf() {
        return;
    }
    let default = CgroupGuard::new();
    let sniffer = CgroupGuard::new();
    let policies = PolicyDir::with(&[
        ("plain.toml", &service_policy(&default, "enforce", &[])),
        (
            "sniffer.toml",
            &policy_with(&sniffer, "enforce", &[&"[sockets]\npacket = true\n"]),
        ),
    ]);
    let daemon = Daemon::start(&policies);
    let log = daemon.log();
    let judged = log.lines().any(|l| l.contains(PACKET_JUDGED));
    let not_judged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(PACKET_NOT_JUDGED))
        .collect();
    assert!(
        judged == not_judged.is_empty(),
        "the daemon must say at start whether packet sockets are judged: one of \
         {PACKET_JUDGED:?} or {PACKET_NOT_JUDGED:?}..., not both, not neither; its log:\n{log}"
    );
    // `status` and the metric say what the log said.
    let (active, says) = status_feature(&status(&daemon), "packet_sockets");
    assert_eq!(
        (active, says.starts_with("judged")),
        (judged, judged),
        "status must agree with the log (judged: {judged}): {says:?}"
    );
    assert_eq!(
        sample_count(
            &scrape(metrics_addr(&daemon)),
            "bulkhead_kernel_feature",
            &[("feature", "packet_sockets")]
        ),
        Some(u64::from(judged)),
        "bulkhead_kernel_feature{{feature=\"packet_sockets\"}} must be {}",
        u64::from(judged)
    );

    probe!()
        .packet_socket()
        .assert_ok("an unmanaged process (root) may open a packet socket");
    let in_service = probe!().in_cgroup(default.path()).packet_socket();
    if judged {
        in_service.assert_eperm_at("socket", "AF_PACKET in a service without `packet = true`");
        probe!()
            .in_cgroup(sniffer.path())
            .packet_socket()
            .assert_ok("AF_PACKET with `packet = true`");
        let ev = socket_verdict(&daemon, "plain", "socket_create", None);
        assert_socket_verdict(&ev, "plain", &default, "enforce", "deny");
    } else {
        let line = not_judged[0];
        let reason = line
            .split_once(PACKET_NOT_JUDGED)
            .map_or("", |(_, rest)| rest.trim());
        assert!(
            !reason.is_empty() && line.contains("WARN"),
            "the warning must be a WARN line that gives the reason: {line:?}"
        );
        assert_eq!(
            not_judged.len(),
            1,
            "the gap is reported once at start: {not_judged:#?}"
        );
        // The documented coverage: not judged, so a process with
        // CAP_NET_RAW opens one. If this fails, the daemon judges packet
        // sockets after all and must say so instead of the warning.
        in_service.assert_ok(&format!(
            "the daemon reported packet sockets NOT judged ({reason}), so a root process in \
             the service opens one"
        ));
        eprintln!("NOTE: packet sockets are not judged on this host: {reason}");
    }
}
