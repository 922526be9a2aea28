//! The `[export]` section: OpenTelemetry logs over OTLP/HTTP, off unless
//! an endpoint is set (docs/config.md, docs/export.md).

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// OTLP/HTTP logs URL, like `http://127.0.0.1:4318/v1/logs`; "" is off.
    pub otlp_endpoint: String,
    /// `all` (every event) or `anomalies` (anomaly events only).
    pub events: ExportEvents,
    /// Records per request at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub flush_interval_ms: u64,
    /// Events waiting to be sent at most; more are dropped and counted.
    pub queue_capacity: usize,
    /// Per-request timeout.
    pub timeout_ms: u64,
    /// Retries of a failed batch (backoff doubling from `retry_initial_ms`
    /// up to `retry_max_ms`) before it is dropped and counted.
    pub max_retries: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportEvents {
    All,
    Anomalies,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            events: ExportEvents::All,
            batch_size: 512,
            flush_interval_ms: 1000,
            queue_capacity: 8192,
            timeout_ms: 5000,
            max_retries: 5,
            retry_initial_ms: 200,
            retry_max_ms: 10_000,
        }
    }
}

impl ExportConfig {
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    /// Every problem at once, as "key: why" lines.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.enabled() {
            match self.otlp_endpoint.parse::<hyper::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
                Ok(_) => out.push(format!(
                    "export.otlp_endpoint = {:?}: must be an http:// URL (for TLS, export to a local collector that forwards over https)",
                    self.otlp_endpoint
                )),
                Err(e) => out.push(format!(
                    "export.otlp_endpoint = {:?}: {e}",
                    self.otlp_endpoint
                )),
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
            self.timeout_ms >= 1,
            "export.timeout_ms: must be at least 1",
        );
        need(
            self.retry_initial_ms >= 1 && self.retry_max_ms >= self.retry_initial_ms,
            "export.retry_initial_ms: must be at least 1 and at most export.retry_max_ms",
        );
        out
    }
}
