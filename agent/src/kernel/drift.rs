//! The self-check: reads the policy maps back and compares them with the
//! policy in force and the managed cgroups. Whatever differs is drift: a
//! write that failed half-way, a retire that never happened, or a map
//! changed behind the agent's back.

use std::{
    collections::HashMap,
    fmt::Write as _,
    ops::Range,
    time::{Duration, Instant},
};

use agent_common::{
    maps as names, LpmV4Key, LpmV6Key, RuleSet, ServiceEntry, UnitKey, CGROUP_PATH_MAX,
};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData},
    Ebpf,
};

use super::{
    addr_maps::{self, AddrKey, AddrMaps},
    compile::CompiledPolicy,
    map_access::{map_err, map_ref},
    maps, KernelError,
};
use crate::policy::Selector;

/// What a difference is, as `bulkhead_enforcement_drift{kind}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A managed cgroup has no SERVICES entry (unenforced).
    ServiceMissing,
    /// A managed cgroup's SERVICES entry is not the policy's.
    ServiceEntry,
    /// A SERVICES entry for a cgroup that is no managed service's.
    ServiceUnknown,
    /// SERVICE_PATHS differs from the policy's service paths.
    ServicePath,
    /// A prefix of the policy is missing from its trie.
    PrefixMissing,
    /// A prefix in the live half that the policy does not have as such.
    PrefixWrong,
    /// A prefix left in the other half after its policy was retired.
    PrefixStale,
    /// A ruleset of the policy in force differs.
    Ruleset,
    /// ACTIVE_FLAGS is not what the policy's services need.
    ActiveFlags,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::ServiceMissing,
        Kind::ServiceEntry,
        Kind::ServiceUnknown,
        Kind::ServicePath,
        Kind::PrefixMissing,
        Kind::PrefixWrong,
        Kind::PrefixStale,
        Kind::Ruleset,
        Kind::ActiveFlags,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ServiceMissing => "service_missing",
            Kind::ServiceEntry => "service_entry",
            Kind::ServiceUnknown => "service_unknown",
            Kind::ServicePath => "service_path",
            Kind::PrefixMissing => "prefix_missing",
            Kind::PrefixWrong => "prefix_wrong",
            Kind::PrefixStale => "prefix_stale",
            Kind::Ruleset => "ruleset",
            Kind::ActiveFlags => "active_flags",
        }
    }
}

/// How many differences are described in full (the rest are counted).
const FIRST: usize = 10;

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Differences by kind, indexed like `Kind::ALL`.
    pub counts: [u64; Kind::ALL.len()],
    /// The first few, in words.
    pub first: Vec<String>,
    /// SERVICES keys that belong to no managed service (repair removes them).
    pub unknown_cgroups: Vec<u64>,
    /// Map entries read, and how long the check took.
    pub entries_read: u64,
    pub elapsed: Duration,
}

impl Report {
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn add(&mut self, kind: Kind, what: impl FnOnce() -> String) {
        if let Some(i) = Kind::ALL.iter().position(|k| *k == kind) {
            self.counts[i] += 1;
        }
        if self.first.len() < FIRST {
            self.first.push(format!("{}: {}", kind.as_str(), what()));
        }
    }

    /// `kind=count` for every kind found, for the log.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (kind, n) in Kind::ALL.iter().zip(self.counts) {
            if n > 0 {
                let _ = write!(
                    out,
                    "{}{}={n}",
                    if out.is_empty() { "" } else { " " },
                    kind.as_str()
                );
            }
        }
        out
    }
}

/// The managed cgroups as the agent knows them.
pub struct Cgroups<'a> {
    /// (cgroup id, the entry SERVICES must hold for it) of every managed
    /// service.
    pub managed: Vec<(u64, ServiceEntry)>,
    /// The id each service's cgroup path has now, with its entry. Called
    /// after SERVICES is read: a cgroup the kernel added at mkdir and the
    /// agent has not rescanned yet is then found here (it existed before
    /// the read), so it is not mistaken for drift.
    pub current: &'a dyn Fn() -> Vec<(u64, ServiceEntry)>,
}

