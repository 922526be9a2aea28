//! Blast radius: for one service, what its policy allows, what it actually
//! reached, which allowances went unused, and which services (and through
//! them, which destinations) it could reach laterally if compromised.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::{
    model::{Dest, EdgeStats, Graph, ListenKey, Source},
    named,
};
use crate::policy::{EgressRule, PolicySet, PortRange, Protocol, RuleRef, Section, Service};

/// One destination network, or one name pattern, of one `[[egress]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// `a.toml#egress[0]`.
    pub rule: String,
    /// A network, or a name pattern (`api.example.com`, `*.example.com`).
    pub to: String,
    /// `8080`, `8000-8100, 9000`, or `all`.
    pub ports: String,
    pub protocol: String,
    pub description: Option<String>,
    /// Managed services listening inside it.
    pub services: Vec<String>,
    /// Whether an observed connection went through it.
    pub used: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    /// The service (by name), the DNS name the service looked up
    /// (`NAME:PORT/PROTO`), or the endpoint (`ADDR:PORT/PROTO`).
    pub to: String,
    /// As the kernel saw it (`ADDR:PORT/PROTO`); for a name, the name again
    /// and its addresses in `addresses`.
    pub dest: String,
    /// The addresses reached by the name (empty for other destinations).
    #[serde(default)]
    pub addresses: Vec<String>,
    pub connections: u64,
    pub denied: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// The allowance it went through (null: none, e.g. denied or audited).
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// A service name, or a destination `ADDR:PORT/PROTO`, `NET:PORTS/PROTO`,
    /// `NAME:PORT/PROTO` (reached by a name) or `PATTERN:PORTS/PROTO`.
    pub target: String,
    /// `service` or `destination`.
    pub kind: String,
    pub hops: usize,
    /// `a → b:8080 → 192.0.2.2:5432`.
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lateral {
    pub services: Vec<Hop>,
    pub destinations: Vec<Hop>,
    /// Services reachable, directly or through other services.
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlastRadius {
    pub service: String,
    pub mode: String,
    pub file: String,
    /// Only connections seen since this time count (null: all the graph holds).
    pub since: Option<String>,
    pub allows: Vec<Allowance>,
    pub reached: Vec<Reached>,
    pub unused: Vec<Allowance>,
    pub lateral: Lateral,
}

fn protocol_matches(p: Protocol, proto: &str) -> bool {
    match p {
        Protocol::Any => true,
        Protocol::Tcp => proto == "tcp",
        Protocol::Udp => proto == "udp",
        Protocol::Icmp => proto == "icmp",
    }
}

fn ports_cover(ports: &[PortRange], port: u16) -> bool {
    ports.is_empty() || ports.iter().any(|r| r.lo <= port && port <= r.hi)
}

/// Whether `net` of `rule` lets `dest` (an address or a folded network) through.
pub fn covers(rule: &EgressRule, net: &IpNetwork, dest: &Dest) -> bool {
    net.prefix() <= dest.prefix
        && net.contains(dest.addr)
        && ports_cover(&rule.ports, dest.port)
        && protocol_matches(rule.protocol, &dest.protocol)
}

/// Whether `net` of `rule` reaches listener `l`. A wildcard listener
/// (`0.0.0.0`, `::`, dual-stack) is reachable at least on loopback, which
/// the rule must then cover.
fn listener_covered(rule: &EgressRule, net: &IpNetwork, l: &ListenKey) -> bool {
    let at = |addr: IpAddr| covers(rule, net, &Dest::host(addr, l.port, &l.protocol));
    if !l.addr.is_unspecified() {
        return at(l.addr);
    }
    at(Ipv4Addr::LOCALHOST.into()) || (l.addr.is_ipv6() && at(Ipv6Addr::LOCALHOST.into()))
}

fn rule_ref(s: &Service, r: &EgressRule) -> String {
    RuleRef {
        service: s.name.clone(),
        file: s.file.clone(),
        section: Section::Egress,
        index: r.index,
    }
    .to_string()
}

fn ports_text(ports: &[PortRange]) -> String {
    if ports.is_empty() || ports == [PortRange::ALL] {
        return "all".to_string();
    }
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each service's edges, in destination order: one pass over the graph.
type ByService<'a> = BTreeMap<&'a str, Vec<(&'a Dest, &'a EdgeStats)>>;

fn by_service(graph: &Graph) -> ByService<'_> {
    let mut out: ByService<'_> = BTreeMap::new();
    for ((s, d), e) in &graph.edges {
        if let Source::Service { name } = s {
            out.entry(name.as_str()).or_default().push((d, e));
        }
    }
    for edges in out.values_mut() {
        edges.sort_by(|a, b| a.0.cmp(b.0));
    }
    out
}

/// The edges of `name` seen at or after `since` (RFC 3339; None: all).
fn edges_of<'a>(
    index: &ByService<'a>,
    name: &str,
    since: Option<&str>,
) -> Vec<(&'a Dest, &'a EdgeStats)> {
    index
        .get(name)
        .into_iter()
        .flatten()
        .filter(|(_, e)| since.is_none_or(|t| super::time::at_or_after(&e.last_seen, t)))
        .copied()
        .collect()
}

