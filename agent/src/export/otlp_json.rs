//! Records as an OTLP `ExportLogsServiceRequest` in the protobuf JSON
//! mapping (lowerCamelCase names, 64-bit integers as strings, enums as
//! numbers): `http/json`.

use serde_json::{json, Value};

use super::record::{Attr, Record};

fn attr((key, value): &(&'static str, Attr)) -> Value {
    match value {
        Attr::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
        Attr::Int(i) => json!({"key": key, "value": {"intValue": i.to_string()}}),
    }
}

/// One request body.
#[must_use]
pub fn encode(resource: &[(&'static str, Attr)], records: &[Record], observed_ns: u64) -> Vec<u8> {
    let observed = observed_ns.to_string();
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "timeUnixNano": r.time_ns.to_string(),
                "observedTimeUnixNano": observed,
                "severityNumber": r.severity_number,
                "severityText": r.severity_text,
                "eventName": r.event_name,
                "body": {"stringValue": r.body},
                "attributes": r.attributes.iter().map(attr).collect::<Vec<_>>(),
            })
        })
        .collect();
    let request = json!({
        "resourceLogs": [{
            "resource": {"attributes": resource.iter().map(attr).collect::<Vec<_>>()},
            "scopeLogs": [{
                "scope": {"name": "bulkhead", "version": env!("CARGO_PKG_VERSION")},
                "logRecords": records,
            }],
        }],
    });
    serde_json::to_vec(&request).unwrap_or_default()
}
