//! [`LearntCache::learn_answer`]: what one answer gives its client is not
//! taken back by another answer of the same name.

use std::time::Duration;

use super::*;

const SEC: Nanos = 1_000_000_000;

/// The kernel map, and every revoke it was sent; it refuses to allow the
/// addresses in `refuse` (a full or failing map).
#[derive(Default)]
struct Recorder {
    map: MemoryMap,
    revoked: Vec<IpAddr>,
    refuse: Vec<IpAddr>,
}

impl LearntSink for Recorder {
    fn allow(
        &mut self,
        service: ServiceId,
        addr: IpAddr,
        until: Nanos,
        rules: RuleBits,
    ) -> Result<(), SinkError> {
        if self.refuse.contains(&addr) {
            return Err(SinkError(format!("{addr} refused")));
        }
        self.map.allow(service, addr, until, rules)
    }

    fn revoke(&mut self, service: ServiceId, addr: IpAddr) -> Result<(), SinkError> {
        self.revoked.push(addr);
        self.map.revoke(service, addr)
    }
}

fn name() -> DnsName {
    DnsName::from_ascii("many.example.com").expect("test bug: name")
}

fn v4(last: u8) -> IpAddr {
    IpAddr::from([198, 51, 100, last])
}

fn answer(addrs: &[IpAddr]) -> Vec<Answered> {
    addrs
        .iter()
        .map(|&addr| Answered {
            addr,
            ttl: 60,
            rules: 1,
        })
        .collect()
}

fn cache(max_per_name: usize) -> LearntCache {
    LearntCache::new(LearntLimits {
        min_ttl: Duration::from_secs(60),
        max_per_name,
        ..LearntLimits::default()
    })
}

fn outcomes(results: Vec<Result<Learnt, LearnError>>) -> Vec<Learnt> {
    results
        .into_iter()
        .map(|r| r.expect("no sink error, no full set"))
        .collect()
}

#[test]
fn an_answer_over_the_cap_keeps_its_first_addresses_and_leaves_the_rest_out() {
    let mut c = cache(2);
    let mut sink = Recorder::default();
    let all = [v4(1), v4(2), v4(3), v4(4)];
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&all), SEC);
    assert_eq!(
        outcomes(got),
        [Learnt::New, Learnt::New, Learnt::LeftOut, Learnt::LeftOut]
    );
    assert_eq!(c.addresses(1, &name()), [v4(1), v4(2)]);
    assert_eq!(c.evictions(), 0);
    assert_eq!(c.left_out_by_service(), HashMap::from([(1, 2)]));
    assert!(sink.revoked.is_empty(), "{:?}", sink.revoked);
}

/// Round robin: the same addresses in another order. Before
/// `learn_answer`, the second answer's learning evicted (revoked in the
/// kernel) addresses the first had just given its client.
#[test]
fn the_same_addresses_in_another_order_revoke_nothing_the_first_answer_gave() {
    let mut c = cache(2);
    let mut sink = Recorder::default();
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1), v4(2), v4(3)]), SEC);
    let got = c.learn_answer(
        &mut sink,
        1,
        &name(),
        &answer(&[v4(3), v4(2), v4(1)]),
        SEC + 1,
    );
    assert_eq!(
        outcomes(got),
        [Learnt::LeftOut, Learnt::Refreshed, Learnt::Refreshed]
    );
    // Refreshed in the answer's order: .2, then .1, is the newest.
    assert_eq!(c.addresses(1, &name()), [v4(2), v4(1)]);
    assert!(sink.revoked.is_empty(), "{:?}", sink.revoked);
    assert_eq!(c.evictions(), 0);
}

#[test]
fn addresses_given_within_the_grace_stay_and_older_ones_make_room_oldest_first() {
    let grace = u64::try_from(GIVEN_GRACE.as_nanos()).expect("fits");
    let mut c = cache(2);
    let mut sink = Recorder::default();
    let t0 = 10 * SEC;
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1)]), t0);
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(2)]), t0 + 1);
    // An answer sharing .2 within the grace: .1 was given too recently to
    // go, so .3 is left out.
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(2), v4(3)]), t0 + 2);
    assert_eq!(outcomes(got), [Learnt::Refreshed, Learnt::LeftOut]);
    assert!(sink.revoked.is_empty(), "{:?}", sink.revoked);
    // Once .1 was given longer ago than the grace, it makes room.
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(2), v4(3)]), t0 + grace);
    assert_eq!(outcomes(got), [Learnt::Refreshed, Learnt::New]);
    assert_eq!(c.addresses(1, &name()), [v4(2), v4(3)]);
    assert_eq!(sink.revoked, [v4(1)]);
    assert_eq!(c.evictions(), 1);
}

/// Two answers with nothing in common within the grace: the second still
/// gets an address (its client must be able to connect), at the cost of
/// the oldest, and only that one.
#[test]
fn an_answer_sharing_nothing_with_a_full_name_still_gets_one_address() {
    let mut c = cache(2);
    let mut sink = Recorder::default();
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1), v4(2)]), SEC);
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(3), v4(4)]), SEC + 1);
    assert_eq!(outcomes(got), [Learnt::New, Learnt::LeftOut]);
    assert_eq!(c.addresses(1, &name()), [v4(2), v4(3)]);
    assert_eq!(sink.revoked, [v4(1)]);
}

#[test]
fn the_families_are_capped_apart() {
    let mut c = cache(1);
    let mut sink = Recorder::default();
    let six: IpAddr = "2001:db8::1".parse().expect("test bug");
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1), six, v4(2)]), SEC);
    assert_eq!(outcomes(got), [Learnt::New, Learnt::New, Learnt::LeftOut]);
    assert_eq!(c.addresses(1, &name()), [v4(1), six]);
}

/// An answer that gives one new address twice, at the cap: the second is
/// a refresh, not a new address that makes room by evicting another.
#[test]
fn an_address_given_twice_evicts_nothing_the_second_time() {
    let mut c = cache(2);
    let mut sink = Recorder::default();
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1)]), SEC);
    let grace = u64::try_from(GIVEN_GRACE.as_nanos()).expect("fits");
    let later = SEC + grace;
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(2), v4(2)]), later);
    assert_eq!(outcomes(got), [Learnt::New, Learnt::Refreshed]);
    assert_eq!(c.addresses(1, &name()), [v4(1), v4(2)]);
    assert!(sink.revoked.is_empty(), "{:?}", sink.revoked);
}

/// The map refuses the new address: what the name held stays held (the
/// new address is written before its victim goes), in the cache and in
/// the map.
#[test]
fn a_refused_write_evicts_nothing() {
    let mut c = cache(1);
    let mut sink = Recorder::default();
    c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(1)]), SEC);
    sink.refuse.push(v4(2));
    let got = c.learn_answer(&mut sink, 1, &name(), &answer(&[v4(2)]), 10 * SEC);
    assert!(matches!(got[..], [Err(LearnError::Sink(_))]), "{got:?}");
    assert_eq!(c.addresses(1, &name()), [v4(1)]);
    assert!(sink.map.contains_key(&(1, v4(1))));
    assert!(sink.revoked.is_empty(), "{:?}", sink.revoked);
    assert_eq!(c.evictions(), 0);
}
