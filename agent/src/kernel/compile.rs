//! Checked model -> the values the kernel maps hold.
//!
//! The kernel does one LPM lookup per connect. An LPM trie returns only the
//! longest matching prefix, so the value behind each prefix must carry every
//! rule whose network contains that prefix: for an address, all matching
//! prefixes form a chain, and the rules matching the address are exactly
//! the rules covering its longest match. Identical rule lists share one
//! ruleset, so 100,000 CIDRs with the same ports cost one ruleset.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::{
    ExeRule, ExeRuleKey, LpmV4Key, LpmV6Key, PortRange as KPortRange, RuleSet, ServiceEntry,
    UidRuleKey, FLAG_ALLOW_PACKET, FLAG_ALLOW_RAW, FLAG_BIND, FLAG_INGRESS, FLAG_NAMES,
    FLAG_QUARANTINE, MAX_PORT_RANGES, PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, QUALIFY_EXE,
    QUALIFY_UID, SOCKETS_DCCP, SOCKETS_ICMP, SOCKETS_L2TP, SOCKETS_MPTCP, SOCKETS_SCTP,
    SOCKETS_UDPLITE,
};
use ipnetwork::IpNetwork;

use crate::policy::{
    PolicyError, PolicyErrors, PolicySet, PortRange, Protocol, RuleRef, Section, Selector, Service,
    SocketProtocol,
};

/// Everything to write into the maps for one policy set.
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    /// Index = service id.
    pub services: Vec<CompiledService>,
    /// Egress destinations: (prefix length in key bits, key, ruleset index).
    pub v4: Vec<(u32, LpmV4Key, u32)>,
    pub v6: Vec<(u32, LpmV6Key, u32)>,
    /// Ingress sources, same shape.
    pub ingress_v4: Vec<(u32, LpmV4Key, u32)>,
    pub ingress_v6: Vec<(u32, LpmV6Key, u32)>,
    /// `rulesets[i]` lives at index `ruleset_base + i`.
    pub rulesets: Vec<RuleSet>,
    /// `rules[i]` has rule id `rule_base + i` (carried in `PortRange::rule_id`).
    pub rules: Vec<RuleRef>,
    /// `EXE_RULES` and `UID_RULES` entries: which qualified rules of a
    /// service an executable or a user satisfies (see `qualifiers`).
    pub exe_rules: Vec<(ExeRuleKey, ExeRule)>,
    pub uid_rules: Vec<(UidRuleKey, u32)>,
    /// Each `exe` path as written, with the service and the file it named
    /// at load: watched for a replacement (see `Enforcer::follow_executables`).
    pub exe_paths: Vec<ExePath>,
    /// Where this policy's ids start (see `layout::relocate`); 0 when fresh.
    pub service_base: u32,
    pub ruleset_base: u32,
    pub rule_base: u32,
}

/// An `exe` path of a service's rules, and the file it named at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExePath {
    pub service_id: u32,
    pub path: std::path::PathBuf,
    pub file: crate::process::ExeFile,
}

#[derive(Debug, Clone)]
pub struct CompiledService {
    pub name: String,
    /// File name of its policy (for `file#default-deny` references).
    pub file_name: String,
    /// How its cgroups are found.
    pub selector: Selector,
    pub entry: ServiceEntry,
    /// Egress + ingress rules.
    pub rule_count: usize,
}

impl CompiledPolicy {
    pub fn rule(&self, rule_id: u32) -> Option<&RuleRef> {
        self.rules
            .get(rule_id.checked_sub(self.rule_base)? as usize)
    }
}

/// One address rule, egress or ingress, as the compiler sees it.
struct AddrRule<'a> {
    index: usize,
    line: usize,
    nets: &'a [IpNetwork],
    ports: &'a [PortRange],
    protocol: Protocol,
    /// 0, or the rule's qualifier bit + 1 (see `Qualifiers`).
    qualifier: u8,
}

/// The compiler's working state across services.
#[derive(Default)]
struct Builder {
    out: CompiledPolicy,
    ruleset_ids: HashMap<Vec<KPortRange>, u32>,
    errors: Vec<PolicyError>,
}

