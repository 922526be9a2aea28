//! [`MetricsState`] -> metric families, read fresh on every scrape, and the
//! two text encodings a scraper can ask for.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use agent_common::{
    counter_slot, DIRECTION_EGRESS, DIRECTION_INGRESS, LOST_INGRESS, LOST_TCP, LOST_VERDICT,
    PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};
use tracing::warn;

use super::{
    process::ProcessStats,
    state::{Inventory, MetricsState},
};
use crate::events::{Direction, EventType};

mod dns;
mod fleet;
mod flows;

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, which Prometheus asks for by default.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (curl, older scrapers).
    Prometheus,
}

impl Format {
    /// OpenMetrics when the `Accept` header offers it, else classic text.
    #[must_use]
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    #[must_use]
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// A registry whose one collector reads `state` at each scrape.
#[must_use]
pub fn registry(state: Arc<MetricsState>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StateCollector(state)));
    registry
}

/// One scrape of `registry`, encoded as `format`.
///
/// # Errors
/// Only if a collector fails to encode (never, for ours).
pub fn render(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
        }
    }
    Ok(out)
}

const DIRECTIONS: [(u8, &str); 2] = [(DIRECTION_EGRESS, "egress"), (DIRECTION_INGRESS, "ingress")];
/// The kernel counts TCP, and everything else under the second slot (UDP;
/// ICMP datagram sockets also pass the connect hook): see `counter_slot`.
const PROTOCOLS: [(u8, &str); 2] = [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp")];
const VERDICTS: [(u8, &str); 3] = [
    (VERDICT_ALLOW, "allow"),
    (VERDICT_DENY, "deny"),
    (VERDICT_AUDIT, "audit"),
];
/// Every event type, in `EventStats::received` order.
const EVENT_TYPES: [EventType; 6] = [
    EventType::Verdict,
    EventType::TcpEstablished,
    EventType::TcpClosed,
    EventType::PolicyChange,
    EventType::Anomaly,
    EventType::Flow,
];

/// The `type` label: the event's `type` field in the decision log.
fn type_label(kind: EventType) -> &'static str {
    // Exhaustive on purpose: a new event type does not compile until it
    // has a label (and a place in EVENT_TYPES, checked by a test).
    match kind {
        EventType::Verdict => "verdict",
        EventType::TcpEstablished => "tcp_established",
        EventType::TcpClosed => "tcp_closed",
        EventType::PolicyChange => "policy_change",
        EventType::Anomaly => "anomaly",
        EventType::Flow => "flow",
    }
}

struct StateCollector(Arc<MetricsState>);

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StateCollector").finish_non_exhaustive()
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = &self.0;
        // One inventory for the whole scrape, even if a reload swaps it now.
        let inventory = state.inventory();
        build_info(&mut enc)?;
        connections(&mut enc, state, &inventory)?;
        events(&mut enc, state)?;
        policy(&mut enc, &inventory)?;
        reloads(&mut enc, state)?;
        graph(&mut enc, state)?;
        anomalies(&mut enc, state)?;
        export(&mut enc, state)?;
        flows::encode(&mut enc, &state.flows)?;
        fleet::encode(&mut enc, &state.fleet)?;
        if let Some(observed) = state.dns().and_then(|d| d.observed()) {
            dns::encode(&mut enc, &observed)?;
        }
        http(&mut enc, state)?;
        health(&mut enc, state)?;
        state_files(&mut enc)?;
        match ProcessStats::read() {
            Ok(p) => process(&mut enc, &p)?,
            Err(e) => read_failed("/proc/self/stat", &e),
        }
        Ok(())
    }
}

fn build_info(enc: &mut DescriptorEncoder) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "bulkhead_build",
        "Version of the running bulkhead; always 1.",
        None,
        MetricType::Info,
    )?;
    m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])
}

fn connections(
    enc: &mut DescriptorEncoder,
    state: &MetricsState,
    inventory: &Inventory,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "bulkhead_connections",
        "Connection attempts (TCP connect, UDP connect/sendmsg) judged, by service, direction, protocol and verdict; counted in the kernel, exact even when events are lost.",
        None,
        MetricType::Counter,
    )?;
    for service in &inventory.services {
        let counts = match state.service_counts(&service.name) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                read_failed(agent_common::maps::COUNTERS, &e);
                continue;
            }
            None => continue,
        };
        for (direction, d) in DIRECTIONS {
            for (protocol, p) in PROTOCOLS {
                for (verdict, v) in VERDICTS {
                    let slot = counter_slot(direction, protocol, verdict) as usize;
                    let Some(&value) = counts.get(slot) else {
                        continue;
                    };
                    let labels = [
                        ("service", service.name.as_str()),
                        ("direction", d),
                        ("protocol", p),
                        ("verdict", v),
                    ];
                    ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
                }
            }
        }
    }
    Ok(())
}

