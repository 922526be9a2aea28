//! Names seen in the answers to lookups of services that only have them
//! observed (`observe_lookups = true`, no name rules): which name each
//! address came from, so that their decisions carry `dst_name` and
//! `learn` can propose name rules. Nothing here allows anything; the
//! kernel never sees it.
//!
//! Bounded: at most `limit` (service, address) entries, the oldest noted
//! dropped first; each kept `max(ttl, min_ttl)` after it was last seen.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use super::{
    answer::DnsName,
    learnt::{Nanos, ServiceId},
};

#[derive(Debug)]
struct Seen {
    name: DnsName,
    expires: Nanos,
    seq: u64,
}

/// The names observed per (service, address).
#[derive(Debug)]
pub struct ObservedNames {
    limit: usize,
    min_ttl: Duration,
    seen: HashMap<(ServiceId, IpAddr), Seen>,
    /// Order of noting, to drop the oldest first.
    order: BTreeMap<u64, (ServiceId, IpAddr)>,
    seq: u64,
}

impl ObservedNames {
    #[must_use]
    pub fn new(limit: usize, min_ttl: Duration) -> Self {
        Self {
            limit: limit.max(1),
            min_ttl,
            seen: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }

    /// `service`'s lookup of `name` answered `addr` with `ttl` seconds.
    pub fn note(&mut self, service: ServiceId, addr: IpAddr, name: &DnsName, ttl: u32, now: Nanos) {
        let keep = Duration::from_secs(u64::from(ttl)).max(self.min_ttl);
        let expires = now.saturating_add(u64::try_from(keep.as_nanos()).unwrap_or(u64::MAX));
        self.seq += 1;
        let key = (service, addr);
        if let Some(old) = self.seen.insert(
            key,
            Seen {
                name: name.clone(),
                expires,
                seq: self.seq,
            },
        ) {
            self.order.remove(&old.seq);
        }
        self.order.insert(self.seq, key);
        while self.seen.len() > self.limit {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.seen.remove(&oldest);
        }
    }

    /// The name `service` last looked up that answered `addr`, unless
    /// that has expired at `now`.
    #[must_use]
    pub fn name_of(&self, service: ServiceId, addr: IpAddr, now: Nanos) -> Option<&DnsName> {
        self.seen
            .get(&(service, addr))
            .filter(|s| s.expires > now)
            .map(|s| &s.name)
    }

    /// Drops what expired at `now`.
    pub fn sweep(&mut self, now: Nanos) {
        let order = &mut self.order;
        self.seen.retain(|_, s| {
            let keep = s.expires > now;
            if !keep {
                order.remove(&s.seq);
            }
            keep
        });
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    fn name(text: &str) -> DnsName {
        DnsName::from_ascii(text).expect("a name")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn a_name_is_kept_for_its_ttl_or_the_minimum_and_the_last_one_wins() {
        let mut o = ObservedNames::new(8, Duration::from_secs(30));
        o.note(1, ip("192.0.2.1"), &name("a.example.test"), 5, 0);
        assert_eq!(
            o.name_of(1, ip("192.0.2.1"), 29 * SEC),
            Some(&name("a.example.test"))
        );
        assert_eq!(o.name_of(1, ip("192.0.2.1"), 30 * SEC), None);
        assert_eq!(
            o.name_of(2, ip("192.0.2.1"), SEC),
            None,
            "another service's"
        );
        o.note(1, ip("192.0.2.1"), &name("b.example.test"), 300, SEC);
        assert_eq!(
            o.name_of(1, ip("192.0.2.1"), 60 * SEC),
            Some(&name("b.example.test"))
        );
        o.sweep(400 * SEC);
        assert!(o.is_empty());
    }

    #[test]
    fn past_the_limit_the_oldest_noted_goes() {
        let mut o = ObservedNames::new(2, Duration::from_secs(60));
        o.note(1, ip("192.0.2.1"), &name("a.example.test"), 60, 0);
        o.note(1, ip("192.0.2.2"), &name("a.example.test"), 60, 0);
        // Seen again: now the newest.
        o.note(1, ip("192.0.2.1"), &name("a.example.test"), 60, 0);
        o.note(1, ip("192.0.2.3"), &name("a.example.test"), 60, 0);
        assert_eq!(o.len(), 2);
        assert_eq!(o.name_of(1, ip("192.0.2.2"), 0), None);
        assert!(o.name_of(1, ip("192.0.2.1"), 0).is_some());
        assert!(o.name_of(1, ip("192.0.2.3"), 0).is_some());
    }
}
