//! A [`MetricsState`] with made-up kernel counters, for unit tests.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex, PoisonError},
};

use agent_common::{
    counter_slot, DIRECTION_EGRESS, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};
use aya::maps::MapError;

use super::state::{
    CounterSource, Inventory, MapUsage, MetricsState, ServiceMeta, Sources, VerdictCounts,
};
use crate::{
    events::{EventStats, EventType},
    policy::Mode,
};

/// Kernel counters from a table the test can change: service id -> counts;
/// lost by slot.
pub struct Fake {
    pub verdicts: Arc<Mutex<BTreeMap<u32, VerdictCounts>>>,
    pub lost: [u64; 3],
}

impl CounterSource for Fake {
    fn verdicts(&self, service_id: u32) -> Result<VerdictCounts, MapError> {
        self.verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&service_id)
            .copied()
            .ok_or(MapError::OutOfBounds {
                index: service_id,
                max_entries: 0,
            })
    }

    fn lost(&self, slot: u32) -> Result<u64, MapError> {
        self.lost
            .get(slot as usize)
            .copied()
            .ok_or(MapError::OutOfBounds {
                index: slot,
                max_entries: 3,
            })
    }
}

pub fn meta(id: u32, name: &str, mode: Mode, rules: usize, managed: bool) -> ServiceMeta {
    ServiceMeta {
        id,
        name: name.to_owned(),
        mode,
        rules,
        state: if managed { "managed" } else { "waiting" },
    }
}

/// billing (enforce): egress TCP 7 allowed, 3 denied, UDP 2 denied;
/// search (audit): UDP 5 audited; late (waiting): counters unreadable.
/// 17 verdict and 6 tcp_closed events received, 11 + 4 + 2 lost in the kernel,
/// 1 undecodable. Attached, consumer alive. No service graph.
pub fn fake_state() -> Arc<MetricsState> {
    fake_state_with(None)
}

/// [`fake_state`] with every optional source the daemon gives (graph,
/// anomalies, export), all empty, and a running DNS proxy ([`FakeDns`]).
pub fn fake_state_with_every_source() -> Arc<MetricsState> {
    fake_state_sources(|sources| Sources {
        graph: Some(Arc::default()),
        anomalies: Some(Arc::default()),
        export: Some(Arc::default()),
        dns: Some(Arc::new(FakeDns)),
        ..sources
    })
}

/// A DNS proxy that answered billing 3 lookups, one of them truncated,
/// refused 2 of no known service, learnt billing 2 addresses, search
/// none; evicted 4 for the per-name cap, kept 1 out for the total cap,
/// saw 5 expire and 6 map errors; added 100 µs and 3 ms to two lookups;
/// swept 0.5 s ago.
pub struct FakeDns;

impl super::DnsSource for FakeDns {
    fn observed(&self) -> Option<crate::dns::serve::Observed> {
        use crate::dns::proxy::{Outcome, ADDED_BUCKETS};
        let added =
            prometheus_client::metrics::histogram::Histogram::new(ADDED_BUCKETS.iter().copied());
        added.observe(0.000_1);
        added.observe(0.003);
        Some(crate::dns::serve::Observed {
            lookups: vec![
                (Arc::from("billing"), Outcome::Answered, 2),
                (Arc::from("billing"), Outcome::Truncated, 1),
                (Arc::from(""), Outcome::Refused, 2),
            ],
            learnt: vec![(Arc::from("billing"), 2), (Arc::from("search"), 0)],
            evicted_per_name: vec![(Arc::from("billing"), 4), (Arc::from("search"), 0)],
            left_out_per_name: vec![(Arc::from("billing"), 7), (Arc::from("search"), 0)],
            refused_full: vec![(Arc::from("billing"), 0), (Arc::from("search"), 1)],
            map_errors: 6,
            expired: 5,
            added_seconds: added,
            sweep_age_seconds: 0.5,
        })
    }
}

/// [`fake_state`], with `graph` as its service graph.
pub fn fake_state_with(graph: Option<Arc<crate::graph::Shared>>) -> Arc<MetricsState> {
    fake_state_sources(|sources| Sources { graph, ..sources })
}

fn fake_state_sources(complete: impl FnOnce(Sources) -> Sources) -> Arc<MetricsState> {
    let slot = |proto, verdict| counter_slot(DIRECTION_EGRESS, proto, verdict) as usize;
    let mut billing = [0; 12];
    billing[slot(PROTO_TCP, VERDICT_ALLOW)] = 7;
    billing[slot(PROTO_TCP, VERDICT_DENY)] = 3;
    billing[slot(PROTO_UDP, VERDICT_DENY)] = 2;
    let mut search = [0; 12];
    search[slot(PROTO_UDP, VERDICT_AUDIT)] = 5;
    // The agent starts with zeroed counters; the counts come after.
    let kernel = Arc::new(Mutex::new(BTreeMap::from([(0, [0; 12]), (1, [0; 12])])));
    let fake = Fake {
        verdicts: Arc::clone(&kernel),
        lost: [11, 4, 2],
    };
    let stats = Arc::new(EventStats::default());
    stats.received[EventType::Verdict as usize].store(17, Ordering::Relaxed);
    stats.received[EventType::TcpClosed as usize].store(6, Ordering::Relaxed);
    stats.decode_errors.store(1, Ordering::Relaxed);
    stats.consumer_alive.store(true, Ordering::Relaxed);
    stats.log_queued.store(2, Ordering::Relaxed);
    stats.log_written_bytes.store(4096, Ordering::Relaxed);
    let inventory = Inventory {
        services: vec![
            meta(0, "billing", Mode::Enforce, 4, true),
            meta(1, "search", Mode::Audit, 1, true),
            meta(2, "late", Mode::Enforce, 0, false),
        ],
        maps: vec![MapUsage {
            name: "EGRESS_V4",
            entries: 3,
            capacity: 1024,
        }],
        quarantined: ["search".to_owned()].into(),
    };
    let sources = complete(Sources::new(fake, stats));
    let state = Arc::new(MetricsState::new(sources, inventory));
    kernel
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend([(0, billing), (1, search)]);
    state.set_attached(true);
    state
}
