//! What the fleet's blast radius is computed from: the rows the agents
//! sent, as the fleet queries read them back (one struct per kind).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// One destination rule of a policy snapshot (`[[egress]]`), as the
/// agent serialises it into the `policies` table's `rules` column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// `api.toml#egress[0]`.
    pub rule: String,
    pub to: Vec<IpNetwork>,
    /// Name patterns (`api.example.com`, `*.example.com`; docs/dns-names.md).
    /// Left out when none, and absent from snapshots older than it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Inclusive ranges; empty means every port.
    pub ports: Vec<(u16, u16)>,
    /// `tcp`, `udp`, `icmp` or `any`.
    pub protocol: String,
    #[serde(default)]
    pub description: Option<String>,
}

impl Rule {
    pub fn port_allowed(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    pub fn protocol_allowed(&self, protocol: &str) -> bool {
        self.protocol == "any" || self.protocol == protocol
    }

    /// Whether name pattern `pattern` of this rule lets flow `f` through:
    /// the service's lookup of a name it allows gave the address; or the
    /// agent's decisions say this rule did (its pattern matched a CNAME
    /// on the way) and it has no other pattern the credit could be for.
    pub fn name_covers(&self, pattern: &str, f: &Flow) -> bool {
        let by_name = crate::graph::named::allows(pattern, &f.dst_name);
        let by_rule = self.names.len() == 1 && f.name_rule == self.rule;
        !f.dst_name.is_empty()
            && (by_name || by_rule)
            && self.port_allowed(f.remote_port)
            && self.protocol_allowed(&f.protocol)
    }

    /// `8080`, `8000-8100, 9000`, or `all`.
    pub fn ports_text(&self) -> String {
        if self.ports.is_empty() || self.ports == [(0, 65535)] {
            return "all".to_string();
        }
        self.ports
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One service on one host: its latest policy snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    pub host: String,
    pub mode: String,
    pub file: String,
    pub rules: Vec<Rule>,
}

impl Instance {
    /// `api@h2`.
    pub fn name(&self) -> String {
        format!("{}@{}", self.service, self.host)
    }
}

/// A socket a service listened on, with when it was seen (Unix seconds).
/// Wildcard listeners arrive expanded to the host's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub host: String,
    pub service: String,
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub first_seen: u64,
    pub last_seen: u64,
}

/// Outgoing calls of one service instance to one remote endpoint over a
/// stretch of time (Unix seconds), summed from flow summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub host: String,
    pub service: String,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub protocol: String,
    pub allowed: u64,
    /// Let through in audit mode (would have been denied).
    pub audited: u64,
    pub denied: u64,
    /// TCP payload bytes.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    /// The DNS name the service looked up that gave `remote_addr`, ""
    /// when none.
    pub dst_name: String,
    /// The rule of the latest allowed call with a name (the agent's
    /// decision: a name rule may have matched a CNAME on the way, not the
    /// name looked up); else of the latest call; "" when none.
    pub name_rule: String,
}

impl Flow {
    /// Calls let through (allowed or audited).
    pub fn calls(&self) -> u64 {
        self.allowed + self.audited
    }

    /// `ADDR:PORT/PROTO` (IPv6 in brackets).
    pub fn dest(&self) -> String {
        format!("{}/{}", self.endpoint(), self.protocol)
    }

    /// `NAME:PORT/PROTO` when the address came from the service's lookup
    /// of a name (docs/graph.md), else None.
    pub fn name_label(&self) -> Option<String> {
        (!self.dst_name.is_empty())
            .then(|| crate::graph::named::label(&self.dst_name, self.remote_port, &self.protocol))
    }

    /// The address alone, as a name's address list shows it.
    pub fn address(&self) -> String {
        self.remote_addr.to_string()
    }

    /// `ADDR:PORT`.
    pub fn endpoint(&self) -> String {
        match self.remote_addr {
            IpAddr::V4(a) => format!("{a}:{}", self.remote_port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.remote_port),
        }
    }
}
