//! The service graph as the daemon keeps it: who talked to what, fed one
//! event at a time, bounded in memory.
//!
//! Edges go from a *source* (a managed service by name, or an unmanaged
//! process by cgroup id) to a *destination* as the kernel saw it (address or
//! folded network, port, protocol). Which destinations are local services is
//! decided later, at view time ([`super::view`]), from the listeners seen
//! here: a connection is judged before the peer accepts it, so the listener
//! may be learned after the edge.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

pub use super::node::{
    Dest, EdgeStats, ListenKey, ListenerInfo, Source, MAX_EXECUTABLES, OTHER_EXE, UNKNOWN_EXE,
};
use crate::events::{Direction, EventType, FlowEvent, Verdict};

/// Edges kept at most; past this the least recently seen are evicted.
pub const MAX_EDGES: usize = 20_000;
/// Listening sockets of managed services kept at most.
pub const MAX_LISTENERS: usize = 4_096;
/// A source that reaches this many addresses of one /24 (IPv4) or /64
/// (IPv6) on one port and protocol gets them folded into one network.
pub const GROUP_AT: usize = 8;

/// The aggregated graph. Cheap to clone only when small: views take the
/// lock briefly and copy what they need.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub edges: HashMap<(Source, Dest), EdgeStats, Hasher>,
    pub listeners: BTreeMap<ListenKey, ListenerInfo>,
    /// Edges and listeners dropped to stay within the caps (since start).
    pub evictions: u64,
    seq: u64,
    /// Addresses of this host that peers reached services at.
    local: std::collections::HashSet<IpAddr>,
    /// How many single-address edges each (source, /24 or /64 group) has,
    /// so that folding costs a scan only when a group is due.
    group_sizes: HashMap<(Source, Dest), usize, Hasher>,
}

/// The edge takes the name its latest decision carries, if any.
fn name(stats: &mut EdgeStats, ev: &FlowEvent) {
    if let Some(n) = &ev.dst_name {
        if stats.dst_name.as_deref() != Some(&**n) {
            stats.dst_name = Some(n.to_string());
        }
        if let (Some(r), Some(Verdict::Allow)) = (&ev.rule, ev.verdict) {
            if stats.name_rule.as_deref() != Some(&**r) {
                stats.name_rule = Some(r.to_string());
            }
        }
    }
}

/// A fast hasher for the per-event lookups (keys come from the kernel's
/// records of this host's own traffic, seeded per process).
pub type Hasher = foldhash::fast::RandomState;