/// Compiles a policy set; fails with file and line when a prefix would need
/// more port checks than the kernel scans (`MAX_PORT_RANGES`).
pub fn compile(set: &PolicySet) -> Result<CompiledPolicy, PolicyErrors> {
    let mut b = Builder::default();
    for (service_id, service) in set.services.iter().enumerate() {
        let service_id = u32::try_from(service_id).unwrap_or(u32::MAX);
        let qualifiers = Qualifiers::of(service);
        let egress: Vec<AddrRule<'_>> = service
            .egress
            .iter()
            .map(|r| AddrRule {
                index: r.index,
                line: r.line,
                nets: &r.to,
                ports: &r.ports,
                protocol: r.protocol,
                qualifier: qualifiers.of_rule(Section::Egress, r.index),
            })
            .collect();
        let first_egress_rule = u32::try_from(b.out.rules.len()).unwrap_or(u32::MAX);
        let (v4, v6) = b.prefixes(service_id, service, Section::Egress, &egress);
        b.out.v4.extend(v4);
        b.out.v6.extend(v6);

        let mut flags = 0;
        let mut names_ruleset = 0;
        if service.through_proxy() {
            // Redirected lookups; learnt addresses only with name rules
            // (an observed service's LEARNT lookups all miss).
            flags |= FLAG_NAMES;
        }
        if service.name_rules().next().is_some() {
            names_ruleset = b.name_rulesets(service, first_egress_rule, &qualifiers);
        }
        if let Some(ingress) = &service.ingress {
            flags |= FLAG_INGRESS;
            let rules: Vec<AddrRule<'_>> = ingress
                .iter()
                .map(|r| AddrRule {
                    index: r.index,
                    line: r.line,
                    nets: &r.from,
                    ports: &r.ports,
                    protocol: r.protocol,
                    qualifier: qualifiers.of_rule(Section::Ingress, r.index),
                })
                .collect();
            let (v4, v6) = b.prefixes(service_id, service, Section::Ingress, &rules);
            b.out.ingress_v4.extend(v4);
            b.out.ingress_v6.extend(v6);
        }
        let mut bind_ruleset = u32::MAX;
        if let Some(bind) = &service.bind {
            flags |= FLAG_BIND;
            let rule_id = b.rule(service, Section::Bind, 0);
            let checks = port_checks(&bind.ports, bind.protocol, rule_id, 0);
            match b.ruleset(checks) {
                Some(id) => bind_ruleset = id,
                None => b.errors.push(PolicyError {
                    file: service.file.clone(),
                    line: bind.line,
                    column: 1,
                    message: format!(
                        "[bind]: {} port ranges; the kernel checks at most {MAX_PORT_RANGES}: merge ports into ranges",
                        bind.ports.len()
                    ),
                }),
            }
        }
        if service.sockets.raw {
            flags |= FLAG_ALLOW_RAW;
        }
        if service.sockets.packet {
            flags |= FLAG_ALLOW_PACKET;
        }
        if service.quarantined {
            flags |= FLAG_QUARANTINE;
        }
        let sockets = socket_bits(service);
        let (exe_rules, uid_rules) = qualifiers.entries(service, service_id);
        b.out.exe_rules.extend(exe_rules);
        for (_, exes, _) in qualified(service) {
            for e in exes {
                let path = ExePath {
                    service_id,
                    path: e.path.clone(),
                    file: e.file,
                };
                if !b.out.exe_paths.contains(&path) {
                    b.out.exe_paths.push(path);
                }
            }
        }
        b.out.uid_rules.extend(uid_rules);
        b.out.services.push(CompiledService {
            name: service.name.clone(),
            file_name: service
                .file
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            selector: service.selector.clone(),
            entry: ServiceEntry {
                service_id,
                mode: service.mode.to_kernel(),
                flags,
                sockets,
                qualifiers: qualifiers.flags(service),
                bind_ruleset,
                names_ruleset,
                name_key: service.names_key(),
                exe_free: qualifiers.exe_free,
                uid_free: qualifiers.uid_free,
            },
            rule_count: service.egress.len() + service.ingress.as_ref().map_or(0, Vec::len),
        });
    }
    if b.errors.is_empty() {
        warn_of_shared_folds(&b.out.services);
        Ok(b.out)
    } else {
        Err(PolicyErrors(b.errors))
    }
}

