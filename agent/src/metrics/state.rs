//! What the endpoint reports from. The daemon builds a [`MetricsState`]
//! once; a policy reload swaps its [`Inventory`] with
//! [`MetricsState::replace_inventory`] while scrapes go on.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
};

use agent_common::{maps as names, COUNTER_SLOTS, MODE_AUDIT};
use aya::maps::{Map, MapError};
use tracing::warn;

use crate::{daemon::KernelCounters, events::EventStats, kernel::CompiledPolicy};

const SLOTS: usize = COUNTER_SLOTS as usize;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    Enforce,
    Audit,
}

impl ServiceMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// A service of the loaded policy, as the metrics label it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    /// Its id in the kernel (index of its verdict counters).
    pub id: u32,
    pub name: String,
    pub mode: ServiceMode,
    /// Rules (egress and ingress) in its policy.
    pub rules: usize,
    /// False while its cgroup does not exist yet ("waiting").
    pub managed: bool,
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
}

impl Inventory {
    /// The services of `policy` (managed: those whose ids `managed` lists,
    /// i.e. whose cgroup is in the SERVICES map), and the fill of each map
    /// in `capacities` (see [`map_capacities`]) once the policy is written.
    #[must_use]
    pub fn from_policy(
        policy: &CompiledPolicy,
        managed: impl IntoIterator<Item = u32>,
        capacities: &[(&'static str, u32)],
    ) -> Self {
        let managed: HashSet<u32> = managed.into_iter().collect();
        let services = policy
            .services
            .iter()
            .map(|s| ServiceMeta {
                id: s.entry.service_id,
                name: s.name.clone(),
                mode: if s.entry.mode == MODE_AUDIT {
                    ServiceMode::Audit
                } else {
                    ServiceMode::Enforce
                },
                rules: s.rule_count,
                managed: managed.contains(&s.entry.service_id),
            })
            .collect();
        // The maps hold exactly what `kernel::maps::write` put there.
        let entries = |name: &str| match name {
            names::SERVICES => Some(managed.len()),
            names::EGRESS_V4 => Some(policy.v4.len()),
            names::EGRESS_V6 => Some(policy.v6.len()),
            names::INGRESS_V4 => Some(policy.ingress_v4.len()),
            names::INGRESS_V6 => Some(policy.ingress_v6.len()),
            names::RULESETS => Some(policy.rulesets.len()),
            _ => None,
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
        Self { services, maps }
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

/// Everything a scrape reads. Shared by the daemon (which flips `attached`
/// and swaps the inventory) and the endpoint.
pub struct MetricsState {
    counters: Box<dyn CounterSource>,
    stats: Arc<EventStats>,
    inventory: RwLock<Arc<Inventory>>,
    attached: AtomicBool,
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
    pub fn new(counters: impl CounterSource, stats: Arc<EventStats>, inventory: Inventory) -> Self {
        Self {
            counters: Box::new(counters),
            stats,
            inventory: RwLock::new(Arc::new(inventory)),
            attached: AtomicBool::new(false),
        }
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

    /// Swaps in the services and maps of a newly loaded policy. A reload
    /// must keep each service's id (or zero its counters before reusing
    /// it), else one service's counts would show under another's name.
    pub fn replace_inventory(&self, inventory: Inventory) {
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
