//! Destinations as the detectors see them: an address group, a port and a
//! protocol, small and `Copy` so that counting one allocates nothing.

use std::{
    collections::HashSet,
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DestKey {
    /// The address with host bits cleared past `prefix`.
    pub ip: IpAddr,
    pub prefix: u8,
    pub port: u16,
    pub proto: u8,
}

impl DestKey {
    /// `ip` grouped by the prefix lengths of its family.
    #[must_use]
    pub fn new(ip: IpAddr, port: u16, proto: u8, v4_prefix: u8, v6_prefix: u8) -> Self {
        let (ip, prefix) = match ip {
            IpAddr::V4(a) => {
                let p = v4_prefix.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
                (IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), p)
            }
            IpAddr::V6(a) => {
                let p = v6_prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
                (IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)), p)
            }
        };
        Self {
            ip,
            prefix,
            port,
            proto,
        }
    }
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = matches!(
            (self.ip, self.prefix),
            (IpAddr::V4(_), 32) | (IpAddr::V6(_), 128)
        );
        match (self.ip, full) {
            (IpAddr::V4(a), true) => write!(f, "{a}:{}", self.port)?,
            (IpAddr::V6(a), true) => write!(f, "[{a}]:{}", self.port)?,
            (IpAddr::V4(a), false) => write!(f, "{a}/{}:{}", self.prefix, self.port)?,
            (IpAddr::V6(a), false) => write!(f, "[{a}/{}]:{}", self.prefix, self.port)?,
        }
        match self.proto {
            TCP => f.write_str("/tcp"),
            UDP => f.write_str("/udp"),
            n => write!(f, "/{n}"),
        }
    }
}

/// The protocol number of an event's `protocol` field.
#[must_use]
pub fn proto_number(protocol: Option<&str>) -> u8 {
    match protocol {
        Some("tcp") => TCP,
        Some("udp") => UDP,
        Some(n) => n.parse().unwrap_or(0),
        None => 0,
    }
}

/// A set that stops growing at its capacity (allocated once, up front,
/// and kept across `clear`). `len` saturates at the cap.
#[derive(Debug, Clone)]
pub struct Bounded<T> {
    set: HashSet<T, foldhash::fast::RandomState>,
    cap: usize,
}

impl<T: Hash + Eq> Bounded<T> {
    #[must_use]
    pub fn new(cap: usize) -> Self {
        Self::with_room(cap, 0)
    }

    /// Capped at `cap`, with room for `room` items allocated now.
    #[must_use]
    pub fn with_room(cap: usize, room: usize) -> Self {
        Self {
            set: HashSet::with_capacity_and_hasher(
                room.min(cap),
                foldhash::fast::RandomState::default(),
            ),
            cap,
        }
    }

    /// Adds `v` unless full; true if it was new and kept.
    pub fn insert(&mut self, v: T) -> bool {
        if self.set.len() >= self.cap {
            return false;
        }
        self.set.insert(v)
    }

    #[must_use]
    pub fn contains(&self, v: &T) -> bool {
        self.set.contains(v)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.set.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn clear(&mut self) {
        self.set.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.set.iter()
    }
}

/// The first few distinct items, for evidence (fixed capacity).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    items: Vec<DestKey>,
}

/// Sample destinations carried by an anomaly event.
pub const SAMPLES: usize = 5;

impl Samples {
    #[must_use]
    pub fn new() -> Self {
        Self {
            items: Vec::with_capacity(SAMPLES),
        }
    }

    pub fn push(&mut self, d: DestKey) {
        if self.items.len() < SAMPLES && !self.items.contains(&d) {
            self.items.push(d);
        }
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    #[must_use]
    pub fn render(&self) -> Vec<String> {
        self.items.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_prefix_and_prints() {
        let ip: IpAddr = "198.51.100.77".parse().expect("ip");
        assert_eq!(
            DestKey::new(ip, 443, TCP, 32, 64).to_string(),
            "198.51.100.77:443/tcp"
        );
        assert_eq!(
            DestKey::new(ip, 53, UDP, 24, 64).to_string(),
            "198.51.100.0/24:53/udp"
        );
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            DestKey::new(v6, 80, TCP, 32, 128).to_string(),
            "[2001:db8::1]:80/tcp"
        );
        assert_eq!(
            DestKey::new(ip, 1, 1, 0, 0).ip,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn bounded_set_stops_at_its_cap() {
        let mut s = Bounded::new(2);
        assert!(s.insert(1));
        assert!(!s.insert(1));
        assert!(s.insert(2));
        assert!(!s.insert(3));
        assert_eq!(s.len(), 2);
        s.clear();
        assert!(s.is_empty());
    }
}
