//! Export to a fleet pipeline: flow and anomaly events as OpenTelemetry
//! logs over OTLP/HTTP (JSON), batched, through a bounded queue, with
//! retries and a count of what was dropped (docs/export.md).
//!
//! - `config`: the `[export]` section
//! - `otlp`: events -> `ExportLogsServiceRequest` JSON
//! - `sender`: the queue and the HTTP client tasks
//! - `stats`: sent and dropped, for the metrics

mod config;
mod otlp;
mod sender;
mod stats;
#[cfg(test)]
mod tests;

pub use config::{ExportConfig, ExportEvents};
pub use otlp::encode;
pub use sender::{spawn, Exporter};
pub use stats::ExportStats;
