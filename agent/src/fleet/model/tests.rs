use std::net::IpAddr;

use super::*;

fn rule(name: &str, to: &[&str], port: u16, protocol: &str) -> Rule {
    Rule {
        rule: name.to_string(),
        to: to.iter().map(|n| n.parse().expect("net")).collect(),
        ports: vec![(port, port)],
        protocol: protocol.to_string(),
        description: None,
        names: Vec::new(),
    }
}

fn instance(service: &str, host: &str, rules: Vec<Rule>) -> Instance {
    Instance {
        service: service.to_string(),
        host: host.to_string(),
        mode: "enforce".to_string(),
        file: format!("/etc/bulkhead/policies/{service}.toml"),
        rules,
    }
}

fn ip(a: &str) -> IpAddr {
    a.parse().expect("ip")
}

fn listener(service: &str, host: &str, addr: &str, port: u16, seen: (u64, u64)) -> Listener {
    Listener {
        host: host.to_string(),
        service: service.to_string(),
        addr: ip(addr),
        port,
        protocol: "tcp".to_string(),
        first_seen: seen.0,
        last_seen: seen.1,
    }
}

fn flow(service: &str, host: &str, to: (&str, u16), calls: u64, seen: (u64, u64)) -> Flow {
    Flow {
        host: host.to_string(),
        service: service.to_string(),
        remote_addr: ip(to.0),
        remote_port: to.1,
        protocol: "tcp".to_string(),
        allowed: calls,
        audited: 0,
        denied: 0,
        bytes_sent: 0,
        bytes_received: 0,
        first_seen: seen.0,
        last_seen: seen.1,
        dst_name: String::new(),
        name_rule: String::new(),
    }
}

const ALWAYS: (u64, u64) = (1_000, 10_000);

/// web@h1 → api@h2:8080 → db@h3:5432, an isolated service on h4, and a
/// second web on h4 that reaches nothing.
fn chain() -> Fleet {
    let instances = vec![
        instance(
            "web",
            "h1",
            vec![
                rule("web.toml#egress[0]", &["198.51.100.0/24"], 8080, "tcp"),
                rule("web.toml#egress[1]", &["203.0.113.0/24"], 443, "tcp"),
            ],
        ),
        instance(
            "api",
            "h2",
            vec![rule("api.toml#egress[0]", &["198.51.100.30"], 5432, "tcp")],
        ),
        instance("db", "h3", vec![]),
        instance("iso", "h4", vec![]),
    ];
    let listeners = vec![
        // api listens on every address: the agent expands it to h2's.
        listener("api", "h2", "198.51.100.20", 8080, ALWAYS),
        listener("api", "h2", "127.0.0.1", 8080, ALWAYS),
        listener("db", "h3", "198.51.100.30", 5432, ALWAYS),
        listener("iso", "h4", "198.51.100.40", 9000, ALWAYS),
        // A loopback listener on h4: not reachable from h1 on 127.0.0.1.
        listener("iso", "h4", "127.0.0.1", 8080, ALWAYS),
    ];
    let flows = vec![
        flow("web", "h1", ("198.51.100.20", 8080), 7, (2_000, 2_010)),
        flow("api", "h2", ("198.51.100.30", 5432), 3, (2_000, 2_010)),
    ];
    Fleet::new(instances, listeners, flows)
}

