//! Undoing a switch that failed part-way: the SERVICES changes that point
//! every cgroup the switch touched back at its entry in the policy in force.

use crate::{
    kernel::{Change, CompiledPolicy},
    services::TrackedService,
};

/// `changes` were computed by the tracker going from `before` to `after`;
/// `live` is the policy in force. A cgroup the tracker knew gets its old
/// entry back; one it found during the switch gets the entry of the policy
/// in force for its path (the kernel may have added it at mkdir with that
/// entry), or is removed when that policy has no service there.
#[must_use]
pub fn changes(
    before: &[TrackedService],
    after: &[TrackedService],
    live: Option<&CompiledPolicy>,
    changes: &[Change],
) -> Vec<Change> {
    let holds = |s: &&TrackedService, id: u64| s.cgroups.iter().any(|c| c.id == id);
    let known = |id: u64| before.iter().find(|s| holds(s, id));
    let by_path = |id: u64| {
        let selector = &after.iter().find(|s| holds(s, id))?.selector;
        live?.services.iter().find(|s| &s.selector == selector)
    };
    let mut out: Vec<Change> = Vec::new();
    for change in changes {
        let cgroup_id = match *change {
            Change::Add { cgroup_id, .. } | Change::Remove { cgroup_id } => cgroup_id,
        };
        let done = out.iter().any(|c| {
            matches!(*c, Change::Add { cgroup_id: id, .. } | Change::Remove { cgroup_id: id } if id == cgroup_id)
        });
        if done {
            continue;
        }
        let entry = known(cgroup_id)
            .map(|s| s.entry)
            .or_else(|| by_path(cgroup_id).map(|s| s.entry));
        out.push(match (entry, change) {
            (Some(entry), _) => Change::Add { cgroup_id, entry },
            (None, Change::Add { .. }) => Change::Remove { cgroup_id },
            // Removed by the switch and unknown before: nothing to restore.
            (None, Change::Remove { .. }) => continue,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use agent_common::ServiceEntry;

    use super::*;
    use crate::{kernel::CompiledService, policy::Selector, services::ServiceCgroup};

    fn entry(service_id: u32) -> ServiceEntry {
        ServiceEntry {
            service_id,
            mode: 0,
            flags: 0,
            sockets: 0,
            qualifiers: 0,
            bind_ruleset: u32::MAX,
            names_ruleset: 0,
            name_key: 0,
            exe_free: 0,
            uid_free: 0,
        }
    }

    fn tracked(path: &str, id: Option<u64>, sid: u32) -> TrackedService {
        TrackedService {
            name: path.to_string(),
            selector: Selector::Cgroup(path.to_string()),
            entry: entry(sid),
            cgroups: id
                .map(|id| ServiceCgroup {
                    path: path.to_string(),
                    id,
                    unenforced: None,
                })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn every_touched_cgroup_goes_back_to_the_policy_in_force() {
        // a: kept (re-pointed); b: dropped by the new policy; c: new in it;
        // d: in both, its cgroup seen for the first time during the switch.
        let before = [
            tracked("a", Some(1), 0),
            tracked("b", Some(2), 1),
            tracked("d", None, 2),
        ];
        let after = [
            tracked("a", Some(1), 1024),
            tracked("c", Some(3), 1025),
            tracked("d", Some(4), 1026),
        ];
        let live = CompiledPolicy {
            services: ["a", "b", "d"]
                .iter()
                .zip(0..)
                .map(|(p, i)| CompiledService {
                    name: (*p).to_string(),
                    file_name: String::new(),
                    selector: Selector::Cgroup((*p).to_string()),
                    entry: entry(i),
                    rule_count: 0,
                })
                .collect(),
            ..CompiledPolicy::default()
        };
        let forward = [
            Change::Add {
                cgroup_id: 1,
                entry: entry(1024),
            },
            Change::Remove { cgroup_id: 2 },
            Change::Add {
                cgroup_id: 3,
                entry: entry(1025),
            },
            Change::Add {
                cgroup_id: 4,
                entry: entry(1026),
            },
        ];
        let back = changes(&before, &after, Some(&live), &forward);
        assert_eq!(
            back,
            [
                Change::Add {
                    cgroup_id: 1,
                    entry: entry(0)
                },
                Change::Add {
                    cgroup_id: 2,
                    entry: entry(1)
                },
                Change::Remove { cgroup_id: 3 },
                Change::Add {
                    cgroup_id: 4,
                    entry: entry(2)
                },
            ]
        );
    }
}
