//! Upkeep of the UDP pinholes (`UDP_PEERS`, see the kernel side in
//! agent-ebpf/src/udp_peers.rs). The kernel opens and refreshes them and
//! ignores one unused for the idle timeout; the agent removes those, counts
//! what it removed against each service's bound, and after a policy switch judges
//! every pinhole again under the new policy: one the new policy no longer
//! allows is closed at once, not left open until it idles out.

use std::{
    collections::HashMap as StdHashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use agent_common::{
    maps as names, LpmV4Key, LpmV6Key, UdpPeer, UdpPeerKey, FAMILY_V4, FLAG_INGRESS, PEER_SENT,
    PROTO_ANY, PROTO_UDP,
};
use aya::{
    maps::{Array, HashMap, MapData, MapError},
    Ebpf,
};

use super::{
    addr_maps,
    compile::CompiledPolicy,
    map_access::{map_mut, map_ref},
    KernelError,
};

/// `BPF_EXIST`: update only a key that exists.
const BPF_EXIST: u64 = 2;

/// How often idle pinholes are removed.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Pinhole counters, for the metrics.
#[derive(Debug, Default)]
pub struct UdpPeerStats {
    /// Open after the last sweep.
    pub open: AtomicU64,
    /// Removed because unused for the idle timeout.
    pub closed_idle: AtomicU64,
    /// Closed because the policy no longer allows the peer.
    pub closed_policy: AtomicU64,
}

/// Removes idle pinholes and, when `previous` is the policy just replaced
/// by `live`, judges the ones made under it again. What it removes, and
/// what it moves to a service's new id, it counts in `UDP_PEER_RELEASED`;
/// it never writes the kernel's own count (`UDP_PEER_COUNT`), so a pinhole
/// the kernel opens during the sweep is never lost from the bound.
pub fn sweep(
    ebpf: &mut Ebpf,
    idle: Duration,
    live: &CompiledPolicy,
    previous: Option<&CompiledPolicy>,
    stats: &UdpPeerStats,
) -> Result<(), KernelError> {
    let now = monotonic_ns();
    let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
    let entries: Vec<(UdpPeerKey, UdpPeer)> = {
        let peers: HashMap<&MapData, UdpPeerKey, UdpPeer> = map_ref(ebpf, names::UDP_PEERS)?;
        peers.iter().filter_map(Result::ok).collect()
    };
    let mut drop = Vec::new();
    let mut moves = Vec::new();
    let mut open = 0;
    for (key, mut peer) in entries {
        let old = peer.service_id;
        if now.saturating_sub(peer.seen_ns) > idle_ns {
            stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            drop.push((key, old));
            continue;
        }
        let id = match live_id(live, previous, old) {
            Some(id) => id,
            None => {
                stats.closed_policy.fetch_add(1, Ordering::Relaxed);
                drop.push((key, old));
                continue;
            }
        };
        if id != old {
            if !allowed(ebpf, live, id, &key, &peer)? {
                stats.closed_policy.fetch_add(1, Ordering::Relaxed);
                drop.push((key, old));
                continue;
            }
            peer.service_id = id;
            moves.push((key, peer, old));
        }
        open += 1;
    }
    let touched = drop.iter().map(|(_, id)| *id).chain(
        moves
            .iter()
            .flat_map(|(_, peer, old)| [peer.service_id, *old]),
    );
    let mut released = Released::read(ebpf, touched)?;
    // A moved pinhole counts for its new id before it carries that id, and
    // for its old one until it no longer does: the bound errs on the safe
    // side while the sweep runs.
    for (_, peer, _) in &moves {
        released.add(peer.service_id, u64::MAX);
    }
    released.write(ebpf)?;
    {
        let mut peers: HashMap<&mut MapData, UdpPeerKey, UdpPeer> =
            map_mut(ebpf, names::UDP_PEERS)?;
        let err = |source| KernelError::Map {
            name: names::UDP_PEERS,
            source,
        };
        for (key, id) in &drop {
            match peers.remove(key) {
                Ok(()) => released.add(*id, 1),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(err(e)),
            }
        }
        for (key, peer, old) in &moves {
            // Only if still there: a rewrite must not reopen a pinhole.
            match peers.insert(key, peer, BPF_EXIST) {
                Ok(()) => released.add(*old, 1),
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    released.add(peer.service_id, 1);
                }
                Err(e) => return Err(err(e)),
            }
        }
    }
    released.write(ebpf)?;
    stats.open.store(open, Ordering::Relaxed);
    Ok(())
}

