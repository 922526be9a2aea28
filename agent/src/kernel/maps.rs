//! Writing a compiled policy into the kernel maps.

use agent_common::{
    maps as names, ExeRule, ExeRuleKey, LpmV4Key, LpmV6Key, RuleSet, ServiceEntry, UidRuleKey,
    UnitKey, ACTIVE_ICMP, ACTIVE_MANAGED, CGROUP_PATH_MAX, SOCKETS_ICMP,
};
use aya::{
    maps::{Array, HashMap, MapData},
    Ebpf,
};

use std::ops::Range;

use super::{
    addr_maps,
    compile::CompiledPolicy,
    map_access::{map_err, map_mut, removed},
    KernelError,
};
use crate::policy::Selector;

/// One change to apply to the SERVICES map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add { cgroup_id: u64, entry: ServiceEntry },
    Remove { cgroup_id: u64 },
}

/// A service whose cgroup exists, with the id the kernel will see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedService {
    pub cgroup_id: u64,
    pub entry: ServiceEntry,
}

/// Rulesets and prefixes first, services last: a service becomes managed
/// only once everything its verdicts need is in place. Returns the service
/// cgroups that could not be written.
pub fn write(
    ebpf: &mut Ebpf,
    policy: &CompiledPolicy,
    resolved: &[ResolvedService],
) -> Result<Vec<(Change, String)>, KernelError> {
    write_rules(ebpf, policy)?;
    write_active_flags(ebpf, active_flags(policy))?;
    write_service_paths(ebpf, policy, None)?;
    let changes: Vec<Change> = resolved
        .iter()
        .map(|r| Change::Add {
            cgroup_id: r.cgroup_id,
            entry: r.entry,
        })
        .collect();
    apply_service_changes(ebpf, &changes)
}

/// Writes a policy's rulesets and address entries (its ids already
/// relocated into a half no service points at yet).
pub fn write_rules(ebpf: &mut Ebpf, policy: &CompiledPolicy) -> Result<(), KernelError> {
    let mut rulesets: Array<&mut MapData, RuleSet> = map_mut(ebpf, names::RULESETS)?;
    for (i, set) in policy.rulesets.iter().enumerate() {
        let index = policy.ruleset_base + u32::try_from(i).unwrap_or(u32::MAX);
        rulesets
            .set(index, set, 0)
            .map_err(map_err(names::RULESETS))?;
    }
    let mut exe: HashMap<&mut MapData, ExeRuleKey, ExeRule> = map_mut(ebpf, names::EXE_RULES)?;
    for (key, rule) in &policy.exe_rules {
        exe.insert(key, rule, 0)
            .map_err(map_err(names::EXE_RULES))?;
    }
    let mut uid: HashMap<&mut MapData, UidRuleKey, u32> = map_mut(ebpf, names::UID_RULES)?;
    for (key, mask) in &policy.uid_rules {
        uid.insert(key, mask, 0)
            .map_err(map_err(names::UID_RULES))?;
    }
    addr_maps::write(ebpf, addr_maps::EGRESS_V4, &policy.v4)?;
    addr_maps::write(ebpf, addr_maps::INGRESS_V4, &policy.ingress_v4)?;
    addr_maps::write(ebpf, addr_maps::EGRESS_V6, &policy.v6)?;
    addr_maps::write(ebpf, addr_maps::INGRESS_V6, &policy.ingress_v6)
}

/// Empties one half of the address maps: every prefix whose service id
/// lies in `services` goes, whoever wrote it (a retire that failed, a
/// staging cut short). Its rulesets are not touched: only prefixes and
/// service entries of that half can reach them, and the next policy there
/// overwrites the ones it uses. Returns how many prefixes went.
pub fn clear_half(ebpf: &mut Ebpf, services: Range<u32>) -> Result<usize, KernelError> {
    let mut cleared = 0;
    for maps in [addr_maps::EGRESS_V4, addr_maps::INGRESS_V4] {
        cleared +=
            addr_maps::remove_where(ebpf, maps, |k: &LpmV4Key| services.contains(&k.service()))?;
    }
    for maps in [addr_maps::EGRESS_V6, addr_maps::INGRESS_V6] {
        cleared +=
            addr_maps::remove_where(ebpf, maps, |k: &LpmV6Key| services.contains(&k.service()))?;
    }
    cleared += remove_keys::<ExeRuleKey, ExeRule>(ebpf, names::EXE_RULES, |k| {
        services.contains(&k.service_id)
    })?;
    cleared += remove_keys::<UidRuleKey, u32>(ebpf, names::UID_RULES, |k| {
        services.contains(&k.service_id)
    })?;
    Ok(cleared)
}

/// Removes the entries of a hash map whose key `doomed` picks.
fn remove_keys<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<usize, KernelError> {
    let mut map: HashMap<&mut MapData, K, V> = map_mut(ebpf, name)?;
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k))
        .collect();
    for key in &keys {
        removed(map.remove(key)).map_err(map_err(name))?;
    }
    Ok(keys.len())
}

/// The SERVICE_PATHS key of a cgroup path relative to the cgroup2 mount:
/// `/path`, NUL-padded; None when too long (validation refuses such paths).
pub fn path_key(cgroup_path: &str) -> Option<[u8; CGROUP_PATH_MAX]> {
    let path = format!("/{cgroup_path}");
    let mut key = [0u8; CGROUP_PATH_MAX];
    // Room for the NUL the kernel writes after the string.
    if path.len() >= CGROUP_PATH_MAX {
        return None;
    }
    key[..path.len()].copy_from_slice(path.as_bytes());
    Some(key)
}

