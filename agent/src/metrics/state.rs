//! What the endpoint reports from. The daemon builds a [`MetricsState`]
//! once, with every source it reads ([`Sources`]); rescans and reloads
//! swap its [`Inventory`] with [`MetricsState::replace_inventory`] while
//! scrapes go on, and each service's counts follow it from id to id.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
};

use agent_common::{maps as names, COUNTER_SLOTS};
use aya::maps::{Map, MapData, MapError, PerCpuArray};
use tracing::warn;

use crate::{
    events::EventStats,
    kernel::{addr_maps, CompiledPolicy},
    policy::Mode,
};

pub(super) const SLOTS: usize = COUNTER_SLOTS as usize;

/// One service's verdict counters, indexed by `agent_common::counter_slot`.
pub type VerdictCounts = [u64; SLOTS];

/// Where the kernel's counters come from: the per-CPU maps in the daemon, a
/// fake in unit tests.
pub trait CounterSource: Send + Sync + 'static {
    /// A service's verdict counters, summed over CPUs.
    ///
    /// # Errors
    /// The map cannot be read (or has no room for `service_id`).
    fn verdicts(&self, service_id: u32) -> Result<VerdictCounts, MapError>;

    /// `LOST[slot]` (records the ring buffer had no room for), summed over CPUs.
    ///
    /// # Errors
    /// The map cannot be read.
    fn lost(&self, slot: u32) -> Result<u64, MapError>;
}

/// The kernel's per-CPU counters, read at scrape time.
pub struct KernelCounters {
    /// Verdict counters by service (see `agent_common::counter_slot`).
    pub verdicts: PerCpuArray<MapData, u64>,
    /// Records dropped because the ring buffer was full, by LOST_* slot.
    pub lost: PerCpuArray<MapData, u64>,
}

impl CounterSource for Mutex<KernelCounters> {
    fn verdicts(&self, service_id: u32) -> Result<VerdictCounts, MapError> {
        let counters = self.lock().unwrap_or_else(PoisonError::into_inner);
        let base = service_id
            .checked_mul(COUNTER_SLOTS)
            .ok_or(MapError::OutOfBounds {
                index: service_id,
                max_entries: counters.verdicts.len(),
            })?;
        let mut out = [0; SLOTS];
        for (slot, value) in (0..COUNTER_SLOTS).zip(out.iter_mut()) {
            *value = sum(&counters.verdicts.get(&(base + slot), 0)?);
        }
        Ok(out)
    }

    fn lost(&self, slot: u32) -> Result<u64, MapError> {
        let counters = self.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(sum(&counters.lost.get(&slot, 0)?))
    }
}

/// Each CPU's count is monotonic; their sum wraps only after 2^64 events.
fn sum(per_cpu: &[u64]) -> u64 {
    per_cpu.iter().fold(0, |acc, v| acc.wrapping_add(*v))
}

/// A service of the loaded policy, as the metrics label it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    /// Its id in the kernel (index of its verdict counters).
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    /// Rules (egress and ingress) in its policy.
    pub rules: usize,
    /// `managed`, `waiting` (no cgroup yet) or `unenforced` (a cgroup the
    /// kernel could not be told about), as the service tracker says.
    pub state: &'static str,
}

/// What the service tracker says of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStatus {
    pub id: u32,
    pub state: &'static str,
    /// Its cgroups in the SERVICES map.
    pub enforced_cgroups: usize,
}

/// How full a policy map is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// The loaded policy as the metrics see it. Replaced as a whole on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub services: Vec<ServiceMeta>,
    pub maps: Vec<MapUsage>,
    /// Services under quarantine (`bulkhead quarantine`), by name.
    pub quarantined: BTreeSet<String>,
}

