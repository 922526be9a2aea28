//! One event as one OTLP log record, before encoding: its time, severity,
//! name, body (the event's JSON line) and attributes; `otlp` makes the
//! request of them.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::events::{Direction, EventType, FlowEvent, Verdict};

/// OpenTelemetry severity numbers.
const INFO: u8 = 9;
const WARN: u8 = 13;
const ERROR: u8 = 17;

fn severity(ev: &FlowEvent) -> (u8, &'static str) {
    match (ev.kind, ev.verdict, ev.anomaly.as_ref()) {
        (EventType::Anomaly, _, Some(a)) if a.severity == "high" => (ERROR, "ERROR"),
        // Denials, first or counted in a flow's summary, alike.
        (EventType::Anomaly, _, _)
        | (EventType::Verdict | EventType::Flow, Some(Verdict::Deny), _) => (WARN, "WARN"),
        _ => (INFO, "INFO"),
    }
}

/// An attribute value: OTLP `stringValue` or `intValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub time_ns: u64,
    pub severity_number: u8,
    pub severity_text: &'static str,
    pub event_name: String,
    pub body: String,
    pub attributes: Vec<(&'static str, Attr)>,
}

/// The resource every batch is about: this agent on this host.
#[must_use]
pub fn resource(host: &str) -> Vec<(&'static str, Attr)> {
    vec![
        ("service.name", Attr::Str("bulkhead".to_string())),
        (
            "service.version",
            Attr::Str(env!("CARGO_PKG_VERSION").to_string()),
        ),
        ("host.name", Attr::Str(host.to_string())),
    ]
}

/// The event's fields as OpenTelemetry semantic-convention attributes where
/// one exists (docs/events.md, "Field mapping"), so that a collector can
/// filter and route without parsing the body; `bulkhead.*` for the rest.
/// A `null` field gives no attribute.
fn attributes(ev: &FlowEvent, kind: &str) -> Vec<(&'static str, Attr)> {
    let mut out = vec![("bulkhead.event.type", Attr::Str(kind.to_string()))];
    let mut text = |key: &'static str, value: Option<&str>| {
        if let Some(v) = value {
            out.push((key, Attr::Str(v.to_string())));
        }
    };
    text("bulkhead.service", ev.service.as_deref());
    text("bulkhead.mode", ev.mode.as_deref());
    text("bulkhead.rule", ev.rule.as_deref());
    text("bulkhead.dst_name", ev.dst_name.as_deref());
    text(
        "bulkhead.traffic_direction",
        ev.traffic_direction.map(|d| match d {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }),
    );
    text(
        "bulkhead.verdict",
        ev.verdict.map(|v| match v {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }),
    );
    text("network.transport", ev.protocol.as_deref());
    let family = ev.dst_ip.or(ev.src_ip).map(|ip| match ip {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    });
    text("network.type", family);
    let port = |p: u16| Attr::Int(i64::from(p));
    let pairs = [
        (
            "network.peer.address",
            ev.dst_ip.map(|ip| Attr::Str(ip.to_string())),
        ),
        ("network.peer.port", ev.dst_port.map(port)),
        (
            "network.local.address",
            ev.src_ip.map(|ip| Attr::Str(ip.to_string())),
        ),
        ("network.local.port", ev.src_port.map(port)),
        ("process.pid", Some(Attr::Int(i64::from(ev.pid)))),
        ("thread.id", Some(Attr::Int(i64::from(ev.tid)))),
    ];
    out.extend(pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    out.push(("process.executable.name", Attr::Str(ev.comm.clone())));
    out.push(("user.id", Attr::Str(ev.uid.to_string())));
    if let Some(a) = &ev.anomaly {
        out.push(("bulkhead.anomaly.kind", Attr::Str(a.kind.clone())));
        out.push(("bulkhead.anomaly.severity", Attr::Str(a.severity.clone())));
    }
    out
}

/// The record of `ev`; `observed_ns` stands in for a time that does not
/// parse.
#[must_use]
pub fn record(ev: &FlowEvent, observed_ns: u64) -> Record {
    let time_ns = humantime::parse_rfc3339(&ev.time).map_or(observed_ns, nanos);
    let (severity_number, severity_text) = severity(ev);
    let kind = serde_json::to_value(ev.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Record {
        time_ns,
        severity_number,
        severity_text,
        event_name: format!("bulkhead.{kind}"),
        body: serde_json::to_string(ev).unwrap_or_default(),
        attributes: attributes(ev, &kind),
    }
}

/// Nanoseconds since the Unix epoch.
#[must_use]
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod severity_tests {
    use super::*;

    #[test]
    fn denials_are_warnings_whether_a_first_record_or_a_flow_summary() {
        let deny = crate::events::sample_verdict();
        assert_eq!(severity(&deny).1, "WARN");
        let summary = FlowEvent {
            kind: EventType::Flow,
            calls: Some(4999),
            ..deny.clone()
        };
        assert_eq!(severity(&summary).1, "WARN");
        let allowed = FlowEvent {
            verdict: Some(Verdict::Allow),
            ..summary
        };
        assert_eq!(severity(&allowed).1, "INFO");
    }
}