/// Two services with name rules (or observing lookups) whose name keys
/// fold to the same 32 bits share the LEARNT_V4 keys of their addresses
/// (agent_common::LearntV4Key: never a wrong allow, but an address both
/// learn is held for one at a time) and the mark of their queries
/// (agent_common::dns_mark: a query waiting in the proxy while its port
/// passes from one's socket to the other's is not told apart). Said, so
/// that an operator knows why (renaming either service changes its key).
fn warn_of_shared_folds(services: &[CompiledService]) -> usize {
    let mut seen: std::collections::HashMap<u32, &str> = std::collections::HashMap::new();
    let mut shared = 0;
    for s in services.iter().filter(|s| s.entry.flags & FLAG_NAMES != 0) {
        let fold = agent_common::fold(s.entry.name_key);
        if let Some(other) = seen.insert(fold, &s.name) {
            shared += 1;
            tracing::warn!(
                service = %s.name,
                other = %other,
                "these two services' name keys fold to the same 32 bits: an IPv4 address both learn from their lookups is allowed to the one that learnt it last (the other is denied it until it looks it up again), and their queries carry the same mark (docs/dns-names.md, \"Who asked\"); renaming either service ends this"
            );
        }
    }
    shared
}

type V4Entries = Vec<(u32, LpmV4Key, u32)>;
type V6Entries = Vec<(u32, LpmV6Key, u32)>;

impl Builder {
    /// Registers a rule and returns its global id.
    fn rule(&mut self, service: &Service, section: Section, index: usize) -> u32 {
        let id = u32::try_from(self.out.rules.len()).unwrap_or(u32::MAX);
        self.out.rules.push(RuleRef {
            service: service.name.clone(),
            file: service.file.clone(),
            section,
            index,
        });
        id
    }

    /// The ruleset holding exactly `ranges` (shared when identical), or
    /// None when it is longer than the kernel scans.
    fn ruleset(&mut self, ranges: Vec<KPortRange>) -> Option<u32> {
        if ranges.len() > MAX_PORT_RANGES {
            return None;
        }
        let next_id = u32::try_from(self.out.rulesets.len()).unwrap_or(u32::MAX);
        let rulesets = &mut self.out.rulesets;
        Some(*self.ruleset_ids.entry(ranges.clone()).or_insert_with(|| {
            let mut set = RuleSet::EMPTY;
            set.len = ranges.len() as u32;
            set.ranges[..ranges.len()].copy_from_slice(&ranges);
            rulesets.push(set);
            next_id
        }))
    }

