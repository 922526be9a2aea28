//! The blast radius of a service across the fleet: what its policies allow
//! (resolved to the services listening there, on any host), what it
//! actually reached, the allowances it never used, and the lateral paths
//! from host to host (`web@h1 → api@h2:8080 → db@h3:5432`).

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{covers, Fleet, Flow, Instance, Rule};
use crate::graph::blast::{add_destinations, Hop, Lateral};

/// One destination network, or one name pattern, of one rule of one
/// instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// `web@h1`.
    pub instance: String,
    /// `web.toml#egress[0]`.
    pub rule: String,
    /// A network, or a name pattern (`api.example.com`, `*.example.com`).
    pub to: String,
    pub ports: String,
    pub protocol: String,
    pub description: Option<String>,
    /// Service instances listening inside it now (`api@h2`).
    pub services: Vec<String>,
    /// Whether an allowed call went through it (audited and denied calls
    /// did not: no rule let them).
    pub used: bool,
}

/// What one instance reached at one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    pub from: String,
    /// The instance listening there at the time (`api@h2`), else the DNS
    /// name the service looked up (`NAME:PORT/PROTO`), else the
    /// destination itself.
    pub to: String,
    /// `ADDR:PORT/PROTO`; for a name, the name again, its addresses in
    /// `addresses`.
    pub dest: String,
    /// The addresses reached by the name (empty for other destinations).
    #[serde(default)]
    pub addresses: Vec<String>,
    pub calls: u64,
    pub denied: u64,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The rule it went through (None: none covers it).
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetBlastRadius {
    /// As asked: `web` (every instance) or `web@h1`.
    pub service: String,
    pub instances: Vec<String>,
    pub allows: Vec<Allowance>,
    pub reached: Vec<Reached>,
    pub unused: Vec<Allowance>,
    pub lateral: Lateral,
}

impl Fleet {
    /// The blast radius of `asked` (`web` or `web@h1`).
    ///
    /// # Errors
    /// No instance of that service in the fleet's policy snapshots.
    pub fn blast_radius(&self, asked: &str) -> Result<FleetBlastRadius, String> {
        let start = self.select(asked);
        if start.is_empty() {
            return Err(format!(
                "no instance of {asked:?} in the fleet (no policy snapshot names it)"
            ));
        }
        let mut allows = Vec::new();
        let mut reached = Vec::new();
        for &i in &start {
            allows.extend(self.allowances(i));
            reached.extend(self.reached(i));
        }
        let unused = allows.iter().filter(|a| !a.used).cloned().collect();
        Ok(FleetBlastRadius {
            service: asked.to_string(),
            instances: start.iter().map(|&i| self.instances[i].name()).collect(),
            allows,
            reached,
            unused,
            lateral: self.lateral(&start),
        })
    }

    fn allowances(&self, i: usize) -> Vec<Allowance> {
        let s = &self.instances[i];
        let flows = self.flows_of(i);
        let mut out = Vec::new();
        for rule in &s.rules {
            for net in &rule.to {
                let mut services: Vec<String> = self
                    .reachable(s, rule, net)
                    .map(Self::owner_name)
                    .filter(|n| *n != s.name())
                    .collect();
                services.sort();
                services.dedup();
                let used = flows.iter().any(|f| f.allowed > 0 && covers(rule, net, f));
                out.push(allowance(s, rule, net.to_string(), services, used));
            }
            for pattern in &rule.names {
                let used = flows
                    .iter()
                    .any(|f| f.allowed > 0 && rule.name_covers(pattern, f));
                out.push(allowance(s, rule, pattern.clone(), Vec::new(), used));
            }
        }
        out
    }

    fn reached(&self, i: usize) -> Vec<Reached> {
        let s = &self.instances[i];
        let mut out: BTreeMap<(String, String), Reached> = BTreeMap::new();
        for f in self.flows_of(i) {
            // A listener first, then the name looked up, as the host graph.
            let owner = self.owner_of(s, f);
            let name = f.name_label().filter(|_| owner.is_none());
            let to = owner.map_or_else(
                || name.clone().unwrap_or_else(|| f.dest()),
                Self::owner_name,
            );
            let dest = name.clone().unwrap_or_else(|| f.dest());
            let r = out
                .entry((to.clone(), dest.clone()))
                .or_insert_with(|| Reached {
                    from: s.name(),
                    to,
                    dest,
                    addresses: Vec::new(),
                    calls: 0,
                    denied: 0,
                    first_seen: f.first_seen,
                    last_seen: f.last_seen,
                    rule: None,
                });
            if name.is_some() && !r.addresses.contains(&f.address()) {
                r.addresses.push(f.address());
            }
            if r.rule.is_none() {
                r.rule = rule_of(s, f);
            }
            r.calls += f.calls();
            r.denied += f.denied;
            r.first_seen = r.first_seen.min(f.first_seen);
            r.last_seen = r.last_seen.max(f.last_seen);
        }
        // The store returns flows in no set order: list addresses by value.
        let mut reached: Vec<Reached> = out.into_values().collect();
        for r in &mut reached {
            r.addresses
                .sort_by_key(|a| (a.parse::<std::net::IpAddr>().ok(), a.clone()));
        }
        reached
    }

