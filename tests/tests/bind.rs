//! `[bind]`, end to end: a service may `bind()` the ports its policy lists
//! (single ports and ranges, per protocol) and gets `EPERM` at once for any
//! other; port 0 (an ephemeral port) always works, and the implicit bind of
//! an outgoing `connect()`/`sendto()` is never judged. Without `[bind]`
//! binding is not restricted; audit mode lets a bind through and records it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use integration_tests::{
    addr,
    events::{assert_fields, wait_event},
    free_port_block, policy_with, probe, require_bpf, CgroupGuard, Daemon, Egress, PolicyDir,
    Proto,
};
use serde_json::Value;

/// `len` consecutive ports free for TCP and UDP on every local address,
/// IPv4 and IPv6 (a dual-stack `[::]` bind checks both).
fn free_ports(len: u16) -> u16 {
    free_port_block(IpAddr::V6(Ipv6Addr::UNSPECIFIED), len)
}

/// The three addresses a test binds: `127.0.0.1`, `::1`, and
/// the IPv4 wildcard.
fn bind_addrs(port: u16) -> [SocketAddr; 3] {
    [
        addr(&format!("127.0.0.1:{port}")),
        addr(&format!("[::1]:{port}")),
        addr(&format!("0.0.0.0:{port}")),
    ]
}

/// Waits for the `bind` verdict event about `local` over `protocol`.
fn bind_verdict(daemon: &Daemon, protocol: &str, local: SocketAddr) -> Value {
    wait_event(
        daemon,
        &format!("bind verdict for {protocol} {local}"),
        |ev| {
            ev["type"] == "verdict"
                && ev["hook"] == "bind"
                && ev["protocol"] == protocol
                && ev["src_ip"] == local.ip().to_string()
                && ev["src_port"] == local.port()
        },
    )
}

fn assert_bind_verdict(ev: &Value, service: &str, svc: &CgroupGuard, mode: &str, verdict: &str) {
    assert_fields(
        ev,
        &[
            ("schema", "bulkhead.event.v2".into()),
            ("service", service.into()),
            ("mode", mode.into()),
            ("cgroup_id", svc.id().into()),
            ("comm", "bulkhead-probe".into()),
            ("verdict", verdict.into()),
            ("rule", format!("{service}.toml#bind").into()),
            ("dst_ip", Value::Null),
            ("dst_port", Value::Null),
        ],
        &format!("the refused bind of service {service}"),
    );
}

#[test]
fn listed_ports_and_ranges_bind_others_get_eperm() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let base = free_ports(5);
    let listed = [base, base + 2, base + 3];
    let unlisted = [base + 1, base + 4];
    let bind = format!(
        "[bind]\nports = [{base}, \"{}-{}\"]\nprotocol = \"any\"\n",
        base + 2,
        base + 3
    );
    let policies = PolicyDir::with(&[("api.toml", &policy_with(&svc, "enforce", &[&bind]))]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());

    for proto in [Proto::Tcp, Proto::Udp] {
        for port in listed {
            for local in bind_addrs(port) {
                client.bind(proto, local).assert_ok(&format!(
                    "{proto:?} bind of {local}: port {port} is listed (single port or range edge)"
                ));
            }
        }
        for port in unlisted {
            for local in bind_addrs(port) {
                client.bind(proto, local).assert_eperm_at(
                    "bind",
                    &format!("{proto:?} bind of {local}: port {port} is just outside the list"),
                );
            }
        }
        for local in bind_addrs(0) {
            let ephemeral = client.bind(proto, local);
            ephemeral.assert_ok(&format!("{proto:?} bind of {local}: port 0 always works"));
            assert_ne!(
                ephemeral.local_addr().port(),
                0,
                "the kernel picked a port for {}",
                ephemeral.what
            );
        }
    }

    let refused = addr(&format!("127.0.0.1:{}", base + 1));
    let ev = bind_verdict(&daemon, "tcp", refused);
    assert_bind_verdict(&ev, "api", &svc, "enforce", "deny");
    let refused6 = addr(&format!("[::1]:{}", base + 4));
    let ev = bind_verdict(&daemon, "udp", refused6);
    assert_bind_verdict(&ev, "api", &svc, "enforce", "deny");
}

