//! The maps of egress by DNS name (agent_common::dns, agent-ebpf's
//! names.rs), taken out of the loaded object for the DNS proxy's tasks:
//! who sent a query (DNS_CLIENTS, read), the learnt addresses (LEARNT_V4
//! and LEARNT, written), the proxy's address and heartbeat (DNS_PROXY), and the
//! sockets redirected to it (DNS_ORIGINS: only carried over from a
//! previous agent). They stay pinned with the others.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use agent_common::{
    DnsClientKey, DnsOrigin, DnsProxy, LearntKey, LearntV4Key, LearntV4Value, LearntValue,
    DNS_CLIENTS, DNS_ORIGINS, DNS_PROXY, FAMILY_V4, FAMILY_V6, LEARNT, LEARNT_V4,
    LEARNT_V4_KEY_BEFORE,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    Ebpf, Pod,
};

use super::{map_access::removed, KernelError};

/// Who sent packets to the proxy, by their address (the kernel writes it).
pub struct DnsClients(HashMap<MapData, DnsClientKey, DnsOrigin>);

/// The learnt addresses: IPv4 in LEARNT_V4, IPv6 in LEARNT. The kernel
/// allows whatever these maps hold (it reads no clock: see agent-ebpf's
/// names.rs), so an entry's expiry is enforced by its removal: the
/// cache's sweep for what it learnt or restored, [`Learnt::sweep_carried`]
/// for what a previous agent's maps carried over.
pub struct Learnt {
    v4: HashMap<MapData, LearntV4Key, LearntV4Value>,
    v6: HashMap<MapData, LearntKey, LearntValue>,
    /// (expiry, entry) of each entry copied from a previous agent, soonest
    /// first.
    carried: VecDeque<(u64, Entry)>,
    /// Entries whose removal failed: tried again at each sweep (the cache
    /// has forgotten them, and nothing else would remove them).
    retry: Vec<Entry>,
}

/// A learnt entry: the service's name key and the address as the kernel
/// judges it (an IPv4-mapped IPv6 address is IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    name_key: u64,
    addr: IpAddr,
}

/// Where the proxy listens, and its heartbeat.
pub struct ProxyBeat {
    map: Array<MapData, DnsProxy>,
    value: DnsProxy,
}

/// The sockets redirected to the proxy, by cookie (the kernel writes it).
pub struct DnsOrigins(HashMap<MapData, u64, DnsOrigin>);

/// The maps of name rules, out of the loaded object.
pub struct DnsMaps {
    pub clients: DnsClients,
    pub origins: DnsOrigins,
    pub learnt: Learnt,
    pub beat: ProxyBeat,
    /// Per key, the value a take-over's copy last put into our maps (see
    /// [`DnsMaps::carry_over_lookups`]).
    copied_clients: std::collections::HashMap<DnsClientKey, DnsOrigin>,
    copied_origins: std::collections::HashMap<u64, DnsOrigin>,
}

/// Takes the maps out of the loaded object (after they are pinned).
pub fn take(ebpf: &mut Ebpf) -> Result<DnsMaps, KernelError> {
    let mut take = |name: &'static str| ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
    let err = |name| move |source| KernelError::Map { name, source };
    let clients = HashMap::try_from(take(DNS_CLIENTS)?).map_err(err(DNS_CLIENTS))?;
    let origins = HashMap::try_from(take(DNS_ORIGINS)?).map_err(err(DNS_ORIGINS))?;
    let learnt_v4 = HashMap::try_from(take(LEARNT_V4)?).map_err(err(LEARNT_V4))?;
    let learnt_v6 = HashMap::try_from(take(LEARNT)?).map_err(err(LEARNT))?;
    let map = Array::try_from(take(DNS_PROXY)?).map_err(err(DNS_PROXY))?;
    let value = DnsProxy {
        heartbeat_ns: 0,
        addr4: [0; 4],
        port4: 0,
        port6: 0,
        addr6: [0; 16],
    };
    Ok(DnsMaps {
        clients: DnsClients(clients),
        origins: DnsOrigins(origins),
        learnt: Learnt {
            v4: learnt_v4,
            v6: learnt_v6,
            carried: VecDeque::new(),
            retry: Vec::new(),
        },
        beat: ProxyBeat { map, value },
        copied_clients: std::collections::HashMap::new(),
        copied_origins: std::collections::HashMap::new(),
    })
}

