//! bulkhead: per-service network segmentation and observability in the
//! kernel.
//!
//! - `policy`: policy files -> checked model (all errors at once)
//! - `kernel`: checked model -> map values; load, attach, write maps
//! - `cgroup`: the cgroup2 mount and service cgroup ids
//! - `config`: the daemon's own configuration
//! - `daemon`: `bulkhead run`
//! - `anomaly`: per-service baselines and anomaly events
//! - `export`: events as OpenTelemetry logs over OTLP/HTTP
//! - `cli`: the command line

pub mod anomaly;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod events;
pub mod export;
pub mod graph;
pub mod kernel;
pub mod learn;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod quarantine;
pub mod reload;
pub mod services;
