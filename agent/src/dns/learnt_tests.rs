//! The learnt-address cache against a map of the kernel map's shape.

use std::time::Duration;

use super::*;

const SEC: Nanos = 1_000_000_000;

fn name(text: &str) -> DnsName {
    DnsName::from_ascii(text).expect("test bug: name")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test bug: address")
}

fn answered(addr: IpAddr, ttl: u32, rules: RuleBits) -> Answered {
    Answered { addr, ttl, rules }
}

fn cache(min_ttl_secs: u64, max_per_name: usize) -> LearntCache {
    LearntCache::new(LearntLimits {
        min_ttl: Duration::from_secs(min_ttl_secs),
        max_per_name,
        ..LearntLimits::default()
    })
}

#[test]
fn an_address_expires_after_its_ttl_or_the_minimum_whichever_is_longer() {
    let mut c = cache(30, 8);
    let mut map = MemoryMap::new();
    let n = name("api.example.com");
    let now = 1_000 * SEC;
    assert_eq!(
        c.learn(&mut map, 1, &n, answered(ip("198.51.100.1"), 5, 1), now),
        Ok(Learnt::New)
    );
    assert_eq!(
        c.learn(&mut map, 1, &n, answered(ip("198.51.100.2"), 300, 1), now),
        Ok(Learnt::New)
    );
    assert_eq!(map.get(&(1, ip("198.51.100.1"))), Some(&(now + 30 * SEC)));
    assert_eq!(map.get(&(1, ip("198.51.100.2"))), Some(&(now + 300 * SEC)));
    assert_eq!(c.len(), 2);
}

#[test]
fn learning_again_extends_but_never_shortens() {
    let mut c = cache(1, 8);
    let mut map = MemoryMap::new();
    let n = name("api.example.com");
    let a = ip("198.51.100.1");
    c.learn(&mut map, 1, &n, answered(a, 100, 1), 0)
        .expect("learn");
    assert_eq!(
        c.learn(&mut map, 1, &n, answered(a, 10, 1), 50 * SEC),
        Ok(Learnt::Refreshed)
    );
    assert_eq!(map[&(1, a)], 100 * SEC);
    c.learn(&mut map, 1, &n, answered(a, 100, 1), 50 * SEC)
        .expect("learn");
    assert_eq!(map[&(1, a)], 150 * SEC);
    assert_eq!(c.len(), 1);
}

#[test]
fn one_name_holds_at_most_n_and_the_oldest_goes_first() {
    let mut c = cache(60, 3);
    let mut map = MemoryMap::new();
    let n = name("many.example.com");
    for i in 1..=5u8 {
        c.learn(
            &mut map,
            1,
            &n,
            Answered {
                addr: IpAddr::from([198, 51, 100, i]),
                ttl: 60,
                rules: 1,
            },
            u64::from(i),
        )
        .expect("learn");
    }
    assert_eq!(
        c.addresses(1, &n),
        vec![ip("198.51.100.3"), ip("198.51.100.4"), ip("198.51.100.5")]
    );
    assert_eq!(c.evictions(), 2);
    let kernel: Vec<IpAddr> = map.keys().map(|(_, a)| *a).collect();
    assert_eq!(kernel, c.addresses(1, &n));
    // Re-learning the oldest makes it the newest: .4 goes next, not .3.
    c.learn(&mut map, 1, &n, answered(ip("198.51.100.3"), 60, 1), 10)
        .expect("learn");
    c.learn(&mut map, 1, &n, answered(ip("198.51.100.6"), 60, 1), 11)
        .expect("learn");
    assert_eq!(
        c.addresses(1, &n),
        vec![ip("198.51.100.5"), ip("198.51.100.3"), ip("198.51.100.6")]
    );
    assert_eq!(c.evictions(), 3);
    assert!(!map.contains_key(&(1, ip("198.51.100.4"))));
}

