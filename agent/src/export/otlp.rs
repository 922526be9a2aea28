//! Records as an OTLP `ExportLogsServiceRequest`, built with the
//! OpenTelemetry project's generated message types and encoded either way
//! OTLP/HTTP has: protobuf (`http/protobuf`, prost) or the protobuf JSON
//! mapping (`http/json`: lowerCamelCase names, 64-bit integers as strings,
//! enums as numbers; the crate's serde derives follow it).

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};
use prost::Message as _;

use super::record::{Attr, Record};

fn string(s: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    })
}

fn key_value((key, value): &(&'static str, Attr)) -> KeyValue {
    KeyValue {
        key: (*key).to_string(),
        value: match value {
            Attr::Str(s) => string(s),
            Attr::Int(i) => Some(AnyValue {
                value: Some(any_value::Value::IntValue(*i)),
            }),
        },
        ..KeyValue::default()
    }
}

/// The request for `records`, about `resource`.
#[must_use]
pub fn request(
    resource: &[(&'static str, Attr)],
    records: &[Record],
    observed_ns: u64,
) -> ExportLogsServiceRequest {
    let log_records = records
        .iter()
        .map(|r| LogRecord {
            time_unix_nano: r.time_ns,
            observed_time_unix_nano: observed_ns,
            severity_number: i32::from(r.severity_number),
            severity_text: r.severity_text.to_string(),
            event_name: r.event_name.clone(),
            body: string(&r.body),
            attributes: r.attributes.iter().map(key_value).collect(),
            ..LogRecord::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource.iter().map(key_value).collect(),
                ..Resource::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "bulkhead".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..InstrumentationScope::default()
                }),
                log_records,
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

/// `request` in protobuf.
#[must_use]
pub fn protobuf(request: &ExportLogsServiceRequest) -> Vec<u8> {
    request.encode_to_vec()
}

/// `request` in the protobuf JSON mapping.
///
/// # Errors
/// None in practice (plain data); serde_json's error otherwise.
pub fn json(request: &ExportLogsServiceRequest) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(request)
}