fn events(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    let stats = state.stats();
    let received = EVENT_TYPES.map(|kind| ([("type", type_label(kind))], stats.received(kind)));
    counters(
        enc,
        "bulkhead_events_received",
        "Events received, by type: decoded from the kernel ring buffer, or made by the daemon (policy_change).",
        received,
    )?;

    let kernel = [
        ("kernel_ringbuf_verdict", LOST_VERDICT),
        ("kernel_ringbuf_tcp", LOST_TCP),
        ("kernel_ringbuf_ingress", LOST_INGRESS),
    ]
    .into_iter()
    .filter_map(|(source, slot)| match state.counters().lost(slot) {
        Ok(n) => Some(([("source", source)], n)),
        Err(e) => {
            read_failed("LOST", &e);
            None
        }
    });
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let userspace = [
        ([("source", "decode")], load(&stats.decode_errors)),
        ([("source", "sink")], load(&stats.sink_errors)),
        ([("source", "subscriber")], load(&stats.subscriber_lagged)),
        (
            [("source", "while_agent_down")],
            load(&stats.lost_while_down),
        ),
        (
            [("source", "takeover_drain")],
            load(&stats.lost_takeover_drain),
        ),
    ];
    counters(
        enc,
        "bulkhead_events_lost",
        "Events lost, by where: kernel_ringbuf_* = dropped in the kernel (ring buffer full), decode = undecodable record; sink = not written to the decision log, subscriber = missed by a slow live subscriber (both also counted as received), while_agent_down = dropped by the pinned programs while no agent read their ring buffer, takeover_drain = left in a previous agent's ring buffer when the take-over's bounded drain stopped.",
        kernel.chain(userspace),
    )?;
    let suppressed = stats.suppressed();
    counters(
        enc,
        "bulkhead_events_suppressed",
        "Denial events not logged because the kernel's per-service rate limit (100 a second per direction and CPU) held them back, by service and direction: the sum of the `suppressed` counts the logged events carry. bulkhead_connections_total still counts every decision.",
        suppressed.iter().map(|(service, direction, n)| {
            let direction = match direction {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            };
            ([("service", &**service), ("direction", direction)], *n)
        }),
    )?;
    one(
        enc,
        "bulkhead_decision_log_queued_batches",
        "Batches of encoded events waiting for the decision log writer; at the bound (16) the ring buffer reader waits for it.",
        None,
        &ConstGauge::new(load(&stats.log_queued)),
    )?;
    one(
        enc,
        "bulkhead_decision_log_written",
        "Bytes written to the decision log.",
        Some(&Unit::Bytes),
        &ConstCounter::new(load(&stats.log_written_bytes)),
    )
}

/// What `ServiceMeta::state` can be, in the order the metrics list them.
const SERVICE_STATES: [&str; 3] = ["managed", "waiting", "unenforced"];