#[test]
fn the_cap_is_per_family_so_an_aaaa_answer_never_evicts_the_a_answer() {
    let mut c = cache(60, 2);
    let mut map = MemoryMap::new();
    let n = name("dual.example.com");
    let mut t = 0;
    let mut learn = |c: &mut LearntCache, map: &mut MemoryMap, a: &str| {
        t += 1;
        c.learn(map, 1, &n, answered(ip(a), 60, 1), t)
            .expect("learn");
    };
    // The A answer, then the AAAA answer, as glibc asks them.
    learn(&mut c, &mut map, "198.51.100.1");
    learn(&mut c, &mut map, "198.51.100.2");
    learn(&mut c, &mut map, "2001:db8::1");
    learn(&mut c, &mut map, "2001:db8::2");
    assert_eq!(c.len(), 4);
    assert_eq!(c.evictions(), 0);
    // One more of a family evicts the oldest of that family only.
    learn(&mut c, &mut map, "2001:db8::3");
    assert_eq!(
        c.addresses(1, &n),
        vec![
            ip("198.51.100.1"),
            ip("198.51.100.2"),
            ip("2001:db8::2"),
            ip("2001:db8::3")
        ]
    );
    learn(&mut c, &mut map, "198.51.100.3");
    assert_eq!(
        c.addresses(1, &n),
        vec![
            ip("198.51.100.2"),
            ip("2001:db8::2"),
            ip("2001:db8::3"),
            ip("198.51.100.3")
        ]
    );
    assert_eq!(c.evictions(), 2);
    let kernel: std::collections::BTreeSet<IpAddr> = map.keys().map(|(_, a)| *a).collect();
    let held: std::collections::BTreeSet<IpAddr> = c.addresses(1, &n).into_iter().collect();
    assert_eq!(kernel, held);
}

#[test]
fn a_thousand_addresses_stay_within_the_cap() {
    let mut c = cache(60, 16);
    let mut map = MemoryMap::new();
    let n = name("wide.example.com");
    for i in 0..1_000u32 {
        let [_, _, hi, lo] = i.to_be_bytes();
        c.learn(
            &mut map,
            7,
            &n,
            Answered {
                addr: IpAddr::from([198, 18, hi, lo]),
                ttl: 60,
                rules: 1,
            },
            0,
        )
        .expect("learn");
    }
    assert_eq!(c.len(), 16);
    assert_eq!(map.len(), 16);
    assert_eq!(c.evictions(), 1_000 - 16);
}

#[test]
fn services_never_share_what_they_learn() {
    let mut c = cache(60, 8);
    let mut map = MemoryMap::new();
    let n = name("api.example.com");
    let a = ip("198.51.100.1");
    c.learn(&mut map, 1, &n, answered(a, 60, 1), 0)
        .expect("learn");
    assert!(map.contains_key(&(1, a)));
    assert!(!map.contains_key(&(2, a)));
    assert_eq!(c.addresses(2, &n), Vec::<IpAddr>::new());
}

#[test]
fn evictions_are_counted_by_the_service_whose_address_went() {
    let mut c = cache(60, 2);
    let mut map = MemoryMap::new();
    let n = name("many.example.com");
    for (service, count) in [(1, 5u8), (2, 3)] {
        for i in 1..=count {
            c.learn(
                &mut map,
                service,
                &n,
                answered(IpAddr::from([198, 51, 100, i]), 60, 1),
                u64::from(i),
            )
            .expect("learn");
        }
    }
    assert_eq!(
        c.evictions_by_service(),
        HashMap::from([(1, 3), (2, 1)]),
        "5 and 3 addresses through a cap of 2"
    );
    assert_eq!(c.evictions(), 4);
}

