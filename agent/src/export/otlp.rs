//! Events as an OTLP `ExportLogsServiceRequest`, in the protobuf JSON
//! mapping (lowerCamelCase names, 64-bit integers as strings, enums as
//! numbers): one log record per event, its body the event's JSON line.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

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

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn string_attr(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

/// An integer attribute (a string in the protobuf JSON mapping).
fn int_attr(key: &str, value: u64) -> Value {
    json!({"key": key, "value": {"intValue": value.to_string()}})
}

/// The event's fields as OpenTelemetry semantic-convention attributes where
/// one exists (docs/events.md, "Field mapping"), so that a collector can
/// filter and route without parsing the body; `bulkhead.*` for the rest.
fn attributes(ev: &FlowEvent, kind: &str) -> Vec<Value> {
    let mut out = vec![string_attr("bulkhead.event.type", kind)];
    let mut text = |key: &str, value: Option<&str>| {
        if let Some(v) = value {
            out.push(string_attr(key, v));
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
    if let Some(ip) = ev.dst_ip {
        out.push(string_attr("network.peer.address", &ip.to_string()));
    }
    if let Some(port) = ev.dst_port {
        out.push(int_attr("network.peer.port", u64::from(port)));
    }
    if let Some(ip) = ev.src_ip {
        out.push(string_attr("network.local.address", &ip.to_string()));
    }
    if let Some(port) = ev.src_port {
        out.push(int_attr("network.local.port", u64::from(port)));
    }
    out.push(int_attr("process.pid", u64::from(ev.pid)));
    out.push(int_attr("thread.id", u64::from(ev.tid)));
    out.push(string_attr("process.executable.name", &ev.comm));
    out.push(string_attr("user.id", &ev.uid.to_string()));
    if let Some(a) = &ev.anomaly {
        out.push(string_attr("bulkhead.anomaly.kind", &a.kind));
        out.push(string_attr("bulkhead.anomaly.severity", &a.severity));
    }
    out
}

fn record(ev: &FlowEvent, observed: &str) -> Value {
    let time = humantime::parse_rfc3339(&ev.time).map_or_else(|_| observed.to_string(), nanos);
    let (number, text) = severity(ev);
    let kind = serde_json::to_value(ev.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let attributes = attributes(ev, &kind);
    let body = serde_json::to_string(ev).unwrap_or_default();
    json!({
        "timeUnixNano": time,
        "observedTimeUnixNano": observed,
        "severityNumber": number,
        "severityText": text,
        "eventName": format!("bulkhead.{kind}"),
        "body": {"stringValue": body},
        "attributes": attributes,
    })
}

/// One request body for `batch`.
#[must_use]
pub fn encode(batch: &[std::sync::Arc<FlowEvent>], host: &str) -> Vec<u8> {
    let observed = nanos(SystemTime::now());
    let records: Vec<Value> = batch.iter().map(|ev| record(ev, &observed)).collect();
    let request = json!({
        "resourceLogs": [{
            "resource": {"attributes": [
                string_attr("service.name", "bulkhead"),
                string_attr("service.version", env!("CARGO_PKG_VERSION")),
                string_attr("host.name", host),
            ]},
            "scopeLogs": [{
                "scope": {"name": "bulkhead", "version": env!("CARGO_PKG_VERSION")},
                "logRecords": records,
            }],
        }],
    });
    serde_json::to_vec(&request).unwrap_or_default()
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