/// Compares every policy map with `live` (in the half of service ids
/// `live_half`). `other_half`: the ids that must have no prefix left (None
/// while the previous policy is within its grace period).
pub fn check(
    ebpf: &Ebpf,
    live: &CompiledPolicy,
    live_half: Range<u32>,
    other_half: Option<Range<u32>>,
    cgroups: &Cgroups<'_>,
) -> Result<Report, KernelError> {
    let started = Instant::now();
    let mut report = Report::default();
    check_services(ebpf, cgroups, &mut report)?;
    check_paths(ebpf, live, &mut report)?;
    check_units(ebpf, live, &mut report)?;
    check_flags(ebpf, live, &mut report)?;
    check_rulesets(ebpf, live, &mut report)?;
    let halves = (&live_half, other_half.as_ref());
    let v4 = |k: &LpmV4Key| (k.service_id, k.addr.to_vec());
    let v6 = |k: &LpmV6Key| (k.service_id, k.addr.to_vec());
    for (maps, entries) in [
        (addr_maps::EGRESS_V4, &live.v4),
        (addr_maps::INGRESS_V4, &live.ingress_v4),
    ] {
        check_addrs(ebpf, maps, entries, v4, halves, &mut report)?;
    }
    for (maps, entries) in [
        (addr_maps::EGRESS_V6, &live.v6),
        (addr_maps::INGRESS_V6, &live.ingress_v6),
    ] {
        check_addrs(ebpf, maps, entries, v6, halves, &mut report)?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn check_services(
    ebpf: &Ebpf,
    cgroups: &Cgroups<'_>,
    report: &mut Report,
) -> Result<(), KernelError> {
    let map: BpfHashMap<&MapData, u64, ServiceEntry> = map_ref(ebpf, names::SERVICES)?;
    let found: HashMap<u64, ServiceEntry> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(names::SERVICES))?;
    report.entries_read += found.len() as u64;
    let current = (cgroups.current)();
    let expected: HashMap<u64, ServiceEntry> = cgroups.managed.iter().copied().collect();
    for (id, entry) in &found {
        // Else a cgroup the kernel added at mkdir, not rescanned yet: its
        // entry is checked, but it is never taken for an unknown one (the
        // repair would remove it).
        let want = expected
            .get(id)
            .or_else(|| current.iter().find(|(c, _)| c == id).map(|(_, e)| e));
        match want {
            Some(want) if want == entry => {}
            Some(want) => report.add(Kind::ServiceEntry, || {
                format!("cgroup {id} has service id {} (flags {:#x}), the policy in force says service id {} (flags {:#x})", entry.service_id, entry.flags, want.service_id, want.flags)
            }),
            None => {
                report.unknown_cgroups.push(*id);
                report.add(Kind::ServiceUnknown, || {
                    format!("cgroup {id} (service id {}) is no managed service's cgroup", entry.service_id)
                });
            }
        }
    }
    for (id, _) in &cgroups.managed {
        // A cgroup that is gone needs no entry (the rescan forgets it).
        let exists = current.iter().any(|(c, _)| c == id);
        if exists && !found.contains_key(id) {
            report.add(Kind::ServiceMissing, || {
                format!("managed cgroup {id} has no SERVICES entry: it is not enforced")
            });
        }
    }
    Ok(())
}

fn check_paths(ebpf: &Ebpf, live: &CompiledPolicy, report: &mut Report) -> Result<(), KernelError> {
    let map: BpfHashMap<&MapData, [u8; CGROUP_PATH_MAX], ServiceEntry> =
        map_ref(ebpf, names::SERVICE_PATHS)?;
    let mut expected: HashMap<[u8; CGROUP_PATH_MAX], ServiceEntry> = live
        .services
        .iter()
        .filter_map(|s| match &s.selector {
            Selector::Cgroup(path) => Some((maps::path_key(path)?, s.entry)),
            Selector::Unit(_) => None,
        })
        .collect();
    let show = |k: &[u8; CGROUP_PATH_MAX]| {
        String::from_utf8_lossy(k.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
    };
    for item in map.iter() {
        let (key, entry) = item.map_err(map_err(names::SERVICE_PATHS))?;
        report.entries_read += 1;
        match expected.remove(&key) {
            Some(want) if want == entry => {}
            Some(_) => report.add(Kind::ServicePath, || {
                format!(
                    "{} points at service id {}, not the policy's entry",
                    show(&key),
                    entry.service_id
                )
            }),
            None => report.add(Kind::ServicePath, || {
                format!("{} is no service's path in the policy", show(&key))
            }),
        }
    }
    for key in expected.keys() {
        report.add(Kind::ServicePath, || format!("{} is missing", show(key)));
    }
    Ok(())
}

/// UNIT_NAMES holds exactly the policy's units and templates.
fn check_units(ebpf: &Ebpf, live: &CompiledPolicy, report: &mut Report) -> Result<(), KernelError> {
    let map: BpfHashMap<&MapData, UnitKey, ServiceEntry> = map_ref(ebpf, names::UNIT_NAMES)?;
    let mut expected: HashMap<UnitKey, (&str, ServiceEntry)> = live
        .services
        .iter()
        .filter_map(|s| match &s.selector {
            Selector::Unit(u) => Some((u.key(), (u.name.as_str(), s.entry))),
            Selector::Cgroup(_) => None,
        })
        .collect();
    for item in map.iter() {
        let (key, entry) = item.map_err(map_err(names::UNIT_NAMES))?;
        report.entries_read += 1;
        match expected.remove(&key) {
            Some((_, want)) if want == entry => {}
            Some((name, _)) => report.add(Kind::ServicePath, || {
                format!(
                    "unit {name} points at service id {}, not the policy's entry",
                    entry.service_id
                )
            }),
            None => report.add(Kind::ServicePath, || {
                format!(
                    "unit key {:#x} (manager {}) is no unit of the policy",
                    key.hash, key.manager
                )
            }),
        }
    }
    for (name, _) in expected.values() {
        report.add(Kind::ServicePath, || format!("unit {name} is missing"));
    }
    Ok(())
}

fn check_flags(ebpf: &Ebpf, live: &CompiledPolicy, report: &mut Report) -> Result<(), KernelError> {
    let map: Array<&MapData, u32> = map_ref(ebpf, names::ACTIVE_FLAGS)?;
    let found = map.get(&0, 0).map_err(map_err(names::ACTIVE_FLAGS))?;
    report.entries_read += 1;
    let want = maps::active_flags(live);
    if found != want {
        report.add(Kind::ActiveFlags, || {
            format!("{found:#x}, the policy in force needs {want:#x}")
        });
    }
    Ok(())
}

fn check_rulesets(
    ebpf: &Ebpf,
    live: &CompiledPolicy,
    report: &mut Report,
) -> Result<(), KernelError> {
    let map: Array<&MapData, RuleSet> = map_ref(ebpf, names::RULESETS)?;
    for (i, want) in live.rulesets.iter().enumerate() {
        let index = live.ruleset_base + u32::try_from(i).unwrap_or(u32::MAX);
        let found = map.get(&index, 0).map_err(map_err(names::RULESETS))?;
        report.entries_read += 1;
        if found != *want {
            report.add(Kind::Ruleset, || {
                format!(
                    "ruleset {index} differs from the policy's ({} port ranges found, {} expected)",
                    found.len, want.len
                )
            });
        }
    }
    Ok(())
}

/// Where a prefix is: map, prefix length, service id, address.
type Place = (&'static str, u32, [u8; 4], Vec<u8>);

/// One trie and its hash of whole addresses (see `addr_maps`): the live
/// half must hold exactly the policy's prefixes, each in the map the
/// programs look in; the other half (when given) nothing.
fn check_addrs<K: AddrKey>(
    ebpf: &Ebpf,
    maps: AddrMaps,
    expected: &[(u32, K, u32)],
    bytes: impl Fn(&K) -> ([u8; 4], Vec<u8>),
    (live_half, other_half): (&Range<u32>, Option<&Range<u32>>),
    report: &mut Report,
) -> Result<(), KernelError> {
    let home = |len: u32| {
        if addr_maps::is_host::<K>(len) {
            maps.hosts
        } else {
            maps.trie
        }
    };
    let mut want: HashMap<Place, u32> = expected
        .iter()
        .map(|(len, key, ruleset)| {
            let (sid, addr) = bytes(key);
            ((home(*len), *len, sid, addr), *ruleset)
        })
        .collect();
    let show = |name: &str, len: u32, sid: [u8; 4], addr: &[u8]| {
        let ip: Option<std::net::IpAddr> = match addr.len() {
            4 => <[u8; 4]>::try_from(addr).ok().map(Into::into),
            _ => <[u8; 16]>::try_from(addr).ok().map(Into::into),
        };
        format!(
            "{name} service id {} {}/{}",
            u32::from_be_bytes(sid),
            ip.map_or_else(|| "?".to_string(), |ip| ip.to_string()),
            len.saturating_sub(32)
        )
    };
    for (name, (len, key, ruleset)) in addr_maps::read_all::<K>(ebpf, maps)? {
        report.entries_read += 1;
        let (sid, addr) = bytes(&key);
        let service = u32::from_be_bytes(sid);
        if live_half.contains(&service) {
            match want.remove(&(name, len, sid, addr.clone())) {
                Some(w) if w == ruleset => {}
                Some(w) => report.add(Kind::PrefixWrong, || {
                    format!(
                        "{} uses ruleset {ruleset}, the policy says {w}",
                        show(name, len, sid, &addr)
                    )
                }),
                None => report.add(Kind::PrefixWrong, || {
                    format!(
                        "{} (ruleset {ruleset}) is not in the policy in force",
                        show(name, len, sid, &addr)
                    )
                }),
            }
        } else if other_half.is_some_and(|h| h.contains(&service)) {
            report.add(Kind::PrefixStale, || {
                format!(
                    "{} (ruleset {ruleset}) is left from a retired policy",
                    show(name, len, sid, &addr)
                )
            });
        } else if other_half.is_some() {
            report.add(Kind::PrefixWrong, || {
                format!(
                    "{} lies outside both halves of service ids",
                    show(name, len, sid, &addr)
                )
            });
        }
    }
    for ((name, len, sid, addr), _) in want {
        report.add(Kind::PrefixMissing, || {
            format!("{} is missing", show(name, len, sid, &addr))
        });
    }
    Ok(())
}
