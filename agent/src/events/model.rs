//! The event schema (docs/events.md). One flat record for every event
//! type, with the same field names everywhere: flows, verdicts, and later
//! anomalies and policy changes.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

/// Versioned schema name carried by every event.
/// v2: a verdict event reports the first call of a flow (`calls`: 1), the
/// flow's later calls come in `flow` summaries (see docs/events.md).
pub const SCHEMA: &str = "bulkhead.event.v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A connect()/sendmsg() decision.
    Verdict,
    /// A TCP connection reached ESTABLISHED.
    TcpEstablished,
    /// An established TCP connection closed.
    TcpClosed,
    /// The policy in force changed, or a change was refused (see `change`).
    PolicyChange,
    /// A service behaved unlike its baseline (see `anomaly`, docs/anomaly.md).
    Anomaly,
    /// The calls of a flow since its last record (`calls`), counted in the
    /// kernel: reported per interval while the flow is active.
    Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Would have been denied; let through because the service is in audit mode.
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Egress,
    Ingress,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    pub schema: Cow<'static, str>,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// This host's name (`host::name`); empty in a line written before
    /// the field existed.
    #[serde(default)]
    pub host: Cow<'static, str>,
    /// Kernel CLOCK_MONOTONIC timestamp (orders events exactly).
    pub ktime_ns: u64,
    /// The managed service, or null for an unmanaged process.
    pub service: Option<Arc<str>>,
    /// "enforce" or "audit" for a managed service.
    pub mode: Option<Cow<'static, str>>,
    pub cgroup_id: u64,
    /// Process (thread group) id and thread id.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// The real path of the process's executable (see
    /// `process::names`), " (deleted)" after it was replaced on disk;
    /// null when the kernel did not know it.
    #[serde(default)]
    pub exe: Option<Arc<str>>,
    /// The executable as the kernel identifies it, for the stage that
    /// names it; not part of the event's JSON.
    #[serde(skip)]
    pub exe_file: Option<agent_common::ExeId>,
    /// egress or ingress; null for policy changes.
    pub traffic_direction: Option<Direction>,
    /// Which kernel hook saw it: connect, sendmsg, bind, ingress,
    /// sock_create, socket_create, sock_ops.
    pub hook: Cow<'static, str>,
    /// "tcp", "udp", or the IP protocol number; null for policy changes.
    pub protocol: Option<Cow<'static, str>>,
    /// Local end, when known (lifecycle events).
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    /// Remote end (for an outbound verdict: the destination asked for; for
    /// an inbound one: the peer); null for bind and socket creation.
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u16>,
    /// For an egress decision allowed to an address the service's own DNS
    /// lookup taught (docs/dns-names.md): the name it looked up that gave
    /// this address (the latest, if several); null otherwise.
    #[serde(default)]
    pub dst_name: Option<Arc<str>>,
    /// Decision, for verdict events.
    pub verdict: Option<Verdict>,
    /// The rule that decided: `billing.toml#egress[1]`, or
    /// `billing.toml#default-deny`; null when no policy applies.
    pub rule: Option<Arc<str>>,
    /// For verdict events: how many denial events of this service and
    /// direction the kernel's rate limit suppressed (on the CPU that made
    /// this one) since the previous one logged; null for other events.
    pub suppressed: Option<u32>,
    /// How many calls (or packets) this event reports: 1 for a verdict, the
    /// calls since the flow's previous record for a flow summary; null for
    /// other events. The sum over a flow's events is every call it made.
    pub calls: Option<u64>,
    pub socket_cookie: u64,
    /// For tcp_closed: bytes sent (acknowledged by the peer) and received.
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    /// For tcp_closed: time from established to closed.
    pub duration_ns: Option<u64>,
    /// For policy_change: what changed, from where, and the result.
    pub change: Option<ChangeRecord>,
    /// For anomaly: what was seen, against which baseline.
    pub anomaly: Option<AnomalyRecord>,
    /// For tcp_established: the kernel's byte counters at establishment
    /// (the SYNs), from which the byte summaries of the open connection
    /// count. Not in the log.
    #[serde(skip)]
    pub bytes_base: Option<(u64, u64)>,
    /// For tcp_closed: of its bytes, those no byte summary of the open
    /// connection reported (set before the event is published, by the
    /// stage that makes the summaries). Not in the log.
    #[serde(skip)]
    pub bytes_unsummarised: Option<(u64, u64)>,
}