/// The hash map `name` pinned under a previous agent's pin directory
/// `dir`, if it has one of that type.
fn pinned<K: Pod, V: Pod>(dir: &Path, name: &str, lru: bool) -> Option<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(dir.join("maps").join(name)).ok()?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    HashMap::try_from(map).ok()
}

impl DnsMaps {
    /// Copies the lookups a previous agent's programs saw (the sockets they
    /// redirected, who sent to the proxy), so that a lookup sent while no
    /// agent ran, waiting in the proxy's held socket, is routed and its
    /// answer shown from its resolver. Called four times: before our
    /// programs attach (entries need not wait), just before its are
    /// detached (while both run, only its redirect, so a socket redirected
    /// since is in its maps alone; copied, ours know it when it sends),
    /// once its connect redirects are gone (see `takeover`), and once
    /// they all are (nothing writes into its maps any more). An entry of
    /// theirs replaces ours as [`takes_theirs`] says. Returns how many.
    pub fn carry_over_lookups(&mut self, dir: &Path) -> usize {
        merge_pinned(
            dir,
            DNS_ORIGINS,
            &mut self.origins.0,
            &mut self.copied_origins,
        ) + merge_pinned(
            dir,
            DNS_CLIENTS,
            &mut self.clients.0,
            &mut self.copied_clients,
        )
    }

    /// The take-over is over: what the copies kept is no longer needed.
    pub fn end_carry_over(&mut self) {
        self.copied_clients = std::collections::HashMap::new();
        self.copied_origins = std::collections::HashMap::new();
    }
}

/// Copies the previous agent's LRU map `name` under `dir` into `into`, key
/// by key as [`takes_theirs`] says, and notes what it copied.
fn merge_pinned<K: Pod + Eq + std::hash::Hash>(
    dir: &Path,
    name: &str,
    into: &mut HashMap<MapData, K, DnsOrigin>,
    copied: &mut std::collections::HashMap<K, DnsOrigin>,
) -> usize {
    let Some(theirs) = pinned::<K, DnsOrigin>(dir, name, true) else {
        return 0;
    };
    let mut count = 0;
    for (key, their) in theirs.iter().filter_map(Result::ok) {
        let ours = into.get(&key, 0).ok();
        if takes_theirs(ours, copied.get(&key).copied()) && into.insert(key, their, 0).is_ok() {
            copied.insert(key, their);
            count += 1;
        }
    }
    count
}

/// Whether the previous agent's entry replaces `ours` (`copied`: what our
/// last copy put there): when we have none, or ours is still what we
/// copied (theirs is as new or newer: their program saw packets ours did
/// not, before ours attached). An entry of ours that differs from the copy
/// was written by our program since and stays: while both agents'
/// programs run, ours run after theirs on every packet, and after the
/// detach ours alone, so a port passed from one socket to another, of
/// another service, never gets the older socket's entry back, and a
/// socket our connect4 redirected again keeps that resolver.
///
/// Comparing values cannot tell which program wrote last, so a socket the
/// previous agent redirected again (to another resolver, after our copy)
/// keeps our entry for the first resolver; that costs only the same
/// service's choice of resolver. Always taking theirs, and taking theirs
/// when it changed since the last copy, were each found by a review to
/// route a query as another service's (docs/dns-names.md).
fn takes_theirs<V: PartialEq + Copy>(ours: Option<V>, copied: Option<V>) -> bool {
    match ours {
        None => true,
        Some(ours) => copied == Some(ours),
    }
}

