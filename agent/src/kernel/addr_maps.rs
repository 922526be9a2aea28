//! Where a compiled prefix lives in the kernel: a whole address (/32,
//! /128) in the hash beside its LPM trie, a network in the trie. The
//! programs look in the hash first (agent-ebpf `rules.rs`): one lookup
//! whatever the number of rules, where a trie walk grows with the trie's
//! depth (BENCHMARKS.md: +100 ns a connect from 10 to 100,000 host rules
//! before the split). A whole address is the longest prefix there is, so
//! finding it in the hash is what the trie would have answered.

use agent_common::{maps as names, LpmV4Key, LpmV6Key};
use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError},
    Ebpf, Pod,
};

use super::{
    compile::CompiledPolicy,
    map_access::{map_err, map_mut, map_ref, removed},
    KernelError,
};

/// An LPM key type of the address maps.
pub trait AddrKey: Pod {
    /// The prefix length of an entry for one whole address.
    const FULL_PREFIX: u32;
}

impl AddrKey for LpmV4Key {
    const FULL_PREFIX: u32 = LpmV4Key::FULL_PREFIX;
}

impl AddrKey for LpmV6Key {
    const FULL_PREFIX: u32 = LpmV6Key::FULL_PREFIX;
}

/// A trie and the hash of its whole addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrMaps {
    pub trie: &'static str,
    pub hosts: &'static str,
}

impl AddrMaps {
    const fn pair(trie: &'static str, hosts: &'static str) -> Self {
        Self { trie, hosts }
    }
}

pub const EGRESS_V4: AddrMaps = AddrMaps::pair(names::EGRESS_V4, names::EGRESS_HOSTS_V4);
pub const EGRESS_V6: AddrMaps = AddrMaps::pair(names::EGRESS_V6, names::EGRESS_HOSTS_V6);
pub const INGRESS_V4: AddrMaps = AddrMaps::pair(names::INGRESS_V4, names::INGRESS_HOSTS_V4);
pub const INGRESS_V6: AddrMaps = AddrMaps::pair(names::INGRESS_V6, names::INGRESS_HOSTS_V6);

/// An entry `(prefix length, key, ruleset)` of the compiled policy.
pub type Entry<K> = (u32, K, u32);

/// What the address map `name` holds, in words for an operator.
#[must_use]
pub fn describe(name: &str) -> &'static str {
    match name {
        names::EGRESS_V4 => "egress IPv4 networks",
        names::EGRESS_HOSTS_V4 => "egress IPv4 addresses",
        names::EGRESS_V6 => "egress IPv6 networks",
        names::EGRESS_HOSTS_V6 => "egress IPv6 addresses",
        names::INGRESS_V4 => "ingress IPv4 networks",
        names::INGRESS_HOSTS_V4 => "ingress IPv4 addresses",
        names::INGRESS_V6 => "ingress IPv6 networks",
        names::INGRESS_HOSTS_V6 => "ingress IPv6 addresses",
        _ => "prefixes",
    }
}

/// Whether an entry of `len` bits goes to the hash.
#[must_use]
pub fn is_host<K: AddrKey>(len: u32) -> bool {
    len == K::FULL_PREFIX
}