/// The agent's side of the count of the services a sweep touches:
/// `UDP_PEER_RELEASED`, read once per sweep. The agent is its only writer,
/// so reading, adding and writing back loses nothing.
struct Released {
    values: StdHashMap<u32, u64>,
    changed: Vec<u32>,
}

impl Released {
    fn read(ebpf: &Ebpf, ids: impl Iterator<Item = u32>) -> Result<Self, KernelError> {
        let map: Array<&MapData, u64> = map_ref(ebpf, names::UDP_PEER_RELEASED)?;
        let mut values = StdHashMap::new();
        for id in ids {
            if let std::collections::hash_map::Entry::Vacant(slot) = values.entry(id) {
                slot.insert(map.get(&id, 0).map_err(|source| KernelError::Map {
                    name: names::UDP_PEER_RELEASED,
                    source,
                })?);
            }
        }
        Ok(Self {
            values,
            changed: Vec::new(),
        })
    }

    /// Adds `n` (wrapping: `u64::MAX` takes one away) to `id`'s entry.
    fn add(&mut self, id: u32, n: u64) {
        let value = self.values.entry(id).or_default();
        *value = value.wrapping_add(n);
        self.changed.push(id);
    }

    fn write(&mut self, ebpf: &mut Ebpf) -> Result<(), KernelError> {
        let mut map: Array<&mut MapData, u64> = map_mut(ebpf, names::UDP_PEER_RELEASED)?;
        self.changed.sort_unstable();
        self.changed.dedup();
        for id in self.changed.drain(..) {
            let n = self.values.get(&id).copied().unwrap_or(0);
            map.set(id, n, 0).map_err(|source| KernelError::Map {
                name: names::UDP_PEER_RELEASED,
                source,
            })?;
        }
        Ok(())
    }
}

/// The id in `live` of the service a pinhole was made for: its own id if
/// it is one of `live`'s, the same service's new id if it was made under
/// `previous`, None if that service is gone.
fn live_id(live: &CompiledPolicy, previous: Option<&CompiledPolicy>, id: u32) -> Option<u32> {
    fn find(p: &CompiledPolicy, id: u32) -> Option<&super::CompiledService> {
        p.services.iter().find(|s| s.entry.service_id == id)
    }
    if find(live, id).is_some() {
        return Some(id);
    }
    let name = &find(previous?, id)?.name;
    live.services
        .iter()
        .find(|s| &s.name == name)
        .map(|s| s.entry.service_id)
}

/// Whether service `id` of `live` still allows the pinhole: it restricts
/// inbound traffic (else no pinhole is needed), and the rule behind it
/// still matches: an egress rule to the peer for one the service sent to,
/// an ingress rule from the peer to the local port for one let in. Looked
/// up in the kernel's own tries, as the programs do.
fn allowed(
    ebpf: &Ebpf,
    live: &CompiledPolicy,
    id: u32,
    key: &UdpPeerKey,
    peer: &UdpPeer,
) -> Result<bool, KernelError> {
    let Some(service) = live.services.iter().find(|s| s.entry.service_id == id) else {
        return Ok(false);
    };
    if service.entry.flags & FLAG_INGRESS == 0 {
        return Ok(false);
    }
    let sent = peer.origin == PEER_SENT;
    let port = if sent { key.port } else { peer.local_port };
    let maps = match (sent, key.family == FAMILY_V4) {
        (true, true) => addr_maps::EGRESS_V4,
        (true, false) => addr_maps::EGRESS_V6,
        (false, true) => addr_maps::INGRESS_V4,
        (false, false) => addr_maps::INGRESS_V6,
    };
    // The lookup the kernel programs make (agent-ebpf rules.rs).
    let ruleset = if key.family == FAMILY_V4 {
        let mut addr = [0; 4];
        addr.copy_from_slice(&key.addr[..4]);
        addr_maps::lookup(ebpf, maps, LpmV4Key::new(id, addr))?
    } else {
        addr_maps::lookup(ebpf, maps, LpmV6Key::new(id, key.addr))?
    };
    let Some(index) = ruleset else {
        return Ok(false);
    };
    let Some(set) = index
        .checked_sub(live.ruleset_base)
        .and_then(|i| live.rulesets.get(i as usize))
    else {
        return Ok(false);
    };
    Ok(set.ranges[..(set.len as usize).min(set.ranges.len())]
        .iter()
        .any(|r| (r.proto == PROTO_ANY || r.proto == PROTO_UDP) && (r.lo..=r.hi).contains(&port)))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