#[test]
fn an_address_two_names_hold_stays_until_the_last_lets_go() {
    let mut c = cache(1, 1);
    let mut map = MemoryMap::new();
    let (x, y) = (name("x.example.com"), name("y.example.com"));
    let shared = ip("198.51.100.9");
    c.learn(&mut map, 1, &x, answered(shared, 100, 1), 0)
        .expect("learn");
    c.learn(&mut map, 1, &y, answered(shared, 10, 1), 0)
        .expect("learn");
    assert_eq!(map[&(1, shared)], 100 * SEC);
    // x evicts the shared address; y still holds it, until its own expiry.
    c.learn(&mut map, 1, &x, answered(ip("198.51.100.10"), 100, 1), 0)
        .expect("learn");
    assert_eq!(c.evictions(), 1);
    assert_eq!(map[&(1, shared)], 10 * SEC);
    // y lets it go too: gone from the kernel.
    c.learn(&mut map, 1, &y, answered(ip("198.51.100.11"), 100, 1), 0)
        .expect("learn");
    assert!(!map.contains_key(&(1, shared)));
    assert_eq!(c.held_until(1, shared), None);
}

#[test]
fn a_sweep_drops_what_expired_and_nothing_else() {
    let mut c = cache(1, 8);
    let mut map = MemoryMap::new();
    let n = name("api.example.com");
    c.learn(&mut map, 1, &n, answered(ip("198.51.100.1"), 5, 1), 0)
        .expect("learn");
    c.learn(&mut map, 1, &n, answered(ip("198.51.100.2"), 50, 1), 0)
        .expect("learn");
    assert_eq!(c.sweep(&mut map, 4 * SEC), Ok(0));
    assert_eq!(c.sweep(&mut map, 5 * SEC), Ok(1));
    assert_eq!(c.expirations(), 1);
    assert_eq!(c.addresses(1, &n), vec![ip("198.51.100.2")]);
    assert_eq!(map.len(), 1);
    assert_eq!(c.sweep(&mut map, 50 * SEC), Ok(1));
    assert!(c.is_empty());
    assert!(map.is_empty());
}

/// A sink that refuses every write, like a full kernel map.
struct Full;

impl LearntSink for Full {
    fn allow(&mut self, _: ServiceId, _: IpAddr, _: Nanos, _: RuleBits) -> Result<(), SinkError> {
        Err(SinkError("full".into()))
    }
    fn revoke(&mut self, _: ServiceId, _: IpAddr) -> Result<(), SinkError> {
        Err(SinkError("full".into()))
    }
}

/// A map that refuses to remove one address.
struct Stuck {
    map: MemoryMap,
    stuck: IpAddr,
}

impl LearntSink for Stuck {
    fn allow(
        &mut self,
        s: ServiceId,
        a: IpAddr,
        until: Nanos,
        r: RuleBits,
    ) -> Result<(), SinkError> {
        self.map.allow(s, a, until, r)
    }
    fn revoke(&mut self, s: ServiceId, a: IpAddr) -> Result<(), SinkError> {
        if a == self.stuck {
            return Err(SinkError("stuck".into()));
        }
        self.map.revoke(s, a)
    }
}

/// The programs read no expiry: an expired entry the sweep does not
/// revoke stays allowed. One refused revoke must not keep the sweep from
/// revoking the others.
#[test]
fn a_refused_revoke_does_not_stop_the_sweep_revoking_the_rest() {
    let mut c = cache(1, 8);
    let n = name("api.example.com");
    let mut sink = Stuck {
        map: MemoryMap::new(),
        stuck: ip("198.51.100.1"),
    };
    for addr in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        c.learn(&mut sink, 1, &n, answered(ip(addr), 1, 1), 0)
            .expect("learn");
    }
    assert_eq!(c.sweep(&mut sink, 10 * SEC), Err(SinkError("stuck".into())));
    assert!(c.is_empty());
    let left: Vec<IpAddr> = sink.map.keys().map(|(_, a)| *a).collect();
    assert_eq!(left, [ip("198.51.100.1")]);
}

#[test]
fn a_refused_write_learns_nothing() {
    let mut c = cache(1, 8);
    let n = name("api.example.com");
    assert_eq!(
        c.learn(&mut Full, 1, &n, answered(ip("198.51.100.1"), 60, 1), 0),
        Err(LearnError::Sink(SinkError("full".into())))
    );
    assert!(c.is_empty());
}