    /// Breadth first from the start instances over "the policy lets S
    /// connect to a socket T listens on" (any host); at every instance
    /// reached, its own allowed destinations that no service listens on.
    fn lateral(&self, start: &[usize]) -> Lateral {
        let mut seen: HashSet<String> = start.iter().map(|&i| self.instances[i].name()).collect();
        let mut services = Vec::new();
        let mut destinations: BTreeMap<String, Hop> = BTreeMap::new();
        let mut queue: VecDeque<(usize, String, usize)> = start
            .iter()
            .map(|&i| (i, self.instances[i].name(), 0))
            .collect();
        while let Some((i, path, depth)) = queue.pop_front() {
            let s = &self.instances[i];
            for rule in &s.rules {
                for net in &rule.to {
                    let mut via_service = false;
                    for l in self.reachable(s, rule, net) {
                        let target = Self::owner_name(l);
                        if target == s.name() {
                            continue;
                        }
                        via_service = true;
                        if seen.insert(target.clone()) {
                            let hop_path = format!("{path} → {target}:{}", l.port);
                            services.push(Hop {
                                target: target.clone(),
                                kind: "service".to_string(),
                                hops: depth + 1,
                                path: hop_path.clone(),
                            });
                            // One without a policy snapshot is reached, but
                            // its own reach is unknown: the walk stops there.
                            if let Some(&next) =
                                self.by_name.get(&(l.service.clone(), l.host.clone()))
                            {
                                queue.push_back((next, hop_path, depth + 1));
                            }
                        }
                    }
                    let mut targets: Vec<(String, String)> = self
                        .flows_of(i)
                        .iter()
                        .filter(|f| covers(rule, net, f) && self.owner_of(s, f).is_none())
                        .map(target)
                        .collect();
                    if targets.is_empty() && !via_service {
                        let whole = format!("{net}:{}/{}", rule.ports_text(), rule.protocol);
                        targets.push((whole.clone(), whole));
                    }
                    add_destinations(&mut destinations, targets, &path, depth);
                }
                for pattern in &rule.names {
                    let mut targets: Vec<(String, String)> = self
                        .flows_of(i)
                        .iter()
                        .filter(|f| rule.name_covers(pattern, f) && self.owner_of(s, f).is_none())
                        .map(target)
                        .collect();
                    if targets.is_empty() {
                        let whole = format!("{pattern}:{}/{}", rule.ports_text(), rule.protocol);
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
}

fn allowance(
    s: &Instance,
    rule: &Rule,
    to: String,
    services: Vec<String>,
    used: bool,
) -> Allowance {
    Allowance {
        instance: s.name(),
        rule: rule.rule.clone(),
        to,
        ports: rule.ports_text(),
        protocol: rule.protocol.clone(),
        description: rule.description.clone(),
        services,
        used,
    }
}

/// The first rule of `s` that lets `f` through: by the name looked up,
/// else by address. (A name a rule allowed through a CNAME on the way is
/// not in the rows: such a flow is attributed by address.)
fn rule_of(s: &Instance, f: &Flow) -> Option<String> {
    let decided = s.rules.iter().find(|r| {
        // Positional: after a reload the same reference may be another
        // rule, which must still let the flow through.
        !f.dst_name.is_empty()
            && !r.names.is_empty()
            && r.rule == f.name_rule
            && r.port_allowed(f.remote_port)
            && r.protocol_allowed(&f.protocol)
    });
    decided
        .or_else(|| {
            s.rules
                .iter()
                .find(|r| r.names.iter().any(|p| r.name_covers(p, f)))
        })
        .or_else(|| {
            s.rules
                .iter()
                .find(|r| r.to.iter().any(|n| covers(r, n, f)))
        })
        .map(|r| r.rule.clone())
}

/// A destination of a lateral path, as its target and as shown in the
/// path: the name looked up when there is one, else the address.
fn target(f: &Flow) -> (String, String) {
    match f.name_label() {
        Some(label) => (
            label,
            crate::graph::named::short(&f.dst_name, f.remote_port),
        ),
        None => (f.dest(), f.endpoint()),
    }
}
