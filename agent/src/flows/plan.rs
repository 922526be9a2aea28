//! What a sweep does with the entries of the epoch it closed: which calls
//! to report, which flows go on into the next epoch, which end. Pure, so
//! that the rules are tested without a kernel.

use std::collections::BTreeMap;

use agent_common::{recorded_when_carried, FlowKey, FlowValue, RECORD_HELD, RECORD_SENT};

/// The outcome of one sweep over a closed epoch's entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (flow, its entry, calls to report): calls no record reported yet,
    /// of flows whose first call had a record.
    pub summaries: Vec<(FlowKey, FlowValue, u64)>,
    /// Flows whose first call the denial rate limit kept from the log,
    /// summed per process and decision (destinations left out: a scan
    /// must not flood the log): (a flow of the group, its entry, calls,
    /// flows held back in this epoch; a held-back flow's later calls are
    /// summed here but the flow is counted only once).
    pub held_back: Vec<(FlowKey, FlowValue, u64, u64)>,
    /// Flows to carry into the open epoch, with their new (empty) entries.
    pub carry: Vec<(FlowKey, FlowValue)>,
    /// Flows that end: idle for the timeout, or of a replaced policy.
    pub ended_idle: u64,
    pub ended_policy: u64,
    /// Flows ended early to keep room in the table (their calls were all
    /// reported: nothing is lost, the next call starts a new flow).
    pub evicted: u64,
}

/// The rules of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// A flow with no call in this many sweeps in a row ends.
    pub idle_sweeps: u32,
    /// At most this many flows are carried over (the rest are evicted,
    /// idlest first), so that new flows keep finding room.
    pub carry_max: usize,
}

/// Plans the sweep of `entries` (the closed epoch's: every one is removed
/// after). `live`: whether a service id belongs to the policy in force.
pub fn plan(entries: Vec<(FlowKey, FlowValue)>, rules: Rules, live: impl Fn(u32) -> bool) -> Plan {
    let mut out = Plan::default();
    let mut held: BTreeMap<HeldGroup, (FlowKey, FlowValue, u64, u64)> = BTreeMap::new();
    for (key, value) in entries {
        let unreported = value.calls.saturating_sub(value.reported);
        if unreported > 0 && value.recorded == RECORD_SENT {
            out.summaries.push((key, value, unreported));
        } else if unreported > 0 {
            let group = held
                .entry(HeldGroup::of(&key))
                .or_insert((key, value, 0, 0));
            group.2 += unreported;
            // Counted once, in the epoch of its first call.
            group.3 += u64::from(value.recorded == RECORD_HELD);
        }
        let idle = if value.calls == 0 {
            value.idle_sweeps.saturating_add(1)
        } else {
            0
        };
        if !live(key.service_id) {
            out.ended_policy += 1;
        } else if idle >= rules.idle_sweeps {
            out.ended_idle += 1;
        } else {
            let next = FlowKey {
                epoch: key.epoch ^ 1,
                ..key
            };
            out.carry.push((
                next,
                FlowValue {
                    calls: 0,
                    reported: 0,
                    idle_sweeps: idle,
                    recorded: recorded_when_carried(value.recorded),
                    ..value
                },
            ));
        }
    }
    out.held_back = held.into_values().collect();
    if out.carry.len() > rules.carry_max {
        // Busiest first: the idlest flows are the ones let go.
        out.carry.sort_by_key(|(_, v)| v.idle_sweeps);
        out.evicted = (out.carry.len() - rules.carry_max) as u64;
        out.carry.truncate(rules.carry_max);
    }
    out
}

/// What held-back flows are summed by: the flow without its ends.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HeldGroup {
    service_id: u32,
    cgroup_id: u64,
    tgid: u32,
    direction: u8,
    protocol: u8,
    hook: u8,
    verdict: u8,
    rule_id: u32,
}