/// Whether name pattern `pattern` of `service`'s `rule` lets the edge to
/// `dest` through: the service's lookup of a name it allows gave the
/// address; or the decisions say the rule did (its pattern matched a CNAME
/// on the way, not the name looked up) and it has no other pattern the
/// credit could be for.
fn name_covers(
    service: &Service,
    rule: &EgressRule,
    pattern: &str,
    dest: &Dest,
    e: &EdgeStats,
) -> bool {
    let by_name = e
        .dst_name
        .as_deref()
        .is_some_and(|n| named::allows(pattern, n));
    let by_rule = rule.names.len() == 1
        && e.dst_name.is_some()
        && e.name_rule.as_deref() == Some(&*rule_ref(service, rule));
    (by_name || by_rule)
        && ports_cover(&rule.ports, dest.port)
        && protocol_matches(rule.protocol, &dest.protocol)
}

/// The first rule of `service` that lets the edge through: the one its
/// named decisions name, else by the name looked up, else by address.
fn rule_of(service: &Service, dest: &Dest, e: &EdgeStats) -> Option<String> {
    let decided = e.name_rule.as_deref().and_then(|named| {
        service.egress.iter().find(|r| {
            // Positional: after a reload the same reference may be
            // another rule, which must still let the edge through.
            !r.names.is_empty()
                && rule_ref(service, r) == named
                && ports_cover(&r.ports, dest.port)
                && protocol_matches(r.protocol, &dest.protocol)
        })
    });
    decided
        .or_else(|| {
            service.egress.iter().find(|r| {
                r.names
                    .iter()
                    .any(|p| name_covers(service, r, &p.to_string(), dest, e))
            })
        })
        .or_else(|| {
            service
                .egress
                .iter()
                .find(|r| r.to.iter().any(|n| covers(r, n, dest)))
        })
        .map(|r| rule_ref(service, r))
}

fn allowance(
    service: &Service,
    rule: &EgressRule,
    to: String,
    services: Vec<String>,
    used: bool,
) -> Allowance {
    Allowance {
        rule: rule_ref(service, rule),
        to,
        ports: ports_text(&rule.ports),
        protocol: rule.protocol.to_string(),
        description: rule.description.clone(),
        services,
        used,
    }
}

/// The DNS name an edge is listed by (`NAME:PORT/PROTO`): the name the
/// service looked up, unless a local service listens there (then it is
/// that service, as in the graph).
fn name_of(graph: &Graph, dest: &Dest, e: &EdgeStats) -> Option<String> {
    let name = e.dst_name.as_deref()?;
    graph
        .service_at(dest)
        .is_none()
        .then(|| named::label(name, dest.port, &dest.protocol))
}

/// What the service reached, one line per service, name or address: the
/// addresses of one name (on one port and protocol) are summed under it.
fn reached(graph: &Graph, service: &Service, edges: &[(&Dest, &EdgeStats)]) -> Vec<Reached> {
    let mut out: Vec<Reached> = Vec::new();
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for (d, e) in edges {
        let rule = rule_of(service, d, e);
        let Some(label) = name_of(graph, d, e) else {
            out.push(Reached {
                to: graph
                    .service_at(d)
                    .map_or_else(|| d.label(), str::to_string),
                dest: d.label(),
                addresses: Vec::new(),
                connections: e.connections,
                denied: e.denied,
                first_seen: e.first_seen.clone(),
                last_seen: e.last_seen.clone(),
                rule,
            });
            continue;
        };
        let address = d.addr.to_string();
        if let Some(&i) = by_name.get(&label) {
            let r = &mut out[i];
            r.addresses.push(address);
            r.connections += e.connections;
            r.denied += e.denied;
            if !super::time::at_or_after(&e.first_seen, &r.first_seen) {
                r.first_seen.clone_from(&e.first_seen);
            }
            if super::time::at_or_after(&e.last_seen, &r.last_seen) {
                r.last_seen.clone_from(&e.last_seen);
            }
            if r.rule.is_none() {
                r.rule = rule;
            }
            continue;
        }
        by_name.insert(label.clone(), out.len());
        out.push(Reached {
            to: label.clone(),
            dest: label,
            addresses: vec![address],
            connections: e.connections,
            denied: e.denied,
            first_seen: e.first_seen.clone(),
            last_seen: e.last_seen.clone(),
            rule,
        });
    }
    out
}