#[test]
fn the_chain_crosses_hosts_with_every_hop() {
    let b = chain().blast_radius("web").expect("web is in the fleet");
    assert_eq!(b.instances, ["web@h1"]);
    let services: Vec<(&str, usize, &str)> = b
        .lateral
        .services
        .iter()
        .map(|h| (h.target.as_str(), h.hops, h.path.as_str()))
        .collect();
    assert_eq!(
        services,
        [
            ("api@h2", 1, "web@h1 → api@h2:8080"),
            ("db@h3", 2, "web@h1 → api@h2:8080 → db@h3:5432"),
        ]
    );
    assert_eq!(b.lateral.size, 2);
    // The allowance no service listens in, and nothing used.
    let unused: Vec<&str> = b.unused.iter().map(|a| a.to.as_str()).collect();
    assert_eq!(unused, ["203.0.113.0/24"]);
    assert_eq!(b.allows[0].services, ["api@h2"]);
    let reached: Vec<(&str, &str, u64)> = b
        .reached
        .iter()
        .map(|r| (r.to.as_str(), r.dest.as_str(), r.calls))
        .collect();
    assert_eq!(reached, [("api@h2", "198.51.100.20:8080/tcp", 7)]);
    assert_eq!(b.reached[0].rule.as_deref(), Some("web.toml#egress[0]"));
}

#[test]
fn an_isolated_service_reaches_nothing_and_nothing_reaches_it() {
    let fleet = chain();
    let iso = fleet.blast_radius("iso").expect("iso");
    assert_eq!(iso.lateral.size, 0);
    assert!(iso.allows.is_empty() && iso.reached.is_empty());
    let web = fleet.blast_radius("web@h1").expect("web@h1");
    assert!(!web
        .lateral
        .services
        .iter()
        .any(|h| h.target.starts_with("iso@")));
}

#[test]
fn loopback_resolves_on_the_callers_own_host_only() {
    let mut fleet = chain();
    fleet = Fleet::new(
        {
            let mut i = fleet.instances().to_vec();
            i[0].rules
                .push(rule("web.toml#egress[2]", &["127.0.0.1"], 8080, "tcp"));
            i
        },
        vec![
            listener("api", "h2", "127.0.0.1", 8080, ALWAYS),
            listener("iso", "h4", "127.0.0.1", 8080, ALWAYS),
        ],
        vec![],
    );
    let b = fleet.blast_radius("web").expect("web");
    assert_eq!(b.lateral.size, 0, "{:?}", b.lateral.services);
    let loopback = b
        .allows
        .iter()
        .find(|a| a.to == "127.0.0.1/32")
        .expect("rule");
    assert!(loopback.services.is_empty());
}

#[test]
fn an_address_that_moved_is_resolved_by_time() {
    let instances = vec![
        instance(
            "web",
            "h1",
            vec![rule("web.toml#egress[0]", &["198.51.100.30"], 5432, "tcp")],
        ),
        instance("db", "h3", vec![]),
        instance("db", "h4", vec![]),
    ];
    let listeners = vec![
        listener("db", "h3", "198.51.100.30", 5432, (1_000, 2_000)),
        listener("db", "h4", "198.51.100.30", 5432, (3_000, 9_000)),
    ];
    let flows = vec![
        flow("web", "h1", ("198.51.100.30", 5432), 2, (1_500, 1_510)),
        flow("web", "h1", ("198.51.100.30", 5432), 5, (8_000, 8_010)),
    ];
    let b = Fleet::new(instances, listeners, flows)
        .blast_radius("web")
        .expect("web");
    let reached: Vec<(&str, u64)> = b.reached.iter().map(|r| (r.to.as_str(), r.calls)).collect();
    assert_eq!(reached, [("db@h3", 2), ("db@h4", 5)]);
    // What the policy allows now reaches only the current owner.
    assert_eq!(b.allows[0].services, ["db@h4"]);
    let services: Vec<&str> = b
        .lateral
        .services
        .iter()
        .map(|h| h.target.as_str())
        .collect();
    assert_eq!(services, ["db@h4"]);
}

