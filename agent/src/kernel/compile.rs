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
    LpmV4Key, LpmV6Key, PortRange as KPortRange, RuleSet, ServiceEntry, MAX_PORT_RANGES,
    MODE_AUDIT, MODE_ENFORCE, PROTO_ANY, PROTO_TCP, PROTO_UDP,
};
use ipnetwork::IpNetwork;

use crate::policy::{Mode, PolicyError, PolicyErrors, PolicySet, Protocol, RuleRef};

/// Everything to write into the maps for one policy set.
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    /// Index = service id.
    pub services: Vec<CompiledService>,
    /// (prefix length in key bits, key, ruleset index).
    pub v4: Vec<(u32, LpmV4Key, u32)>,
    pub v6: Vec<(u32, LpmV6Key, u32)>,
    pub rulesets: Vec<RuleSet>,
    /// Index = rule id carried in `PortRange::rule_id`.
    pub rules: Vec<RuleRef>,
}

#[derive(Debug, Clone)]
pub struct CompiledService {
    pub name: String,
    /// File name of its policy (for `file#default-deny` references).
    pub file_name: String,
    /// Path of its cgroup relative to the cgroup2 mount.
    pub cgroup_path: String,
    pub entry: ServiceEntry,
    pub rule_count: usize,
}

impl CompiledPolicy {
    pub fn rule(&self, rule_id: u32) -> Option<&RuleRef> {
        self.rules.get(rule_id as usize)
    }
}

/// Compiles a policy set; fails with file and line when a prefix would need
/// more port checks than the kernel scans (`MAX_PORT_RANGES`).
pub fn compile(set: &PolicySet) -> Result<CompiledPolicy, PolicyErrors> {
    let mut out = CompiledPolicy::default();
    let mut ruleset_ids: HashMap<Vec<KPortRange>, u32> = HashMap::new();
    let mut errors = Vec::new();

    for (service_id, service) in set.services.iter().enumerate() {
        let service_id = u32::try_from(service_id).unwrap_or(u32::MAX);
        out.services.push(CompiledService {
            name: service.name.clone(),
            file_name: service
                .file
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            cgroup_path: service.selector.cgroup_path(),
            entry: ServiceEntry {
                service_id,
                mode: match service.mode {
                    Mode::Enforce => MODE_ENFORCE,
                    Mode::Audit => MODE_AUDIT,
                },
                _pad: [0; 3],
            },
            rule_count: service.egress.len(),
        });

        // Port checks of each rule, tagged with its global rule id.
        let mut checks: Vec<Vec<KPortRange>> = Vec::with_capacity(service.egress.len());
        for rule in &service.egress {
            let rule_id = u32::try_from(out.rules.len()).unwrap_or(u32::MAX);
            out.rules.push(RuleRef {
                service: service.name.clone(),
                file: service.file.clone(),
                index: rule.index,
            });
            let proto = match rule.protocol {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
                Protocol::Any => PROTO_ANY,
            };
            checks.push(
                rule.ports
                    .iter()
                    .map(|p| KPortRange {
                        lo: p.lo,
                        hi: p.hi,
                        proto,
                        _pad: [0; 3],
                        rule_id,
                    })
                    .collect(),
            );
        }

        // Which rules name each exact network.
        let mut by_net: HashMap<IpNetwork, Vec<usize>> = HashMap::new();
        for (i, rule) in service.egress.iter().enumerate() {
            for net in &rule.to {
                let rules = by_net.entry(*net).or_default();
                if !rules.contains(&i) {
                    rules.push(i);
                }
            }
        }

        let mut nets: Vec<&IpNetwork> = by_net.keys().collect();
        nets.sort();
        for net in nets {
            let covering = covering_rules(net, &by_net);
            let ranges: Vec<KPortRange> = covering
                .iter()
                .flat_map(|&i| checks[i].iter().copied())
                .collect();
            if ranges.len() > MAX_PORT_RANGES {
                let first = &service.egress[covering[0]];
                errors.push(PolicyError {
                    file: service.file.clone(),
                    line: first.line,
                    column: 1,
                    message: format!(
                        "destination {net} is allowed by rules {} with {} port ranges in all; the kernel checks at most {MAX_PORT_RANGES} per destination: merge port lists or split destinations",
                        covering
                            .iter()
                            .map(|&i| format!("egress[{}]", service.egress[i].index))
                            .collect::<Vec<_>>()
                            .join(", "),
                        ranges.len()
                    ),
                });
                continue;
            }
            let next_id = u32::try_from(out.rulesets.len()).unwrap_or(u32::MAX);
            let ruleset = *ruleset_ids.entry(ranges.clone()).or_insert_with(|| {
                let mut set = RuleSet::EMPTY;
                set.len = ranges.len() as u32;
                set.ranges[..ranges.len()].copy_from_slice(&ranges);
                out.rulesets.push(set);
                next_id
            });
            let sid = service_id.to_be_bytes();
            match net {
                IpNetwork::V4(n) => out.v4.push((
                    32 + u32::from(n.prefix()),
                    LpmV4Key {
                        service_id: sid,
                        addr: n.network().octets(),
                    },
                    ruleset,
                )),
                IpNetwork::V6(n) => out.v6.push((
                    32 + u32::from(n.prefix()),
                    LpmV6Key {
                        service_id: sid,
                        addr: n.network().octets(),
                    },
                    ruleset,
                )),
            }
        }
    }

    if errors.is_empty() {
        Ok(out)
    } else {
        Err(PolicyErrors(errors))
    }
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
    use crate::policy::{EgressRule, PortRange, Selector, Service};

    fn rule(index: usize, to: &[&str], ports: &[(u16, u16)], protocol: Protocol) -> EgressRule {
        EgressRule {
            index,
            line: index + 1,
            description: None,
            to: to.iter().map(|t| t.parse().expect("test CIDR")).collect(),
            ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
            protocol,
        }
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
            }],
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
}
