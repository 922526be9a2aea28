//! The event schema (docs/events.md). One flat record for every event
//! type, with the same field names everywhere: flows, verdicts, and later
//! anomalies and policy changes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Versioned schema name carried by every event.
pub const SCHEMA: &str = "bulkhead.event.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A connect()/sendmsg() decision.
    Verdict,
    /// A TCP connection reached ESTABLISHED.
    TcpEstablished,
    /// An established TCP connection closed.
    TcpClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Would have been denied; let through because the service is in audit mode.
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Egress,
    Ingress,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    pub schema: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// Kernel CLOCK_MONOTONIC timestamp (orders events exactly).
    pub ktime_ns: u64,
    /// The managed service, or null for an unmanaged process.
    pub service: Option<String>,
    /// "enforce" or "audit" for a managed service.
    pub mode: Option<String>,
    pub cgroup_id: u64,
    /// Process (thread group) id and thread id.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub traffic_direction: Direction,
    /// Which kernel hook saw it: connect, sendmsg, bind, ingress,
    /// sock_create, socket_create, sock_ops.
    pub hook: String,
    /// "tcp", "udp", or the IP protocol number.
    pub protocol: String,
    /// Local end, when known (lifecycle events).
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    /// Remote end (for an outbound verdict: the destination asked for; for
    /// an inbound one: the peer); null for bind and socket creation.
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u16>,
    /// Decision, for verdict events.
    pub verdict: Option<Verdict>,
    /// The rule that decided: `billing.toml#egress[1]`, or
    /// `billing.toml#default-deny`; null when no policy applies.
    pub rule: Option<String>,
    pub socket_cookie: u64,
    /// For tcp_closed: bytes sent (acknowledged by the peer) and received.
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    /// For tcp_closed: time from established to closed.
    pub duration_ns: Option<u64>,
}
