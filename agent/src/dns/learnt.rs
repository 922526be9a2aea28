//! Addresses learnt from DNS answers, per service and per name looked up:
//! the agent's copy of the kernel's learnt-address map, which it keeps in
//! step through a [`LearntSink`].
//!
//! Each (service, name) holds at most `max_per_name` addresses of each
//! family (IPv4, IPv6); learning one more evicts the one of its family
//! learnt (or re-learnt) longest ago, and counts it; an answer's
//! addresses are learnt together ([`LearntCache::learn_answer`]), so that
//! one answer does not take back what another just gave. Per family, because
//! a client asks A and AAAA at once (glibc): a shared cap would let one
//! answer evict the addresses the other just gave the client.
//! An address expires `max(ttl, min_ttl)` after it was last learnt; a
//! later answer never shortens that. The kernel map is keyed by (service,
//! address) alone, so an address several names of one service hold stays
//! there until the last of them lets it go, with the latest expiry of
//! them. At most `max_total` entries are held in all: past that, learning
//! fails (counted by the caller) and the kernel denies, as it would with
//! its map full; a cache that grows without bound is not an option.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use super::answer::DnsName;

/// A service as the kernel's learnt map keys it: its `name_key` (stable
/// across reloads and restarts, unlike the policy's service id).
pub type ServiceId = u64;

/// Which of a service's name rules allow an address (bit i: its i-th
/// `[[egress]]` rule with names): the kernel applies those rules' ports.
pub type RuleBits = u8;

/// Nanoseconds of `CLOCK_MONOTONIC`: what the kernel's `bpf_ktime_get_ns`
/// reads, so an expiry written into the map means the same there. It
/// survives an agent restart (not a reboot, which the pinned map does not
/// survive either).
pub type Nanos = u64;

/// `CLOCK_MONOTONIC` now.
#[must_use]
pub fn monotonic_now() -> Nanos {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Where learnt addresses go: the kernel's map (to be written), or a plain
/// map of the same shape ([`MemoryMap`]) until then and in tests.
pub trait LearntSink {
    /// Allow `addr` for `service` until `until`, by the name rules `rules`.
    ///
    /// # Errors
    /// The write failed (for the kernel: map full, or gone).
    fn allow(
        &mut self,
        service: ServiceId,
        addr: IpAddr,
        until: Nanos,
        rules: RuleBits,
    ) -> Result<(), SinkError>;
    /// `addr` is no longer learnt for `service`.
    ///
    /// # Errors
    /// The delete failed.
    fn revoke(&mut self, service: ServiceId, addr: IpAddr) -> Result<(), SinkError>;
    /// Drops what expired at `now` that the cache does not know of (a
    /// walk of the whole sink, after a sweep that failed: what a previous
    /// agent learnt goes by [`Self::sweep_carried`]). Returns how many it dropped and how many
    /// entries it holds now (`None`: it holds nothing the cache does not
    /// know of, and need not be swept).
    fn sweep_unknown(&mut self, _now: Nanos) -> (usize, Option<usize>) {
        (0, None)
    }
    /// Drops what a previous agent learnt, carried over at start, that
    /// expired at `now`, and what a failed revoke left: cheap, on every
    /// sweep, so that such an entry is not allowed longer than one the
    /// cache learnt (the kernel reads no clock: removal is what ends an
    /// address's TTL). Returns how many.
    fn sweep_carried(&mut self, _now: Nanos) -> usize {
        0
    }
    /// Removals refused and not yet done (tried again at each sweep):
    /// while there are some, expired addresses are still allowed.
    fn pending_removals(&self) -> usize {
        0
    }
}

/// A failed write to a [`LearntSink`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("learnt-address map: {0}")]
pub struct SinkError(pub String);

/// Why an address was not learnt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{0} learnt addresses held, the most allowed")]
    Full(usize),
}