/// `protocol = "tcp"` leaves UDP no port; `ports = []` leaves no port at
/// all (but port 0 and outgoing connections work); no `[bind]` at all
/// leaves binding alone.
#[test]
fn protocol_empty_list_and_no_bind_table() {
    if !require_bpf() {
        return;
    }
    let tcp_only = CgroupGuard::new();
    let nothing = CgroupGuard::new();
    let free = CgroupGuard::new();
    let port = free_ports(1);
    let target = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let echo = probe!().listen(Proto::Udp, addr("127.0.0.1:0"));
    let reach_targets = Egress::to(["127.0.0.1"]);
    let policies = PolicyDir::with(&[
        (
            "tcponly.toml",
            &policy_with(
                &tcp_only,
                "enforce",
                &[&format!("[bind]\nports = [{port}]\nprotocol = \"tcp\"\n")],
            ),
        ),
        (
            "nothing.toml",
            &policy_with(
                &nothing,
                "enforce",
                &[&"[bind]\nports = []\n", &reach_targets],
            ),
        ),
        ("free.toml", &policy_with(&free, "enforce", &[])),
    ]);
    let daemon = Daemon::start(&policies);
    let local = addr(&format!("127.0.0.1:{port}"));
    let local6 = addr(&format!("[::1]:{port}"));

    let client = probe!().in_cgroup(tcp_only.path());
    client
        .bind(Proto::Tcp, local)
        .assert_ok("TCP bind of the port a `protocol = \"tcp\"` list names");
    client
        .bind(Proto::Udp, local)
        .assert_eperm_at("bind", "UDP bind of a port only listed for TCP");
    client
        .bind(Proto::Udp, local6)
        .assert_eperm_at("bind", "UDP bind (IPv6) of a port only listed for TCP");
    let ev = bind_verdict(&daemon, "udp", local);
    assert_bind_verdict(&ev, "tcponly", &tcp_only, "enforce", "deny");

    let client = probe!().in_cgroup(nothing.path());
    for proto in [Proto::Tcp, Proto::Udp] {
        for at in [local, local6] {
            client
                .bind(proto, at)
                .assert_eperm_at("bind", &format!("{proto:?} bind of {at} with `ports = []`"));
        }
        client
            .bind(proto, addr("127.0.0.1:0"))
            .assert_ok(&format!("{proto:?} bind of port 0 with `ports = []`"));
    }
    client
        .tcp_connect(target.addr())
        .assert_ok("connect() binds implicitly, and that is never judged");
    client
        .udp_connect(echo.addr())
        .assert_ok("UDP connect() binds implicitly, and that is never judged");
    client
        .udp_sendto(echo.addr())
        .assert_ok("the implicit bind of an unconnected sendto() is never judged");

    let client = probe!().in_cgroup(free.path());
    for proto in [Proto::Tcp, Proto::Udp] {
        for at in [local, local6] {
            client
                .bind(proto, at)
                .assert_ok(&format!("{proto:?} bind of {at}: the policy has no [bind]"));
        }
    }
}

#[test]
fn audit_mode_lets_binds_through_and_records_them() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let port = free_ports(1);
    let policies = PolicyDir::with(&[(
        "trial.toml",
        &policy_with(&svc, "audit", &[&"[bind]\nports = []\n"]),
    )]);
    let daemon = Daemon::start(&policies);
    let local = addr(&format!("127.0.0.1:{port}"));
    probe!()
        .in_cgroup(svc.path())
        .bind(Proto::Tcp, local)
        .assert_ok("audit mode: a bind the list does not allow goes through");
    let ev = bind_verdict(&daemon, "tcp", local);
    assert_bind_verdict(&ev, "trial", &svc, "audit", "audit");
}
