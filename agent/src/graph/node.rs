//! The graph's keys and values: sources, destinations, what an edge
//! counts, listeners.

use std::{collections::BTreeMap, net::IpAddr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Who opened a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A managed service, by name.
    Service { name: String },
    /// A process outside every managed service, by cgroup id.
    Process { cgroup_id: u64 },
    /// A remote peer that connected to (or was refused by) a managed
    /// service: inbound traffic.
    Remote { addr: IpAddr },
}

impl Source {
    /// The node id used in exports: `service:NAME`, `process:CGROUP_ID`.
    pub fn id(&self) -> String {
        match self {
            Source::Service { name } => format!("service:{name}"),
            Source::Process { cgroup_id } => format!("process:{cgroup_id}"),
            Source::Remote { addr } => format!("peer:{addr}"),
        }
    }
}

/// Where a connection went: one address (a /32 or /128) or a folded network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dest {
    pub addr: IpAddr,
    pub prefix: u8,
    pub port: u16,
    /// `tcp`, `udp`, or the IP protocol number.
    pub protocol: String,
}

impl Dest {
    pub fn host(addr: IpAddr, port: u16, protocol: &str) -> Self {
        let addr = addr.to_canonical();
        Self {
            prefix: if addr.is_ipv4() { 32 } else { 128 },
            addr,
            port,
            protocol: protocol.to_string(),
        }
    }

    pub fn is_host(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn network(&self) -> IpNetwork {
        IpNetwork::new(self.addr, self.prefix).unwrap_or_else(|_| IpNetwork::from(self.addr))
    }

    /// `192.0.2.7:5432/tcp`, `[2001:db8::1]:53/udp`, `198.51.100.0/24:443/tcp`.
    pub fn label(&self) -> String {
        let addr = match (self.is_host(), self.addr) {
            (true, IpAddr::V4(a)) => a.to_string(),
            (true, IpAddr::V6(a)) => format!("[{a}]"),
            (false, _) => self.network().to_string(),
        };
        format!("{addr}:{}/{}", self.port, self.protocol)
    }

    /// The /24 or /64 this address folds into.
    pub(super) fn group(&self) -> Option<Dest> {
        let prefix = if self.addr.is_ipv4() { 24 } else { 64 };
        let net = IpNetwork::new(self.addr, prefix).ok()?;
        Some(Dest {
            addr: net.network(),
            prefix,
            port: self.port,
            protocol: self.protocol.clone(),
        })
    }
}

/// What was seen on one edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeStats {
    /// Attempts that went through (allowed, or audited in audit mode).
    pub connections: u64,
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// TCP connections that reached ESTABLISHED.
    pub established: u64,
    /// Payload bytes of closed TCP connections.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// RFC 3339, UTC.
    pub first_seen: String,
    pub last_seen: String,
    /// The process name last seen on this edge.
    pub comm: String,
    /// Addresses folded into this edge (1 for a single address).
    pub addresses: u64,
    /// The DNS name the service looked up that gave this address (the
    /// latest seen, from its decisions' `dst_name`); null when no lookup
    /// of its own did. An edge with a name is never folded into a network.
    pub dst_name: Option<String>,
    /// The rule that let the latest named call through (its event's
    /// `rule`): the kernel knows which name rule an address was learnt
    /// by, CNAME chains included, which the name looked up alone does not
    /// say.
    pub name_rule: Option<String>,
    /// Calls that went through (allowed or audited) per executable that
    /// made them (the real path decisions name
    /// in `exe`; [`UNKNOWN_EXE`] when the kernel had no record): at most
    /// [`MAX_EXECUTABLES`] paths, later ones counted under [`OTHER_EXE`].
    pub executables: BTreeMap<String, u64>,
    /// Recency order, for eviction (larger: seen later).
    pub seq: u64,
}

/// Executables an edge names at most: the graph's answer on the control
/// socket stays far below its size limit with every edge full (20,000
/// edges of three 256-byte paths).
pub const MAX_EXECUTABLES: usize = 3;
/// Longest path kept per executable, in bytes (the kernel keeps exec names
/// of 256 bytes; `/proc/PID/exe` may be longer).
const MAX_EXE_LEN: usize = 256;
/// The calls of executables past [`MAX_EXECUTABLES`].
pub const OTHER_EXE: &str = "(other)";
/// The calls of processes whose executable the kernel had no record of.
pub const UNKNOWN_EXE: &str = "(unknown)";

impl EdgeStats {
    /// Counts `calls` made by `exe` (None: unknown).
    pub(super) fn add_executable(&mut self, exe: Option<&str>, calls: u64) {
        let mut key = exe.unwrap_or(UNKNOWN_EXE);
        if key.len() > MAX_EXE_LEN {
            let mut end = MAX_EXE_LEN;
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            key = &key[..end];
        }
        if let Some(n) = self.executables.get_mut(key) {
            *n += calls;
            return;
        }
        let known = self.executables.len() - usize::from(self.executables.contains_key(OTHER_EXE));
        let key = if known < MAX_EXECUTABLES {
            key
        } else {
            OTHER_EXE
        };
        *self.executables.entry(key.to_owned()).or_insert(0) += calls;
    }

    pub(super) fn merge(&mut self, other: &EdgeStats) {
        for (exe, &calls) in &other.executables {
            self.add_executable(Some(exe), calls);
        }
        self.connections += other.connections;
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.audited += other.audited;
        self.established += other.established;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.addresses += other.addresses;
        if self.first_seen.is_empty() || other.first_seen < self.first_seen {
            self.first_seen.clone_from(&other.first_seen);
        }
        if other.seq >= self.seq {
            self.last_seen.clone_from(&other.last_seen);
            self.comm.clone_from(&other.comm);
            self.seq = other.seq;
            if other.dst_name.is_some() {
                self.dst_name.clone_from(&other.dst_name);
            }
        } else if self.dst_name.is_none() {
            self.dst_name.clone_from(&other.dst_name);
        }
    }
}

/// A listening socket of a managed service, learned from the connections it
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ListenKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub service: String,
    pub last_seen: String,
    pub seq: u64,
}