/// An address as the maps hold it: family and 16 bytes.
fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // The kernel judges a mapped address as IPv4.
            Some(v4) => addr_bytes(IpAddr::V4(v4)),
            None => (FAMILY_V6, a.octets()),
        },
    }
}

/// The address a map entry holds.
pub fn ip_of(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

impl DnsClients {
    /// Who sent from `client` over `protocol` (`PROTO_TCP`/`PROTO_UDP`),
    /// as the kernel recorded it on the way to the proxy.
    pub fn get(&self, protocol: u8, client: SocketAddr) -> Option<DnsOrigin> {
        let (family, addr) = addr_bytes(client.ip());
        let key = DnsClientKey {
            protocol,
            family,
            port: client.port(),
            addr,
        };
        self.0.get(&key, 0).ok()
    }
}

impl Entry {
    fn new(name_key: u64, addr: IpAddr) -> Self {
        let (family, bytes) = addr_bytes(addr);
        Self {
            name_key,
            addr: ip_of(family, bytes),
        }
    }
}

impl Learnt {
    fn insert(&mut self, e: Entry, value: LearntValue) -> Result<(), MapError> {
        match e.addr {
            // A slot held for another service whose name key folds alike
            // is taken over (the policy's compile warned of the pair).
            IpAddr::V4(a) => self.v4.insert(
                LearntV4Key::new(e.name_key, a.octets()),
                LearntV4Value::new(e.name_key, value),
                0,
            ),
            IpAddr::V6(a) => self.v6.insert(v6_key(e.name_key, a.octets()), value, 0),
        }
    }

    /// Removes `e`: absent (or held for another service whose name key
    /// folds the same, see agent_common::LearntV4Key) counts as removed.
    fn remove(&mut self, e: Entry) -> Result<(), MapError> {
        match e.addr {
            IpAddr::V4(a) => {
                let key = LearntV4Key::new(e.name_key, a.octets());
                match self.v4.get(&key, 0) {
                    Ok(held) if held.name_key != e.name_key => Ok(()),
                    Ok(_) => removed(self.v4.remove(&key)),
                    // Absent counts as removed; any other failure is
                    // tried again (a removal must not be lost).
                    Err(err) => removed(Err(err)),
                }
            }
            IpAddr::V6(a) => removed(self.v6.remove(&v6_key(e.name_key, a.octets()))),
        }
    }

    /// `e`'s value, if the maps hold it for `e`'s service.
    fn get(&self, e: Entry) -> Option<LearntValue> {
        match e.addr {
            IpAddr::V4(a) => self
                .v4
                .get(&LearntV4Key::new(e.name_key, a.octets()), 0)
                .ok()
                .filter(|v| v.name_key == e.name_key)
                .map(|v| v.learnt()),
            IpAddr::V6(a) => self.v6.get(&v6_key(e.name_key, a.octets()), 0).ok(),
        }
    }

    /// Every entry of both maps.
    fn all(&self) -> impl Iterator<Item = (Entry, LearntValue)> + '_ {
        v4_entries(&self.v4).chain(v6_entries(&self.v6))
    }

    /// The entries expired at `now_ns` (only those are kept in memory).
    fn expired(&self, now_ns: u64) -> Vec<Entry> {
        self.all()
            .filter(|(_, v)| v.expires_ns <= now_ns)
            .map(|(e, _)| e)
            .collect()
    }

    /// Tried again at the next sweep unless already.
    fn retry_later(&mut self, e: Entry) {
        if !self.retry.contains(&e) {
            self.retry.push(e);
        }
    }

    /// Removes `e`, or keeps it to be tried again; whether it is gone.
    fn remove_or_retry(&mut self, e: Entry) -> bool {
        let gone = self.remove(e).is_ok();
        if !gone {
            self.retry_later(e);
        }
        gone
    }

    pub fn allow(
        &mut self,
        name_key: u64,
        addr: IpAddr,
        expires_ns: u64,
        rules: u8,
    ) -> Result<(), MapError> {
        let value = LearntValue {
            expires_ns,
            rules,
            _pad: [0; 7],
        };
        let e = Entry::new(name_key, addr);
        self.insert(e, value)?;
        // Allowed again: no longer to be removed.
        self.retry.retain(|k| *k != e);
        Ok(())
    }

    /// Removes the entry; one whose removal fails is removed by a later
    /// [`Self::sweep_carried`].
    pub fn revoke(&mut self, name_key: u64, addr: IpAddr) -> Result<(), MapError> {
        let e = Entry::new(name_key, addr);
        let result = self.remove(e);
        if result.is_err() {
            self.retry_later(e);
        }
        result
    }

    /// Every entry: (service key, address, value).
    pub fn entries(&self) -> Vec<(u64, IpAddr, LearntValue)> {
        self.all().map(|(e, v)| (e.name_key, e.addr, v)).collect()
    }

    /// Copies a previous agent's learnt addresses not expired at `now_ns`
    /// (its pinned maps under `dir`: LEARNT_V4, with its 8-byte key or
    /// the 12-byte one before, and LEARNT; or LEARNT alone with both
    /// families from an agent before LEARNT_V4), so that what
    /// it enforced stays enforced once this agent's programs replace its
    /// own, until [`Self::sweep_carried`] removes each at its expiry.
    /// Returns how many; none if it had no such map.
    pub fn restore_from(&mut self, dir: &Path, now_ns: u64) -> usize {
        let mut old: Vec<(Entry, LearntValue)> = Vec::new();
        if let Some(map) = pinned::<LearntV4Key, LearntV4Value>(dir, LEARNT_V4, false) {
            old.extend(v4_entries(&map));
        } else if let Some(map) = pinned::<LearntV4KeyBefore, LearntValue>(dir, LEARNT_V4, false) {
            old.extend(v4_entries_before(&map));
        }
        if let Some(map) = pinned::<LearntKey, LearntValue>(dir, LEARNT, false) {
            old.extend(v6_entries(&map));
        }
        let mut copied: Vec<(u64, Entry)> = old
            .into_iter()
            .filter(|(_, v)| v.expires_ns > now_ns)
            .filter(|(e, v)| self.insert(*e, *v).is_ok())
            .map(|(e, v)| (v.expires_ns, e))
            .collect();
        copied.sort_by_key(|(expires, _)| *expires);
        let n = copied.len();
        self.carried.extend(copied);
        n
    }

    /// Removes the entries carried over from a previous agent that have
    /// expired at `now_ns`, unless learnt again since (the entry then
    /// holds a later expiry, and the cache removes it), and those whose
    /// revoke failed. Cheap: one lookup per entry due. Returns how many
    /// it removed.
    pub fn sweep_carried(&mut self, now_ns: u64) -> usize {
        let retry = std::mem::take(&mut self.retry);
        let mut removed_n = 0;
        for e in retry {
            removed_n += usize::from(self.remove_or_retry(e));
        }
        while let Some(&(expires, e)) = self.carried.front() {
            if expires > now_ns {
                break;
            }
            self.carried.pop_front();
            let due = self.get(e).is_some_and(|v| v.expires_ns <= now_ns);
            if due {
                removed_n += usize::from(self.remove_or_retry(e));
            }
        }
        removed_n
    }

    /// Removals refused and not yet done (see [`Self::sweep_carried`]).
    #[must_use]
    pub fn pending_removals(&self) -> usize {
        self.retry.len()
    }

    /// Entries held now (a walk of both maps).
    #[must_use]
    pub fn count(&self) -> usize {
        self.v4.keys().filter(Result::is_ok).count() + self.v6.keys().filter(Result::is_ok).count()
    }

    /// Removes the entries expired at `now_ns` (a walk of both maps); one
    /// whose removal fails is tried again by [`Self::sweep_carried`].
    /// Returns how many.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        let mut removed_n = 0;
        for e in self.expired(now_ns) {
            removed_n += usize::from(self.remove_or_retry(e));
        }
        removed_n
    }
}