#[test]
fn past_the_total_limit_nothing_new_is_learnt_but_refreshes_and_evictions_go_on() {
    let mut c = LearntCache::new(LearntLimits {
        min_ttl: Duration::from_secs(1),
        max_per_name: 2,
        max_total: 3,
    });
    let mut map = MemoryMap::new();
    let (x, y) = (name("x.example.com"), name("y.example.com"));
    c.learn(&mut map, 1, &x, answered(ip("198.51.100.1"), 60, 1), 0)
        .expect("learn");
    c.learn(&mut map, 1, &x, answered(ip("198.51.100.2"), 60, 1), 0)
        .expect("learn");
    c.learn(&mut map, 1, &y, answered(ip("198.51.100.3"), 60, 1), 0)
        .expect("learn");
    assert_eq!(
        c.learn(&mut map, 1, &y, answered(ip("198.51.100.4"), 60, 1), 0),
        Err(LearnError::Full(3))
    );
    assert!(!map.contains_key(&(1, ip("198.51.100.4"))));
    // Known: refreshed. At its name's cap: the oldest makes room.
    assert_eq!(
        c.learn(&mut map, 1, &y, answered(ip("198.51.100.3"), 60, 1), 1),
        Ok(Learnt::Refreshed)
    );
    assert_eq!(
        c.learn(&mut map, 1, &x, answered(ip("198.51.100.5"), 60, 1), 1),
        Ok(Learnt::New)
    );
    assert_eq!(c.len(), 3);
    assert_eq!(map.len(), 3);
    // Expiry frees room.
    assert_eq!(c.sweep(&mut map, 61 * SEC), Ok(3));
    assert_eq!(c.len(), 0);
    assert_eq!(
        c.learn(
            &mut map,
            1,
            &y,
            answered(ip("198.51.100.4"), 60, 1),
            62 * SEC
        ),
        Ok(Learnt::New)
    );
}

#[test]
fn a_cap_of_zero_is_taken_as_one() {
    let c = cache(1, 0);
    assert_eq!(c.limits().max_per_name, 1);
}

#[test]
fn the_clock_is_monotonic_nanoseconds() {
    let a = monotonic_now();
    let b = monotonic_now();
    assert!(a > 0 && b >= a);
}

/// Records the rule bits the kernel would get.
#[derive(Default)]
struct Bits(std::collections::BTreeMap<(ServiceId, IpAddr), RuleBits>);

impl LearntSink for Bits {
    fn allow(
        &mut self,
        s: ServiceId,
        a: IpAddr,
        _: Nanos,
        rules: RuleBits,
    ) -> Result<(), SinkError> {
        self.0.insert((s, a), rules);
        Ok(())
    }

    fn revoke(&mut self, s: ServiceId, a: IpAddr) -> Result<(), SinkError> {
        self.0.remove(&(s, a));
        Ok(())
    }
}

#[test]
fn an_address_carries_the_rules_of_every_name_holding_it_and_loses_them_with_the_name() {
    let mut c = cache(60, 1);
    let mut sink = Bits::default();
    let shared = ip("198.51.100.20");
    c.learn(
        &mut sink,
        1,
        &name("a.example.com"),
        answered(shared, 60, 0b01),
        0,
    )
    .expect("learn");
    c.learn(
        &mut sink,
        1,
        &name("b.example.com"),
        answered(shared, 60, 0b10),
        0,
    )
    .expect("learn");
    assert_eq!(sink.0[&(1, shared)], 0b11, "both rules' ports apply");
    // a.example.com's next address evicts the shared one from it (cap 1):
    // only b.example.com's rule is left.
    c.learn(
        &mut sink,
        1,
        &name("a.example.com"),
        answered(ip("198.51.100.21"), 60, 0b01),
        1,
    )
    .expect("learn");
    assert_eq!(sink.0[&(1, shared)], 0b10);
}

