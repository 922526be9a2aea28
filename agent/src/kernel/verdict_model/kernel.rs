//! The verdict the kernel programs reach, computed from the map contents a
//! `CompiledPolicy` writes (`kernel::maps::write`), step by step as
//! `agent-ebpf` does it. Each step names the kernel function it mirrors;
//! when one of those changes, this must change with it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use agent_common::{
    ExeRule, ExeRuleKey, RuleSet, ServiceEntry, UidRuleKey, FLAG_INGRESS, MAX_PORT_RANGES,
    MODE_AUDIT, PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, QUALIFY_EXE, QUALIFY_UID,
    RULE_DEFAULT_DENY,
};

use super::{Direction, Proto, Query, Verdict};
use crate::{kernel::CompiledPolicy, policy::Section};

/// An LPM trie's contents: (prefix length, key with the bits past the
/// prefix cleared) -> value. The kernel's trie_update_elem replaces the
/// entry with the same prefix length and prefix bits, as inserting here
/// does.
#[derive(Default)]
struct Lpm(BTreeMap<(u32, Vec<u8>), u32>);

impl Lpm {
    fn insert(&mut self, len: u32, key: &[u8], value: u32) {
        self.0.insert((len, masked(key, len)), value);
    }

    /// The value of the longest prefix matching all `key`'s bits (the
    /// programs look up with the full key length, `LpmV4Key::FULL_PREFIX`
    /// and `LpmV6Key::FULL_PREFIX`, in rules.rs `lookup_v4`/`lookup_v6`). The
    /// kernel's trie_lookup_elem returns the longest match only, never a
    /// shorter one whose ruleset might allow more.
    fn lookup(&self, key: &[u8]) -> Option<u32> {
        let bits = u32::try_from(key.len() * 8).unwrap_or(u32::MAX);
        self.0
            .iter()
            .filter(|((len, prefix), _)| *len <= bits && masked(key, *len) == *prefix)
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, value)| *value)
    }
}

fn masked(key: &[u8], len: u32) -> Vec<u8> {
    key.iter()
        .enumerate()
        .map(|(i, b)| {
            let start = u32::try_from(i * 8).unwrap_or(u32::MAX);
            match len.saturating_sub(start) {
                0 => 0,
                n if n >= 8 => *b,
                n => b & (0xffu8 << (8 - n)),
            }
        })
        .collect()
}

/// The maps as the programs see them once `maps::write` wrote `policy`.
pub struct Maps<'a> {
    policy: &'a CompiledPolicy,
    egress_v4: Lpm,
    egress_v6: Lpm,
    ingress_v4: Lpm,
    ingress_v6: Lpm,
    /// RULESETS: an array, written at `ruleset_base + i`.
    rulesets: HashMap<u32, RuleSet>,
    /// EXE_RULES and UID_RULES: hashes of qualifier masks.
    exe_rules: HashMap<(u64, u32, u32), ExeRule>,
    uid_rules: HashMap<(u32, u32), u32>,
}

impl<'a> Maps<'a> {
    /// Writes `policy` (ids already relocated) the way `maps::write` does:
    /// rulesets at their absolute index, every LPM entry in order.
    pub fn write(policy: &'a CompiledPolicy) -> Self {
        let lpm4 = |entries: &[(u32, agent_common::LpmV4Key, u32)]| {
            let mut t = Lpm::default();
            for (len, key, value) in entries {
                t.insert(*len, &[key.service_id, key.addr].concat(), *value);
            }
            t
        };
        let lpm6 = |entries: &[(u32, agent_common::LpmV6Key, u32)]| {
            let mut t = Lpm::default();
            for (len, key, value) in entries {
                t.insert(*len, &[&key.service_id[..], &key.addr[..]].concat(), *value);
            }
            t
        };
        let rulesets = policy
            .rulesets
            .iter()
            .enumerate()
            .map(|(i, set)| {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                (policy.ruleset_base + i, *set)
            })
            .collect();
        Self {
            policy,
            egress_v4: lpm4(&policy.v4),
            egress_v6: lpm6(&policy.v6),
            ingress_v4: lpm4(&policy.ingress_v4),
            ingress_v6: lpm6(&policy.ingress_v6),
            rulesets,
            exe_rules: policy
                .exe_rules
                .iter()
                .map(|(k, m)| ((k.ino, k.dev, k.service_id), *m))
                .collect(),
            uid_rules: policy
                .uid_rules
                .iter()
                .map(|(k, m)| ((k.service_id, k.uid), *m))
                .collect(),
        }
    }

    /// process.rs `caller_mask`/`mask_of`: the qualified rules the caller
    /// satisfies; every rule for a service without qualifiers (sock_addr.rs
    /// and ingress.rs ask only when `qualifiers` is set).
    fn callers(&self, entry: &ServiceEntry, q: &Query) -> u32 {
        if entry.qualifiers == 0 {
            return u32::MAX;
        }
        let mut mask = u32::MAX;
        if entry.qualifiers & QUALIFY_EXE != 0 {
            // An unknown executable is in no entry; one of another
            // generation than the entry's satisfies nothing in it.
            let found = q.exe.and_then(|i| {
                let f = super::strategy::executable(i).file;
                let k = ExeRuleKey {
                    ino: f.ino,
                    dev: f.dev,
                    service_id: entry.service_id,
                };
                let rule = self.exe_rules.get(&(k.ino, k.dev, k.service_id))?;
                rule.mask_for(&f.to_kernel())
            });
            mask = found.unwrap_or(entry.exe_free);
        }
        if entry.qualifiers & QUALIFY_UID != 0 {
            let k = UidRuleKey {
                service_id: entry.service_id,
                uid: q.uid,
            };
            mask &= self
                .uid_rules
                .get(&(k.service_id, k.uid))
                .copied()
                .unwrap_or(entry.uid_free);
        }
        mask
    }