/// The kernel map's keys and expiries (not the rule bits): a sink for
/// tests and tools.
pub type MemoryMap = BTreeMap<(ServiceId, IpAddr), Nanos>;

impl LearntSink for MemoryMap {
    fn allow(
        &mut self,
        service: ServiceId,
        addr: IpAddr,
        until: Nanos,
        _rules: RuleBits,
    ) -> Result<(), SinkError> {
        self.insert((service, addr), until);
        Ok(())
    }

    fn revoke(&mut self, service: ServiceId, addr: IpAddr) -> Result<(), SinkError> {
        self.remove(&(service, addr));
        Ok(())
    }
}

/// The cache's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearntLimits {
    /// Shortest time an address stays learnt, whatever its TTL (answers
    /// with TTL 0 or 1 would otherwise expire before the client connects).
    pub min_ttl: Duration,
    /// Most addresses of one family (IPv4, IPv6) one (service, name)
    /// holds.
    pub max_per_name: usize,
    /// Most (service, name, address) entries held in all (the kernel map's
    /// size follows from it).
    pub max_total: usize,
}

impl Default for LearntLimits {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(60),
            max_per_name: 64,
            max_total: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    addr: IpAddr,
    expires: Nanos,
    /// The name rules the answer's names matched.
    rules: RuleBits,
    /// Order of (re-)learning: the smallest is evicted first.
    seq: u64,
    /// When an answer last gave it (to a client): see [`GIVEN_GRACE`].
    given: Nanos,
}

/// How long an address an answer gave a client is kept from eviction by
/// another answer of the same name: the client's connect comes after it
/// has its answer, and two lookups of a name with more addresses than the
/// cap may be answered at once (a cap full of addresses given within it
/// leaves the new addresses out of the answer instead).
pub const GIVEN_GRACE: Duration = Duration::from_secs(2);

/// One address of an answer, as [`LearntCache::learn`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub addr: IpAddr,
    /// Seconds, the smallest on its CNAME chain.
    pub ttl: u32,
    /// The name rules a name on its chain matched.
    pub rules: RuleBits,
}

/// What one [`LearntCache::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    New,
    /// Already held: expiry extended (never shortened), now the newest.
    Refreshed,
    /// Not learnt by [`LearntCache::learn_answer`]: the name holds its cap
    /// of addresses of this family, all given by this answer or by one
    /// within [`GIVEN_GRACE`]. The answer must leave it out.
    LeftOut,
}

/// The learnt addresses of every service.
#[derive(Debug, Default)]
pub struct LearntCache {
    limits: LearntLimits,
    names: HashMap<(ServiceId, DnsName), Vec<Held>>,
    /// Which names of a service hold an address (the kernel key).
    holders: HashMap<(ServiceId, IpAddr), Vec<DnsName>>,
    seq: u64,
    /// Entries held in all (sum of the `names` lists).
    total: usize,
    /// Addresses evicted because a name held too many, by service.
    evictions: HashMap<ServiceId, u64>,
    /// Addresses of answers left out because a name held its cap of
    /// addresses in use ([`Learnt::LeftOut`]), by service.
    left_out: HashMap<ServiceId, u64>,
    expirations: u64,
    /// Bumped by every change of what is held: a save can tell whether
    /// there is anything new to write.
    changes: u64,
}

/// One (service, name, address) entry, as saved for the next agent
/// (`dns::saved`) and restored by [`LearntCache::restore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub service: ServiceId,
    pub name: DnsName,
    pub addr: IpAddr,
    pub expires: Nanos,
    pub rules: RuleBits,
}

impl LearntCache {
    #[must_use]
    pub fn new(limits: LearntLimits) -> Self {
        Self {
            // A name holding no address would evict each one as it came.
            limits: LearntLimits {
                max_per_name: limits.max_per_name.max(1),
                ..limits
            },
            ..Self::default()
        }
    }

    #[must_use]
    pub fn limits(&self) -> LearntLimits {
        self.limits
    }

