//! Writing a compiled policy into the kernel maps.

use agent_common::{maps as names, LpmV4Key, LpmV6Key, RuleSet, ServiceEntry};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData},
    Ebpf,
};

use super::{compile::CompiledPolicy, KernelError};

/// A service whose cgroup exists, with the id the kernel will see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedService {
    pub cgroup_id: u64,
    pub entry: ServiceEntry,
}

/// Rulesets and prefixes first, services last: a service becomes managed
/// only once everything its verdicts need is in place.
pub fn write(
    ebpf: &mut Ebpf,
    policy: &CompiledPolicy,
    resolved: &[ResolvedService],
) -> Result<(), KernelError> {
    let map_err = |name: &'static str| move |source| KernelError::Map { name, source };

    let mut rulesets: Array<&mut MapData, RuleSet> = map(ebpf, names::RULESETS)?;
    for (i, set) in policy.rulesets.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        rulesets
            .set(index, set, 0)
            .map_err(map_err(names::RULESETS))?;
    }

    let mut v4: LpmTrie<&mut MapData, LpmV4Key, u32> = map(ebpf, names::EGRESS_V4)?;
    for (len, key, ruleset) in &policy.v4 {
        v4.insert(&Key::new(*len, *key), ruleset, 0)
            .map_err(map_err(names::EGRESS_V4))?;
    }

    let mut v6: LpmTrie<&mut MapData, LpmV6Key, u32> = map(ebpf, names::EGRESS_V6)?;
    for (len, key, ruleset) in &policy.v6 {
        v6.insert(&Key::new(*len, *key), ruleset, 0)
            .map_err(map_err(names::EGRESS_V6))?;
    }

    let mut v4: LpmTrie<&mut MapData, LpmV4Key, u32> = map(ebpf, names::INGRESS_V4)?;
    for (len, key, ruleset) in &policy.ingress_v4 {
        v4.insert(&Key::new(*len, *key), ruleset, 0)
            .map_err(map_err(names::INGRESS_V4))?;
    }

    let mut v6: LpmTrie<&mut MapData, LpmV6Key, u32> = map(ebpf, names::INGRESS_V6)?;
    for (len, key, ruleset) in &policy.ingress_v6 {
        v6.insert(&Key::new(*len, *key), ruleset, 0)
            .map_err(map_err(names::INGRESS_V6))?;
    }

    let mut services: HashMap<&mut MapData, u64, ServiceEntry> = map(ebpf, names::SERVICES)?;
    for s in resolved {
        services
            .insert(s.cgroup_id, s.entry, 0)
            .map_err(map_err(names::SERVICES))?;
    }
    Ok(())
}

/// Adds and removes service cgroups in the SERVICES map.
pub fn apply_service_changes(
    ebpf: &mut Ebpf,
    changes: &[crate::services::Change],
) -> Result<(), KernelError> {
    use crate::services::Change;
    let map_err = |source| KernelError::Map {
        name: names::SERVICES,
        source,
    };
    let mut services: HashMap<&mut MapData, u64, ServiceEntry> = map(ebpf, names::SERVICES)?;
    for change in changes {
        match *change {
            Change::Add { cgroup_id, entry } => {
                services.insert(cgroup_id, entry, 0).map_err(map_err)?;
            }
            Change::Remove { cgroup_id } => match services.remove(&cgroup_id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(e)),
            },
        }
    }
    Ok(())
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(m).map_err(|source| KernelError::Map { name, source })
}