    /// The `NAME_RULESETS` consecutive rulesets of a service's name rules
    /// (see agent_common::dns): the one at offset `bits` is the union of
    /// the port checks of the name rules in `bits` (bit i: the i-th rule
    /// with names), each range with its own rule id. Returns the first
    /// index; an offset whose union is longer than the kernel scans is an
    /// error naming the rules.
    fn name_rulesets(
        &mut self,
        service: &Service,
        first_egress_rule: u32,
        qualifiers: &Qualifiers,
    ) -> u32 {
        let rules: Vec<(usize, Vec<KPortRange>)> = service
            .name_rules()
            .map(|(i, r)| {
                let id = first_egress_rule.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
                let q = qualifiers.of_rule(Section::Egress, r.index);
                (r.index, port_checks(&r.ports, r.protocol, id, q))
            })
            .collect();
        let first = u32::try_from(self.out.rulesets.len()).unwrap_or(u32::MAX);
        for bits in 0..agent_common::NAME_RULESETS as usize {
            let chosen: Vec<&(usize, Vec<KPortRange>)> = rules
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, r)| r)
                .collect();
            let ranges: Vec<KPortRange> =
                chosen.iter().flat_map(|(_, c)| c.iter().copied()).collect();
            let mut set = RuleSet::EMPTY;
            if ranges.len() > MAX_PORT_RANGES {
                self.errors.push(PolicyError {
                    file: service.file.clone(),
                    line: service.egress.iter().find(|r| r.index == chosen[0].0).map_or(1, |r| r.line),
                    column: 1,
                    message: format!(
                        "a name allowed by rules {} would have {} port ranges; the kernel checks at most {MAX_PORT_RANGES}: merge port lists",
                        chosen.iter().map(|(i, _)| format!("egress[{i}]")).collect::<Vec<_>>().join(", "),
                        ranges.len()
                    ),
                });
            } else {
                set.len = ranges.len() as u32;
                set.ranges[..ranges.len()].copy_from_slice(&ranges);
            }
            self.out.rulesets.push(set);
        }
        first
    }

    /// LPM entries for one service's egress or ingress rules.
    fn prefixes(
        &mut self,
        service_id: u32,
        service: &Service,
        section: Section,
        rules: &[AddrRule<'_>],
    ) -> (V4Entries, V6Entries) {
        let checks: Vec<Vec<KPortRange>> = rules
            .iter()
            .map(|r| {
                let rule_id = self.rule(service, section, r.index);
                port_checks(r.ports, r.protocol, rule_id, r.qualifier)
            })
            .collect();

        // Which rules name each exact network.
        let mut by_net: HashMap<IpNetwork, Vec<usize>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            for net in rule.nets {
                let list = by_net.entry(*net).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        let mut nets: Vec<&IpNetwork> = by_net.keys().collect();
        nets.sort();

        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let name = match section {
            Section::Ingress => "ingress",
            _ => "egress",
        };
        for net in nets {
            let covering = covering_rules(net, &by_net);
            let ranges: Vec<KPortRange> = covering
                .iter()
                .flat_map(|&i| checks[i].iter().copied())
                .collect();
            let count = ranges.len();
            let Some(ruleset) = self.ruleset(ranges) else {
                self.errors.push(PolicyError {
                    file: service.file.clone(),
                    line: rules[covering[0]].line,
                    column: 1,
                    message: format!(
                        "{net} is allowed by rules {} with {count} port ranges in all; the kernel checks at most {MAX_PORT_RANGES} per network: merge port lists or split networks",
                        covering
                            .iter()
                            .map(|&i| format!("{name}[{}]", rules[i].index))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                });
                continue;
            };
            match net {
                IpNetwork::V4(n) => v4.push((
                    LpmV4Key::prefix_len(n.prefix()),
                    LpmV4Key::new(service_id, n.network().octets()),
                    ruleset,
                )),
                IpNetwork::V6(n) => v6.push((
                    LpmV6Key::prefix_len(n.prefix()),
                    LpmV6Key::new(service_id, n.network().octets()),
                    ruleset,
                )),
            }
        }
        (v4, v6)
    }
}

/// `ServiceEntry::sockets` of a service: ping sockets when an egress rule
/// may allow an echo (`icmp`, or `any` without ports: the echo is then
/// judged against the rules like any destination), and the protocols
/// `[sockets]` names.
fn socket_bits(service: &Service) -> u8 {
    let mut bits = 0;
    let echo = |r: &crate::policy::EgressRule| {
        r.protocol == Protocol::Icmp
            || (r.protocol == Protocol::Any && r.ports.iter().any(|p| p.lo == 0))
    };
    if service.egress.iter().any(echo) {
        bits |= SOCKETS_ICMP;
    }
    for p in &service.sockets.protocols {
        bits |= match p {
            SocketProtocol::Sctp => SOCKETS_SCTP,
            SocketProtocol::Mptcp => SOCKETS_MPTCP,
            SocketProtocol::Dccp => SOCKETS_DCCP,
            SocketProtocol::Udplite => SOCKETS_UDPLITE,
            SocketProtocol::L2tp => SOCKETS_L2TP,
        };
    }
    bits
}

fn port_checks(
    ports: &[PortRange],
    protocol: Protocol,
    rule_id: u32,
    qualifier: u8,
) -> Vec<KPortRange> {
    let proto = match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Icmp => PROTO_ICMP,
        Protocol::Any => PROTO_ANY,
    };
    ports
        .iter()
        .map(|p| KPortRange {
            lo: p.lo,
            hi: p.hi,
            proto,
            qualifier,
            _pad: [0; 2],
            rule_id,
        })
        .collect()
}

/// The `EXE_RULES` key of file `f` for a service.
#[must_use]
pub fn exe_rule_key(f: crate::process::ExeFile, service_id: u32) -> ExeRuleKey {
    ExeRuleKey {
        ino: f.ino,
        dev: f.dev,
        service_id,
    }
}

/// The `EXE_RULES` value: `mask` for the file `f`, for its generation
/// where it is known.
#[must_use]
pub fn exe_rule(f: crate::process::ExeFile, mask: u32) -> ExeRule {
    ExeRule {
        mask,
        gen: f.gen.unwrap_or(0),
        checks_gen: u32::from(f.gen.is_some()),
    }
}

/// A service's EXE_RULES and UID_RULES entries.
type QualifierEntries = (Vec<(ExeRuleKey, ExeRule)>, Vec<(UidRuleKey, u32)>);

/// A service's rules with `exe` or `uid` (`EgressRule::is_qualified`):
/// the i-th of them has bit i in the kernel's masks, and its port checks
/// carry i + 1. A caller's mask (process.rs in the kernel) is the
/// `EXE_RULES` entry of its executable (else `exe_free`) AND the
/// `UID_RULES` entry of its user (else `uid_free`), so a rule with both
/// qualifiers needs both to match.
struct Qualifiers {
    /// (section, rule index) -> bit.
    bits: HashMap<(Section, usize), u32>,
    /// Qualified rules that name no executable / no user.
    exe_free: u32,
    uid_free: u32,
}

impl Qualifiers {
    fn of(service: &Service) -> Self {
        let mut q = Self {
            bits: HashMap::new(),
            exe_free: 0,
            uid_free: 0,
        };
        // At most MAX_QUALIFIED_RULES (validation refuses more).
        for (bit, (key, exe, uid)) in qualified(service)
            .filter(|(_, exe, uid)| !exe.is_empty() || !uid.is_empty())
            .take(agent_common::MAX_QUALIFIED_RULES)
            .enumerate()
        {
            let mask = 1u32 << bit;
            q.bits.insert(key, bit as u32);
            if exe.is_empty() {
                q.exe_free |= mask;
            }
            if uid.is_empty() {
                q.uid_free |= mask;
            }
        }
        q
    }

    fn of_rule(&self, section: Section, index: usize) -> u8 {
        self.bits.get(&(section, index)).map_or(0, |b| *b as u8 + 1)
    }

    fn flags(&self, service: &Service) -> u8 {
        let mut flags = 0;
        if qualified(service).any(|(_, exe, _)| !exe.is_empty()) {
            flags |= QUALIFY_EXE;
        }
        if qualified(service).any(|(_, _, uid)| !uid.is_empty()) {
            flags |= QUALIFY_UID;
        }
        flags
    }

    /// The service's EXE_RULES and UID_RULES entries.
    fn entries(&self, service: &Service, service_id: u32) -> QualifierEntries {
        let mut exe: HashMap<crate::process::ExeFile, u32> = HashMap::new();
        let mut uid: HashMap<u32, u32> = HashMap::new();
        for (key, exes, uids) in qualified(service) {
            let Some(bit) = self.bits.get(&key) else {
                continue;
            };
            for e in exes {
                *exe.entry(e.file).or_insert(self.exe_free) |= 1 << bit;
            }
            for u in uids {
                *uid.entry(*u).or_insert(self.uid_free) |= 1 << bit;
            }
        }
        let mut exe: Vec<(ExeRuleKey, ExeRule)> = exe
            .into_iter()
            .map(|(f, mask)| (exe_rule_key(f, service_id), exe_rule(f, mask)))
            .collect();
        exe.sort_by_key(|(k, _)| (k.dev, k.ino));
        let mut uid: Vec<(UidRuleKey, u32)> = uid
            .into_iter()
            .map(|(uid, mask)| (UidRuleKey { service_id, uid }, mask))
            .collect();
        uid.sort_by_key(|(k, _)| k.uid);
        (exe, uid)
    }
}

/// Every egress then ingress rule of `service` with its qualifiers (empty
/// lists for a rule without).
fn qualified(
    service: &Service,
) -> impl Iterator<Item = ((Section, usize), &[crate::policy::Executable], &[u32])> {
    let egress = service.egress.iter().map(|r| {
        (
            (Section::Egress, r.index),
            r.exe.as_slice(),
            r.uid.as_slice(),
        )
    });
    let ingress = service.ingress.iter().flatten().map(|r| {
        (
            (Section::Ingress, r.index),
            r.exe.as_slice(),
            r.uid.as_slice(),
        )
    });
    egress.chain(ingress)
}

/// Indexes of every rule whose network contains `net` (itself included), in
/// rule order, found by walking `net`'s shorter prefixes: O(address bits),
/// not O(rules).
fn covering_rules(net: &IpNetwork, by_net: &HashMap<IpNetwork, Vec<usize>>) -> Vec<usize> {
    let mut rules: Vec<usize> = Vec::new();
    for len in 0..=net.prefix() {
        if let Some(found) = truncate(net, len).and_then(|n| by_net.get(&n)) {
            rules.extend(found);
        }
    }
    rules.sort_unstable();
    rules.dedup();
    rules
}

fn truncate(net: &IpNetwork, len: u8) -> Option<IpNetwork> {
    match net.network() {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpNetwork::new(IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), len).ok()
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpNetwork::new(IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)), len).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{EgressRule, Mode, Selector};

    fn rule(index: usize, to: &[&str], ports: &[(u16, u16)], protocol: Protocol) -> EgressRule {
        EgressRule {
            index,
            line: index + 1,
            description: None,
            to: to.iter().map(|t| t.parse().expect("test CIDR")).collect(),
            names: Vec::new(),
            ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
            protocol,
            exe: Vec::new(),
            uid: Vec::new(),
        }
    }

    fn named(index: usize, names: &[&str], ports: &[(u16, u16)], protocol: Protocol) -> EgressRule {
        EgressRule {
            names: names
                .iter()
                .map(|n| crate::dns::name::NamePattern::parse(n).expect("test name"))
                .collect(),
            ..rule(index, &[], ports, protocol)
        }
    }

    #[test]
    fn qualified_rules_get_a_bit_and_their_callers_masks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").expect("write");
        std::fs::write(&b, b"b").expect("write");
        let text = format!(
            "cgroup = \"/s\"\nmode = \"enforce\"\n\
             [[egress]]\nto = [\"10.0.0.1\"]\nports = [80]\n\
             [[egress]]\nto = [\"10.0.0.1\"]\nports = [5432]\nexe = [{a:?}]\n\
             [[egress]]\nto = [\"10.0.0.0/8\"]\nports = [22]\nuid = [0]\n\
             [[egress]]\nto = [\"10.0.0.2\"]\nports = [443]\nexe = [{a:?}, {b:?}]\nuid = [33]\n"
        );
        let p = crate::kernel::compiled_from(&text);
        let s = &p.services[0].entry;
        assert_eq!(s.qualifiers, QUALIFY_EXE | QUALIFY_UID);
        // Bits: egress[1] = 0, egress[2] = 1, egress[3] = 2.
        assert_eq!(s.exe_free, 0b010, "egress[2] names no executable");
        assert_eq!(s.uid_free, 0b001, "egress[1] names no user");
        let file = |p: &std::path::Path| crate::process::ExeFile::of(p).expect("stat");
        let exe: HashMap<crate::process::ExeFile, u32> = p
            .exe_rules
            .iter()
            .map(|(k, r)| {
                let gen = (r.checks_gen != 0).then_some(r.gen);
                let f = crate::process::ExeFile {
                    dev: k.dev,
                    ino: k.ino,
                    gen,
                };
                (f, r.mask)
            })
            .collect();
        assert_eq!(exe[&file(&a)], 0b111);
        assert_eq!(exe[&file(&b)], 0b110);
        let uid: Vec<(u32, u32)> = p.uid_rules.iter().map(|(k, m)| (k.uid, *m)).collect();
        assert_eq!(uid, vec![(0, 0b011), (33, 0b101)]);
        // 10.0.0.1's ruleset: port 80 for anyone, 5432 for `a` (bit 0),
        // 22 (from the /8) for uid 0 (bit 1).
        let checks: Vec<(u16, u8)> = p
            .rulesets
            .iter()
            .flat_map(|r| {
                r.ranges[..r.len as usize]
                    .iter()
                    .map(|c| (c.lo, c.qualifier))
            })
            .collect();
        for expected in [(80, 0), (5432, 1), (22, 2), (443, 3)] {
            assert!(checks.contains(&expected), "{expected:?} in {checks:?}");
        }
        assert_eq!(p.exe_paths.len(), 2);
    }

    #[test]
    fn name_rules_get_one_union_ruleset_per_combination_of_rules() {
        let policy = set(vec![
            rule(0, &["198.51.100.0/24"], &[(22, 22)], Protocol::Tcp),
            named(1, &["api.example.com"], &[(443, 443)], Protocol::Tcp),
            named(2, &["*.db.example.com"], &[(5432, 5432)], Protocol::Tcp),
        ]);
        let p = compile(&policy).expect("compiles");
        let entry = p.services[0].entry;
        assert_ne!(entry.flags & FLAG_NAMES, 0);
        let at = |bits: u32| p.rulesets[(entry.names_ruleset + bits) as usize];
        assert_eq!(at(0).len, 0, "no rule: nothing allowed");
        let ports = |bits: u32| {
            let set = at(bits);
            set.ranges[..set.len as usize]
                .iter()
                .map(|r| (r.lo, r.rule_id))
                .collect::<Vec<_>>()
        };
        // Rule ids: egress[0] is 0, egress[1] is 1, egress[2] is 2.
        assert_eq!(ports(0b01), [(443, 1)]);
        assert_eq!(ports(0b10), [(5432, 2)]);
        assert_eq!(ports(0b11), [(443, 1), (5432, 2)]);
        assert_eq!(
            p.rulesets.len() as u32,
            entry.names_ruleset + agent_common::NAME_RULESETS
        );
        assert_eq!(entry.name_key, policy.services[0].names_key());
    }

    #[test]
    fn the_names_key_follows_the_name_patterns_in_order_not_the_ports() {
        let key = |rules: Vec<EgressRule>| set(rules).services[0].names_key();
        let api = |port| named(0, &["api.example.com"], &[(port, port)], Protocol::Tcp);
        let db = named(1, &["db.example.com"], &[(5432, 5432)], Protocol::Tcp);
        let base = key(vec![api(443), db.clone()]);
        assert_eq!(base, key(vec![api(8443), db.clone()]), "ports only");
        assert_ne!(base, key(vec![db.clone(), api(443)]), "the rule order");
        assert_ne!(base, key(vec![api(443)]), "a rule gone");
        assert_ne!(
            key(vec![named(
                0,
                &["a.example.com", "b.example.com"],
                &[(1, 1)],
                Protocol::Tcp
            )]),
            key(vec![
                named(0, &["a.example.com"], &[(1, 1)], Protocol::Tcp),
                named(1, &["b.example.com"], &[(1, 1)], Protocol::Tcp),
            ]),
            "the same patterns split into two rules"
        );
    }

    #[test]
    fn a_service_without_names_has_no_name_flag() {
        let p = compile(&set(vec![rule(
            0,
            &["198.51.100.0/24"],
            &[(22, 22)],
            Protocol::Tcp,
        )]))
        .expect("compiles");
        assert_eq!(p.services[0].entry.flags & FLAG_NAMES, 0);
    }

    #[test]
    fn observed_lookups_set_the_name_flag_with_no_name_ruleset() {
        let mut s = set(Vec::new());
        s.services[0].observe_lookups = true;
        let p = compile(&s).expect("compiles");
        assert_ne!(
            p.services[0].entry.flags & FLAG_NAMES,
            0,
            "its lookups are redirected"
        );
        assert_eq!(
            p.services[0].entry.names_ruleset, 0,
            "no name rules to point at"
        );
    }

    fn set(rules: Vec<EgressRule>) -> PolicySet {
        PolicySet {
            services: vec![Service {
                name: "svc".into(),
                file: PathBuf::from("svc.toml"),
                description: None,
                selector: Selector::Cgroup("svc".into()),
                mode: Mode::Enforce,
                egress: rules,
                ingress: None,
                bind: None,
                sockets: crate::policy::SocketsPolicy::default(),
                observe_lookups: false,
                quarantined: false,
            }],
            warnings: Vec::new(),
        }
    }

    #[test]
    fn nested_prefix_carries_the_outer_rules_too() {
        let p = compile(&set(vec![
            rule(0, &["10.0.0.0/8"], &[(443, 443)], Protocol::Tcp),
            rule(1, &["10.1.0.0/16"], &[(53, 53)], Protocol::Udp),
        ]))
        .expect("compiles");
        assert_eq!(p.v4.len(), 2);
        let inner =
            p.v4.iter()
                .find(|(len, _, _)| *len == 48)
                .expect("/16 entry");
        let set = &p.rulesets[inner.2 as usize];
        assert_eq!(set.len, 2, "the /16 must also allow the /8's port 443");
        assert_eq!(set.ranges[0].rule_id, 0);
        assert_eq!(set.ranges[1].rule_id, 1);
    }

    #[test]
    fn identical_rule_lists_share_one_ruleset() {
        let cidrs: Vec<String> = (0..1000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        let p = compile(&set(vec![rule(0, &refs, &[(80, 80)], Protocol::Tcp)])).expect("compiles");
        assert_eq!(p.v4.len(), 1000);
        assert_eq!(p.rulesets.len(), 1);
    }

    #[test]
    fn too_many_port_ranges_is_an_error_with_the_line() {
        let ports: Vec<(u16, u16)> = (0..40).map(|i| (1000 + 2 * i, 1000 + 2 * i)).collect();
        let err = compile(&set(vec![rule(
            3,
            &["192.0.2.0/24"],
            &ports,
            Protocol::Tcp,
        )]))
        .expect_err("40 ranges cannot fit");
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].line, 4);
        assert!(
            err.0[0].message.contains("at most 32"),
            "{}",
            err.0[0].message
        );
    }

    /// A policy file in `dir`, for the tests that start from policy text.
    fn write_policy(dir: &tempfile::TempDir, name: &str, text: &str) {
        std::fs::write(dir.path().join(name), text).expect("write test policy");
    }

    #[test]
    fn icmp_rules_and_socket_protocols_parse_and_compile_to_socket_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_policy(
            &dir,
            "pinger.toml",
            "cgroup = \"/p\"\nmode = \"enforce\"\n[[egress]]\nto = [\"198.51.100.0/24\"]\nprotocol = \"icmp\"\n[[egress]]\nto = [\"10.0.0.0/8\"]\nprotocol = \"any\"\n[sockets]\nprotocols = [\"sctp\", \"mptcp\", \"sctp\"]\n",
        );
        let set = crate::policy::load_dir(dir.path()).expect("valid");
        let s = &set.services[0];
        assert_eq!(s.egress[0].protocol, Protocol::Icmp);
        assert_eq!(s.egress[0].ports, [PortRange::ALL]);
        assert_eq!(s.egress[1].protocol, Protocol::Any);
        assert_eq!(
            s.sockets.protocols,
            [SocketProtocol::Sctp, SocketProtocol::Mptcp]
        );
        let compiled = compile(&set).expect("compiles");
        let bits = compiled.services[0].entry.sockets;
        assert_eq!(
            bits,
            agent_common::SOCKETS_ICMP | agent_common::SOCKETS_SCTP | agent_common::SOCKETS_MPTCP
        );
    }

    /// Ping sockets come with a rule that may allow an echo: `icmp`, or `any`
    /// naming no ports; not with `any` limited to ports, nor with no rule.
    #[test]
    fn ping_sockets_follow_rules_that_may_allow_an_echo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rule = |extra: &str| {
            format!("mode = \"enforce\"\n[[egress]]\nto = [\"198.51.100.0/24\"]\n{extra}")
        };
        write_policy(&dir, "a.toml", &format!("cgroup = \"/a\"\n{}", rule("")));
        write_policy(
            &dir,
            "b.toml",
            &format!("cgroup = \"/b\"\n{}", rule("ports = [443]\n")),
        );
        write_policy(&dir, "c.toml", "cgroup = \"/c\"\nmode = \"enforce\"\n");
        let set = crate::policy::load_dir(dir.path()).expect("valid");
        let compiled = compile(&set).expect("compiles");
        let icmp: Vec<(String, bool)> = compiled
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.entry.sockets & agent_common::SOCKETS_ICMP != 0,
                )
            })
            .collect();
        assert_eq!(
            icmp,
            [
                ("a".to_string(), true),
                ("b".to_string(), false),
                ("c".to_string(), false)
            ]
        );
    }

    #[test]
    fn services_with_name_rules_whose_keys_fold_alike_are_warned_of() {
        let service = |name: &str, name_key: u64, flags: u8| CompiledService {
            name: name.into(),
            file_name: format!("{name}.toml"),
            selector: Selector::Cgroup(name.into()),
            entry: ServiceEntry {
                service_id: 0,
                mode: 0,
                flags,
                sockets: 0,
                qualifiers: 0,
                bind_ruleset: 0,
                names_ruleset: 0,
                name_key,
                exe_free: 0,
                uid_free: 0,
            },
            rule_count: 1,
        };
        // 1 << 32 and 1 fold to 1.
        let a = service("a", 1 << 32, FLAG_NAMES);
        let b = service("b", 1, FLAG_NAMES);
        let c = service("c", 2, FLAG_NAMES);
        let no_names = service("d", 1, 0);
        assert_eq!(
            agent_common::fold(a.entry.name_key),
            agent_common::fold(b.entry.name_key)
        );
        assert_eq!(
            warn_of_shared_folds(&[a.clone(), c.clone(), no_names.clone()]),
            0
        );
        assert_eq!(warn_of_shared_folds(&[a, c, no_names, b]), 1);
    }
}