fn policy(enc: &mut DescriptorEncoder, inventory: &Inventory) -> fmt::Result {
    let in_state = |state: &str| {
        inventory
            .services
            .iter()
            .filter(|s| s.state == state)
            .count()
    };
    gauges(
        enc,
        "bulkhead_services",
        "Services in the loaded policy: managed (cgroups found, enforced), waiting (no cgroup found yet) or unenforced (a cgroup found that the kernel could not be told about; retried).",
        None,
        SERVICE_STATES.map(|state| ([("state", state)], count(in_state(state)))),
    )?;
    {
        // No label that changes while the service runs: a series whose
        // labels flip is a new series, which breaks rate(), joins and
        // alert `for:` clauses. The state is its own gauge below.
        let mut m = enc.encode_descriptor(
            "bulkhead_service",
            "One series per service of the loaded policy, with its mode (changed only by a reload that changes it); always 1.",
            None,
            MetricType::Info,
        )?;
        for s in &inventory.services {
            m.encode_info(&[("service", s.name.as_str()), ("mode", s.mode.as_str())])?;
        }
    }
    gauges(
        enc,
        "bulkhead_service_state",
        "1 for the state each service is in, 0 for the others: managed, waiting (no cgroup found yet) or unenforced (a cgroup the kernel could not be told about; retried). Every service has all three series.",
        None,
        inventory.services.iter().flat_map(|s| {
            SERVICE_STATES.map(|state| {
                (
                    [("service", s.name.as_str()), ("state", state)],
                    u64::from(s.state == state),
                )
            })
        }),
    )?;
    gauges(
        enc,
        "bulkhead_service_quarantined",
        "1 while the service is quarantined (bulkhead quarantine), else 0; one series per service of the loaded policy.",
        None,
        inventory.services.iter().map(|s| {
            let on = inventory.quarantined.contains(&s.name);
            ([("service", s.name.as_str())], u64::from(on))
        }),
    )?;
    gauges(
        enc,
        "bulkhead_policy_rules",
        "Rules (egress and ingress) in each service's policy.",
        None,
        inventory
            .services
            .iter()
            .map(|s| ([("service", s.name.as_str())], count(s.rules))),
    )?;
    gauges(
        enc,
        "bulkhead_bpf_map_entries",
        "Entries in each policy map of the kernel.",
        None,
        inventory
            .maps
            .iter()
            .map(|m| ([("map", m.name)], m.entries)),
    )?;
    gauges(
        enc,
        "bulkhead_bpf_map_capacity",
        "Capacity (max_entries) of each policy map of the kernel.",
        None,
        inventory
            .maps
            .iter()
            .map(|m| ([("map", m.name)], m.capacity)),
    )
}

fn graph(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    let Some(shared) = state.graph() else {
        return Ok(());
    };
    let (edges, listeners, evictions) = {
        let g = shared.graph();
        (g.edges.len(), g.listeners.len(), g.evictions)
    };
    one(
        enc,
        "bulkhead_graph_evictions",
        "Service graph edges and listeners dropped, least recently seen first, to keep the graph within its caps.",
        None,
        &ConstCounter::new(evictions),
    )?;
    gauges(
        enc,
        "bulkhead_graph_entries",
        "Entries in the service graph, by kind (edge, listener).",
        None,
        [
            ([("kind", "edge")], count(edges)),
            ([("kind", "listener")], count(listeners)),
        ],
    )
}

fn anomalies(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    let Some(stats) = state.anomalies() else {
        return Ok(());
    };
    let totals = stats.totals();
    counters(
        enc,
        "bulkhead_anomalies",
        "Anomaly events (starts and updates of grouped anomalies), by service, detector kind and severity.",
        totals.iter().map(|(service, kind, severity, n)| {
            (
                [
                    ("service", service.as_str()),
                    ("kind", *kind),
                    ("severity", *severity),
                ],
                *n,
            )
        }),
    )
}

fn export(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    use crate::export::ExportStats;
    let Some(stats) = state.export() else {
        return Ok(());
    };
    counters(
        enc,
        "bulkhead_export_sent",
        "Events the OTLP collector accepted.",
        [([("exporter", "otlp")], ExportStats::get(&stats.sent))],
    )?;
    counters(
        enc,
        "bulkhead_export_dropped",
        "Events not exported, by reason: queue_full (the collector slow or down), retries_exhausted, rejected (4xx).",
        [
            ("queue_full", &stats.dropped_queue_full),
            ("retries_exhausted", &stats.dropped_retries),
            ("rejected", &stats.dropped_rejected),
        ]
        .map(|(reason, v)| ([("reason", reason)], ExportStats::get(v))),
    )?;
    counters(
        enc,
        "bulkhead_export_failed_requests",
        "OTLP requests that failed (each retry counts).",
        [(
            [("exporter", "otlp")],
            ExportStats::get(&stats.failed_requests),
        )],
    )
}

/// The metrics listener itself (listener.rs, host.rs, graph_cache.rs).
fn http(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    use super::http_stats::HttpStats;
    let h = &state.http;
    one(
        enc,
        "bulkhead_http_connections",
        "Connections the metrics listener serves now.",
        None,
        &ConstGauge::new(HttpStats::get(&h.open)),
    )?;
    counters(
        enc,
        "bulkhead_http_refused",
        "Connections and requests the metrics listener refused, by reason: busy (connection cap reached; closed at once), host (Host header not allowed; 421).",
        [("busy", &h.refused_busy), ("host", &h.refused_host)]
            .map(|(reason, v)| ([("reason", reason)], HttpStats::get(v))),
    )?;
    one(
        enc,
        "bulkhead_http_graph_renders",
        "Renderings of the service graph for /graph and /graph.json; requests within a second of one are served from it.",
        None,
        &ConstCounter::new(HttpStats::get(&h.graph_renders)),
    )
}

