//! Anomaly detection (docs/anomaly.md): per-service baselines learnt from
//! the agent's own flow events, and structured anomaly events with their
//! evidence.
//!
//! - `config`: the `[anomaly]` section
//! - `window`, `dest`, `ewma`: fixed-size counters per interval, capped
//!   sets, baselines
//! - `service`: one service's state, and how an event updates it
//! - `detect`: one file per detector
//! - `group`: one event per anomaly, then bounded updates
//! - `detector`: all of it behind `observe` / `tick(now)`
//! - `early`: `check(now)`, the threshold detectors reported mid-interval
//! - `state`: baselines in `anomaly.json`
//! - `event`, `task`, `stats`: decision-log events, the daemon task, metrics
//!
//! The seeded evaluation of the detectors (`cargo xtask eval-anomaly`) is a
//! development tool outside the shipped binary: `agent/examples/eval-anomaly`.

mod config;
mod dest;
mod detect;
mod detector;
mod early;
mod event;
mod ewma;
mod finding;
mod group;
mod service;
pub mod state;
mod stats;
mod task;
#[cfg(test)]
mod tests;
mod window;

pub use config::{AnomalyConfig, DenyBurst, FanOut, NewDestination, RateSpike, VolumeSpike};
pub use detector::{Anomaly, Detector};
pub use event::to_event;
pub use finding::{Finding, Kind, Severity};
pub use group::Emit;
pub use stats::AnomalyStats;
pub use task::{spawn, AnomalyTask};