/// The blast radius of `name`, or why there is none.
///
/// # Errors
/// No service of that name in the policy.
pub fn compute(
    graph: &Graph,
    policy: &PolicySet,
    name: &str,
    since: Option<&str>,
) -> Result<BlastRadius, String> {
    let service = policy
        .services
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("no service named {name:?} in the policy"))?;
    let listeners = graph.listeners_of();
    let index = by_service(graph);
    let edges = edges_of(&index, name, since);
    let mut allows = Vec::new();
    for rule in &service.egress {
        for net in &rule.to {
            let services: Vec<String> = listeners
                .iter()
                .filter(|(s, keys)| {
                    *s != name && keys.iter().any(|k| listener_covered(rule, net, k))
                })
                .map(|(s, _)| s.clone())
                .collect();
            let used = edges
                .iter()
                .any(|(d, e)| e.connections > 0 && covers(rule, net, d));
            allows.push(allowance(service, rule, net.to_string(), services, used));
        }
        for pattern in &rule.names {
            let pattern = pattern.to_string();
            let used = edges
                .iter()
                .any(|(d, e)| e.connections > 0 && name_covers(service, rule, &pattern, d, e));
            allows.push(allowance(service, rule, pattern, Vec::new(), used));
        }
    }
    let reached = reached(graph, service, &edges);
    let unused = allows.iter().filter(|a| !a.used).cloned().collect();
    Ok(BlastRadius {
        service: name.to_string(),
        mode: service.mode.to_string(),
        file: service.file.display().to_string(),
        since: since.map(str::to_string),
        allows,
        reached,
        unused,
        lateral: lateral(graph, &index, policy, &listeners, name),
    })
}

/// `ADDR:PORT` of a destination (the protocol left out, as in paths).
fn short(d: &Dest) -> String {
    let label = d.label();
    label
        .rsplit_once('/')
        .map_or(label.clone(), |(a, _)| a.to_string())
}

/// A destination of a lateral path, as its target and as shown in the
/// path: the name looked up when there is one, else the address.
fn target(d: &Dest, e: &EdgeStats) -> (String, String) {
    match e.dst_name.as_deref() {
        Some(n) => (
            named::label(n, d.port, &d.protocol),
            named::short(n, d.port),
        ),
        None => (d.label(), short(d)),
    }
}

/// Adds each (target, shown) reached `depth` hops along `path` as a
/// destination, unless already there (the fleet's blast radius too).
pub(crate) fn add_destinations(
    destinations: &mut BTreeMap<String, Hop>,
    targets: Vec<(String, String)>,
    path: &str,
    depth: usize,
) {
    for (target, shown) in targets {
        let hop = Hop {
            target: target.clone(),
            kind: "destination".to_string(),
            hops: depth + 1,
            path: format!("{path} → {shown}"),
        };
        destinations.entry(target).or_insert(hop);
    }
}

