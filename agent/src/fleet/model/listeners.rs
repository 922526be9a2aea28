//! Who listens where across the fleet, and when: the owner of an address
//! and port now (what a policy allows reaches it) or at the time of a flow
//! (an address can move from one host to another). Loopback addresses
//! exist on every host, so they resolve only on the caller's own host.

use std::{collections::HashMap, net::IpAddr};

use ipnetwork::IpNetwork;

use super::input::Listener;

/// A listener row is current when last seen within this many seconds of
/// the latest row of its endpoint and of its host: agents refresh their
/// listeners every minute at least, not all at the same second.
pub const CURRENT_SLACK_SECS: u64 = 120;

/// An address as one sortable key: family first, so that a network's
/// addresses are one contiguous range.
type AddrKey = (u8, u128);

fn key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(a) => (4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (6, u128::from(a)),
    }
}

fn range(net: &IpNetwork) -> (AddrKey, AddrKey) {
    match net {
        IpNetwork::V4(n) => (
            (4, u128::from(u32::from(n.network()))),
            (4, u128::from(u32::from(n.broadcast()))),
        ),
        IpNetwork::V6(n) => {
            let lo = u128::from(n.network());
            let host_bits = 128 - u32::from(n.prefix());
            let hi = if host_bits == 128 {
                u128::MAX
            } else {
                lo | ((1u128 << host_bits) - 1)
            };
            ((6, lo), (6, hi))
        }
    }
}

/// Every listener row, sorted by address for range lookups.
pub struct Listeners {
    rows: Vec<Listener>,
    keys: Vec<AddrKey>,
    /// Per row: whether it is among the current owners of its endpoint.
    current: Vec<bool>,
}

impl Listeners {
    pub fn new(mut rows: Vec<Listener>) -> Self {
        rows.sort_by(|a, b| {
            (key(a.addr), a.port, &a.protocol, &a.host).cmp(&(
                key(b.addr),
                b.port,
                &b.protocol,
                &b.host,
            ))
        });
        let keys: Vec<AddrKey> = rows.iter().map(|r| key(r.addr)).collect();
        // The latest row of each endpoint (a loopback one is each host's
        // own) and of each host: a row is current while it keeps up with
        // both, so a listener that stopped, or an address that moved to
        // another host, stops being current once its host's agent has
        // reported without it for CURRENT_SLACK_SECS.
        let endpoint = |r: &Listener| {
            let host = if r.addr.is_loopback() {
                r.host.clone()
            } else {
                String::new()
            };
            (key(r.addr), r.port, r.protocol.clone(), host)
        };
        let mut latest: HashMap<(AddrKey, u16, String, String), u64> = HashMap::new();
        let mut host_latest: HashMap<&str, u64> = HashMap::new();
        for r in &rows {
            let e = latest.entry(endpoint(r)).or_default();
            *e = (*e).max(r.last_seen);
            let h = host_latest.entry(r.host.as_str()).or_default();
            *h = (*h).max(r.last_seen);
        }
        let fresh = |seen: u64, latest: Option<&u64>| {
            latest.is_some_and(|&l| seen.saturating_add(CURRENT_SLACK_SECS) >= l)
        };
        let current = rows
            .iter()
            .map(|r| {
                fresh(r.last_seen, latest.get(&endpoint(r)))
                    && fresh(r.last_seen, host_latest.get(r.host.as_str()))
            })
            .collect();
        Self {
            rows,
            keys,
            current,
        }
    }

    /// Rows whose address lies in `net`.
    fn in_net(&self, net: &IpNetwork) -> impl Iterator<Item = (usize, &Listener)> {
        let (lo, hi) = range(net);
        let start = self.keys.partition_point(|k| *k < lo);
        let end = self.keys.partition_point(|k| *k <= hi);
        (start..end).map(move |i| (i, &self.rows[i]))
    }

    /// Current listeners inside `net` that pass `filter` (port and
    /// protocol), as seen from `from_host`.
    pub fn current_in<'a>(
        &'a self,
        net: &IpNetwork,
        from_host: &'a str,
        filter: impl Fn(&Listener) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Listener> + 'a {
        self.in_net(net).filter_map(move |(i, l)| {
            (self.current[i] && visible(l, from_host) && filter(l)).then_some(l)
        })
    }

    /// Who listened on `addr`:`port`/`protocol` between `first` and `last`
    /// (Unix seconds), seen from `from_host`: the owner that started
    /// listening last before `last`, among those whose time overlaps.
    pub fn owner_at(
        &self,
        addr: IpAddr,
        port: u16,
        protocol: &str,
        from_host: &str,
        (first, last): (u64, u64),
    ) -> Option<&Listener> {
        let k = key(addr);
        let start = self.keys.partition_point(|x| *x < k);
        let end = self.keys.partition_point(|x| *x <= k);
        self.rows[start..end]
            .iter()
            .filter(|l| l.port == port && l.protocol == protocol && visible(l, from_host))
            .filter(|l| {
                l.first_seen <= last.saturating_add(CURRENT_SLACK_SECS)
                    && l.last_seen.saturating_add(CURRENT_SLACK_SECS) >= first
            })
            .max_by_key(|l| (l.first_seen, l.last_seen))
    }
}

/// A loopback listener is reachable only from its own host.
fn visible(l: &Listener, from_host: &str) -> bool {
    !l.addr.is_loopback() || l.host == from_host
}
