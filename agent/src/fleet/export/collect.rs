//! Events into rows: flow events of managed services summed per batch
//! interval into `flows` rows (one per service, direction, protocol,
//! endpoint, verdict, rule and DNS name), anomalies into `anomalies` rows.
//!
//! The ephemeral end of a connection is left out of the key (the local
//! port of an outbound call, the peer's port of an inbound one): it is
//! new for every TCP connection and would make a row per connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::{
    events::{Direction, EventType, FlowEvent, Tap, Verdict},
    fleet::{time, AnomalyRow, FlowRow, HostIdentity},
};

/// The collector fed as a tap of the event hub: it sees every event the
/// decision log gets, synchronously, so it never falls behind (a channel
/// subscriber would lose what it could not keep up with). Its work per
/// event is a hash-map update; the exporter swaps the collector out each
/// interval, so the lock is never held for more than that.
pub struct CollectTap {
    collector: Mutex<Collector>,
    identity: HostIdentity,
    max_rows: usize,
}

impl CollectTap {
    pub fn new(identity: HostIdentity, max_rows: usize) -> Self {
        Self {
            collector: Mutex::new(Collector::new(max_rows)),
            identity,
            max_rows,
        }
    }

    /// The rows collected since the last call.
    pub fn take(&self) -> (Vec<FlowRow>, Vec<AnomalyRow>) {
        let mut full = {
            let mut c = self
                .collector
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *c, Collector::new(self.max_rows))
        };
        full.take()
    }
}

impl Tap for CollectTap {
    fn observe(&self, batch: &[Arc<FlowEvent>]) {
        let now = time::now();
        let mut c = self
            .collector
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ev in batch {
            c.observe(&self.identity, ev, now);
        }
    }
}

/// The columns a flow row is summed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    service: String,
    direction: &'static str,
    protocol: String,
    local: (Option<IpAddr>, u16),
    remote: (Option<IpAddr>, u16),
    verdict: &'static str,
    rule: String,
    /// `dst_name`: the name the service looked up that gave the address.
    name: Option<Arc<str>>,
}

fn verdict(v: Option<Verdict>) -> &'static str {
    match v {
        Some(Verdict::Allow) | None => "allow",
        Some(Verdict::Deny) => "deny",
        Some(Verdict::Audit) => "audit",
    }
}

fn addr(a: Option<IpAddr>) -> String {
    a.map(|a| a.to_canonical().to_string()).unwrap_or_default()
}

