//! Tests of the graph model, and event builders the other graph tests use.

use std::net::{IpAddr, Ipv4Addr};

use super::model::{Dest, EdgeStats, Graph, Source, GROUP_AT, MAX_EDGES};
use crate::events::{Direction, EventType, FlowEvent, Verdict};

pub(crate) fn ev(
    kind: EventType,
    service: Option<&str>,
    dir: Direction,
    dst: (&str, u16),
    verdict: Option<Verdict>,
) -> FlowEvent {
    FlowEvent {
        kind,
        time: "2026-11-29T02:00:00.000000000Z".to_string(),
        service: service.map(Into::into),
        cgroup_id: 77,
        comm: "probe".to_string(),
        traffic_direction: Some(dir),
        hook: if kind == EventType::Verdict {
            "connect".into()
        } else {
            "sock_ops".into()
        },
        src_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        src_port: Some(40000),
        dst_ip: dst.0.parse().ok(),
        dst_port: Some(dst.1),
        verdict,
        rule: None,
        ..crate::events::sample_verdict()
    }
}

pub(crate) fn connect(service: &str, dst: (&str, u16), v: Verdict) -> FlowEvent {
    ev(
        EventType::Verdict,
        Some(service),
        Direction::Egress,
        dst,
        Some(v),
    )
}

/// `service` accepted a connection on `local`.
pub(crate) fn accepted(service: &str, local: (&str, u16)) -> FlowEvent {
    FlowEvent {
        src_ip: local.0.parse().ok(),
        src_port: Some(local.1),
        ..ev(
            EventType::TcpEstablished,
            Some(service),
            Direction::Ingress,
            ("127.0.0.1", 50000),
            None,
        )
    }
}

fn stats<'a>(g: &'a Graph, service: &str, dest: &str) -> &'a EdgeStats {
    g.edges
        .iter()
        .find(|((s, d), _)| s.id() == format!("service:{service}") && d.label() == dest)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no edge {service} -> {dest} in {:?}", g.edges.keys()))
}

#[test]
fn verdicts_lifecycle_and_bytes_add_up_on_one_edge() {
    let mut g = Graph::default();
    for v in [
        Verdict::Allow,
        Verdict::Allow,
        Verdict::Deny,
        Verdict::Audit,
    ] {
        g.observe(&connect("a", ("192.0.2.7", 5432), v));
    }
    g.observe(&ev(
        EventType::TcpEstablished,
        Some("a"),
        Direction::Egress,
        ("192.0.2.7", 5432),
        None,
    ));
    let mut closed = ev(
        EventType::TcpClosed,
        Some("a"),
        Direction::Egress,
        ("192.0.2.7", 5432),
        None,
    );
    closed.bytes_sent = Some(10);
    closed.bytes_received = Some(1000);
    g.observe(&closed);
    let s = stats(&g, "a", "192.0.2.7:5432/tcp");
    assert_eq!(
        (s.connections, s.allowed, s.denied, s.audited, s.established),
        (3, 2, 1, 1, 1)
    );
    assert_eq!((s.bytes_sent, s.bytes_received), (10, 1000));
    assert_eq!(g.edges.len(), 1);
}

#[test]
fn a_local_listener_turns_the_destination_into_its_service() {
    let mut g = Graph::default();
    g.observe(&connect("a", ("127.0.0.1", 8080), Verdict::Allow));
    g.observe(&accepted("b", ("127.0.0.1", 8080)));
    let dest = Dest::host("127.0.0.1".parse().expect("ip"), 8080, "tcp");
    assert_eq!(g.service_at(&dest), Some("b"));
    // Another loopback address, same port: the same listener.
    let other = Dest::host("127.0.0.2".parse().expect("ip"), 8080, "tcp");
    assert_eq!(g.service_at(&other), Some("b"));
    let elsewhere = Dest::host("192.0.2.1".parse().expect("ip"), 8080, "tcp");
    assert_eq!(g.service_at(&elsewhere), None);
}

#[test]
fn many_addresses_of_one_subnet_fold_into_a_network() {
    let mut g = Graph::default();
    for i in 1..=GROUP_AT {
        g.observe(&connect(
            "a",
            (&format!("198.51.100.{i}"), 443),
            Verdict::Allow,
        ));
    }
    g.observe(&connect("a", ("198.51.100.200", 443), Verdict::Allow));
    g.observe(&connect("a", ("198.51.100.1", 80), Verdict::Allow));
    let s = stats(&g, "a", "198.51.100.0/24:443/tcp");
    assert_eq!(
        (s.connections, s.addresses),
        (GROUP_AT as u64 + 1, GROUP_AT as u64)
    );
    assert_eq!(g.edges.len(), 2, "{:?}", g.edges.keys());
}