fn health(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    let flag = |on: bool| u64::from(on);
    one(
        enc,
        "bulkhead_programs_attached",
        "1 while the kernel programs are attached (enforcing), else 0.",
        None,
        &ConstGauge::new(flag(state.attached())),
    )?;
    gauges(
        enc,
        "bulkhead_kernel_feature",
        "1 when the optional kernel part is active on this host, 0 when the kernel lacks it (the agent says why at start and in `status`).",
        None,
        state
            .features()
            .iter()
            .map(|&(feature, active)| ([("feature", feature)], flag(active))),
    )?;
    one(
        enc,
        "bulkhead_event_consumer_alive",
        "1 while the ring buffer consumer runs, else 0.",
        None,
        &ConstGauge::new(flag(state.stats().consumer_alive.load(Ordering::Relaxed))),
    )
}

fn process(enc: &mut DescriptorEncoder, p: &ProcessStats) -> fmt::Result {
    one(
        enc,
        "process_cpu",
        "Total user and system CPU time spent.",
        Some(&Unit::Seconds),
        &ConstCounter::new(p.cpu_seconds),
    )?;
    one(
        enc,
        "process_resident_memory",
        "Resident memory size.",
        Some(&Unit::Bytes),
        &ConstGauge::new(p.resident_bytes),
    )?;
    one(
        enc,
        "process_virtual_memory",
        "Virtual memory size.",
        Some(&Unit::Bytes),
        &ConstGauge::new(p.virtual_bytes),
    )?;
    if let Some(start) = p.start_time_seconds {
        one(
            enc,
            "process_start_time",
            "Start time of the process since the Unix epoch.",
            Some(&Unit::Seconds),
            &ConstGauge::new(start),
        )?;
    }
    if let Some(open) = p.open_fds {
        one(
            enc,
            "process_open_fds",
            "Open file descriptors.",
            None,
            &ConstGauge::new(open),
        )?;
    }
    if let Some(max) = p.max_fds {
        one(
            enc,
            "process_max_fds",
            "Limit on open file descriptors.",
            None,
            &ConstGauge::new(max),
        )?;
    }
    Ok(())
}

fn reloads(enc: &mut DescriptorEncoder, state: &MetricsState) -> fmt::Result {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    counters(
        enc,
        "bulkhead_policy_reloads",
        "Policy reloads (SIGHUP, bulkhead reload or a change in the policy directory), by result: success = applied, failure = refused, the policy in force unchanged.",
        [
            ([("result", "success")], load(&state.reloads.success)),
            ([("result", "failure")], load(&state.reloads.failure)),
        ],
    )?;
    one(
        enc,
        "bulkhead_policy_last_reload_successful",
        "1 if the last policy load or reload was applied, 0 if it was refused (the policy in force is then the one loaded before).",
        None,
        &ConstGauge::new(u64::from(state.reloads.last_successful())),
    )?;
    one(
        enc,
        // The unit adds `_seconds`, as for process_start_time_seconds.
        "bulkhead_policy_last_reload_success_timestamp",
        "Unix time of the last policy applied: the load at start or a reload.",
        Some(&Unit::Seconds),
        &ConstGauge::new(load(&state.reloads.last_success_unix)),
    )?;
    let held = &state.held;
    one(
        enc,
        "bulkhead_held_sockets",
        "Sockets judged by the managed service that holds them though another cgroup created them (socket activation, inheritance, SCM_RIGHTS), as of the last scan.",
        None,
        &ConstGauge::new(load(&held.sockets)),
    )?;
    one(
        enc,
        "bulkhead_held_sockets_unseen",
        "Of bulkhead_held_sockets, those the kernel's socket list did not show at the last scan (closed, or closed to the network and unbound: kept, since such a socket may listen again).",
        None,
        &ConstGauge::new(load(&held.unseen)),
    )?;
    counters(
        enc,
        "bulkhead_held_socket_scan_errors",
        "Problems of the scan for held sockets, by kind: unreadable = a process of a managed service whose descriptors could not be read, or a scan that could not list the kernel's sockets (a socket it would have found is judged by its creator's policy); overflow = a held socket that did not fit (the service's share of 1024 or the kernel map), counted once.",
        [
            ([("kind", "unreadable")], load(&held.scan_errors)),
            ([("kind", "overflow")], load(&held.overflow)),
        ],
    )?;
    drift(enc, &state.drift)?;
    let pinholes = &state.udp_peers;
    one(
        enc,
        "bulkhead_udp_pinholes",
        "UDP pinholes of ingress-restricted services open after the last sweep (answers to what a service sent, answers to peers a rule let in).",
        None,
        &ConstGauge::new(load(&pinholes.open)),
    )?;
    counters(
        enc,
        "bulkhead_udp_pinholes_closed",
        "UDP pinholes closed, by reason: idle = unused for udp_replies.idle_timeout_secs, policy = a reload no longer allows the peer.",
        [
            ([("reason", "idle")], load(&pinholes.closed_idle)),
            ([("reason", "policy")], load(&pinholes.closed_policy)),
        ],
    )
}

