//! The harness of bulkhead's root integration tests.
//!
//! Everything here is real: tests create their own cgroups ([`CgroupGuard`])
//! and network namespaces ([`NetnsGuard`]), start real listeners and clients
//! ([`Probe`], [`Listener`], the `bulkhead-probe` binary), and drive the real
//! `bulkhead` binary ([`Daemon`], [`bulkhead`]). Every guard cleans up in
//! `Drop`, so a panicking test leaves nothing behind, and no `Drop` panics.
//!
//! Tests share kernel state (programs attached at the cgroup2 root), so the
//! suite runs with `--test-threads=1`. A test that needs root starts with
//! `if !require_bpf() { return; }`: see [`require_bpf`].
//!
//! The fleet tests need no BPF but a real `clickhouse-server` ([`ClickHouse`]):
//! without its server they fail, saying to run `cargo xtask setup`.
//! Likewise the monitoring tests start a real `prometheus`
//! ([`PrometheusServer`]) that scrapes a real agent, and the DNS proxy
//! tests a real `dnsmasq` ([`DnsServer`]) queried with `dig`.

pub mod anomaly;
pub mod bpf;
pub mod browser;
pub mod cgroup;
pub mod clickhouse;
pub mod conn;
pub mod control;
pub mod daemon;
pub mod dns_server;
pub mod events;
pub mod eventually;
pub mod executables;
pub mod faults;
pub mod fixture;
pub mod http;
pub mod logrotate;
pub mod maps;
pub mod netns;
pub mod nft;
pub mod notify;
pub mod otlp;
pub mod pinned_map;
pub mod policy;
pub mod ports;
pub mod probe;
pub mod process;
pub mod prometheus;
pub mod prometheus_server;
pub mod relay;
pub mod require;
pub mod resolving;
pub mod server;
pub mod serving;
pub mod socket_activation;
pub mod state_files;
pub mod sysctl;

pub use bpf::ProgSnapshot;
pub use cgroup::{cgroup2_mount, unique_name, CgroupGuard};
pub use clickhouse::ClickHouse;
pub use daemon::{bulkhead, bulkhead_bin, detach_command, Daemon};
pub use dns_server::DnsServer;
pub use eventually::eventually;
pub use fixture::{Enforced, Targets};
pub use netns::NetnsGuard;
pub use policy::{allowing, policy_with, service_policy, unit_policy, Egress, Ingress, PolicyDir};
pub use ports::free_port_block;
pub use probe::{Listener, Outcome, Probe, Proto};
pub use prometheus_server::PrometheusServer;
pub use relay::Relay;
pub use require::require_bpf;
pub use server::Server;
pub use serving::Serving;
pub use socket_activation::HeldSockets;
pub use sysctl::PingGroupRange;

/// `EPERM`: what a denied `connect()`/`sendto()` must return.
pub const EPERM: i32 = libc::EPERM;

/// Parses a socket address written in a test (`"127.0.0.1:0"`, `"[::1]:0"`).
#[must_use]
pub fn addr(s: &str) -> std::net::SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("test bug: {s:?} is not a socket address: {e}"))
}

/// A [`Probe`] running this package's `bulkhead-probe`, from the test's own
/// cgroup and namespace. A macro, not a function: only integration tests
/// know the binary's path (`env!("CARGO_BIN_EXE_bulkhead-probe")`), so it
/// must expand in the test.
#[macro_export]
macro_rules! probe {
    () => {
        $crate::Probe::new(env!("CARGO_BIN_EXE_bulkhead-probe"))
    };
}

/// A [`conn::Conn`] running this package's `bulkhead-conn` (a macro for the
/// same reason as [`probe!`]).
#[macro_export]
macro_rules! conn {
    () => {
        $crate::conn::Conn::new(env!("CARGO_BIN_EXE_bulkhead-conn"))
    };
}