/// The entries of a LEARNT_V4 map (ours or a previous agent's).
fn v4_entries<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, LearntV4Key, LearntV4Value>,
) -> impl Iterator<Item = (Entry, LearntValue)> + '_ {
    map.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (Entry::new(v.name_key, IpAddr::from(k.addr)), v.learnt()))
}

/// LEARNT_V4's key in an agent before [`LearntV4Key`]: the whole name key
/// (native order), then the address.
#[repr(C)]
#[derive(Clone, Copy)]
struct LearntV4KeyBefore {
    name_key: [u8; 8],
    addr: [u8; 4],
}

const _: () = assert!(std::mem::size_of::<LearntV4KeyBefore>() == LEARNT_V4_KEY_BEFORE);

// SAFETY: plain #[repr(C)] bytes, no padding, every bit pattern valid.
unsafe impl Pod for LearntV4KeyBefore {}

/// The entries of a previous agent's LEARNT_V4 with the key before.
fn v4_entries_before<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, LearntV4KeyBefore, LearntValue>,
) -> impl Iterator<Item = (Entry, LearntValue)> + '_ {
    map.iter().filter_map(Result::ok).map(|(k, v)| {
        let addr = IpAddr::from(k.addr);
        (Entry::new(u64::from_ne_bytes(k.name_key), addr), v)
    })
}

