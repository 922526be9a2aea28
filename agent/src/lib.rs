//! bulkhead: per-service network segmentation and observability in the
//! kernel. One module per concern:
//!
//! - `policy`: policy files -> checked model (all errors at once)
//! - `kernel`: checked model -> map values (`compile`, `layout`); load,
//!   attach and pin the programs (`loader`, `pins`); write maps (`maps`)
//! - `cgroup`, `services`: the cgroup2 mount; which cgroup each service is in
//! - `engine`: the policy in force and how it changes (rescans, reloads,
//!   quarantine, status); `reload`: reading and auditing policy changes;
//!   `quarantine`: the quarantine overlay; `rollback`: undoing a failed
//!   switch; `selfcheck`: what the drift self-check found (`kernel::drift`
//!   compares the maps)
//! - `events`: ring buffer -> decoded events -> decision log and live
//!   subscribers; `flows`: the kernel's per-flow counts -> `flow` summaries
//! - `control`: the local control socket (protocol, server, client)
//! - `metrics`: Prometheus endpoint and `/healthz`
//! - `graph`: the service graph, blast radius, learned policies
//! - `anomaly`, `export`: per-service baselines and anomaly events; OTLP
//! - `fleet`: fleet mode on ClickHouse (config, client, schema, rows)
//! - `daemon`: `bulkhead run` (start-up and main loop); `takeover`: from a
//!   previous agent's pins; `notify`: systemd readiness and watchdog
//! - `config`, `logging`: configuration, logs
//! - `dns`: egress by DNS name (a design in progress, not yet wired into
//!   the daemon): name patterns, answers, the learnt cache, the proxy
//! - `cli`: the command line, one file per command; it builds the daemon's
//!   options and talks to the control socket (nothing imports it)
//! - `sock_diag`: the kernel's socket list (held sockets, TCP byte summaries)
//! - `visible`: control characters from outside written out for terminals
//!   and diagrams

pub mod anomaly;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod engine;
pub mod events;
pub mod export;
pub mod fleet;
pub mod flows;
pub mod graph;
pub mod held;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod policy_watch;
pub mod process;
pub mod quarantine;
pub mod quarantine_recovery;
pub mod reload;
pub mod rollback;
pub mod selfcheck;
pub mod services;
pub mod sock_diag;
pub mod spool;
pub mod state_file;
pub mod takeover;
pub mod visible;