#[test]
fn a_service_name_means_every_instance() {
    let instances = vec![
        instance(
            "web",
            "h1",
            vec![rule("web.toml#egress[0]", &["198.51.100.20"], 8080, "tcp")],
        ),
        instance(
            "web",
            "h4",
            vec![rule("web.toml#egress[0]", &["198.51.100.30"], 5432, "tcp")],
        ),
        instance("api", "h2", vec![]),
        instance("db", "h3", vec![]),
    ];
    let listeners = vec![
        listener("api", "h2", "198.51.100.20", 8080, ALWAYS),
        listener("db", "h3", "198.51.100.30", 5432, ALWAYS),
    ];
    let fleet = Fleet::new(instances, listeners, vec![]);
    let all = fleet.blast_radius("web").expect("web");
    assert_eq!(all.instances, ["web@h1", "web@h4"]);
    let mut targets: Vec<&str> = all
        .lateral
        .services
        .iter()
        .map(|h| h.target.as_str())
        .collect();
    targets.sort_unstable();
    assert_eq!(targets, ["api@h2", "db@h3"]);
    let one = fleet.blast_radius("web@h4").expect("web@h4");
    let targets: Vec<&str> = one
        .lateral
        .services
        .iter()
        .map(|h| h.target.as_str())
        .collect();
    assert_eq!(targets, ["db@h3"]);
    assert!(fleet.blast_radius("nope").is_err());
    assert!(fleet.blast_radius("web@h9").is_err());
}

#[test]
fn a_template_instance_name_keeps_its_own_at() {
    let instances = vec![instance("postgresql@14-main", "h3", vec![])];
    let fleet = Fleet::new(instances, vec![], vec![]);
    let b = fleet
        .blast_radius("postgresql@14-main")
        .expect("whole name");
    assert_eq!(b.instances, ["postgresql@14-main@h3"]);
    let b = fleet
        .blast_radius("postgresql@14-main@h3")
        .expect("name and host");
    assert_eq!(b.instances, ["postgresql@14-main@h3"]);
}

#[test]
fn an_ipv6_network_covers_its_listeners_only() {
    let instances = vec![
        instance(
            "web",
            "h1",
            vec![rule(
                "web.toml#egress[0]",
                &["2001:db8:1::/64"],
                8080,
                "tcp",
            )],
        ),
        instance("api", "h2", vec![]),
        instance("other", "h3", vec![]),
    ];
    let listeners = vec![
        listener("api", "h2", "2001:db8:1::5", 8080, ALWAYS),
        listener("other", "h3", "2001:db8:2::5", 8080, ALWAYS),
        listener("other", "h3", "198.51.100.5", 8080, ALWAYS),
    ];
    let b = Fleet::new(instances, listeners, vec![])
        .blast_radius("web")
        .expect("web");
    assert_eq!(b.allows[0].services, ["api@h2"]);
}

#[test]
fn the_graph_draws_instances_and_resolves_destinations_by_time() {
    let v = chain().view();
    let ids: Vec<&str> = v.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "service:api@h2",
            "service:db@h3",
            "service:iso@h4",
            "service:web@h1"
        ]
    );
    let edges: Vec<(&str, &str, &str, u64)> = v
        .edges
        .iter()
        .map(|e| {
            (
                e.from.as_str(),
                e.to.as_str(),
                e.dest.as_str(),
                e.stats.connections,
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            (
                "service:api@h2",
                "service:db@h3",
                "198.51.100.30:5432/tcp",
                3
            ),
            (
                "service:web@h1",
                "service:api@h2",
                "198.51.100.20:8080/tcp",
                7
            ),
        ]
    );
    assert_eq!(v.edges[0].stats.first_seen, "1970-01-01T00:33:20Z");
    // Dot output works on it as on a host's graph.
    let dot = crate::graph::export::dot(&v);
    assert!(
        dot.contains("\"service:web@h1\" -> \"service:api@h2\""),
        "{dot}"
    );
}

