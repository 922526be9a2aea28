//! How ids and map capacity are laid out so that a new policy can be
//! written beside the one in force and switched in without a gap.
//!
//! Service ids, ruleset indexes and rule ids are split in two halves. The
//! policy in force lives in one half; a reload writes the new policy into
//! the other, then points each service's cgroup at its new entry (one map
//! update per service, so every connection is judged by the old policy or
//! the new one, never a mix), then retires the old half. Map capacities are
//! fixed at load time, with room for both halves.

use agent_common::{
    LpmV4Key, LpmV6Key, DEFAULT_MAX_PREFIXES, DEFAULT_MAX_RULESETS, DEFAULT_MAX_SERVICES,
};

use super::{addr_maps, compile::CompiledPolicy};

/// Rule ids of a half start at `half * RULES_PER_HALF`.
pub const RULES_PER_HALF: u32 = 1 << 30;

/// Map capacities, fixed when the programs are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Services per half (SERVICES holds cgroups of both halves).
    pub services: u32,
    /// Rulesets per half.
    pub rulesets: u32,
    /// Entries of each address map (`addr_maps::entry_counts`' order),
    /// both halves together. Each is sized by its own count: a hash's
    /// bucket array is allocated in full at load (16 bytes a bucket), so
    /// the maps a policy hardly uses stay small.
    pub prefixes: [(&'static str, u32); 8],
}

impl Capacity {
    /// Room for `policy` to grow to twice its size on reload, and never less
    /// than the defaults.
    pub fn for_policy(policy: &CompiledPolicy) -> Self {
        let grow = |n: usize, floor: u32| -> u32 {
            u32::try_from(n.saturating_mul(2))
                .unwrap_or(u32::MAX)
                .max(floor)
        };
        Self {
            services: grow(policy.services.len(), DEFAULT_MAX_SERVICES),
            rulesets: grow(policy.rulesets.len(), DEFAULT_MAX_RULESETS),
            // Two halves, each with room to double.
            prefixes: addr_maps::entry_counts(policy)
                .map(|(name, n)| (name, grow(n, DEFAULT_MAX_PREFIXES).saturating_mul(2))),
        }
    }

    /// Why `policy` cannot be written into one half, if it cannot.
    pub fn check(&self, policy: &CompiledPolicy) -> Result<(), String> {
        let mut checks = vec![
            ("services".to_string(), policy.services.len(), self.services),
            ("rulesets".to_string(), policy.rulesets.len(), self.rulesets),
        ];
        for ((name, needed), (_, room)) in addr_maps::entry_counts(policy)
            .into_iter()
            .zip(self.prefixes)
        {
            checks.push((addr_maps::describe(name).to_string(), needed, room / 2));
        }
        for (what, needed, room) in checks {
            if needed > room as usize {
                return Err(format!(
                    "the new policy needs {needed} {what}, the loaded maps have room for {room}; restart the agent to size the maps for it"
                ));
            }
        }
        Ok(())
    }
}

/// Moves a freshly compiled policy (ids from 0) into `half`.
pub fn relocate(mut policy: CompiledPolicy, half: u32, capacity: Capacity) -> CompiledPolicy {
    let service_base = half * capacity.services;
    let ruleset_base = half * capacity.rulesets;
    let rule_base = half * RULES_PER_HALF;
    for s in &mut policy.services {
        s.entry.service_id += service_base;
        if s.entry.bind_ruleset != u32::MAX {
            s.entry.bind_ruleset += ruleset_base;
        }
        if s.entry.flags & agent_common::FLAG_NAMES != 0 {
            s.entry.names_ruleset += ruleset_base;
        }
    }
    for (_, key, ruleset) in policy.v4.iter_mut().chain(policy.ingress_v4.iter_mut()) {
        *key = LpmV4Key::new(key.service() + service_base, key.addr);
        *ruleset += ruleset_base;
    }
    for (_, key, ruleset) in policy.v6.iter_mut().chain(policy.ingress_v6.iter_mut()) {
        *key = LpmV6Key::new(key.service() + service_base, key.addr);
        *ruleset += ruleset_base;
    }
    for (key, _) in &mut policy.exe_rules {
        key.service_id += service_base;
    }
    for (key, _) in &mut policy.uid_rules {
        key.service_id += service_base;
    }
    for p in &mut policy.exe_paths {
        p.service_id += service_base;
    }
    for set in &mut policy.rulesets {
        for r in set.ranges.iter_mut().take(set.len as usize) {
            r.rule_id += rule_base;
        }
    }
    policy.service_base = service_base;
    policy.ruleset_base = ruleset_base;
    policy.rule_base = rule_base;
    policy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::compiled_from as compiled;
    use agent_common::maps as names;

    #[test]
    fn relocation_moves_every_id_into_the_half() {
        let p = compiled(
            "cgroup = \"/s\"\nmode = \"enforce\"\n[[egress]]\nto = [\"192.0.2.0/24\"]\nports = [80]\n[bind]\nports = [8080]\n",
        );
        let cap = Capacity::for_policy(&p);
        let r = relocate(p.clone(), 1, cap);
        assert_eq!(r.services[0].entry.service_id, cap.services);
        assert_eq!(
            r.services[0].entry.bind_ruleset,
            p.services[0].entry.bind_ruleset + cap.rulesets
        );
        assert_eq!(r.v4[0].1.service(), cap.services);
        assert_eq!(r.v4[0].2, p.v4[0].2 + cap.rulesets);
        assert_eq!(r.rulesets[0].ranges[0].rule_id, RULES_PER_HALF);
        assert_eq!(
            r.rule(RULES_PER_HALF).map(ToString::to_string).as_deref(),
            Some("svc.toml#egress[0]")
        );
        // Half 0 changes nothing.
        let same = relocate(p.clone(), 0, cap);
        assert_eq!(same.v4, p.v4);
    }

    #[test]
    fn a_policy_too_large_for_the_loaded_maps_is_refused() {
        let small = compiled("cgroup = \"/s\"\nmode = \"enforce\"\n");
        let cap = Capacity::for_policy(&small);
        // Each address map has room of its own: networks and whole
        // addresses are counted apart.
        let room = |name: &str| {
            let (_, n) = cap
                .prefixes
                .iter()
                .find(|(m, _)| *m == name)
                .expect("a map");
            n / 2
        };
        for (name, format, what) in [
            (names::EGRESS_V4, "10.{}.{}.0/24", "egress IPv4 networks"),
            (
                names::EGRESS_HOSTS_V4,
                "10.0.{}.{}",
                "egress IPv4 addresses",
            ),
        ] {
            let cidrs: Vec<String> = (0..=room(name))
                .map(|i| {
                    let net = format
                        .replacen("{}", &(i / 256 % 256).to_string(), 1)
                        .replacen("{}", &(i % 256).to_string(), 1);
                    format!("\"{net}\"")
                })
                .collect();
            let big = compiled(&format!(
                "cgroup = \"/s\"\nmode = \"enforce\"\n[[egress]]\nto = [{}]\n",
                cidrs.join(",")
            ));
            let err = cap.check(&big).expect_err("does not fit");
            assert!(err.contains(what), "{err}");
            // One fewer fits.
            let fits = compiled(&format!(
                "cgroup = \"/s\"\nmode = \"enforce\"\n[[egress]]\nto = [{}]\n",
                cidrs[1..].join(",")
            ));
            cap.check(&fits).expect("fits");
        }
    }
}