    /// Records that `service`'s lookup of `name` answered `addr` with
    /// `ttl` seconds (allowed by the name rules `rules`), and writes the address's expiry to `sink`; evicts the
    /// oldest address of (service, name) if that makes one too many.
    ///
    /// # Errors
    /// [`LearnError::Full`]: `max_total` entries are held and this one
    /// would be one more (nothing changed). [`LearnError::Sink`]: the sink
    /// refused a write; the caller counts it. A refused `allow`
    /// leaves the cache as it was (the kernel denies what it does not
    /// have). A refused `revoke` of an evicted address is the sink's to
    /// try again (the kernel's tries it at each sweep: the programs read
    /// no expiry, so nothing else would remove it).
    pub fn learn(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        answered: Answered,
        now: Nanos,
    ) -> Result<Learnt, LearnError> {
        self.learn_replacing(sink, service, name, answered, now, None)
    }

    /// [`Self::learn`], evicting `victim` rather than the oldest if the
    /// name is then one over its cap. The new address is written first:
    /// should the sink refuse it, nothing is evicted.
    fn learn_replacing(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        answered: Answered,
        now: Nanos,
        victim: Option<IpAddr>,
    ) -> Result<Learnt, LearnError> {
        let Answered { addr, ttl, rules } = answered;
        let key = (service, name.clone());
        let (known, evicts) = self.names.get(&key).map_or((false, false), |held| {
            (
                held.iter().any(|h| h.addr == addr),
                same_family(held, addr) >= self.limits.max_per_name,
            )
        });
        if !known && !evicts && self.total >= self.limits.max_total {
            return Err(LearnError::Full(self.limits.max_total));
        }
        let keep = Duration::from_secs(u64::from(ttl)).max(self.limits.min_ttl);
        let expires = now.saturating_add(u64::try_from(keep.as_nanos()).unwrap_or(u64::MAX));
        let (held_until, held_rules) = self.held(service, addr).unwrap_or((0, 0));
        sink.allow(service, addr, expires.max(held_until), rules | held_rules)?;
        self.changes += 1;
        self.seq += 1;
        let seq = self.seq;
        let held = self.names.entry(key).or_default();
        if let Some(h) = held.iter_mut().find(|h| h.addr == addr) {
            h.expires = h.expires.max(expires);
            h.rules |= rules;
            h.seq = seq;
            h.given = now;
            return Ok(Learnt::Refreshed);
        }
        held.push(Held {
            addr,
            expires,
            rules,
            seq,
            given: now,
        });
        self.total += 1;
        let over = same_family(held, addr) > self.limits.max_per_name;
        self.holders
            .entry((service, addr))
            .or_default()
            .push(name.clone());
        if over {
            match victim {
                Some(victim) => self.evict(sink, service, name, victim)?,
                None => self.evict_oldest(sink, service, name, addr.is_ipv4())?,
            }
        }
        Ok(Learnt::New)
    }

