//! Export to a fleet pipeline: flow and anomaly events as OpenTelemetry
//! logs over OTLP/HTTP (JSON or protobuf, gzip or not, plain or TLS),
//! batched, through a bounded queue, with retries and a count of what was
//! dropped (docs/export.md).
//!
//! - `config`: the `[export]` section; `settings`: it merged with the
//!   `OTEL_EXPORTER_OTLP_*` environment
//! - `record`: an event as a log record; `otlp`: the request, in either
//!   encoding; `body`: encoded and compressed
//! - `client`: the HTTP(S) client; `delivery`: sending with retries
//! - `sender`: the queue and the tasks
//! - `stats`: sent and dropped, for the metrics

mod body;
mod client;
mod config;
mod delivery;
mod otlp;
mod record;
mod sender;
pub mod settings;
mod stats;
#[cfg(test)]
mod tests;

pub use config::{Compression, ExportConfig, ExportEvents, Protocol};
pub use sender::{spawn, Exporter};
pub use stats::ExportStats;
