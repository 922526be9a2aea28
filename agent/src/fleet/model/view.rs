//! The fleet's service graph in the host graph's exported form
//! (`bulkhead.graph.v1`), so that `--format dot|mermaid` and the map page
//! work on it unchanged: a node per service instance (`service:api@h2`),
//! an edge per instance and destination, drawn to the instance that
//! listened there at the time, else under the DNS name the service looked
//! up (`name:NAME:PORT/PROTO`), else to the address.

use std::collections::BTreeMap;

use super::Fleet;
use crate::fleet::time::rfc3339;
use crate::graph::{
    view::{Edge, Node, View, SCHEMA},
    EdgeStats,
};

impl Fleet {
    /// Every instance (even one that has not talked yet), every
    /// destination reached, and every edge.
    pub fn view(&self) -> View {
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        for s in &self.instances {
            let id = format!("service:{}", s.name());
            nodes.insert(
                id.clone(),
                Node {
                    id,
                    kind: "service".to_string(),
                    label: s.name(),
                    mode: Some(s.mode.clone()),
                },
            );
        }
        let mut edges: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
        let mut order: Vec<&usize> = self.flows.keys().collect();
        order.sort_unstable();
        for &i in order {
            let s = &self.instances[i];
            let from = format!("service:{}", s.name());
            for f in self.flows_of(i) {
                // A listener first, then the name looked up (every address
                // of a name under one node, as in the host graph).
                let (to, label, kind) = match (self.owner_of(s, f), f.name_label()) {
                    (Some(l), _) => {
                        let name = Self::owner_name(l);
                        (format!("service:{name}"), name, "service")
                    }
                    (None, Some(label)) => (format!("name:{label}"), label, "name"),
                    (None, None) => (format!("endpoint:{}", f.dest()), f.dest(), "endpoint"),
                };
                nodes.entry(to.clone()).or_insert_with(|| Node {
                    id: to.clone(),
                    kind: kind.to_string(),
                    label,
                    // A listener's service without a policy snapshot.
                    mode: None,
                });
                let dest = f.dest();
                let e = edges
                    .entry((from.clone(), to.clone(), dest.clone()))
                    .or_insert_with(|| Edge {
                        from: from.clone(),
                        to,
                        dest,
                        port: f.remote_port,
                        protocol: f.protocol.clone(),
                        stats: EdgeStats {
                            first_seen: rfc3339(f.first_seen),
                            last_seen: rfc3339(f.last_seen),
                            addresses: 1,
                            ..EdgeStats::default()
                        },
                    });
                let st = &mut e.stats;
                if !f.dst_name.is_empty() {
                    st.dst_name = Some(f.dst_name.clone());
                }
                st.connections += f.calls();
                st.allowed += f.allowed;
                st.audited += f.audited;
                st.denied += f.denied;
                st.bytes_sent += f.bytes_sent;
                st.bytes_received += f.bytes_received;
                let (first, last) = (rfc3339(f.first_seen), rfc3339(f.last_seen));
                if first < st.first_seen {
                    st.first_seen = first;
                }
                if last > st.last_seen {
                    st.last_seen = last;
                }
            }
        }
        View {
            schema: SCHEMA.to_string(),
            nodes: nodes.into_values().collect(),
            edges: edges.into_values().collect(),
            evictions: 0,
        }
    }
}