/// Breadth first from `start` over "the policy lets S connect to a socket
/// T listens on"; at every service reached, its own allowed destinations.
fn lateral(
    graph: &Graph,
    index: &ByService<'_>,
    policy: &PolicySet,
    listeners: &BTreeMap<String, BTreeSet<ListenKey>>,
    start: &str,
) -> Lateral {
    let mut seen: BTreeSet<String> = BTreeSet::from([start.to_string()]);
    let mut services = Vec::new();
    let mut destinations: BTreeMap<String, Hop> = BTreeMap::new();
    let mut queue = VecDeque::from([(start.to_string(), start.to_string(), 0usize)]);
    while let Some((name, path, depth)) = queue.pop_front() {
        let Some(service) = policy.services.iter().find(|s| s.name == name) else {
            continue;
        };
        let observed = edges_of(index, &name, None);
        for rule in &service.egress {
            for net in &rule.to {
                let mut via_service = false;
                for (target, keys) in listeners {
                    let Some(k) = keys.iter().find(|k| listener_covered(rule, net, k)) else {
                        continue;
                    };
                    if *target == name {
                        continue;
                    }
                    via_service = true;
                    if seen.insert(target.clone()) {
                        let hop_path = format!("{path} → {target}:{}", k.port);
                        services.push(Hop {
                            target: target.clone(),
                            kind: "service".to_string(),
                            hops: depth + 1,
                            path: hop_path.clone(),
                        });
                        queue.push_back((target.clone(), hop_path, depth + 1));
                    }
                }
                let mut targets: Vec<(String, String)> = observed
                    .iter()
                    .filter(|(d, _)| graph.service_at(d).is_none() && covers(rule, net, d))
                    .map(|(d, e)| target(d, e))
                    .collect();
                if targets.is_empty() && !via_service {
                    let whole = format!("{net}:{}/{}", ports_text(&rule.ports), rule.protocol);
                    targets.push((whole.clone(), whole));
                }
                add_destinations(&mut destinations, targets, &path, depth);
            }
            for pattern in &rule.names {
                let pattern = pattern.to_string();
                let mut targets: Vec<(String, String)> = observed
                    .iter()
                    .filter(|(d, e)| {
                        graph.service_at(d).is_none() && name_covers(service, rule, &pattern, d, e)
                    })
                    .map(|(d, e)| target(d, e))
                    .collect();
                if targets.is_empty() {
                    let whole = format!("{pattern}:{}/{}", ports_text(&rule.ports), rule.protocol);
                    targets.push((whole.clone(), whole));
                }
                add_destinations(&mut destinations, targets, &path, depth);
            }
        }
    }
    let size = services.len();
    let mut destinations: Vec<Hop> = destinations.into_values().collect();
    destinations.sort_by(|a, b| (a.hops, &a.target).cmp(&(b.hops, &b.target)));
    Lateral {
        services,
        destinations,
        size,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        events::Verdict,
        graph::tests::{accepted, connect, connect_named},
    };

    fn policy(files: &[(&str, &str)]) -> PolicySet {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        crate::policy::load_dir(dir.path()).expect("valid policy")
    }

    pub(crate) fn three_tier() -> (Graph, PolicySet) {
        let set = policy(&[
            (
                "a.toml",
                "cgroup = \"/a\"\nmode = \"enforce\"\n[[egress]]\nto = [\"127.0.0.1\"]\nports = [8080]\nprotocol = \"tcp\"\n[[egress]]\nto = [\"203.0.113.0/24\"]\nports = [443]\nprotocol = \"tcp\"\n",
            ),
            (
                "b.toml",
                "cgroup = \"/b\"\nmode = \"enforce\"\n[[egress]]\ndescription = \"database\"\nto = [\"192.0.2.2\"]\nports = [5432]\nprotocol = \"tcp\"\n",
            ),
        ]);
        let mut g = Graph::default();
        for _ in 0..3 {
            g.observe(&connect("a", ("127.0.0.1", 8080), Verdict::Allow));
        }
        g.observe(&connect("a", ("198.51.100.9", 22), Verdict::Deny));
        g.observe(&accepted("b", ("127.0.0.1", 8080)));
        g.observe(&connect("b", ("192.0.2.2", 5432), Verdict::Allow));
        (g, set)
    }

    #[test]
    fn two_hops_to_the_database_and_the_unused_allowance() {
        let (g, set) = three_tier();
        let b = compute(&g, &set, "a", None).expect("a is in the policy");
        assert_eq!(b.allows.len(), 2);
        assert_eq!(b.allows[0].services, vec!["b".to_string()]);
        let unused: Vec<&str> = b.unused.iter().map(|a| a.to.as_str()).collect();
        assert_eq!(unused, ["203.0.113.0/24"]);
        let to_b = b.reached.iter().find(|r| r.to == "b").expect("a reached b");
        assert_eq!(to_b.connections, 3);
        assert_eq!(to_b.rule.as_deref(), Some("a.toml#egress[0]"));
        let denied = b
            .reached
            .iter()
            .find(|r| r.denied == 1)
            .expect("the denied one");
        assert_eq!(denied.rule, None);
        assert_eq!(b.lateral.size, 1);
        assert_eq!(b.lateral.services[0].path, "a → b:8080");
        let db = b
            .lateral
            .destinations
            .iter()
            .find(|h| h.target == "192.0.2.2:5432/tcp")
            .expect("the database");
        assert_eq!(
            (db.hops, db.path.as_str()),
            (2, "a → b:8080 → 192.0.2.2:5432")
        );
    }

    #[test]
    fn a_wildcard_listener_is_reachable_on_loopback() {
        let (mut g, set) = three_tier();
        // b also listens on every address, port 9000 (found by the /proc scan).
        let wildcard = ListenKey {
            addr: "::".parse().expect("ip"),
            port: 9000,
            protocol: "tcp".to_string(),
        };
        g.add_scanned(
            vec![(wildcard.clone(), "b".to_string())],
            "2026-11-29T02:00:00Z",
        );
        let rule = &set.services[0].egress[0];
        let net: IpNetwork = "127.0.0.1/32".parse().expect("net");
        assert!(
            !listener_covered(rule, &net, &wildcard),
            "port 9000 is not in a's rule"
        );
        let any_port = EgressRule {
            ports: Vec::new(),
            ..rule.clone()
        };
        assert!(listener_covered(&any_port, &net, &wildcard));
        let v4_wildcard = ListenKey {
            addr: "0.0.0.0".parse().expect("ip"),
            ..wildcard
        };
        assert!(listener_covered(&any_port, &net, &v4_wildcard));
    }

    /// A destination reached by a name is listed by that name with its
    /// addresses, attributed to the name rule, and a name pattern is an
    /// allowance of its own.
    #[test]
    fn a_destination_reached_by_name_is_listed_by_its_name() {
        let set = policy(&[(
            "a.toml",
            "cgroup = \"/a\"\nmode = \"enforce\"\n[[egress]]\nto = [\"api.example.test\", \"*.unused.example.test\"]\nports = [443]\nprotocol = \"tcp\"\n[[egress]]\nto = [\"192.0.2.0/24\"]\nports = [80]\nprotocol = \"tcp\"\n",
        )]);
        let mut g = Graph::default();
        g.observe(&connect_named(
            "a",
            ("203.0.113.5", 443),
            "api.example.test",
        ));
        g.observe(&connect_named(
            "a",
            ("203.0.113.6", 443),
            "api.example.test",
        ));
        g.observe(&connect_named(
            "a",
            ("203.0.113.6", 443),
            "api.example.test",
        ));
        g.observe(&connect("a", ("192.0.2.7", 80), Verdict::Allow));
        let b = compute(&g, &set, "a", None).expect("a is in the policy");
        let named = b
            .reached
            .iter()
            .find(|r| r.to == "api.example.test:443/tcp")
            .expect("reached by name");
        assert_eq!(named.addresses, ["203.0.113.5", "203.0.113.6"]);
        assert_eq!(named.connections, 3);
        assert_eq!(named.rule.as_deref(), Some("a.toml#egress[0]"));
        assert!(b.reached.iter().any(|r| r.to == "192.0.2.7:80/tcp"));
        assert_eq!(b.reached.len(), 2, "{:?}", b.reached);
        let to: Vec<(&str, bool)> = b.allows.iter().map(|a| (a.to.as_str(), a.used)).collect();
        assert_eq!(
            to,
            [
                ("*.unused.example.test", false),
                ("api.example.test", true),
                ("192.0.2.0/24", true)
            ]
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
                "a → *.unused.example.test:443/tcp",
                "a → 192.0.2.7:80",
                "a → api.example.test:443"
            ]
        );
        let text = crate::graph::report::render(&b);
        assert!(
            text.contains("api.example.test:443/tcp (203.0.113.5, 203.0.113.6) 3 connections"),
            "{text}"
        );
    }

    /// Allowed through a CNAME: the service asked for www.example.test,
    /// whose answer led to edge.cdn.example.test, which the rule names.
    /// The name looked up matches no pattern; the decisions' `rule` says
    /// which rule let it through, so the destination is credited to it and
    /// its pattern counts as used.
    #[test]
    fn a_destination_allowed_through_a_cname_is_credited_to_the_rule_that_allowed_it() {
        let set = policy(&[(
            "a.toml",
            "cgroup = \"/a\"\nmode = \"enforce\"\n[[egress]]\nto = [\"*.cdn.example.test\"]\nports = [443]\nprotocol = \"tcp\"\n[[egress]]\nto = [\"192.0.2.0/24\"]\nports = [80]\nprotocol = \"tcp\"\n",
        )]);
        let mut g = Graph::default();
        g.observe(&crate::events::FlowEvent {
            rule: Some("a.toml#egress[0]".into()),
            ..connect_named("a", ("203.0.113.5", 443), "www.example.test")
        });
        let b = compute(&g, &set, "a", None).expect("a is in the policy");
        let named = b
            .reached
            .iter()
            .find(|r| r.to == "www.example.test:443/tcp")
            .unwrap_or_else(|| panic!("reached by name: {:?}", b.reached));
        assert_eq!(named.rule.as_deref(), Some("a.toml#egress[0]"));
        let to: Vec<(&str, bool)> = b.allows.iter().map(|a| (a.to.as_str(), a.used)).collect();
        assert_eq!(to, [("*.cdn.example.test", true), ("192.0.2.0/24", false)]);
    }

    #[test]
    fn unknown_service_is_an_error() {
        let (g, set) = three_tier();
        assert!(compute(&g, &set, "zz", None).is_err());
    }
}