/// Rows of the interval being collected. At most `max_rows` flow rows:
/// past it (a service sweeping a wide allowed network), a new endpoint's
/// calls are folded into one row per service, direction, protocol and
/// verdict with no endpoint (`remote_addr` ""), so memory stays bounded
/// and every call is still counted.
#[derive(Debug)]
pub struct Collector {
    flows: HashMap<Key, FlowRow>,
    anomalies: Vec<AnomalyRow>,
    max_rows: usize,
    /// Calls folded this interval (logged when the interval ends).
    folded: u64,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl Collector {
    #[must_use]
    pub fn new(max_rows: usize) -> Self {
        Self {
            flows: HashMap::new(),
            anomalies: Vec::new(),
            max_rows,
            folded: 0,
        }
    }

    /// Counts one event seen at `now` (UTC seconds).
    pub fn observe(&mut self, id: &HostIdentity, ev: &FlowEvent, now: u32) {
        let Some(service) = ev.service.as_deref() else {
            return;
        };
        if ev.kind == EventType::Anomaly {
            if let Some(a) = &ev.anomaly {
                self.anomalies.push(AnomalyRow {
                    host: id.host.clone(),
                    host_id: id.host_id.clone(),
                    service: service.to_string(),
                    kind: a.kind.clone(),
                    severity: a.severity.clone(),
                    detail: serde_json::to_string(a).unwrap_or_default(),
                    at: now,
                    ..AnomalyRow::default()
                });
            }
            return;
        }
        let (Some(direction), Some(protocol)) = (ev.traffic_direction, ev.protocol.as_deref())
        else {
            return;
        };
        let (calls, bytes) = match (ev.kind, &*ev.hook) {
            (EventType::Verdict | EventType::Flow, "connect" | "sendmsg" | "ingress") => {
                (ev.calls.unwrap_or(1), (0, 0))
            }
            (EventType::TcpClosed | EventType::Flow, "sock_ops") => match ev.new_bytes() {
                Some(b) if b != (0, 0) => (0, b),
                _ => return,
            },
            _ => return,
        };
        let outbound = direction == Direction::Egress;
        let key = Key {
            service: service.to_string(),
            direction: if outbound { "egress" } else { "ingress" },
            protocol: protocol.to_string(),
            local: if outbound {
                (None, 0)
            } else {
                (ev.src_ip, ev.src_port.unwrap_or(0))
            },
            remote: if outbound {
                (ev.dst_ip, ev.dst_port.unwrap_or(0))
            } else {
                (ev.dst_ip, 0)
            },
            verdict: verdict(ev.verdict),
            rule: ev.rule.as_deref().unwrap_or_default().to_string(),
            name: if outbound { ev.dst_name.clone() } else { None },
        };
        let key = if self.flows.len() >= self.max_rows && !self.flows.contains_key(&key) {
            self.folded += calls;
            Key {
                local: (None, 0),
                remote: (None, 0),
                rule: String::new(),
                name: None,
                ..key
            }
        } else {
            key
        };
        let row = self.flows.entry(key).or_insert_with_key(|k| FlowRow {
            host: id.host.clone(),
            host_id: id.host_id.clone(),
            service: k.service.clone(),
            direction: k.direction.to_string(),
            protocol: k.protocol.clone(),
            local_addr: addr(k.local.0),
            local_port: k.local.1,
            remote_addr: addr(k.remote.0),
            remote_port: k.remote.1,
            verdict: k.verdict.to_string(),
            rule: k.rule.clone(),
            dst_name: k.name.as_deref().unwrap_or_default().to_string(),
            first_seen: now,
            last_seen: now,
            ..FlowRow::default()
        });
        row.calls += calls;
        row.bytes_sent += bytes.0;
        row.bytes_received += bytes.1;
        row.first_seen = row.first_seen.min(now);
        row.last_seen = row.last_seen.max(now);
    }

    /// The interval's rows; the collector starts the next one empty
    /// (open connections' bytes stay remembered).
    pub fn take(&mut self) -> (Vec<FlowRow>, Vec<AnomalyRow>) {
        if self.folded > 0 {
            tracing::warn!(
                calls = self.folded,
                rows = self.max_rows,
                "fleet export: more endpoints in one interval than [fleet] queue_rows; the calls past it are summed without their endpoint"
            );
            self.folded = 0;
        }
        let flows = self.flows.drain().map(|(_, r)| r).collect();
        (flows, std::mem::take(&mut self.anomalies))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> HostIdentity {
        HostIdentity {
            host: "h1".to_string(),
            host_id: "0123abcd".to_string(),
        }
    }

    fn call(kind: EventType, calls: u64, port: u16) -> FlowEvent {
        FlowEvent {
            kind,
            service: Some("web".into()),
            hook: "connect".into(),
            traffic_direction: Some(Direction::Egress),
            protocol: Some("tcp".into()),
            src_ip: "198.51.100.10".parse().ok(),
            src_port: Some(port),
            dst_ip: "198.51.100.20".parse().ok(),
            dst_port: Some(8080),
            verdict: Some(Verdict::Allow),
            rule: Some("web.toml#egress[0]".into()),
            calls: Some(calls),
            ..crate::events::sample_verdict()
        }
    }

    #[test]
    fn calls_of_one_destination_sum_into_one_row_whatever_the_local_port() {
        let mut c = Collector::default();
        c.observe(&id(), &call(EventType::Verdict, 1, 40_001), 100);
        c.observe(&id(), &call(EventType::Verdict, 1, 40_002), 101);
        c.observe(&id(), &call(EventType::Flow, 40, 40_001), 105);
        let (flows, anomalies) = c.take();
        assert!(anomalies.is_empty());
        assert_eq!(flows.len(), 1, "{flows:?}");
        let r = &flows[0];
        assert_eq!(
            (
                r.calls,
                r.first_seen,
                r.last_seen,
                r.local_port,
                r.remote_port
            ),
            (42, 100, 105, 0, 8080)
        );
        assert_eq!(
            (r.host.as_str(), r.service.as_str(), r.remote_addr.as_str()),
            ("h1", "web", "198.51.100.20")
        );
        assert!(c.take().0.is_empty(), "the next interval starts empty");
    }

    #[test]
    fn an_open_connections_bytes_count_once() {
        let mut c = Collector::default();
        let bytes = |kind, sent| FlowEvent {
            hook: "sock_ops".into(),
            socket_cookie: 9,
            bytes_sent: Some(sent),
            bytes_received: Some(0),
            calls: None,
            ..call(kind, 0, 40_001)
        };
        c.observe(&id(), &bytes(EventType::Flow, 1_000), 100);
        let (flows, _) = c.take();
        assert_eq!(flows[0].bytes_sent, 1_000);
        // The close carries the total, 1,500, and (marked by the stage of
        // flows::tcp) the 500 no summary reported.
        let close = FlowEvent {
            bytes_unsummarised: Some((500, 0)),
            ..bytes(EventType::TcpClosed, 1_500)
        };
        c.observe(&id(), &close, 110);
        let (flows, _) = c.take();
        assert_eq!((flows[0].bytes_sent, flows[0].calls), (500, 0));
    }

    #[test]
    fn the_tap_collects_every_batch_and_take_starts_the_next_interval() {
        let tap = CollectTap::new(id(), 100);
        let batch: Vec<Arc<FlowEvent>> = (0..3)
            .map(|_| Arc::new(call(EventType::Verdict, 1, 40_001)))
            .collect();
        tap.observe(&batch);
        tap.observe(&batch[..1]);
        let (flows, _) = tap.take();
        assert_eq!(flows.iter().map(|r| r.calls).sum::<u64>(), 4);
        assert!(tap.take().0.is_empty(), "the next interval starts empty");
    }

    #[test]
    fn past_the_bound_calls_are_folded_not_lost() {
        let mut c = Collector::new(2);
        for port in [8080, 8081, 8082, 8083] {
            let ev = FlowEvent {
                dst_port: Some(port),
                ..call(EventType::Verdict, 1, 40_001)
            };
            c.observe(&id(), &ev, 100);
        }
        let (mut flows, _) = c.take();
        flows.sort_by_key(|r| r.remote_port);
        let rows: Vec<(&str, u16, u64)> = flows
            .iter()
            .map(|r| (r.remote_addr.as_str(), r.remote_port, r.calls))
            .collect();
        assert_eq!(
            rows,
            [
                ("", 0, 2),
                ("198.51.100.20", 8080, 1),
                ("198.51.100.20", 8081, 1)
            ]
        );
    }

    #[test]
    fn the_name_looked_up_is_carried_and_keeps_its_calls_apart() {
        let mut c = Collector::default();
        let named = FlowEvent {
            dst_name: Some(Arc::from("api.example.test")),
            ..call(EventType::Verdict, 1, 40_001)
        };
        c.observe(&id(), &named, 100);
        c.observe(&id(), &call(EventType::Flow, 3, 40_001), 101);
        c.observe(
            &id(),
            &FlowEvent {
                calls: Some(5),
                ..named.clone()
            },
            102,
        );
        let (mut flows, _) = c.take();
        flows.sort_by(|a, b| a.dst_name.cmp(&b.dst_name));
        let rows: Vec<(&str, u64)> = flows
            .iter()
            .map(|r| (r.dst_name.as_str(), r.calls))
            .collect();
        assert_eq!(rows, [("", 3), ("api.example.test", 6)]);
    }

    #[test]
    fn unmanaged_processes_are_not_exported() {
        let mut c = Collector::default();
        let ev = FlowEvent {
            service: None,
            ..call(EventType::Verdict, 1, 40_001)
        };
        c.observe(&id(), &ev, 100);
        assert!(c.take().0.is_empty());
    }
}