fn drift(enc: &mut DescriptorEncoder, drift: &crate::selfcheck::DriftStats) -> fmt::Result {
    use crate::kernel::drift::Kind;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    gauges(
        enc,
        "bulkhead_enforcement_drift",
        "Differences between the kernel maps and the policy in force left after the last self-check and its repair, by kind (0 everywhere when the kernel enforces exactly the policy).",
        None,
        Kind::ALL
            .iter()
            .zip(&drift.current)
            .map(|(k, n)| ([("kind", k.as_str())], load(n))),
    )?;
    counters(
        enc,
        "bulkhead_enforcement_drift_found",
        "Differences the self-check found since start, by kind, before repairing them.",
        Kind::ALL
            .iter()
            .zip(&drift.found)
            .map(|(k, n)| ([("kind", k.as_str())], load(n))),
    )?;
    counters(
        enc,
        "bulkhead_self_checks",
        "Self-checks run, by result: ok = the maps were read (drift or not), error = a map could not be read.",
        [
            ([("result", "ok")], load(&drift.checks)),
            ([("result", "error")], load(&drift.check_errors)),
        ],
    )?;
    counters(
        enc,
        "bulkhead_enforcement_drift_repairs",
        "Repairs of drift (the policy in force written again and switched to), by result.",
        [
            ([("result", "success")], load(&drift.repairs)),
            ([("result", "failure")], load(&drift.repair_failures)),
        ],
    )?;
    one(
        enc,
        "bulkhead_self_check_duration_seconds",
        "How long the last self-check took to read and compare the maps.",
        None,
        &ConstGauge::new(load(&drift.last_micros) as f64 / 1e6),
    )
}

/// Damaged state files found since start (see `state_file`).
fn state_files(enc: &mut DescriptorEncoder) -> fmt::Result {
    let counts = crate::state_file::error_counts();
    counters(
        enc,
        "bulkhead_state_file_errors",
        "State files found damaged (unparsable, a link, not a regular file, not root's, writable by others), by file; each was set aside as FILE.corrupt-<unix seconds> and the agent went on.",
        counts.iter().map(|(f, n)| ([("file", f.as_str())], *n)),
    )
}