    /// Learns the addresses one answer of `service`'s lookup of `name`
    /// gave (see [`Self::learn`]), so that what it gives a client cannot
    /// cost another client of the same name what it was just given. Past
    /// the cap of a family, a new address evicts the oldest address of
    /// its family that this answer did not give and no answer gave within
    /// [`GIVEN_GRACE`]; with none such it is left out
    /// ([`Learnt::LeftOut`]), unless the answer would then have no
    /// address of that family held: then the oldest goes, as for
    /// [`Self::learn`]. Addresses already held are refreshed first, so an
    /// answer giving them in another order (round robin) evicts nothing.
    /// Returns one result per address of `answered`, in its order.
    pub fn learn_answer(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        answered: &[Answered],
        now: Nanos,
    ) -> Vec<Result<Learnt, LearnError>> {
        let key = (service, name.clone());
        let holds = |cache: &Self, addr: IpAddr| {
            cache
                .names
                .get(&key)
                .is_some_and(|held| held.iter().any(|h| h.addr == addr))
        };
        let mut out: Vec<Option<Result<Learnt, LearnError>>> = answered
            .iter()
            .map(|a| holds(self, a.addr).then(|| self.learn(sink, service, name, *a, now)))
            .collect();
        let given: HashSet<IpAddr> = answered.iter().map(|a| a.addr).collect();
        let in_answer = |h: &Held| given.contains(&h.addr);
        let grace = u64::try_from(GIVEN_GRACE.as_nanos()).unwrap_or(u64::MAX);
        for (i, a) in answered.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let v4 = a.addr.is_ipv4();
            let held = self.names.get(&key).map_or(&[][..], Vec::as_slice);
            // Not held, unless the answer gave it twice: that is a refresh.
            let again = held.iter().any(|h| h.addr == a.addr);
            if !again && same_family(held, a.addr) >= self.limits.max_per_name {
                let answer_holds_one = held.iter().any(|h| h.addr.is_ipv4() == v4 && in_answer(h));
                let victim = held
                    .iter()
                    .filter(|h| h.addr.is_ipv4() == v4 && !in_answer(h))
                    .filter(|h| !answer_holds_one || h.given.saturating_add(grace) <= now)
                    .min_by_key(|h| h.seq)
                    .map(|h| h.addr);
                let Some(victim) = victim else {
                    *self.left_out.entry(service).or_default() += 1;
                    out[i] = Some(Ok(Learnt::LeftOut));
                    continue;
                };
                out[i] = Some(self.learn_replacing(sink, service, name, *a, now, Some(victim)));
                continue;
            }
            out[i] = Some(self.learn(sink, service, name, *a, now));
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Ok(Learnt::LeftOut)))
            .collect()
    }

    /// Evicts the oldest address of (service, name) of one family.
    fn evict_oldest(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        v4: bool,
    ) -> Result<(), LearnError> {
        let oldest = self.names.get(&(service, name.clone())).and_then(|held| {
            held.iter()
                .filter(|h| h.addr.is_ipv4() == v4)
                .min_by_key(|h| h.seq)
                .map(|h| h.addr)
        });
        match oldest {
            Some(addr) => self.evict(sink, service, name, addr),
            None => Ok(()),
        }
    }

    /// Evicts `addr` from (service, name), counted.
    fn evict(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        addr: IpAddr,
    ) -> Result<(), LearnError> {
        let key = (service, name.clone());
        let Some(held) = self.names.get_mut(&key) else {
            return Ok(());
        };
        let Some(i) = held.iter().position(|h| h.addr == addr) else {
            return Ok(());
        };
        let gone = held.remove(i);
        self.changes += 1;
        self.total -= 1;
        *self.evictions.entry(service).or_default() += 1;
        Ok(self.release(sink, service, name, gone.addr)?)
    }

    /// `name` no longer holds `addr`: revoke it, or lower its expiry to
    /// what the names still holding it say.
    fn release(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
        name: &DnsName,
        addr: IpAddr,
    ) -> Result<(), SinkError> {
        if let Some(names) = self.holders.get_mut(&(service, addr)) {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.holders.remove(&(service, addr));
            }
        }
        match self.held(service, addr) {
            None => sink.revoke(service, addr),
            Some((until, rules)) => sink.allow(service, addr, until, rules),
        }
    }

    /// The latest expiry of `addr` over the names of `service` holding it.
    #[must_use]
    pub fn held_until(&self, service: ServiceId, addr: IpAddr) -> Option<Nanos> {
        self.held(service, addr).map(|(until, _)| until)
    }

    /// The latest expiry of `addr` over the names of `service` holding
    /// it, and every name rule they matched.
    fn held(&self, service: ServiceId, addr: IpAddr) -> Option<(Nanos, RuleBits)> {
        let names = self.holders.get(&(service, addr))?;
        names
            .iter()
            .filter_map(|n| self.names.get(&(service, n.clone())))
            .flat_map(|held| held.iter().filter(|h| h.addr == addr))
            .map(|h| (h.expires, h.rules))
            .reduce(|(a, ra), (b, rb)| (a.max(b), ra | rb))
    }

    /// Drops every address expired at `now` and tells `sink`. Returns how
    /// many (service, name, address) entries went.
    ///
    /// # Errors
    /// The first refused sink write. Every expired entry is released all
    /// the same: the cache has dropped them, and an entry never released
    /// would stay in the kernel map, allowed (the programs read no expiry).
    pub fn sweep(&mut self, sink: &mut dyn LearntSink, now: Nanos) -> Result<usize, SinkError> {
        let mut expired = Vec::new();
        for ((service, name), held) in &mut self.names {
            held.retain(|h| {
                let keep = h.expires > now;
                if !keep {
                    expired.push((*service, name.clone(), h.addr));
                }
                keep
            });
        }
        self.names.retain(|_, held| !held.is_empty());
        let count = expired.len();
        self.changes += count as u64;
        self.total -= count;
        self.expirations += count as u64;
        let mut first_error = None;
        for (service, name, addr) in expired {
            if let Err(e) = self.release(sink, service, &name, addr) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(count), Err)
    }

    /// Drops everything `service` learnt (its name rules changed: what
    /// each address was allowed by no longer holds) and revokes it in
    /// `sink`. Returns how many (service, name, address) entries went.
    ///
    /// # Errors
    /// The first refused revoke; the entries are gone from the cache
    /// anyway (the sink tries such a removal again, `sweep_carried`).
    pub fn forget(
        &mut self,
        sink: &mut dyn LearntSink,
        service: ServiceId,
    ) -> Result<usize, SinkError> {
        let names: Vec<DnsName> = self
            .names
            .keys()
            .filter(|(s, _)| *s == service)
            .map(|(_, n)| n.clone())
            .collect();
        let mut gone = 0;
        for name in names {
            if let Some(held) = self.names.remove(&(service, name)) {
                gone += held.len();
            }
        }
        self.total -= gone;
        self.changes += gone as u64;
        let addrs: Vec<IpAddr> = self
            .holders
            .keys()
            .filter(|(s, _)| *s == service)
            .map(|(_, a)| *a)
            .collect();
        let mut first_error = None;
        for addr in addrs {
            self.holders.remove(&(service, addr));
            if let Err(e) = sink.revoke(service, addr) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(gone), Err)
    }

    /// How many changes the held entries have had: equal numbers, same
    /// entries.
    #[must_use]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Every entry held, oldest learnt first (the order
    /// [`Self::restore`] keeps, so evictions go on in the same order).
    #[must_use]
    pub fn entries(&self) -> Vec<Entry> {
        let mut all: Vec<(u64, Entry)> = self
            .names
            .iter()
            .flat_map(|((service, name), held)| {
                held.iter().map(|h| {
                    (
                        h.seq,
                        Entry {
                            service: *service,
                            name: name.clone(),
                            addr: h.addr,
                            expires: h.expires,
                            rules: h.rules,
                        },
                    )
                })
            })
            .collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, e)| e).collect()
    }

    /// Takes back what a previous agent held (its saved `entries`, oldest
    /// first), for the names and caps of what the kernel map still holds:
    /// an entry is restored only while `kernel` (the map's expiry and rule
    /// bits for a service and address) has it, with the map's expiry (the
    /// latest of the names that held it, some of which the file may not
    /// name: a shorter one would have the cache revoke the address before
    /// the map would), never by more rules than the map says, and only for
    /// a service `keep`s (one
    /// whose name rules are those the entry was learnt by). The limits
    /// apply as to a lookup, except that nothing is evicted: what does
    /// not fit stays in the map, unknown to the cache, until it expires.
    /// Nothing is written to a sink: the map already holds it all.
    /// Returns how many entries were restored.
    pub fn restore(
        &mut self,
        entries: Vec<Entry>,
        kernel: impl Fn(ServiceId, IpAddr) -> Option<(Nanos, RuleBits)>,
        keep: impl Fn(ServiceId) -> bool,
        now: Nanos,
    ) -> usize {
        let mut restored = 0;
        for entry in entries {
            let Some((until, map_rules)) = kernel(entry.service, entry.addr) else {
                continue;
            };
            let expires = until;
            let rules = entry.rules & map_rules;
            if expires <= now || rules == 0 || !keep(entry.service) {
                continue;
            }
            let key = (entry.service, entry.name.clone());
            let held = self.names.get(&key).map_or(&[][..], Vec::as_slice);
            if held.iter().any(|h| h.addr == entry.addr)
                || same_family(held, entry.addr) >= self.limits.max_per_name
                || self.total >= self.limits.max_total
            {
                continue;
            }
            self.seq += 1;
            self.names.entry(key).or_default().push(Held {
                addr: entry.addr,
                expires,
                rules,
                seq: self.seq,
                // Clients of the previous agent may have just been given it.
                given: now,
            });
            self.holders
                .entry((entry.service, entry.addr))
                .or_default()
                .push(entry.name);
            self.total += 1;
            restored += 1;
        }
        self.changes += restored as u64;
        restored
    }

    /// The addresses (service, name) holds, oldest first.
    #[must_use]
    pub fn addresses(&self, service: ServiceId, name: &DnsName) -> Vec<IpAddr> {
        let mut held = self
            .names
            .get(&(service, name.clone()))
            .cloned()
            .unwrap_or_default();
        held.sort_by_key(|h| h.seq);
        held.into_iter().map(|h| h.addr).collect()
    }

    /// The name of `service` that most recently taught `addr` (the one
    /// an event names), if it holds it now.
    #[must_use]
    pub fn name_of(&self, service: ServiceId, addr: IpAddr) -> Option<&DnsName> {
        self.holders
            .get(&(service, addr))?
            .iter()
            .filter_map(|n| {
                let held = self.names.get(&(service, n.clone()))?;
                let seq = held.iter().find(|h| h.addr == addr)?.seq;
                Some((seq, n))
            })
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, n)| n)
    }

    /// Distinct addresses each service holds (what the kernel map holds
    /// for it: one entry per (service, address), whatever the names).
    #[must_use]
    pub fn addresses_by_service(&self) -> HashMap<ServiceId, usize> {
        let mut out: HashMap<ServiceId, usize> = HashMap::new();
        for (service, _) in self.holders.keys() {
            *out.entry(*service).or_default() += 1;
        }
        out
    }

    /// Addresses evicted because a name held too many.
    #[must_use]
    pub fn evictions(&self) -> u64 {
        self.evictions.values().sum()
    }

    /// The same, by service (services with none left out).
    #[must_use]
    pub fn evictions_by_service(&self) -> HashMap<ServiceId, u64> {
        self.evictions.clone()
    }

    /// Addresses left out of answers by [`Self::learn_answer`], by
    /// service (services with none left out).
    #[must_use]
    pub fn left_out_by_service(&self) -> HashMap<ServiceId, u64> {
        self.left_out.clone()
    }

    /// Addresses dropped by [`Self::sweep`] because they expired.
    #[must_use]
    pub fn expirations(&self) -> u64 {
        self.expirations
    }

    /// (service, name, address) entries held now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.total
    }

    /// (service, address) pairs held now: the sink's entries it knows.
    #[must_use]
    pub fn sink_entries(&self) -> usize {
        self.holders.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// How many of `held` are of `addr`'s family.
fn same_family(held: &[Held], addr: IpAddr) -> usize {
    held.iter()
        .filter(|h| h.addr.is_ipv4() == addr.is_ipv4())
        .count()
}

#[cfg(test)]
#[path = "learnt_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "learnt_answer_tests.rs"]
mod answer_tests;