#[test]
fn a_listener_its_host_no_longer_reports_is_not_reachable_now() {
    let instances = vec![
        instance(
            "web",
            "h1",
            vec![rule("web.toml#egress[0]", &["198.51.100.20"], 8080, "tcp")],
        ),
        instance("api", "h2", vec![]),
    ];
    let listeners = vec![
        // api stopped listening at 2,000; h2's agent went on reporting.
        listener("api", "h2", "198.51.100.20", 8080, (1_000, 2_000)),
        listener("other", "h2", "198.51.100.21", 22, (1_000, 9_000)),
    ];
    let flows = vec![flow(
        "web",
        "h1",
        ("198.51.100.20", 8080),
        4,
        (1_500, 1_510),
    )];
    let b = Fleet::new(instances, listeners, flows)
        .blast_radius("web")
        .expect("web");
    assert!(b.allows[0].services.is_empty(), "{:?}", b.allows[0]);
    assert_eq!(b.lateral.size, 0);
    // What web reached while api listened is still api's.
    assert_eq!(b.reached[0].to, "api@h2");
}

/// What a test compares of a `Reached`: to, dest, addresses, calls, rule.
type ReachedRow<'a> = (&'a str, &'a str, Vec<&'a str>, u64, Option<&'a str>);

/// A flow to an address the service's lookup of a name gave: listed by
/// that name with its addresses (reached, lateral, graph), attributed to
/// the name rule; an address a service listens on stays that service.
#[test]
fn destinations_reached_by_name_are_listed_by_their_name() {
    let named = |addr: &str, calls: u64| Flow {
        dst_name: "api.example.test".to_string(),
        name_rule: String::new(),
        ..flow("web", "h1", (addr, 443), calls, ALWAYS)
    };
    let by_name = Rule {
        names: vec![
            "api.example.test".to_string(),
            "*.idle.example.test".to_string(),
        ],
        ..rule("web.toml#egress[0]", &[], 443, "tcp")
    };
    let fleet = Fleet::new(
        vec![
            instance("web", "h1", vec![by_name]),
            instance("api", "h2", Vec::new()),
        ],
        vec![listener("api", "h2", "198.51.100.20", 443, ALWAYS)],
        vec![
            named("203.0.113.5", 2),
            named("203.0.113.6", 3),
            // The name gave an address a fleet service listens on.
            named("198.51.100.20", 1),
        ],
    );
    let b = fleet.blast_radius("web").expect("web");
    let reached: Vec<ReachedRow<'_>> = b
        .reached
        .iter()
        .map(|r| {
            (
                r.to.as_str(),
                r.dest.as_str(),
                r.addresses.iter().map(String::as_str).collect(),
                r.calls,
                r.rule.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        reached,
        [
            (
                "api.example.test:443/tcp",
                "api.example.test:443/tcp",
                vec!["203.0.113.5", "203.0.113.6"],
                5,
                Some("web.toml#egress[0]")
            ),
            (
                "api@h2",
                "198.51.100.20:443/tcp",
                Vec::new(),
                1,
                Some("web.toml#egress[0]")
            ),
        ]
    );
    let allows: Vec<(&str, bool)> = b.allows.iter().map(|a| (a.to.as_str(), a.used)).collect();
    assert_eq!(
        allows,
        [("api.example.test", true), ("*.idle.example.test", false)]
    );
    let paths: Vec<&str> = b
        .lateral
        .destinations
        .iter()
        .map(|h| h.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "web@h1 → *.idle.example.test:443/tcp",
            "web@h1 → api.example.test:443"
        ]
    );
    let view = fleet.view();
    let node = view
        .nodes
        .iter()
        .find(|n| n.id == "name:api.example.test:443/tcp")
        .expect("a node for the name");
    assert_eq!(node.kind, "name");
    let under: Vec<(&str, Option<&str>)> = view
        .edges
        .iter()
        .filter(|e| e.to == node.id)
        .map(|e| (e.dest.as_str(), e.stats.dst_name.as_deref()))
        .collect();
    assert_eq!(
        under,
        [
            ("203.0.113.5:443/tcp", Some("api.example.test")),
            ("203.0.113.6:443/tcp", Some("api.example.test"))
        ]
    );
    assert!(view.edges.iter().any(|e| e.to == "service:api@h2"));
}