impl FlowEvent {
    /// The TCP (sent, received) bytes this event adds to a running sum,
    /// each byte counted once: an open connection's byte summary its own,
    /// a close what no summary reported. `None` for other events.
    #[must_use]
    pub fn new_bytes(&self) -> Option<(u64, u64)> {
        let total = (
            self.bytes_sent.unwrap_or(0),
            self.bytes_received.unwrap_or(0),
        );
        match self.kind {
            EventType::TcpClosed => Some(self.bytes_unsummarised.unwrap_or(total)),
            EventType::Flow if &*self.hook == "sock_ops" => Some(total),
            _ => None,
        }
    }

    /// An event the agent itself makes (policy changes, anomalies): stamped
    /// now, with the agent as the process, and every flow field null.
    pub fn from_agent(kind: EventType, hook: &'static str) -> Self {
        let ktime_ns = monotonic_ns();
        Self {
            schema: Cow::Borrowed(SCHEMA),
            kind,
            time: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            host: Cow::Borrowed(super::host::name()),
            ktime_ns,
            service: None,
            mode: None,
            cgroup_id: 0,
            pid: std::process::id(),
            tid: std::process::id(),
            // SAFETY: plain syscalls without arguments.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            comm: "bulkhead".to_string(),
            exe: None,
            exe_file: None,
            traffic_direction: None,
            hook: Cow::Borrowed(hook),
            protocol: None,
            src_ip: None,
            src_port: None,
            dst_ip: None,
            dst_port: None,
            dst_name: None,
            verdict: None,
            rule: None,
            suppressed: None,
            calls: None,
            socket_cookie: 0,
            bytes_sent: None,
            bytes_received: None,
            duration_ns: None,
            change: None,
            anomaly: None,
            bytes_base: None,
            bytes_unsummarised: None,
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the kernel's `bpf_ktime_get_ns`
/// clock, which `ktime_ns` uses.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// An audit record of a change to what is enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// load, reload, quarantine, release.
    pub action: String,
    /// applied or refused.
    pub result: String,
    /// startup, sighup, inotify, control.
    pub trigger: String,
    pub files: Vec<FileChange>,
    pub services: Vec<ServiceChange>,
    /// Why a change was refused.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// SHA-256 of the content before and after (null: absent).
    pub sha256_before: Option<String>,
    pub sha256_after: Option<String>,
    pub owner_uid: Option<u32>,
    /// Octal permission bits, like "0644".
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    pub service: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// What an anomaly detector saw (docs/anomaly.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyRecord {
    /// rate_spike, new_destination, fan_out, deny_burst, volume_spike.
    pub kind: String,
    /// low, medium or high.
    pub severity: String,
    /// "started" for the first event of a group, "ongoing" for its updates.
    pub state: String,
    pub evidence: Evidence,
    /// RFC 3339, UTC: when this group of anomalies started and was last seen.
    pub first_seen: String,
    pub last_seen: String,
    /// Intervals in which the detector fired since `first_seen`.
    pub count: u64,
}

/// The numbers behind an anomaly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// What the detector expected per window (EWMA, threshold or 0).
    pub baseline: f64,
    /// What it saw in the window.
    pub observed: f64,
    /// The window, in seconds.
    pub window_s: u64,
    /// A few of the destinations involved, like "192.0.2.10:443/tcp".
    pub sample_destinations: Vec<String>,
}

// Baselines are finite numbers (never NaN), so equality is an equivalence.
impl Eq for Evidence {}

/// A denied connect of `billing` to 192.0.2.9:5432, for unit tests.
#[cfg(test)]
pub(crate) fn sample_verdict() -> FlowEvent {
    FlowEvent {
        schema: SCHEMA.into(),
        kind: EventType::Verdict,
        time: "2026-05-20T09:08:07.123456789Z".to_string(),
        host: "web-1".into(),
        ktime_ns: 1,
        service: Some("billing".into()),
        mode: Some("enforce".into()),
        cgroup_id: 7,
        pid: 42,
        tid: 43,
        uid: 0,
        gid: 0,
        comm: "curl".to_string(),
        exe: Some("/usr/bin/curl".into()),
        exe_file: None,
        traffic_direction: Some(Direction::Egress),
        hook: "connect".into(),
        protocol: Some("tcp".into()),
        src_ip: None,
        src_port: None,
        dst_ip: Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 9))),
        dst_port: Some(5432),
        dst_name: None,
        verdict: Some(Verdict::Deny),
        rule: Some("billing.toml#default-deny".into()),
        suppressed: Some(0),
        calls: Some(1),
        socket_cookie: 9,
        bytes_sent: None,
        bytes_received: None,
        duration_ns: None,
        change: None,
        anomaly: None,
        bytes_base: None,
        bytes_unsummarised: None,
    }
}