#[test]
fn forgetting_a_service_revokes_all_it_learnt_and_nothing_of_others() {
    let mut c = cache(60, 4);
    let mut map = MemoryMap::new();
    let shared = ip("198.51.100.30");
    c.learn(
        &mut map,
        1,
        &name("a.example.com"),
        answered(shared, 60, 1),
        0,
    )
    .expect("learn");
    c.learn(
        &mut map,
        1,
        &name("b.example.com"),
        answered(shared, 60, 1),
        0,
    )
    .expect("learn");
    c.learn(
        &mut map,
        1,
        &name("b.example.com"),
        answered(ip("198.51.100.31"), 60, 1),
        0,
    )
    .expect("learn");
    c.learn(
        &mut map,
        2,
        &name("a.example.com"),
        answered(shared, 60, 1),
        0,
    )
    .expect("learn");
    assert_eq!(c.forget(&mut map, 1), Ok(3));
    assert_eq!(map.keys().copied().collect::<Vec<_>>(), [(2, shared)]);
    assert_eq!(c.len(), 1);
    assert_eq!(c.held_until(1, shared), None);
}

#[test]
fn an_address_is_named_by_the_name_that_taught_it_last_and_only_for_its_service() {
    let mut c = cache(60, 8);
    let mut map = MemoryMap::new();
    let (api, cdn) = (name("api.example.com"), name("cdn.example.net"));
    let a = ip("198.51.100.1");
    let now = 1_000 * SEC;
    assert_eq!(c.name_of(1, a), None, "nothing learnt yet");
    c.learn(&mut map, 1, &api, answered(a, 60, 1), now)
        .expect("learnt");
    assert_eq!(c.name_of(1, a), Some(&api));
    assert_eq!(c.name_of(2, a), None, "another service did not look it up");
    assert_eq!(c.name_of(1, ip("198.51.100.2")), None);
    c.learn(&mut map, 1, &cdn, answered(a, 60, 1), now + SEC)
        .expect("learnt");
    assert_eq!(c.name_of(1, a), Some(&cdn), "the latest lookup names it");
    c.learn(&mut map, 1, &api, answered(a, 60, 1), now + 2 * SEC)
        .expect("refreshed");
    assert_eq!(c.name_of(1, a), Some(&api), "a refresh makes it the latest");
    c.learn(&mut map, 1, &api, answered(ip("198.51.100.3"), 60, 1), now)
        .expect("learnt");
    c.learn(&mut map, 2, &api, answered(a, 60, 1), now)
        .expect("learnt");
    let by_service = c.addresses_by_service();
    assert_eq!(by_service.get(&1), Some(&2), "two names, two addresses");
    assert_eq!(by_service.get(&2), Some(&1));
    c.sweep(&mut map, now + 1_000 * SEC).expect("swept");
    assert_eq!(c.name_of(1, a), None, "expired: no name");
    assert!(c.addresses_by_service().is_empty());
}

/// A previous agent's cache, learnt into `map` (what the pinned map would
/// carry over), and its saved entries.
fn previous(
    limits_per_name: usize,
    learnt: &[(ServiceId, &str, &str, u32)],
) -> (MemoryMap, Vec<Entry>) {
    let mut old = cache(1, limits_per_name);
    let mut map = MemoryMap::new();
    for (service, n, addr, ttl) in learnt {
        old.learn(&mut map, *service, &name(n), answered(ip(addr), *ttl, 1), 0)
            .expect("learn");
    }
    (map, old.entries())
}