impl HeldGroup {
    fn of(key: &FlowKey) -> Self {
        Self {
            service_id: key.service_id,
            cgroup_id: key.cgroup_id,
            tgid: key.tgid,
            direction: key.direction,
            protocol: key.protocol,
            hook: key.hook,
            verdict: key.verdict,
            rule_id: key.rule_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::RECORD_HELD_COUNTED;

    fn key(port: u16, service_id: u32) -> FlowKey {
        FlowKey {
            cgroup_id: 7,
            addr: [198, 51, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            service_id,
            rule_id: 3,
            tgid: 42,
            port,
            local_port: 0,
            family: agent_common::FAMILY_V4,
            protocol: agent_common::PROTO_UDP,
            hook: agent_common::HOOK_SENDMSG,
            direction: agent_common::DIRECTION_EGRESS,
            verdict: agent_common::VERDICT_ALLOW,
            epoch: 0,
            _pad: [0; 2],
        }
    }

    fn value(calls: u64, reported: u64, idle_sweeps: u32) -> FlowValue {
        FlowValue {
            calls,
            reported,
            first_ns: 1,
            pid_tgid: 42 << 32 | 43,
            uid_gid: 0,
            socket_cookie: 9,
            comm: [0; 16],
            idle_sweeps,
            mode: 0,
            recorded: RECORD_SENT,
            _pad: [0; 2],
            exe: agent_common::ExeId::UNKNOWN,
        }
    }

    const RULES: Rules = Rules {
        idle_sweeps: 3,
        carry_max: 100,
    };

    #[test]
    fn unreported_calls_are_summarised_and_active_flows_carried_empty() {
        let p = plan(vec![(key(1, 5), value(5000, 1, 0))], RULES, |_| true);
        assert_eq!(p.summaries, vec![(key(1, 5), value(5000, 1, 0), 4999)]);
        let (next, v) = p.carry[0];
        assert_eq!(next.epoch, 1);
        assert_eq!((v.calls, v.reported, v.idle_sweeps), (0, 0, 0));
        assert_eq!(
            v.pid_tgid,
            value(0, 0, 0).pid_tgid,
            "the first caller is kept"
        );
    }

    #[test]
    fn flows_the_rate_limit_kept_from_the_log_are_summed_per_process() {
        let held = |port, calls| {
            let mut k = key(port, 5);
            k.verdict = agent_common::VERDICT_DENY;
            let mut v = value(calls, 0, 0);
            v.recorded = RECORD_HELD;
            (k, v)
        };
        let p = plan(
            vec![
                held(1, 1),
                held(2, 3),
                (key(3, 5), value(4, 1, 0)),
                held(4, 2),
            ],
            RULES,
            |_| true,
        );
        assert_eq!(p.summaries.len(), 1, "the recorded flow alone");
        assert_eq!(p.held_back.len(), 1, "one group: one process, one decision");
        let (_, _, calls, flows) = p.held_back[0];
        assert_eq!((calls, flows), (6, 3));
        assert_eq!(p.carry.len(), 4, "held-back flows go on too");
        assert!(p
            .carry
            .iter()
            .filter(|(k, _)| k.port != 3)
            .all(|(_, v)| v.recorded == RECORD_HELD_COUNTED));
    }

    #[test]
    fn a_held_back_flow_with_calls_in_later_epochs_is_counted_once() {
        let mut first = value(2, 0, 0);
        first.recorded = RECORD_HELD;
        let mut k = key(1, 5);
        k.verdict = agent_common::VERDICT_DENY;
        let p = plan(vec![(k, first)], RULES, |_| true);
        assert_eq!(p.held_back.len(), 1);
        assert_eq!((p.held_back[0].2, p.held_back[0].3), (2, 1));
        // The next epoch: the carried entry gets three more calls.
        let (next, mut carried) = p.carry[0];
        carried.calls = 3;
        let p = plan(vec![(next, carried)], RULES, |_| true);
        assert!(p.summaries.is_empty(), "still no destination in the log");
        assert_eq!(
            (p.held_back[0].2, p.held_back[0].3),
            (3, 0),
            "the calls are summed, the flow is not counted again"
        );
        assert_eq!(p.carry[0].1.recorded, RECORD_HELD_COUNTED);
    }

    #[test]
    fn a_flow_whose_calls_were_all_reported_gets_no_summary() {
        let p = plan(vec![(key(1, 5), value(1, 1, 0))], RULES, |_| true);
        assert!(p.summaries.is_empty());
        assert_eq!(p.carry.len(), 1);
    }

    #[test]
    fn a_flow_ends_after_the_idle_sweeps_and_not_before() {
        let p = plan(vec![(key(1, 5), value(0, 0, 1))], RULES, |_| true);
        assert_eq!(p.carry[0].1.idle_sweeps, 2);
        let p = plan(vec![(key(1, 5), value(0, 0, 2))], RULES, |_| true);
        assert!(p.carry.is_empty());
        assert_eq!(p.ended_idle, 1);
    }

    #[test]
    fn flows_of_a_replaced_policy_end_after_their_last_summary() {
        let p = plan(vec![(key(1, 9), value(10, 1, 0))], RULES, |id| id == 5);
        assert_eq!(p.summaries.len(), 1);
        assert!(p.carry.is_empty());
        assert_eq!(p.ended_policy, 1);
    }

    #[test]
    fn past_the_carry_bound_the_idlest_flows_are_evicted() {
        let entries = vec![
            (key(1, 5), value(0, 0, 1)),
            (key(2, 5), value(3, 0, 0)),
            (key(3, 5), value(0, 0, 0)),
        ];
        let rules = Rules {
            idle_sweeps: 10,
            carry_max: 2,
        };
        let p = plan(entries, rules, |_| true);
        assert_eq!(p.evicted, 1);
        let ports: Vec<u16> = p.carry.iter().map(|(k, _)| k.port).collect();
        assert_eq!(ports, vec![2, 3]);
        assert_eq!(p.summaries.len(), 1, "the active flow's 3 calls");
    }
}