/// One unlabelled sample with its descriptor.
fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A source that cannot be read is left out of the scrape and logged (the
/// first time, then at powers of two, so a broken map cannot flood the log).
fn read_failed(what: &str, e: &dyn std::error::Error) {
    static FAILURES: AtomicU64 = AtomicU64::new(0);
    let n = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!("metrics: cannot read {what}; its series are left out ({n} failures so far): {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        anomaly::Severity,
        metrics::fake::{fake_state, fake_state_with_every_source, meta},
        policy::Mode,
    };

    fn scrape(format: Format) -> String {
        render(&registry(fake_state()), format).expect("encodes")
    }

    /// The sample lines (no comments) of a scrape.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    /// docs/metrics.md lists every metric the agent serves, and nothing it
    /// does not, each with the type it is served as: a metric added without
    /// its row, a row left for a metric gone, or a row whose type is wrong
    /// fails here.
    #[test]
    fn docs_list_exactly_the_metrics_served_with_their_types() {
        let text = render(
            &registry(fake_state_with_every_source()),
            Format::Prometheus,
        )
        .expect("encodes");
        // Counters' TYPE lines carry the `_total` of their samples; info
        // metrics are gauges in this format.
        let served: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| {
                let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect();
        let documented = documented_metrics(DOCS);
        let undocumented: Vec<_> = served
            .keys()
            .filter(|m| !documented.contains_key(*m))
            .collect();
        let gone: Vec<_> = documented
            .keys()
            .filter(|m| !served.contains_key(*m))
            .collect();
        assert!(
            undocumented.is_empty() && gone.is_empty(),
            "served but not in docs/metrics.md: {undocumented:?}; in the docs but not served: {gone:?}"
        );
        let wrong: Vec<_> = served
            .iter()
            .filter(|(name, kind)| documented.get(*name) != Some(kind))
            .map(|(name, kind)| {
                format!(
                    "{name}: served as {kind}, documented as {:?}",
                    documented[name]
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "docs/metrics.md has the wrong type: {wrong:?}"
        );
    }

    /// The label values docs/metrics.md lists name every value the agent
    /// serves: every event `type` (a new event kind without its row fails)
    /// and every anomaly `severity`.
    #[test]
    fn docs_list_every_event_type_and_severity() {
        let row = |label: &str| {
            let start = format!("| `{label}` |");
            DOCS.lines()
                .find(|l| l.starts_with(&start))
                .unwrap_or_else(|| panic!("docs/metrics.md has no label row for `{label}`"))
        };
        let types = row("type");
        for kind in EVENT_TYPES {
            let value = format!("`{}`", type_label(kind));
            assert!(
                types.contains(&value),
                "the `type` row lacks {value}: {types}"
            );
        }
        let severities = row("severity");
        for severity in [Severity::Low, Severity::Medium, Severity::High] {
            let value = format!("`{}`", severity.as_str());
            assert!(
                severities.contains(&value),
                "the `severity` row lacks {value}: {severities}"
            );
        }
    }

    /// A test of the checks above: a docs text without a metric's row, or
    /// with a wrong type, reads as such.
    #[test]
    fn documented_metrics_reads_names_and_types() {
        let docs = "| `bulkhead_a_total` | counter | `x` | a |\n| `bulkhead_b` | gauge (info) | | b |\n| `other` | gauge | | c |\n";
        let found = documented_metrics(docs);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                ("bulkhead_a_total".to_owned(), "counter".to_owned()),
                ("bulkhead_b".to_owned(), "gauge".to_owned()),
            ]
        );
    }

    const DOCS: &str = include_str!("../../../docs/metrics.md");

    /// The metric rows of `docs`: name -> its type's first word.
    fn documented_metrics(docs: &str) -> BTreeMap<String, String> {
        docs.lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| `")?.split(" | ");
                let name = cells.next()?.strip_suffix('`')?;
                let kind = cells.next()?.split_whitespace().next()?;
                (name.starts_with("bulkhead_") || name.starts_with("process_"))
                    .then(|| (name.to_owned(), kind.to_owned()))
            })
            .collect()
    }

    /// The DNS proxy's series: lookups by service and result (an unknown
    /// client under the empty service), learnt addresses by service,
    /// evictions by service and reason, the added-latency histogram; none without a
    /// proxy.
    #[test]
    fn dns_lookups_by_service_and_result_learnt_evictions_and_added_latency() {
        let text = render(
            &registry(fake_state_with_every_source()),
            Format::Prometheus,
        )
        .expect("encodes");
        let lines = samples(&text);
        for expected in [
            r#"bulkhead_dns_lookups_total{service="billing",result="answered"} 2"#,
            r#"bulkhead_dns_lookups_total{service="billing",result="truncated"} 1"#,
            r#"bulkhead_dns_lookups_total{service="",result="refused"} 2"#,
            r#"bulkhead_dns_learnt_addresses{service="billing"} 2"#,
            r#"bulkhead_dns_learnt_addresses{service="search"} 0"#,
            r#"bulkhead_dns_learnt_evictions_total{service="billing",reason="per_name_cap"} 4"#,
            r#"bulkhead_dns_learnt_evictions_total{service="search",reason="per_name_cap"} 0"#,
            r#"bulkhead_dns_learnt_evictions_total{service="billing",reason="full"} 0"#,
            r#"bulkhead_dns_learnt_evictions_total{service="search",reason="full"} 1"#,
            r#"bulkhead_dns_learnt_evictions_total{service="billing",reason="per_name_in_use"} 7"#,
            "bulkhead_dns_learnt_expired_total 5",
            "bulkhead_dns_learn_errors_total 6",
            "bulkhead_dns_sweep_age_seconds 0.5",
            "bulkhead_dns_proxy_added_seconds_count 2",
            r#"bulkhead_dns_proxy_added_seconds_bucket{le="0.0001"} 1"#,
            r#"bulkhead_dns_proxy_added_seconds_bucket{le="0.0032"} 2"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected}:\n{text}");
        }
        assert!(
            !scrape(Format::Prometheus).contains("bulkhead_dns_"),
            "no proxy, no DNS series"
        );
    }

    #[test]
    fn anomalies_by_service_kind_and_severity() {
        let state = fake_state_with_every_source();
        let stats = state.anomalies().expect("the anomaly source is on");
        stats.count("billing", "fan_out", "high");
        stats.count("billing", "fan_out", "high");
        stats.count("billing", "deny_burst", "low");
        let text = render(&registry(Arc::clone(&state)), Format::Prometheus).expect("encodes");
        let lines = samples(&text);
        for expected in [
            r#"bulkhead_anomalies_total{service="billing",kind="fan_out",severity="high"} 2"#,
            r#"bulkhead_anomalies_total{service="billing",kind="deny_burst",severity="low"} 1"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected} in\n{text}");
        }
    }

    #[test]
    fn last_reload_gauges_follow_applied_and_refused_reloads() {
        let state = fake_state();
        let gauges = |state: &Arc<MetricsState>| {
            let text = render(&registry(Arc::clone(state)), Format::Prometheus).expect("encodes");
            let value = |name: &str| {
                samples(&text)
                    .iter()
                    .find_map(|l| l.strip_prefix(&format!("{name} ")))
                    .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"))
            };
            (
                value("bulkhead_policy_last_reload_successful"),
                value("bulkhead_policy_last_reload_success_timestamp_seconds"),
            )
        };
        // Before the start-up load is in force: no time yet, nothing refused.
        assert_eq!(gauges(&state), (1, 0));
        state.reloads.record_load();
        let (ok, loaded_at) = gauges(&state);
        assert_eq!(ok, 1);
        assert!(loaded_at > 1_700_000_000, "{loaded_at}");
        state.reloads.record(&Err("x.toml:1:1: bad".to_string()));
        assert_eq!(gauges(&state), (0, loaded_at), "a refusal keeps the time");
        state.reloads.record(&Ok(()));
        let (ok, applied_at) = gauges(&state);
        assert_eq!(ok, 1);
        assert!(applied_at >= loaded_at, "{applied_at} < {loaded_at}");
    }

    #[test]
    fn connections_by_service_direction_protocol_verdict() {
        let text = scrape(Format::Prometheus);
        let lines = samples(&text);
        for expected in [
            r#"bulkhead_connections_total{service="billing",direction="egress",protocol="tcp",verdict="allow"} 7"#,
            r#"bulkhead_connections_total{service="billing",direction="egress",protocol="tcp",verdict="deny"} 3"#,
            r#"bulkhead_connections_total{service="billing",direction="egress",protocol="udp",verdict="deny"} 2"#,
            r#"bulkhead_connections_total{service="billing",direction="ingress",protocol="tcp",verdict="allow"} 0"#,
            r#"bulkhead_connections_total{service="search",direction="egress",protocol="udp",verdict="audit"} 5"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected} in\n{text}");
        }
        let per_service = |name: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.starts_with(&format!("bulkhead_connections_total{{service=\"{name}\""))
                })
                .count()
        };
        // Every combination is present from the start (rate() needs a zero).
        assert_eq!(per_service("billing"), 12, "{text}");
        assert_eq!(per_service("search"), 12, "{text}");
        assert_eq!(
            per_service("late"),
            0,
            "unreadable counters are left out:\n{text}"
        );
    }

    #[test]
    fn events_received_and_lost_by_source() {
        let text = scrape(Format::Prometheus);
        let lines = samples(&text);
        for expected in [
            r#"bulkhead_events_received_total{type="verdict"} 17"#,
            r#"bulkhead_events_received_total{type="tcp_established"} 0"#,
            r#"bulkhead_events_received_total{type="tcp_closed"} 6"#,
            r#"bulkhead_events_received_total{type="policy_change"} 0"#,
            r#"bulkhead_events_lost_total{source="kernel_ringbuf_verdict"} 11"#,
            r#"bulkhead_events_lost_total{source="kernel_ringbuf_tcp"} 4"#,
            r#"bulkhead_events_lost_total{source="kernel_ringbuf_ingress"} 2"#,
            r#"bulkhead_events_lost_total{source="decode"} 1"#,
            r#"bulkhead_events_lost_total{source="sink"} 0"#,
            r#"bulkhead_events_lost_total{source="subscriber"} 0"#,
            r#"bulkhead_events_lost_total{source="while_agent_down"} 0"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected} in\n{text}");
        }
    }

    #[test]
    fn every_event_type_has_its_decision_log_name() {
        assert_eq!(
            EVENT_TYPES.len(),
            crate::events::EventStats::default().received.len()
        );
        for (i, kind) in EVENT_TYPES.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "EVENT_TYPES is in EventStats order");
            let serde = serde_json::to_value(kind).expect("serializes");
            assert_eq!(serde.as_str(), Some(type_label(kind)));
        }
    }

    #[test]
    fn policy_inventory_and_health() {
        let text = scrape(Format::Prometheus);
        let lines = samples(&text);
        for expected in [
            r#"bulkhead_services{state="managed"} 2"#,
            r#"bulkhead_services{state="waiting"} 1"#,
            r#"bulkhead_service_info{service="search",mode="audit"} 1"#,
            r#"bulkhead_service_info{service="late",mode="enforce"} 1"#,
            r#"bulkhead_service_state{service="search",state="managed"} 1"#,
            r#"bulkhead_service_state{service="search",state="waiting"} 0"#,
            r#"bulkhead_service_state{service="search",state="unenforced"} 0"#,
            r#"bulkhead_service_state{service="late",state="waiting"} 1"#,
            r#"bulkhead_service_state{service="late",state="managed"} 0"#,
            r#"bulkhead_policy_rules{service="billing"} 4"#,
            r#"bulkhead_service_quarantined{service="billing"} 0"#,
            r#"bulkhead_service_quarantined{service="search"} 1"#,
            r#"bulkhead_bpf_map_entries{map="EGRESS_V4"} 3"#,
            r#"bulkhead_bpf_map_capacity{map="EGRESS_V4"} 1024"#,
            "bulkhead_programs_attached 1",
            "bulkhead_event_consumer_alive 1",
            "bulkhead_decision_log_queued_batches 2",
            "bulkhead_decision_log_written_bytes_total 4096",
            concat!(
                r#"bulkhead_build_info{version=""#,
                env!("CARGO_PKG_VERSION"),
                r#""} 1"#
            ),
        ] {
            assert!(lines.contains(&expected), "missing {expected} in\n{text}");
        }
    }

    #[test]
    fn process_metrics_use_the_standard_names() {
        let text = scrape(Format::Prometheus);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            assert!(
                samples(&text).iter().any(|l| l.starts_with(name)),
                "missing {name} in\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_has_types_units_and_eof() {
        let text = scrape(Format::OpenMetrics);
        assert!(
            text.contains("# TYPE bulkhead_connections counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE bulkhead_build info\n"), "{text}");
        assert!(
            text.contains("# UNIT process_resident_memory_bytes bytes\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"bulkhead_events_lost_total{source="kernel_ringbuf_verdict"} 11"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn negotiation_prefers_openmetrics_only_when_offered() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert!(Format::Prometheus
            .content_type()
            .starts_with("text/plain; version=0.0.4"));
    }

    #[test]
    fn health_needs_attached_programs_and_a_live_consumer() {
        let state = fake_state();
        assert_eq!(state.health(), Ok(()));
        state.stats().consumer_alive.store(false, Ordering::Relaxed);
        assert_eq!(state.health(), Err("event consumer stopped"));
        state.set_attached(false);
        assert_eq!(state.health(), Err("programs not attached"));
    }

    #[test]
    fn a_reload_swaps_the_service_list() {
        let state = fake_state();
        state.replace_inventory(Inventory {
            services: vec![meta(0, "renamed", Mode::Enforce, 9, true)],
            maps: Vec::new(),
            ..Inventory::default()
        });
        let text = render(&registry(state), Format::Prometheus).expect("encodes");
        assert!(
            text.contains(r#"bulkhead_policy_rules{service="renamed"} 9"#),
            "{text}"
        );
        assert!(!text.contains(r#"service="billing""#), "{text}");
    }
}
