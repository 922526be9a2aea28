//! The `[export]` section: OpenTelemetry logs over OTLP/HTTP, off unless
//! an endpoint is set, here or in the `OTEL_EXPORTER_OTLP_*` environment
//! (docs/config.md, docs/export.md; `settings` merges the two).

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// OTLP/HTTP URL: a base (`http://host:4318`, to which `/v1/logs` is
    /// added) or the full logs URL; "" is off unless the environment sets
    /// one.
    pub otlp_endpoint: String,
    /// `all` (every event) or `anomalies` (anomaly events only).
    pub events: ExportEvents,
    /// Body encoding; unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else JSON.
    pub protocol: Option<Protocol>,
    /// Body compression; unset: `OTEL_EXPORTER_OTLP_COMPRESSION`, else none.
    pub compression: Option<Compression>,
    /// Headers sent with every request (an API key, say); a name set here
    /// wins over the same name in `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: BTreeMap<String, String>,
    /// PEM file of the CA certificates an https collector is checked
    /// against, besides the system's trust store; unset:
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    pub ca_file: Option<PathBuf>,
    /// Records per request at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub flush_interval_ms: u64,
    /// Events waiting to be sent at most; more are dropped and counted.
    pub queue_capacity: usize,
    /// Per-request timeout; unset: `OTEL_EXPORTER_OTLP_TIMEOUT`, else
    /// [`DEFAULT_TIMEOUT_MS`].
    pub timeout_ms: Option<u64>,
    /// Retries of a failed batch (backoff doubling from `retry_initial_ms`
    /// up to `retry_max_ms`, or what the collector's Retry-After asks)
    /// before it is dropped and counted.
    pub max_retries: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

/// The request timeout when neither the file nor the environment sets one.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportEvents {
    All,
    Anomalies,
}

/// OTLP/HTTP body encodings (the names `OTEL_EXPORTER_OTLP_PROTOCOL` uses).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    #[serde(rename = "http/json")]
    HttpJson,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            events: ExportEvents::All,
            protocol: None,
            compression: None,
            headers: BTreeMap::new(),
            ca_file: None,
            batch_size: 512,
            flush_interval_ms: 1000,
            queue_capacity: 8192,
            timeout_ms: None,
            max_retries: 5,
            retry_initial_ms: 200,
            retry_max_ms: 10_000,
        }
    }
}

impl ExportConfig {
    /// Every problem of the file's values at once, as "key: why" lines
    /// (the environment's are checked when they are merged, `settings`).
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.otlp_endpoint.is_empty() {
            let path = super::settings::LogsPath::IfNone;
            if let Err(why) = super::settings::endpoint(&self.otlp_endpoint, path) {
                out.push(format!("export.otlp_endpoint: {why}"));
            }
        }
        for (name, value) in &self.headers {
            if let Err(why) = super::settings::header(name, value) {
                out.push(format!("export.headers: {why}"));
            }
        }
        let mut need = |ok: bool, what: &str| {
            if !ok {
                out.push(what.to_string());
            }
        };
        need(
            self.batch_size >= 1,
            "export.batch_size: must be at least 1",
        );
        need(
            self.queue_capacity >= self.batch_size,
            "export.queue_capacity: must be at least export.batch_size",
        );
        need(
            self.flush_interval_ms >= 1,
            "export.flush_interval_ms: must be at least 1",
        );
        need(
            self.timeout_ms.is_none_or(|t| t >= 1),
            "export.timeout_ms: must be at least 1",
        );
        need(
            self.retry_initial_ms >= 1 && self.retry_max_ms >= self.retry_initial_ms,
            "export.retry_initial_ms: must be at least 1 and at most export.retry_max_ms",
        );
        out
    }
}