#[test]
fn a_restore_takes_back_only_what_the_map_still_holds_and_never_for_longer() {
    let (mut map, saved) = previous(
        8,
        &[
            (1, "api.example.com", "198.51.100.1", 100),
            (1, "api.example.com", "198.51.100.2", 100),
            (1, "cdn.example.com", "198.51.100.1", 300),
            (2, "db.example.com", "198.51.100.9", 100),
            (1, "old.example.com", "198.51.100.3", 5),
        ],
    );
    // Since the save: one address revoked, one shortened by the map.
    map.remove(&(1, ip("198.51.100.2")));
    map.insert((1, ip("198.51.100.1")), 50 * SEC);
    let mut c = cache(1, 8);
    let restored = c.restore(
        saved,
        |s, a| map.get(&(s, a)).map(|until| (*until, 1)),
        |s| s == 1,
        10 * SEC,
    );
    // api/.1 and cdn/.1 (both capped at the map's 50 s); not .2 (gone
    // from the map), not service 2 (not kept), not .3 (expired at 10 s).
    assert_eq!(restored, 2);
    assert_eq!(c.len(), 2);
    assert_eq!(c.sink_entries(), 1);
    assert_eq!(
        c.addresses(1, &name("api.example.com")),
        vec![ip("198.51.100.1")]
    );
    assert_eq!(c.held_until(1, ip("198.51.100.1")), Some(50 * SEC));
    // The name that taught it last is the one events name.
    assert_eq!(
        c.name_of(1, ip("198.51.100.1")),
        Some(&name("cdn.example.com"))
    );
    assert_eq!(c.name_of(2, ip("198.51.100.9")), None);
    assert!(c.changes() > 0);
}

#[test]
fn a_restored_name_keeps_its_cap_and_evicts_its_oldest_first() {
    let (mut map, saved) = previous(
        3,
        &[
            (1, "api.example.com", "198.51.100.1", 100),
            (1, "api.example.com", "198.51.100.2", 100),
            (1, "api.example.com", "198.51.100.3", 100),
        ],
    );
    // The new agent runs with a cap of 2: the two oldest come back, the
    // third stays in the map unknown (swept once expired).
    let mut c = cache(1, 2);
    let restored = c.restore(
        saved,
        |s, a| map.get(&(s, a)).map(|until| (*until, 1)),
        |_| true,
        SEC,
    );
    assert_eq!(restored, 2);
    let n = name("api.example.com");
    assert_eq!(
        c.addresses(1, &n),
        vec![ip("198.51.100.1"), ip("198.51.100.2")]
    );
    // A new address evicts the oldest restored one, from the map too.
    c.learn(
        &mut map,
        1,
        &n,
        answered(ip("198.51.100.4"), 100, 1),
        2 * SEC,
    )
    .expect("learn");
    assert_eq!(
        c.addresses(1, &n),
        vec![ip("198.51.100.2"), ip("198.51.100.4")]
    );
    assert!(!map.contains_key(&(1, ip("198.51.100.1"))));
    assert_eq!(c.evictions(), 1);
}

#[test]
fn a_restore_never_claims_rules_the_map_does_not_give() {
    let (map, saved) = previous(8, &[(1, "api.example.com", "198.51.100.1", 100)]);
    let mut c = cache(1, 8);
    // The map's bits for the address are another rule's (bit 1, not 0).
    let restored = c.restore(
        saved,
        |s, a| map.get(&(s, a)).map(|until| (*until, 0b10)),
        |_| true,
        SEC,
    );
    assert_eq!(restored, 0);
    assert!(c.is_empty());
}

#[test]
fn a_restored_address_is_held_until_the_maps_expiry_not_the_saved_one() {
    // Saved at 100 s; refreshed to 400 s by a lookup the file missed (a
    // crash before the next save).
    let (mut map, saved) = previous(8, &[(1, "api.example.com", "198.51.100.1", 100)]);
    map.insert((1, ip("198.51.100.1")), 400 * SEC);
    let mut c = cache(1, 8);
    let restored = c.restore(
        saved,
        |s, a| map.get(&(s, a)).map(|until| (*until, 1)),
        |_| true,
        SEC,
    );
    assert_eq!(restored, 1);
    assert_eq!(c.held_until(1, ip("198.51.100.1")), Some(400 * SEC));
    c.sweep(&mut map, 101 * SEC).expect("sweep");
    assert_eq!(
        map.get(&(1, ip("198.51.100.1"))),
        Some(&(400 * SEC)),
        "not revoked before the map's expiry"
    );
}
