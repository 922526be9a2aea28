//! The Prometheus endpoint: `/metrics` and `/healthz` (docs/metrics.md).
//!
//! Nothing is counted twice: every value is read at scrape time from where
//! it already lives — the kernel's per-CPU counters, the event pipeline's
//! [`EventStats`](crate::events::EventStats), the policy inventory and
//! `/proc/self` — by one custom prometheus-client collector.
//!
//! - `state`: what the daemon hands over ([`MetricsState`], [`Inventory`])
//! - `collector`: state -> metric families, text encoding
//! - `process`: the process's own CPU, memory and file descriptors
//! - `http`: the routes; `listener`: accepting connections, with a cap and
//!   timeouts; `host`: the `Host` allowlist; `graph_cache`: `/graph`
//!   rendered once a second at most; `http_stats`: what the listener counts

mod collector;
#[cfg(test)]
mod fake;
mod graph_cache;
mod host;
mod http;
mod http_stats;
mod listener;
mod process;
mod state;
#[cfg(test)]
mod state_tests;

pub use collector::{registry, render, Format};
pub use http::{Endpoint, MetricsError, MetricsServer};
pub use state::{
    map_capacities, CounterSource, DnsSource, Inventory, KernelCounters, MapUsage, MetricsState,
    ServiceMeta, ServiceStatus, Sources, VerdictCounts,
};
