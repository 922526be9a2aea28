//! The flow sweeper's metrics (crate::flows).

use std::{fmt, sync::atomic::Ordering};

use prometheus_client::{
    encoding::DescriptorEncoder,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::{counters, one};
use crate::flows::FlowStats;

pub fn encode(enc: &mut DescriptorEncoder, stats: &FlowStats) -> fmt::Result {
    let get = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    one(
        enc,
        "bulkhead_flows_active",
        "Flows in the kernel's flow table after the last sweep (both epochs).",
        None,
        &ConstGauge::new(get(&stats.active)),
    )?;
    one(
        enc,
        "bulkhead_flow_table_capacity",
        "Flows the kernel's flow table holds at most ([flows] table_size).",
        None,
        &ConstGauge::new(get(&stats.capacity)),
    )?;
    one(
        enc,
        "bulkhead_flow_summaries",
        "`flow` events sent: calls of a flow since its previous record.",
        None,
        &ConstCounter::new(get(&stats.summaries)),
    )?;
    counters(
        enc,
        "bulkhead_flows_ended",
        "Flows ended, by reason: idle (no call for [flows] idle_timeout_secs), policy (their policy was replaced), evicted (let go to keep room in the table; their calls were all reported). The next call of an ended flow starts a new one, with a record.",
        [
            ("idle", &stats.ended_idle),
            ("policy", &stats.ended_policy),
            ("evicted", &stats.evicted),
        ]
        .map(|(reason, v)| ([("reason", reason)], get(v))),
    )?;
    one(
        enc,
        "bulkhead_flow_table_full",
        "New flows that found the kernel's flow table full: each of their calls was reported by a record of its own (nothing lost). Raise [flows] table_size if this grows.",
        None,
        &ConstCounter::new(get(&stats.table_full)),
    )?;
    one(
        enc,
        "bulkhead_tcp_table_full",
        "Outbound TCP connections of managed services whose owner found the kernel's table of them full: kept in socket storage instead, reported all the same (nothing lost), at a slower connect(). Raise [flows] tcp_table_size if this grows.",
        None,
        &ConstCounter::new(get(&stats.tcp_table_full)),
    )?;
    one(
        enc,
        "bulkhead_tcp_table_entries",
        "Entries in the kernel's table of connecting TCP sockets' owners at the last sweep: outbound TCP connections of managed (and observed) processes open or being made ([flows] tcp_table_size at most).",
        None,
        &ConstGauge::new(get(&stats.tcp_table_entries)),
    )?;
    one(
        enc,
        "bulkhead_tcp_table_stale",
        "Entries of that table the sweeps removed: unarmed (their connect never reached the SYN) for three sweeps in a row, left by kernel sockets (under AF_SMC, MPTCP subflows) that are never released through the agent's hook, or by sockets held open after such a failure.",
        None,
        &ConstCounter::new(get(&stats.tcp_table_stale)),
    )?;
    one(
        enc,
        "bulkhead_tcp_unobserved",
        "Outbound TCP connects whose owner the table could not take and whose socket refused its storage too (no memory, or its option memory spent): no tcp_established or tcp_closed is reported for them (their connect's verdict and flow are). Should stay 0.",
        None,
        &ConstCounter::new(get(&stats.tcp_unobserved)),
    )?;
    one(
        enc,
        "bulkhead_flow_sweep_errors",
        "Flow sweeps that failed (logged); the counts stay in the table until the next sweep.",
        None,
        &ConstCounter::new(get(&stats.sweep_errors)),
    )
}
