//! The maps of egress by DNS name (agent_common::dns, agent-ebpf's
//! names.rs), taken out of the loaded object for the DNS proxy's tasks:
//! who sent a query (DNS_CLIENTS, read), the learnt addresses (LEARNT,
//! written), the proxy's address and heartbeat (DNS_PROXY). They stay
//! pinned with the others.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use agent_common::{
    DnsClientKey, DnsOrigin, DnsProxy, LearntKey, LearntValue, DNS_CLIENTS, DNS_PROXY, FAMILY_V4,
    FAMILY_V6, LEARNT,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    Ebpf,
};

use super::{map_access::removed, KernelError};

/// Who sent packets to the proxy, by their address (the kernel writes it).
pub struct DnsClients(HashMap<MapData, DnsClientKey, DnsOrigin>);

/// The learnt addresses.
pub struct Learnt(HashMap<MapData, LearntKey, LearntValue>);

/// Where the proxy listens, and its heartbeat.
pub struct ProxyBeat {
    map: Array<MapData, DnsProxy>,
    value: DnsProxy,
}

/// Takes the three maps out of the loaded object (after they are pinned).
pub fn take(ebpf: &mut Ebpf) -> Result<(DnsClients, Learnt, ProxyBeat), KernelError> {
    let mut take = |name: &'static str| ebpf.take_map(name).ok_or(KernelError::MissingMap(name));
    let err = |name| move |source| KernelError::Map { name, source };
    let clients = HashMap::try_from(take(DNS_CLIENTS)?).map_err(err(DNS_CLIENTS))?;
    let learnt = HashMap::try_from(take(LEARNT)?).map_err(err(LEARNT))?;
    let map = Array::try_from(take(DNS_PROXY)?).map_err(err(DNS_PROXY))?;
    let value = DnsProxy {
        heartbeat_ns: 0,
        addr4: [0; 4],
        port4: 0,
        port6: 0,
        addr6: [0; 16],
    };
    Ok((
        DnsClients(clients),
        Learnt(learnt),
        ProxyBeat { map, value },
    ))
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

impl Learnt {
    fn key(name_key: u64, addr: IpAddr) -> LearntKey {
        let (family, addr) = addr_bytes(addr);
        LearntKey {
            name_key,
            family,
            _pad: [0; 7],
            addr,
        }
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
        self.0.insert(Self::key(name_key, addr), value, 0)
    }

    pub fn revoke(&mut self, name_key: u64, addr: IpAddr) -> Result<(), MapError> {
        removed(self.0.remove(&Self::key(name_key, addr)))
    }

    /// Every entry: (service key, address, value).
    pub fn entries(&self) -> Vec<(u64, IpAddr, LearntValue)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.name_key, ip_of(k.family, k.addr), v))
            .collect()
    }

    /// Copies a previous agent's learnt addresses (its pinned map under
    /// `dir`), so that what it enforced stays enforced once this agent's
    /// programs replace its own. Returns how many; none if it had no map.
    pub fn restore_from(&mut self, dir: &Path) -> usize {
        let Ok(data) = MapData::from_pin(dir.join("maps").join(LEARNT)) else {
            return 0;
        };
        let Ok(old) = HashMap::<MapData, LearntKey, LearntValue>::try_from(Map::HashMap(data))
        else {
            return 0;
        };
        old.iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| self.0.insert(*k, *v, 0).is_ok())
            .count()
    }

    /// Removes the entries expired at `now_ns`. Returns how many.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        let expired: Vec<LearntKey> = self
            .0
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        expired
            .iter()
            .filter(|k| removed(self.0.remove(k)).is_ok())
            .count()
    }
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