/// Records which flags any service of `policy` has (see ACTIVE_FLAGS).
/// Written after the services switch when flags are dropped, before when
/// they are added, so that a per-packet program never skips a service that
/// needs it.
pub fn write_active_flags(ebpf: &mut Ebpf, flags: u32) -> Result<(), KernelError> {
    let mut active: Array<&mut MapData, u32> = map_mut(ebpf, names::ACTIVE_FLAGS)?;
    active.set(0, flags, 0).map_err(|source| KernelError::Map {
        name: names::ACTIVE_FLAGS,
        source,
    })
}

/// The OR of every service's flags, with `ACTIVE_MANAGED` when there is a
/// service at all and `ACTIVE_ICMP` when one may open ping sockets.
pub fn active_flags(policy: &CompiledPolicy) -> u32 {
    policy.services.iter().fold(0, |acc, s| {
        let mut acc = acc | u32::from(s.entry.flags) | ACTIVE_MANAGED;
        if s.entry.sockets & SOCKETS_ICMP != 0 {
            acc |= ACTIVE_ICMP;
        }
        acc
    })
}

/// Points each service's cgroup path (SERVICE_PATHS) or unit name
/// (UNIT_NAMES) at its entry in `policy`, and removes those of `old` that
/// `policy` no longer has: what the cgroup_mkdir watcher looks up.
pub fn write_service_paths(
    ebpf: &mut Ebpf,
    policy: &CompiledPolicy,
    old: Option<&CompiledPolicy>,
) -> Result<(), KernelError> {
    let old = old.map(|o| o.services.as_slice()).unwrap_or_default();
    let gone = old
        .iter()
        .filter(|o| !policy.services.iter().any(|n| n.selector == o.selector));
    let path_err = |source| KernelError::Map {
        name: names::SERVICE_PATHS,
        source,
    };
    let mut paths: HashMap<&mut MapData, [u8; CGROUP_PATH_MAX], ServiceEntry> =
        map_mut(ebpf, names::SERVICE_PATHS)?;
    for s in &policy.services {
        if let Some(key) = cgroup_key(&s.selector) {
            paths.insert(key, s.entry, 0).map_err(path_err)?;
        }
    }
    for s in gone.clone() {
        if let Some(key) = cgroup_key(&s.selector) {
            removed(paths.remove(&key)).map_err(path_err)?;
        }
    }
    let unit_err = |source| KernelError::Map {
        name: names::UNIT_NAMES,
        source,
    };
    let mut units: HashMap<&mut MapData, UnitKey, ServiceEntry> = map_mut(ebpf, names::UNIT_NAMES)?;
    for s in &policy.services {
        if let Selector::Unit(u) = &s.selector {
            units.insert(u.key(), s.entry, 0).map_err(unit_err)?;
        }
    }
    for s in gone {
        if let Selector::Unit(u) = &s.selector {
            removed(units.remove(&u.key())).map_err(unit_err)?;
        }
    }
    Ok(())
}

fn cgroup_key(selector: &Selector) -> Option<[u8; CGROUP_PATH_MAX]> {
    match selector {
        Selector::Cgroup(path) => path_key(path),
        Selector::Unit(_) => None,
    }
}

/// Adds and removes service cgroups in the SERVICES map, every one even
/// when some fail; returns the changes that failed, with why.
pub fn apply_service_changes(
    ebpf: &mut Ebpf,
    changes: &[Change],
) -> Result<Vec<(Change, String)>, KernelError> {
    let mut services: HashMap<&mut MapData, u64, ServiceEntry> = map_mut(ebpf, names::SERVICES)?;
    let mut failed = Vec::new();
    for change in changes {
        let result = match *change {
            Change::Add { cgroup_id, entry } => services.insert(cgroup_id, entry, 0),
            Change::Remove { cgroup_id } => removed(services.remove(&cgroup_id)),
        };
        if let Err(e) = result {
            failed.push((*change, format!("cannot write the SERVICES map: {e}")));
        }
    }
    Ok(failed)
}

/// Makes HELD_SOCKETS hold `now` (socket cookie -> holder's cgroup id),
/// given that it held `before`. Returns how many sockets did not fit.
pub fn write_held_sockets(
    ebpf: &mut Ebpf,
    before: &std::collections::HashMap<u64, u64>,
    now: &std::collections::HashMap<u64, u64>,
) -> Result<u64, KernelError> {
    let map_err = |source| KernelError::Map {
        name: names::HELD_SOCKETS,
        source,
    };
    let mut held: HashMap<&mut MapData, u64, u64> = map_mut(ebpf, names::HELD_SOCKETS)?;
    for cookie in before.keys().filter(|c| !now.contains_key(c)) {
        removed(held.remove(cookie)).map_err(map_err)?;
    }
    let mut overflow = 0;
    for (cookie, cgroup) in now {
        if before.get(cookie) == Some(cgroup) {
            continue;
        }
        match held.insert(cookie, cgroup, 0) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                overflow += 1;
            }
            Err(e) => return Err(map_err(e)),
        }
    }
    Ok(overflow)
}