#[test]
fn edges_are_capped_least_recently_seen_first() {
    let mut g = Graph::default();
    g.observe(&connect("keep", ("127.0.0.1", 1), Verdict::Allow));
    for i in 0..MAX_EDGES {
        let port = u16::try_from(i % 60_000 + 2).expect("port");
        let service = format!("s{}", i / 60_000);
        g.observe(&connect(&service, ("127.0.0.1", port), Verdict::Allow));
        if i == MAX_EDGES - 10 {
            // Seen again: now among the most recent.
            g.observe(&connect("keep", ("127.0.0.1", 1), Verdict::Allow));
        }
    }
    assert!(g.edges.len() <= MAX_EDGES);
    assert!(g.evictions > 0);
    assert!(g.edges.keys().any(|(s, _)| s.id() == "service:keep"));
}

#[test]
fn remote_peers_get_inbound_edges_local_ones_do_not() {
    let mut g = Graph::default();
    let mut from_remote = accepted("b", ("198.51.100.1", 8080));
    from_remote.dst_ip = "192.0.2.50".parse().ok();
    g.observe(&from_remote);
    let mut drop = from_remote.clone();
    drop.kind = EventType::Verdict;
    drop.hook = "ingress".into();
    drop.verdict = Some(Verdict::Deny);
    drop.dst_ip = "192.0.2.66".parse().ok();
    g.observe(&drop);
    // A local peer (loopback, or this host's own address): not inbound.
    g.observe(&accepted("b", ("127.0.0.1", 8080)));
    let mut local = from_remote.clone();
    local.dst_ip = "198.51.100.1".parse().ok();
    g.observe(&local);
    let edges: Vec<(String, String, u64, u64)> = g
        .edges
        .iter()
        .map(|((s, d), e)| (s.id(), d.label(), e.connections, e.denied))
        .collect();
    assert_eq!(edges.len(), 2, "{edges:?}");
    assert!(edges.contains(&(
        "peer:192.0.2.50".into(),
        "198.51.100.1:8080/tcp".into(),
        1,
        0
    )));
    assert!(edges.contains(&(
        "peer:192.0.2.66".into(),
        "198.51.100.1:8080/tcp".into(),
        0,
        1
    )));
    let dest = Dest::host("198.51.100.1".parse().expect("ip"), 8080, "tcp");
    assert_eq!(g.service_at(&dest), Some("b"));
}

#[test]
fn unmanaged_processes_are_keyed_by_cgroup() {
    let mut g = Graph::default();
    let mut e = ev(
        EventType::Verdict,
        None,
        Direction::Egress,
        ("192.0.2.1", 53),
        Some(Verdict::Allow),
    );
    e.protocol = Some("udp".into());
    e.hook = "sendmsg".into();
    g.observe(&e);
    assert!(g.edges.contains_key(&(
        Source::Process { cgroup_id: 77 },
        Dest::host("192.0.2.1".parse().expect("ip"), 53, "udp")
    )));
}

#[test]
fn calls_of_flow_summaries_and_bytes_of_open_connections_count_once() {
    let mut g = Graph::default();
    let dst = ("192.0.2.7", 5432);
    g.observe(&connect("a", dst, Verdict::Allow));
    g.observe(&FlowEvent {
        calls: Some(4999),
        hook: "connect".into(),
        ..ev(
            EventType::Flow,
            Some("a"),
            Direction::Egress,
            dst,
            Some(Verdict::Allow),
        )
    });
    let bytes = |kind, sent, received| FlowEvent {
        bytes_sent: Some(sent),
        bytes_received: Some(received),
        verdict: None,
        ..ev(kind, Some("a"), Direction::Egress, dst, None)
    };
    // Two summaries of the open connection, then its close with the total,
    // marked (by the stage of flows::tcp) with what they did not report.
    g.observe(&bytes(EventType::Flow, 1000, 10));
    g.observe(&bytes(EventType::Flow, 500, 0));
    g.observe(&FlowEvent {
        bytes_unsummarised: Some((100, 0)),
        ..bytes(EventType::TcpClosed, 1600, 10)
    });
    let s = stats(&g, "a", "192.0.2.7:5432/tcp");
    assert_eq!(
        (s.allowed, s.connections),
        (5000, 5000),
        "calls, not records"
    );
    assert_eq!(
        (s.bytes_sent, s.bytes_received),
        (1600, 10),
        "bytes counted once"
    );
}