    /// The verdict for `q`, as the programs reach it for the service's
    /// SERVICES entry.
    pub fn judge(&self, q: &Query) -> Verdict {
        let entry: &ServiceEntry = &self.policy.services[q.service].entry;
        let callers = self.callers(entry, q);
        let rule = match q.direction {
            Direction::Egress => {
                // sock_addr.rs `icmp_as_one`: a ping socket's echo is judged
                // as PROTO_ICMP with port 0.
                let (proto, port) = match q.proto {
                    Proto::Tcp => (PROTO_TCP, q.port),
                    Proto::Udp => (PROTO_UDP, q.port),
                    Proto::Icmp => (PROTO_ICMP, 0),
                };
                // sock_addr.rs `v6_or_mapped`: ::ffff:a.b.c.d is looked up
                // in the IPv4 trie.
                let addr = match q.addr {
                    IpAddr::V6(a) => a.to_ipv4_mapped().map_or(q.addr, IpAddr::V4),
                    v4 @ IpAddr::V4(_) => v4,
                };
                self.lookup(
                    (&self.egress_v4, &self.egress_v6),
                    entry,
                    addr,
                    (proto, port),
                    callers,
                )
            }
            Direction::Ingress => {
                // ingress.rs `bulkhead_ingress`: a service without
                // FLAG_INGRESS passes every packet.
                if entry.flags & FLAG_INGRESS == 0 {
                    return Verdict::NotJudged;
                }
                // ingress.rs `judge`: the packet's source as parsed
                // (packet.rs: an IPv6 header's address stays IPv6), its
                // protocol and destination (local) port.
                let proto = match q.proto {
                    Proto::Tcp => PROTO_TCP,
                    Proto::Udp => PROTO_UDP,
                    Proto::Icmp => unreachable!("no ICMP query is made for ingress"),
                };
                self.lookup(
                    (&self.ingress_v4, &self.ingress_v6),
                    entry,
                    q.addr,
                    (proto, q.port),
                    callers,
                )
            }
        };
        if rule != RULE_DEFAULT_DENY {
            let section = match q.direction {
                Direction::Egress => Section::Egress,
                Direction::Ingress => Section::Ingress,
            };
            let found = self
                .policy
                .rule(rule)
                .unwrap_or_else(|| panic!("rule id {rule} is no rule of the compiled policy"));
            assert_eq!(
                (found.section, &found.service),
                (section, &self.policy.services[q.service].name),
                "rule id {rule} of another section or service"
            );
            return Verdict::Allow(found.index);
        }
        // sock_addr.rs `judge` (egress) and events.rs `refusal` (ingress):
        // no rule: audit mode lets it through, enforce mode denies.
        if entry.mode == MODE_AUDIT {
            Verdict::Audit
        } else {
            Verdict::Deny
        }
    }

    /// rules.rs `lookup_v4`/`lookup_v6`: one LPM lookup keyed by (service
    /// id, address), then `match_ports` on the ruleset behind it.
    fn lookup(
        &self,
        (v4, v6): (&Lpm, &Lpm),
        entry: &ServiceEntry,
        addr: IpAddr,
        (proto, port): (u8, u16),
        callers: u32,
    ) -> u32 {
        let sid = entry.service_id.to_be_bytes();
        let found = match addr {
            IpAddr::V4(a) => v4.lookup(&[&sid[..], &a.octets()[..]].concat()),
            IpAddr::V6(a) => v6.lookup(&[&sid[..], &a.octets()[..]].concat()),
        };
        match found {
            Some(index) => self.match_ports(index, proto, port, callers),
            None => RULE_DEFAULT_DENY,
        }
    }

    /// rules.rs `match_ports` + `scan`: a missing ruleset denies; the
    /// first of at most MAX_PORT_RANGES entries whose protocol (or
    /// PROTO_ANY) and inclusive range match, and whose qualifier bit (if
    /// any) the caller has, decides.
    fn match_ports(&self, index: u32, proto: u8, port: u16, callers: u32) -> u32 {
        let Some(set) = self.rulesets.get(&index) else {
            return RULE_DEFAULT_DENY;
        };
        let len = set.len as usize;
        set.ranges
            .iter()
            .take(len.min(MAX_PORT_RANGES))
            .find(|r| {
                (r.proto == PROTO_ANY || r.proto == proto)
                    && port >= r.lo
                    && port <= r.hi
                    && (r.qualifier == 0 || callers & (1u32 << ((r.qualifier - 1) & 31)) != 0)
            })
            .map_or(RULE_DEFAULT_DENY, |r| r.rule_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_returns_the_longest_match_only() {
        let mut t = Lpm::default();
        t.insert(8, &[10, 0, 0, 0], 1);
        t.insert(16, &[10, 1, 0, 0], 2);
        t.insert(32, &[10, 1, 2, 3], 3);
        assert_eq!(t.lookup(&[10, 1, 2, 3]), Some(3));
        assert_eq!(t.lookup(&[10, 1, 2, 4]), Some(2));
        assert_eq!(t.lookup(&[10, 2, 0, 0]), Some(1));
        assert_eq!(t.lookup(&[11, 0, 0, 0]), None);
        // Host bits past the prefix are ignored, on insert as on lookup.
        t.insert(12, &[172, 31, 255, 255], 4);
        assert_eq!(t.lookup(&[172, 16, 0, 1]), Some(4));
        assert_eq!(t.lookup(&[172, 32, 0, 1]), None);
    }
}