impl Inventory {
    /// The services of `policy` in the states `tracked` gives them (one
    /// not listed is waiting), and the fill of each map in `capacities`
    /// (see [`map_capacities`]) once the policy is written.
    #[must_use]
    pub fn from_policy(
        policy: &CompiledPolicy,
        tracked: &[ServiceStatus],
        capacities: &[(&'static str, u32)],
    ) -> Self {
        let state_of = |id: u32| {
            tracked
                .iter()
                .find(|t| t.id == id)
                .map_or("waiting", |t| t.state)
        };
        let cgroups: usize = tracked.iter().map(|t| t.enforced_cgroups).sum();
        let services = policy
            .services
            .iter()
            .map(|s| ServiceMeta {
                id: s.entry.service_id,
                name: s.name.clone(),
                mode: Mode::from_kernel(s.entry.mode),
                rules: s.rule_count,
                state: state_of(s.entry.service_id),
            })
            .collect();
        // The maps hold exactly what `kernel::maps::write` put there.
        let addresses = addr_maps::entry_counts(policy);
        let entries = |name: &str| match name {
            names::SERVICES => Some(cgroups),
            names::RULESETS => Some(policy.rulesets.len()),
            _ => addresses.iter().find(|(n, _)| *n == name).map(|(_, c)| *c),
        };
        let maps = capacities
            .iter()
            .filter_map(|&(name, capacity)| {
                Some(MapUsage {
                    name,
                    entries: u64::try_from(entries(name)?).unwrap_or(u64::MAX),
                    capacity: u64::from(capacity),
                })
            })
            .collect();
        Self {
            services,
            maps,
            quarantined: BTreeSet::new(),
        }
    }

    /// The same inventory, with `names` as the quarantined services.
    #[must_use]
    pub fn quarantined<'a>(mut self, names: impl IntoIterator<Item = &'a String>) -> Self {
        self.quarantined = names.into_iter().cloned().collect();
        self
    }
}

/// The capacity (`max_entries`) of each policy map, as the kernel reports it.
#[must_use]
pub fn map_capacities(ebpf: &aya::Ebpf) -> Vec<(&'static str, u32)> {
    [
        names::SERVICES,
        names::EGRESS_V4,
        names::EGRESS_V6,
        names::INGRESS_V4,
        names::INGRESS_V6,
        names::EGRESS_HOSTS_V4,
        names::EGRESS_HOSTS_V6,
        names::INGRESS_HOSTS_V4,
        names::INGRESS_HOSTS_V6,
        names::RULESETS,
    ]
    .into_iter()
    .filter_map(|name| {
        let data = match ebpf.map(name)? {
            Map::HashMap(d) | Map::LpmTrie(d) | Map::Array(d) => d,
            _ => return None,
        };
        match data.info() {
            Ok(info) => Some((name, info.max_entries())),
            Err(e) => {
                warn!("cannot read the size of map {name}; it is left out of the metrics: {e}");
                None
            }
        }
    })
    .collect()
}

/// Where a scrape reads from besides the inventory: everything the
/// daemon hands over, at construction.
pub struct Sources {
    /// The kernel's verdict and lost-record counters.
    pub counters: Box<dyn CounterSource>,
    /// The event pipeline's counters.
    pub events: Arc<EventStats>,
    /// The optional kernel parts and whether each is active.
    pub features: Vec<(&'static str, bool)>,
    /// The service graph (`/graph`, graph metrics). The daemon always
    /// gives the three below; a unit test may leave them out.
    pub graph: Option<Arc<crate::graph::Shared>>,
    /// Anomaly counters.
    pub anomalies: Option<Arc<crate::anomaly::AnomalyStats>>,
    /// OTLP export counters.
    pub export: Option<Arc<crate::export::ExportStats>>,
    /// The DNS proxy of name rules (its metrics while it runs).
    pub dns: Option<Arc<dyn DnsSource>>,
}

/// Where the DNS proxy's metrics come from: the daemon's proxy, a fake in
/// unit tests.
pub trait DnsSource: Send + Sync + 'static {
    /// What the proxy counted; `None` while it does not run.
    fn observed(&self) -> Option<crate::dns::serve::Observed>;
}

impl DnsSource for crate::dns::serve::Dns {
    fn observed(&self) -> Option<crate::dns::serve::Observed> {
        crate::dns::serve::Dns::observed(self)
    }
}

impl Sources {
    /// Counters and event statistics only: no kernel features, graph,
    /// anomaly or export statistics (their metrics are left out).
    pub fn new(counters: impl CounterSource, events: Arc<EventStats>) -> Self {
        Self {
            counters: Box::new(counters),
            events,
            features: Vec::new(),
            graph: None,
            anomalies: None,
            export: None,
            dns: None,
        }
    }
}

/// Everything a scrape reads. Shared by the daemon (which flips `attached`
/// and swaps the inventory) and the endpoint.
pub struct MetricsState {
    counters: Box<dyn CounterSource>,
    stats: Arc<EventStats>,
    /// Policy reloads applied and refused (the engine counts them).
    pub reloads: Arc<crate::reload::ReloadStats>,
    /// Sockets judged by the service holding them (the engine's scan).
    pub held: crate::held::HeldStats,
    /// UDP pinholes (the engine's sweep).
    pub udp_peers: crate::kernel::udp_peers::UdpPeerStats,
    /// The self-check's findings (the engine's check).
    pub drift: crate::selfcheck::DriftStats,
    /// The metrics listener's own connections and refusals.
    pub http: super::http_stats::HttpStats,
    /// The flow sweeper's counters (it is handed this).
    pub flows: Arc<crate::flows::FlowStats>,
    /// The fleet exporter's counters (it is handed this).
    pub fleet: Arc<crate::fleet::export::FleetStats>,
    inventory: RwLock<Arc<Inventory>>,
    ledgers: Mutex<Ledgers>,
    attached: AtomicBool,
    /// The optional kernel parts and whether each is active.
    features: Vec<(&'static str, bool)>,
    /// The service graph (`/graph`, graph metrics).
    graph: Option<Arc<crate::graph::Shared>>,
    /// Anomaly counters.
    anomalies: Option<Arc<crate::anomaly::AnomalyStats>>,
    /// OTLP export counters.
    export: Option<Arc<crate::export::ExportStats>>,
    /// The DNS proxy of name rules.
    dns: Option<Arc<dyn DnsSource>>,
}

/// Which kernel counters belong to which service, across reloads.
///
/// A reload writes the new policy into the other half of the maps, so a
/// service's id (and with it the index of its kernel counters) changes at
/// every reload, and an id is reused by whichever service lands on it two
/// reloads later. The kernel counters are never reset; instead each
/// service keeps what it counted on ids it has left (`carried`) and, for
/// each id it uses, the counter values when it got that id (`baseline`).
/// Its total is `carried + sum(now - baseline)`: monotonic, and exact.
#[derive(Debug, Default)]
struct Ledgers {
    by_service: HashMap<String, Ledger>,
    /// Counter values read just before a switch, by id (see
    /// [`MetricsState::before_switch`]).
    prepared: HashMap<u32, VerdictCounts>,
}

#[derive(Debug, Default)]
struct Ledger {
    carried: VerdictCounts,
    /// Ids this service counts on: the one it has now, and the one it left
    /// at the last reload (in-flight decisions may still land there until
    /// another service takes it).
    uses: Vec<IdUse>,
}

#[derive(Debug, Clone, Copy)]
struct IdUse {
    id: u32,
    baseline: VerdictCounts,
}

fn add_delta(total: &mut VerdictCounts, now: &VerdictCounts, baseline: &VerdictCounts) {
    for ((t, n), b) in total.iter_mut().zip(now).zip(baseline) {
        *t = t.wrapping_add(n.wrapping_sub(*b));
    }
}

impl std::fmt::Debug for MetricsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsState")
            .field("stats", &self.stats)
            .field("inventory", &self.inventory())
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

impl MetricsState {
    /// Starts detached: `/healthz` says 503 until [`Self::set_attached`].
    pub fn new(sources: Sources, inventory: Inventory) -> Self {
        let Sources {
            counters,
            events,
            features,
            graph,
            anomalies,
            export,
            dns,
        } = sources;
        let state = Self {
            counters,
            stats: events,
            reloads: Arc::default(),
            held: crate::held::HeldStats::default(),
            udp_peers: crate::kernel::udp_peers::UdpPeerStats::default(),
            drift: crate::selfcheck::DriftStats::default(),
            http: super::http_stats::HttpStats::default(),
            flows: Arc::default(),
            fleet: Arc::default(),
            inventory: RwLock::new(Arc::new(Inventory::default())),
            ledgers: Mutex::new(Ledgers::default()),
            attached: AtomicBool::new(false),
            features,
            graph,
            anomalies,
            export,
            dns,
        };
        // The maps are this agent's own, loaded empty: whatever the counters
        // hold by now (decisions made between the attach and this point,
        // the whole take-over drain among them) counts, from zero.
        {
            let mut ledgers = state.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
            for s in &inventory.services {
                ledgers.prepared.insert(s.id, VerdictCounts::default());
            }
        }
        state.replace_inventory(inventory);
        state
    }