/// `service`'s allowed connect to `dst`, an address its lookup of `name`
/// gave (the event's `dst_name`).
pub(crate) fn connect_named(service: &str, dst: (&str, u16), name: &str) -> FlowEvent {
    FlowEvent {
        dst_name: Some(name.into()),
        ..connect(service, dst, Verdict::Allow)
    }
}

/// Addresses a lookup named stay edges of their own (never folded into a
/// network, however many), each with its name; the view draws them all
/// under one node per name, port and protocol, and the edges still say
/// which address each went to.
#[test]
fn addresses_a_lookup_named_are_kept_and_drawn_under_their_name() {
    let mut g = Graph::default();
    for i in 1..=GROUP_AT + 2 {
        g.observe(&connect_named(
            "a",
            (&format!("198.51.100.{i}"), 443),
            "api.example.test",
        ));
    }
    // The flow's later calls (no name of their own) keep the name.
    g.observe(&connect("a", ("198.51.100.1", 443), Verdict::Allow));
    assert_eq!(
        g.edges.len(),
        GROUP_AT + 2,
        "not folded: {:?}",
        g.edges.keys()
    );
    let first = stats(&g, "a", "198.51.100.1:443/tcp");
    assert_eq!(first.dst_name.as_deref(), Some("api.example.test"));
    assert_eq!(first.allowed, 2);
    // Unnamed addresses of the same /24 still fold among themselves.
    for i in 100..100 + GROUP_AT {
        g.observe(&connect(
            "a",
            (&format!("198.51.100.{i}"), 443),
            Verdict::Allow,
        ));
    }
    assert!(
        g.edges
            .keys()
            .any(|(_, d)| d.label() == "198.51.100.0/24:443/tcp"),
        "{:?}",
        g.edges.keys()
    );
    let v = super::view::build(&g, &crate::policy::PolicySet::default());
    let node = v
        .nodes
        .iter()
        .find(|n| n.id == "name:api.example.test:443/tcp")
        .unwrap_or_else(|| panic!("a node for the name: {:?}", v.nodes));
    assert_eq!(
        (node.kind.as_str(), node.label.as_str()),
        ("name", "api.example.test:443/tcp")
    );
    let under_name: Vec<&str> = v
        .edges
        .iter()
        .filter(|e| e.to == node.id)
        .map(|e| e.dest.as_str())
        .collect();
    assert_eq!(under_name.len(), GROUP_AT + 2, "{under_name:?}");
    assert!(under_name.contains(&"198.51.100.1:443/tcp"));
    assert!(
        !v.nodes
            .iter()
            .any(|n| n.id == "endpoint:198.51.100.1:443/tcp"),
        "a named address is not drawn as a bare endpoint"
    );
    let dot = super::export::dot(&v);
    assert!(
        dot.contains("\"service:a\" -> \"name:api.example.test:443/tcp\" [label=\"tcp 443 ×2 at 198.51.100.1\"]"),
        "{dot}"
    );
}

/// An edge counts the calls that went through per executable: at most
/// three paths, the rest under "(other)", an unknown one as "(unknown)";
/// denied calls are not counted.
#[test]
fn an_edge_counts_its_calls_per_executable() {
    let mut g = Graph::default();
    let by = |exe: Option<&str>, verdict| {
        let mut ev = connect("a", ("192.0.2.7", 5432), verdict);
        ev.exe = exe.map(Into::into);
        ev.calls = Some(2);
        ev
    };
    for exe in ["/a", "/b", "/a", "/c", "/d", "/e"] {
        g.observe(&by(Some(exe), Verdict::Allow));
    }
    g.observe(&by(None, Verdict::Allow));
    g.observe(&by(Some("/f"), Verdict::Deny));
    let stats = g.edges.values().next().expect("one edge");
    let seen: Vec<(&str, u64)> = stats
        .executables
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        seen,
        [("(other)", 6), ("/a", 4), ("/b", 2), ("/c", 2)],
        "{stats:?}"
    );
    assert_eq!(stats.connections, 14);
}