impl Graph {
    /// Folds one event in. Events that say nothing about who talks to whom
    /// (policy changes, bind and socket refusals, inbound drops) are ignored.
    pub fn observe(&mut self, ev: &FlowEvent) {
        let (Some(protocol), Some(direction)) = (&ev.protocol, ev.traffic_direction) else {
            return;
        };
        let calls = ev.calls.unwrap_or(1);
        match (ev.kind, direction) {
            (EventType::TcpEstablished, Direction::Ingress) => {
                self.listener(ev, protocol);
                self.inbound(ev, protocol, |s| {
                    s.connections += 1;
                    s.established += 1;
                });
            }
            (EventType::TcpClosed | EventType::Flow, Direction::Ingress)
                if ev.hook == "sock_ops" =>
            {
                let Some((sent, received)) = ev.new_bytes() else {
                    return;
                };
                if ev.kind == EventType::TcpClosed {
                    self.listener(ev, protocol);
                }
                // The edge goes from the peer: what it sent, the service received.
                self.inbound(ev, protocol, |s| {
                    s.bytes_sent += received;
                    s.bytes_received += sent;
                });
            }
            (EventType::Verdict, Direction::Ingress) if ev.hook == "ingress" => {
                self.inbound(ev, protocol, |s| match ev.verdict {
                    Some(Verdict::Allow) => s.allowed += calls,
                    Some(Verdict::Deny) => s.denied += calls,
                    Some(Verdict::Audit) => s.audited += calls,
                    None => {}
                });
            }
            // A flow's first call (a verdict) and its later ones (flow
            // summaries): an edge counts calls, not records.
            (EventType::Verdict | EventType::Flow, Direction::Egress)
                if matches!(&*ev.hook, "connect" | "sendmsg") =>
            {
                self.edge(ev, protocol, |s| {
                    match ev.verdict {
                        Some(Verdict::Allow) => s.allowed += calls,
                        Some(Verdict::Deny) => s.denied += calls,
                        Some(Verdict::Audit) => s.audited += calls,
                        None => return,
                    }
                    if ev.verdict != Some(Verdict::Deny) {
                        s.connections += calls;
                        s.add_executable(ev.exe.as_deref(), calls);
                    }
                });
            }
            (EventType::TcpEstablished, Direction::Egress) => {
                self.edge(ev, protocol, |s| s.established += 1);
            }
            (EventType::TcpClosed | EventType::Flow, Direction::Egress)
                if ev.hook == "sock_ops" =>
            {
                let Some((sent, received)) = ev.new_bytes() else {
                    return;
                };
                self.edge(ev, protocol, |s| {
                    s.bytes_sent += sent;
                    s.bytes_received += received;
                });
            }
            _ => {}
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn listener(&mut self, ev: &FlowEvent, protocol: &str) {
        let (Some(service), Some(addr), Some(port)) = (&ev.service, ev.src_ip, ev.src_port) else {
            return;
        };
        let seq = self.next_seq();
        if self.local.len() < MAX_LISTENERS {
            self.local.insert(addr.to_canonical());
        }
        let key = ListenKey {
            addr: addr.to_canonical(),
            port,
            protocol: protocol.to_string(),
        };
        self.listeners.insert(
            key,
            ListenerInfo {
                service: service.to_string(),
                last_seen: ev.time.clone(),
                seq,
            },
        );
        if self.listeners.len() > MAX_LISTENERS {
            if let Some(oldest) = self
                .listeners
                .iter()
                .min_by_key(|(_, l)| l.seq)
                .map(|(k, _)| k.clone())
            {
                self.listeners.remove(&oldest);
                self.evictions += 1;
            }
        }
    }

    /// An edge from a remote peer to the service's local address and port.
    /// Peers on this host (loopback, or an address a local service was
    /// reached at) are left out: their own outbound side is recorded.
    fn inbound(&mut self, ev: &FlowEvent, protocol: &str, update: impl FnOnce(&mut EdgeStats)) {
        let (Some(_), Some(peer), Some(local), Some(port)) =
            (&ev.service, ev.dst_ip, ev.src_ip, ev.src_port)
        else {
            return;
        };
        let peer = peer.to_canonical();
        if peer.is_loopback() || peer.is_unspecified() || self.local.contains(&peer) {
            return;
        }
        let dest = Dest::host(local, port, protocol);
        self.record(Source::Remote { addr: peer }, dest, ev, update);
    }

    fn edge(&mut self, ev: &FlowEvent, protocol: &str, update: impl FnOnce(&mut EdgeStats)) {
        let (Some(ip), Some(port)) = (ev.dst_ip, ev.dst_port) else {
            return;
        };
        let source = match &ev.service {
            Some(name) => Source::Service {
                name: name.to_string(),
            },
            None => Source::Process {
                cgroup_id: ev.cgroup_id,
            },
        };
        self.record(source, Dest::host(ip, port, protocol), ev, update);
    }

    fn record(
        &mut self,
        source: Source,
        host: Dest,
        ev: &FlowEvent,
        update: impl FnOnce(&mut EdgeStats),
    ) {
        // Hot path: an edge seen before (one lookup). A host edge and its
        // folded network never coexist, except for a host edge with a name
        // (never folded): it is found here first.
        let key = (source, host);
        if let Some(stats) = self.edges.get_mut(&key) {
            self.seq += 1;
            update(stats);
            stats.last_seen.clone_from(&ev.time);
            stats.comm.clone_from(&ev.comm);
            stats.seq = self.seq;
            name(stats, ev);
            return;
        }
        let (source, host) = key;
        // An address a lookup named stays an edge of its own, under its
        // name; any other already folded into a network goes to that one.
        let named = ev.dst_name.is_some();
        let dest = match host.group() {
            Some(g) if !named && self.edges.contains_key(&(source.clone(), g.clone())) => g,
            _ => host,
        };
        let seq = self.next_seq();
        let key = (source, dest);
        let is_new = !self.edges.contains_key(&key);
        let stats = self.edges.entry(key.clone()).or_insert_with(|| EdgeStats {
            first_seen: ev.time.clone(),
            addresses: 1,
            ..EdgeStats::default()
        });
        update(stats);
        stats.last_seen.clone_from(&ev.time);
        stats.comm.clone_from(&ev.comm);
        stats.seq = seq;
        name(stats, ev);
        if is_new && key.1.is_host() && !named {
            self.maybe_fold(&key.0, &key.1);
        }
        if self.edges.len() > MAX_EDGES {
            self.evict();
        }
    }

    /// Folds the source's addresses in `dest`'s /24 or /64 (same port and
    /// protocol) into one network edge once there are [`GROUP_AT`] of them.
    /// Loopback addresses are never folded: they are where local services
    /// listen.
    fn maybe_fold(&mut self, source: &Source, dest: &Dest) {
        if dest.addr.is_loopback() {
            return;
        }
        let Some(group) = dest.group() else { return };
        let size = self
            .group_sizes
            .entry((source.clone(), group.clone()))
            .or_insert(0);
        *size += 1;
        if *size < GROUP_AT {
            return;
        }
        self.group_sizes.remove(&(source.clone(), group.clone()));
        let net = group.network();
        let members: Vec<Dest> = self
            .edges
            .iter()
            .filter(|((s, d), stats)| {
                stats.dst_name.is_none()
                    && s == source
                    && d.is_host()
                    && d.port == dest.port
                    && d.protocol == dest.protocol
                    && net.contains(d.addr)
            })
            .map(|((_, d), _)| d.clone())
            .collect();
        let mut folded = EdgeStats::default();
        for d in members {
            if let Some(s) = self.edges.remove(&(source.clone(), d)) {
                folded.merge(&s);
            }
        }
        self.edges.insert((source.clone(), group), folded);
    }

    /// Drops the least recently seen sixteenth of the edges (at least one),
    /// so that a flood of new destinations costs one sort per many events.
    fn evict(&mut self) {
        let excess = self.edges.len().saturating_sub(MAX_EDGES);
        let n = excess.max(MAX_EDGES / 16).min(self.edges.len());
        let mut by_age: Vec<(u64, (Source, Dest))> =
            self.edges.iter().map(|(k, s)| (s.seq, k.clone())).collect();
        by_age.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, key) in by_age.into_iter().take(n) {
            let named = self
                .edges
                .remove(&key)
                .is_some_and(|s| s.dst_name.is_some());
            self.evictions += 1;
            if !named {
                self.forget_member(&key.0, &key.1);
            }
        }
    }

    /// A single-address edge is gone: its group has one member less.
    fn forget_member(&mut self, source: &Source, dest: &Dest) {
        if !dest.is_host() {
            return;
        }
        let Some(group) = dest.group() else { return };
        let key = (source.clone(), group);
        if let Some(n) = self.group_sizes.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.group_sizes.remove(&key);
            }
        }
    }

    /// Records listeners found by scanning `/proc` (see `listeners.rs`);
    /// ones already known from events keep their time.
    pub fn add_scanned(&mut self, found: Vec<(ListenKey, String)>, now: &str) {
        for (key, service) in found {
            let seq = self.next_seq();
            let entry = self.listeners.entry(key).or_insert_with(|| ListenerInfo {
                service: service.clone(),
                last_seen: now.to_string(),
                seq,
            });
            entry.service = service;
            entry.seq = seq;
        }
        while self.listeners.len() > MAX_LISTENERS {
            let Some(oldest) = self
                .listeners
                .iter()
                .min_by_key(|(_, l)| l.seq)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.listeners.remove(&oldest);
            self.evictions += 1;
        }
    }

    /// Continues the recency order after a load.
    pub fn restore(
        &mut self,
        edges: Vec<(Source, Dest, EdgeStats)>,
        listeners: Vec<(ListenKey, ListenerInfo)>,
    ) {
        for (s, d, e) in edges {
            self.seq = self.seq.max(e.seq);
            if d.is_host() && !d.addr.is_loopback() && e.dst_name.is_none() {
                if let Some(g) = d.group() {
                    *self.group_sizes.entry((s.clone(), g)).or_insert(0) += 1;
                }
            }
            self.edges.insert((s, d), e);
        }
        for (k, l) in listeners {
            self.seq = self.seq.max(l.seq);
            if !k.addr.is_unspecified() {
                self.local.insert(k.addr);
            }
            self.listeners.insert(k, l);
        }
    }

    /// The services that own a listening socket, by service name.
    pub fn listeners_of(&self) -> BTreeMap<String, BTreeSet<ListenKey>> {
        let mut out: BTreeMap<String, BTreeSet<ListenKey>> = BTreeMap::new();
        for (k, l) in &self.listeners {
            out.entry(l.service.clone()).or_default().insert(k.clone());
        }
        out
    }

    /// The managed service listening at `dest`, if it is one address: the
    /// exact address and port, or on loopback the same port at a loopback or
    /// wildcard address.
    pub fn service_at(&self, dest: &Dest) -> Option<&str> {
        if !dest.is_host() {
            return None;
        }
        let key = ListenKey {
            addr: dest.addr,
            port: dest.port,
            protocol: dest.protocol.clone(),
        };
        if let Some(l) = self.listeners.get(&key) {
            return Some(&l.service);
        }
        if !dest.addr.is_loopback() {
            return None;
        }
        self.listeners
            .iter()
            .find(|(k, _)| {
                k.port == dest.port
                    && k.protocol == dest.protocol
                    && (k.addr.is_loopback() || k.addr.is_unspecified())
            })
            .map(|(_, l)| l.service.as_str())
    }
}