    #[must_use]
    pub fn features(&self) -> &[(&'static str, bool)] {
        &self.features
    }

    #[must_use]
    pub fn graph(&self) -> Option<&Arc<crate::graph::Shared>> {
        self.graph.as_ref()
    }

    #[must_use]
    pub fn anomalies(&self) -> Option<&Arc<crate::anomaly::AnomalyStats>> {
        self.anomalies.as_ref()
    }

    #[must_use]
    pub fn export(&self) -> Option<&Arc<crate::export::ExportStats>> {
        self.export.as_ref()
    }

    #[must_use]
    pub fn dns(&self) -> Option<&Arc<dyn DnsSource>> {
        self.dns.as_ref()
    }

    /// Call with true once every program is attached, with false just
    /// before detaching.
    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Relaxed);
    }

    #[must_use]
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }

    /// For an exact hand-over of counters at a reload: call with the new
    /// policy's service ids after staging it and before switching the
    /// cgroups to it, then [`Self::replace_inventory`] after the switch.
    /// Without this call the hand-over happens at `replace_inventory`, and
    /// decisions made between the switch and that call are counted for the
    /// service that last had the id.
    pub fn before_switch(&self, ids: impl IntoIterator<Item = u32>) {
        let mut ledgers = self.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            let now = self.read_or_zero(id);
            ledgers.prepared.insert(id, now);
        }
    }

    /// Swaps in the services and maps of the policy now in force (after a
    /// reload, or when a service's cgroup appears or goes). Each service
    /// keeps its counts when its id changes: see [`Ledgers`].
    pub fn replace_inventory(&self, inventory: Inventory) {
        let mut ledgers = self.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
        let Ledgers {
            by_service,
            prepared,
        } = &mut *ledgers;
        for service in &inventory.services {
            let keeps = by_service
                .get(&service.name)
                .is_some_and(|l| l.uses.last().is_some_and(|u| u.id == service.id));
            if keeps {
                continue;
            }
            // The counters as they stood when the id changed hands.
            let handover = prepared
                .get(&service.id)
                .copied()
                .unwrap_or_else(|| self.read_or_zero(service.id));
            // Whoever counted on this id before stops here (including this
            // service itself, back on an id it had two reloads ago).
            for ledger in by_service.values_mut() {
                let Ledger { carried, uses } = ledger;
                uses.retain(|u| {
                    if u.id == service.id {
                        add_delta(carried, &handover, &u.baseline);
                    }
                    u.id != service.id
                });
            }
            let ledger = by_service.entry(service.name.clone()).or_default();
            // Only the id it leaves now may still see in-flight decisions.
            while ledger.uses.len() > 1 {
                let old = ledger.uses.remove(0);
                let now = self.read_or_zero(old.id);
                add_delta(&mut ledger.carried, &now, &old.baseline);
            }
            ledger.uses.push(IdUse {
                id: service.id,
                baseline: handover,
            });
        }
        prepared.clear();
        // A service no longer in the policy keeps its ledger only while it
        // may still count somewhere, so that a quick re-add continues it.
        by_service.retain(|name, ledger| {
            !ledger.uses.is_empty() || inventory.services.iter().any(|s| &s.name == name)
        });
        *self
            .inventory
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(inventory);
    }

    /// The current inventory (a scrape keeps the one it started with).
    #[must_use]
    pub fn inventory(&self) -> Arc<Inventory> {
        Arc::clone(
            &self
                .inventory
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// A service's verdict counts since the agent started, across reloads;
    /// None if the service is unknown (a scrape racing a reload).
    ///
    /// # Errors
    /// A kernel counter cannot be read.
    pub(crate) fn service_counts(&self, name: &str) -> Option<Result<VerdictCounts, MapError>> {
        let ledgers = self.ledgers.lock().unwrap_or_else(PoisonError::into_inner);
        let ledger = ledgers.by_service.get(name)?;
        let mut total = ledger.carried;
        for u in &ledger.uses {
            match self.counters.verdicts(u.id) {
                Ok(now) => add_delta(&mut total, &now, &u.baseline),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(total))
    }

    fn read_or_zero(&self, id: u32) -> VerdictCounts {
        self.counters.verdicts(id).unwrap_or_else(|e| {
            warn!("metrics: cannot read the verdict counters of service id {id}: {e}");
            [0; SLOTS]
        })
    }

    /// Ok when the programs are attached and the event consumer runs; else
    /// why not.
    ///
    /// # Errors
    /// A short reason, served with 503 by `/healthz`.
    pub fn health(&self) -> Result<(), &'static str> {
        if !self.attached() {
            return Err("programs not attached");
        }
        if !self.stats.consumer_alive.load(Ordering::Relaxed) {
            return Err("event consumer stopped");
        }
        Ok(())
    }

    pub(crate) fn counters(&self) -> &dyn CounterSource {
        self.counters.as_ref()
    }

    pub(crate) fn stats(&self) -> &EventStats {
        &self.stats
    }
}
