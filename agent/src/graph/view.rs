//! The graph as exported (`bulkhead graph`, `/graph.json`): nodes and
//! edges, with destinations that are a managed service's listener drawn as
//! that service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::{Dest, EdgeStats, Graph, Source};
use crate::policy::PolicySet;

pub const SCHEMA: &str = "bulkhead.graph.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `service:NAME`, `process:CGROUP_ID`, `endpoint:ADDR:PORT/PROTO`,
    /// `name:DNS-NAME:PORT/PROTO`, `peer:ADDR`.
    pub id: String,
    /// `service`, `process`, `endpoint`, `name` (the addresses a service's
    /// own lookups of one DNS name gave, on one port: docs/dns-names.md)
    /// or `remote` (a peer that connected in).
    pub kind: String,
    pub label: String,
    /// For services: enforce or audit (null when not in the policy).
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// The destination as the kernel saw it (`127.0.0.1:8080/tcp`).
    pub dest: String,
    pub port: u16,
    pub protocol: String,
    #[serde(flatten)]
    pub stats: EdgeStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub schema: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Edges and listeners evicted to keep memory bounded (since start).
    pub evictions: u64,
}

/// The node id a destination is drawn as: the local service listening
/// there, else the DNS name the source looked up that gave it (`name`:
/// every address of that name on that port and protocol under one node),
/// else the address.
pub fn dest_node(
    graph: &Graph,
    dest: &Dest,
    dst_name: Option<&str>,
) -> (String, String, &'static str) {
    match (graph.service_at(dest), dst_name) {
        (Some(service), _) => (format!("service:{service}"), service.to_string(), "service"),
        (None, Some(name)) => {
            let label = super::named::label(name, dest.port, &dest.protocol);
            (format!("name:{label}"), label, "name")
        }
        (None, None) => (
            format!("endpoint:{}", dest.label()),
            dest.label(),
            "endpoint",
        ),
    }
}

/// Every service of the policy (even one that has not talked yet), every
/// source and destination seen, and every edge.
pub fn build(graph: &Graph, policy: &PolicySet) -> View {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mode_of = |name: &str| {
        policy
            .services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.mode.to_string())
    };
    let service = |nodes: &mut BTreeMap<String, Node>, name: &str| {
        let id = format!("service:{name}");
        nodes.entry(id.clone()).or_insert_with(|| Node {
            id,
            kind: "service".to_string(),
            label: name.to_string(),
            mode: mode_of(name),
        });
    };
    for s in &policy.services {
        service(&mut nodes, &s.name);
    }
    let mut edges = Vec::with_capacity(graph.edges.len());
    let mut sorted: Vec<(&(Source, Dest), &EdgeStats)> = graph.edges.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for ((source, dest), stats) in sorted {
        let from = source.id();
        match source {
            Source::Service { name } => service(&mut nodes, name),
            Source::Remote { addr } => {
                nodes.entry(from.clone()).or_insert_with(|| Node {
                    id: from.clone(),
                    kind: "remote".to_string(),
                    label: addr.to_string(),
                    mode: None,
                });
            }
            Source::Process { cgroup_id } => {
                nodes.entry(from.clone()).or_insert_with(|| Node {
                    id: from.clone(),
                    kind: "process".to_string(),
                    label: format!("cgroup {cgroup_id} ({})", stats.comm),
                    mode: None,
                });
            }
        }
        let (to, label, kind) = dest_node(graph, dest, stats.dst_name.as_deref());
        if kind == "service" {
            service(&mut nodes, &label);
        } else {
            nodes.entry(to.clone()).or_insert_with(|| Node {
                id: to.clone(),
                kind: kind.to_string(),
                label,
                mode: None,
            });
        }
        edges.push(Edge {
            from,
            to,
            dest: dest.label(),
            port: dest.port,
            protocol: dest.protocol.clone(),
            stats: stats.clone(),
        });
    }
    View {
        schema: SCHEMA.to_string(),
        nodes: nodes.into_values().collect(),
        edges,
        evictions: graph.evictions,
    }
}