/// How many entries of `policy` each address map holds (its maps hold
/// exactly what `maps::write_rules` put there).
#[must_use]
pub fn entry_counts(policy: &CompiledPolicy) -> [(&'static str, usize); 8] {
    let [a, b] = split_count(EGRESS_V4, &policy.v4);
    let [c, d] = split_count(EGRESS_V6, &policy.v6);
    let [e, f] = split_count(INGRESS_V4, &policy.ingress_v4);
    let [g, h] = split_count(INGRESS_V6, &policy.ingress_v6);
    [a, b, c, d, e, f, g, h]
}

/// `entries` counted by the map each goes to: the trie, then the hash.
fn split_count<K: AddrKey>(maps: AddrMaps, entries: &[Entry<K>]) -> [(&'static str, usize); 2] {
    let hosts = entries.iter().filter(|e| is_host::<K>(e.0)).count();
    [(maps.trie, entries.len() - hosts), (maps.hosts, hosts)]
}

/// Writes `entries` into `maps`, each where the programs look for it.
pub fn write<K: AddrKey>(
    ebpf: &mut Ebpf,
    maps: AddrMaps,
    entries: &[Entry<K>],
) -> Result<(), KernelError> {
    {
        let mut hosts: HashMap<&mut MapData, K, u32> = map_mut(ebpf, maps.hosts)?;
        for (_, key, ruleset) in entries.iter().filter(|e| is_host::<K>(e.0)) {
            hosts.insert(key, ruleset, 0).map_err(map_err(maps.hosts))?;
        }
    }
    let mut trie: LpmTrie<&mut MapData, K, u32> = map_mut(ebpf, maps.trie)?;
    for (len, key, ruleset) in entries.iter().filter(|e| !is_host::<K>(e.0)) {
        trie.insert(&Key::new(*len, *key), ruleset, 0)
            .map_err(map_err(maps.trie))?;
    }
    Ok(())
}

/// Every entry of `maps`, trie and hash, as `(prefix length, key,
/// ruleset)`, with the name of the map it came from.
pub fn read_all<K: AddrKey>(
    ebpf: &Ebpf,
    maps: AddrMaps,
) -> Result<Vec<(&'static str, Entry<K>)>, KernelError> {
    let trie: LpmTrie<&MapData, K, u32> = map_ref(ebpf, maps.trie)?;
    let mut all = Vec::new();
    for item in trie.iter() {
        let (key, ruleset) = item.map_err(map_err(maps.trie))?;
        all.push((maps.trie, (key.prefix_len(), key.data(), ruleset)));
    }
    let hosts: HashMap<&MapData, K, u32> = map_ref(ebpf, maps.hosts)?;
    for item in hosts.iter() {
        let (key, ruleset) = item.map_err(map_err(maps.hosts))?;
        all.push((maps.hosts, (K::FULL_PREFIX, key, ruleset)));
    }
    Ok(all)
}

/// Removes every entry of `maps` whose key `doomed` accepts (an unreadable
/// one too); returns how many went.
pub fn remove_where<K: AddrKey>(
    ebpf: &mut Ebpf,
    maps: AddrMaps,
    doomed: impl Fn(&K) -> bool,
) -> Result<usize, KernelError> {
    let mut gone = 0;
    {
        let mut trie: LpmTrie<&mut MapData, K, u32> = map_mut(ebpf, maps.trie)?;
        // Collected first: deleting while walking would skip keys.
        let keys = trie
            .keys()
            .filter(|k| k.as_ref().map_or(true, |k| doomed(&k.data())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(maps.trie))?;
        for key in &keys {
            removed(trie.remove(key)).map_err(map_err(maps.trie))?;
        }
        gone += keys.len();
    }
    let mut hosts: HashMap<&mut MapData, K, u32> = map_mut(ebpf, maps.hosts)?;
    let keys = hosts
        .keys()
        .filter(|k| k.as_ref().map_or(true, &doomed))
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(maps.hosts))?;
    for key in &keys {
        removed(hosts.remove(key)).map_err(map_err(maps.hosts))?;
    }
    Ok(gone + keys.len())
}

/// The ruleset the programs find for one whole address `key`, as they
/// look it up: the hash, then the trie.
pub fn lookup<K: AddrKey>(ebpf: &Ebpf, maps: AddrMaps, key: K) -> Result<Option<u32>, KernelError> {
    let hosts: HashMap<&MapData, K, u32> = map_ref(ebpf, maps.hosts)?;
    match hosts.get(&key, 0) {
        Ok(ruleset) => return Ok(Some(ruleset)),
        Err(MapError::KeyNotFound) => {}
        Err(source) => return Err(map_err(maps.hosts)(source)),
    }
    let trie: LpmTrie<&MapData, K, u32> = map_ref(ebpf, maps.trie)?;
    match trie.get(&Key::new(K::FULL_PREFIX, key), 0) {
        Ok(ruleset) => Ok(Some(ruleset)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(map_err(maps.trie)(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::compiled_from;

    #[test]
    fn whole_addresses_go_to_the_hash_and_networks_to_the_trie() {
        let p = compiled_from(
            "cgroup = \"/s\"\nmode = \"enforce\"\n\
             [[egress]]\nto = [\"198.18.0.1\", \"198.18.1.0/24\", \"2001:db8::1\", \"2001:db8:1::/48\", \"2001:db8::2/128\"]\nports = [443]\n\
             [[ingress]]\nfrom = [\"198.18.0.9/32\"]\nports = [22]\n",
        );
        let counts = entry_counts(&p);
        assert_eq!(
            counts,
            [
                (names::EGRESS_V4, 1),
                (names::EGRESS_HOSTS_V4, 1),
                (names::EGRESS_V6, 1),
                (names::EGRESS_HOSTS_V6, 2),
                (names::INGRESS_V4, 0),
                (names::INGRESS_HOSTS_V4, 1),
                (names::INGRESS_V6, 0),
                (names::INGRESS_HOSTS_V6, 0),
            ]
        );
        assert!(is_host::<LpmV4Key>(LpmV4Key::prefix_len(32)));
        assert!(!is_host::<LpmV4Key>(LpmV4Key::prefix_len(31)));
        assert!(is_host::<LpmV6Key>(LpmV6Key::prefix_len(128)));
        assert!(!is_host::<LpmV6Key>(LpmV6Key::prefix_len(32)));
    }
}