/// The entries of a LEARNT map: IPv6, and IPv4 too in the map of an agent
/// before LEARNT_V4.
fn v6_entries<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, LearntKey, LearntValue>,
) -> impl Iterator<Item = (Entry, LearntValue)> + '_ {
    map.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (Entry::new(k.name_key, ip_of(k.family, k.addr)), v))
}

/// The LEARNT key of an IPv6 address.
fn v6_key(name_key: u64, addr: [u8; 16]) -> LearntKey {
    LearntKey::v6(name_key, addr)
}

impl ProxyBeat {
    /// Where the proxy listens (`None`: that family is not redirected).
    pub fn set_addresses(&mut self, v4: Option<SocketAddr>, v6: Option<SocketAddr>) {
        if let Some(SocketAddr::V4(a)) = v4 {
            self.value.addr4 = a.ip().octets();
            self.value.port4 = a.port();
        }
        if let Some(SocketAddr::V6(a)) = v6 {
            self.value.addr6 = a.ip().octets();
            self.value.port6 = a.port();
        }
    }

    /// The proxy is alive at `now_ns` (CLOCK_MONOTONIC).
    pub fn beat(&mut self, now_ns: u64) -> Result<(), MapError> {
        self.value.heartbeat_ns = now_ns;
        self.map.set(0, self.value, 0)
    }
}

#[cfg(test)]
mod tests {
    use agent_common::DnsOrigin;

    use super::takes_theirs;

    fn origin(name_key: u64) -> DnsOrigin {
        DnsOrigin {
            name_key,
            service_id: 1,
            port: 53,
            family: agent_common::FAMILY_V4,
            _pad: 0,
            addr: [0; 16],
        }
    }

    #[test]
    fn an_entry_our_program_wrote_since_the_copy_stays() {
        let (a, b) = (origin(1), origin(2));
        // Nothing of ours: theirs.
        assert!(takes_theirs::<DnsOrigin>(None, None));
        assert!(takes_theirs(None, Some(a)));
        // Ours is what we copied: theirs is as new or newer.
        assert!(takes_theirs(Some(a), Some(a)));
        // Ours was written by our program (never copied, or since the
        // copy): ours.
        assert!(!takes_theirs(Some(b), None));
        assert!(!takes_theirs(Some(b), Some(a)));
    }
}
