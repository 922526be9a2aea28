//! The kernel's flow table (`FLOWS`, see agent-ebpf/src/flows.rs and
//! `agent_common::flow`): closing an epoch, reading and removing its
//! entries, carrying flows over to the next one.

use std::path::Path;

use agent_common::{
    maps as names, FlowKey, FlowValue, FLOW_STAT_FULL, FLOW_STAT_OWNERS_FULL, FLOW_STAT_OWNERS_LOST,
};
use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray},
    Ebpf,
};

use super::KernelError;

/// `BPF_NOEXIST`: insert only a key that is not there.
const BPF_NOEXIST: u64 = 1;

pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    epoch: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    capacity: u32,
}

impl FlowTable {
    /// Takes the table's maps out of the loaded object (they stay pinned).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
        Self::from_maps(
            take(names::FLOWS)?,
            take(names::FLOW_EPOCH)?,
            take(names::FLOW_STATS)?,
        )
    }

    /// A previous agent's table, from its pinned maps (`dir`/maps/NAME).
    pub fn from_pins(dir: &Path) -> Result<Self, KernelError> {
        let open = |name: &'static str| {
            let map = MapData::from_pin(dir.join("maps").join(name))
                .map_err(|source| KernelError::Map { name, source })?;
            Ok::<_, KernelError>(match name {
                names::FLOWS => Map::HashMap(map),
                names::FLOW_EPOCH => Map::Array(map),
                _ => Map::PerCpuArray(map),
            })
        };
        Self::from_maps(
            open(names::FLOWS)?,
            open(names::FLOW_EPOCH)?,
            open(names::FLOW_STATS)?,
        )
    }

    fn from_maps(flows: Map, epoch: Map, stats: Map) -> Result<Self, KernelError> {
        let err = |name| move |source| KernelError::Map { name, source };
        let flows: HashMap<MapData, FlowKey, FlowValue> =
            HashMap::try_from(flows).map_err(err(names::FLOWS))?;
        let capacity = flows_capacity(&flows);
        Ok(Self {
            flows,
            epoch: Array::try_from(epoch).map_err(err(names::FLOW_EPOCH))?,
            stats: PerCpuArray::try_from(stats).map_err(err(names::FLOW_STATS))?,
            capacity,
        })
    }

    /// Entries the table holds at most.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Makes the other epoch the one new entries go to, and returns once no
    /// program can still be counting into the one it closes (returned).
    pub fn close_epoch(&mut self) -> Result<u8, KernelError> {
        let err = |source| KernelError::Map {
            name: names::FLOW_EPOCH,
            source,
        };
        let closed = (self.epoch.get(&0, 0).map_err(err)? & 1) as u8;
        self.epoch.set(0, u32::from(closed ^ 1), 0).map_err(err)?;
        super::quiesce();
        Ok(closed)
    }

    /// Every entry, of both epochs. Keys removed while the walk goes on
    /// are skipped.
    pub fn entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// Puts a flow in the table unless it is there already (a program made
    /// it first) or the table is full; says whether it did.
    pub fn carry(&mut self, key: &FlowKey, value: &FlowValue) -> bool {
        self.flows.insert(key, value, BPF_NOEXIST).is_ok()
    }

    pub fn remove(&mut self, key: &FlowKey) {
        // Gone already is fine: that is what was asked.
        let _ = self.flows.remove(key);
    }

    /// New flows that found the table full, since it was made.
    pub fn full(&self) -> u64 {
        self.stat(FLOW_STAT_FULL)
    }

    /// Connecting TCP sockets that found `SOCK_OWNERS` full, since it was
    /// made.
    pub fn owners_full(&self) -> u64 {
        self.stat(FLOW_STAT_OWNERS_FULL)
    }

    /// Of those, the ones socket storage refused too: unreported.
    pub fn owners_lost(&self) -> u64 {
        self.stat(FLOW_STAT_OWNERS_LOST)
    }

    fn stat(&self, slot: u32) -> u64 {
        self.stats
            .get(&slot, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

fn flows_capacity(flows: &HashMap<MapData, FlowKey, FlowValue>) -> u32 {
    IterableMap::map(flows)
        .info()
        .map(|info| info.max_entries())
        .unwrap_or(0)
}
