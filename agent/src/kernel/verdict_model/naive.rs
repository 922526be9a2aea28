//! The semantics docs/policy.md states, read off the policy model rule by
//! rule, with no prefix trie, no ruleset and no relocation: what the
//! compiled maps must agree with.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::{Direction, Proto, Query, Verdict};
use crate::policy::{Executable, Mode, PortRange, Protocol, Service};

/// "A connection is allowed when **one** rule allows it: its destination is
/// in one of the rule's `to` networks, its port in the rule's `ports`, and
/// its protocol matches. [...] When several rules allow a destination, the
/// first in the file is named." The same for `[[ingress]]` with `from` and
/// the local port; a policy with no `ingress` list does not restrict
/// inbound traffic. In audit mode what no rule allows goes through.
pub fn judge(services: &[Service], q: &Query) -> Verdict {
    let s = &services[q.service];
    let allowing = match q.direction {
        Direction::Egress => s
            .egress
            .iter()
            .find(|r| allows(&r.to, &r.ports, r.protocol, q) && caller(&r.exe, &r.uid, q))
            .map(|r| r.index),
        Direction::Ingress => match &s.ingress {
            None => return Verdict::NotJudged,
            Some(rules) => rules
                .iter()
                .find(|r| allows(&r.from, &r.ports, r.protocol, q) && caller(&r.exe, &r.uid, q))
                .map(|r| r.index),
        },
    };
    match (allowing, s.mode) {
        (Some(index), _) => Verdict::Allow(index),
        (None, Mode::Audit) => Verdict::Audit,
        (None, Mode::Enforce) => Verdict::Deny,
    }
}

/// "With `exe`, the rule allows only calls made by a process running one
/// of the listed executables; with `uid`, only by a process whose (real)
/// user id is listed; with both, both must hold."
fn caller(exe: &[Executable], uid: &[u32], q: &Query) -> bool {
    let by_exe = exe.is_empty()
        || q.exe.is_some_and(|i| {
            let file = super::strategy::executable(i).file;
            exe.iter().any(|e| e.file == file)
        });
    let by_uid = uid.is_empty() || uid.contains(&q.uid);
    by_exe && by_uid
}

fn allows(nets: &[IpNetwork], ports: &[PortRange], protocol: Protocol, q: &Query) -> bool {
    let addr = judged_as(q.addr, q.direction);
    let in_nets = nets.iter().any(|n| contains(&stored_as(*n), addr));
    // `ports` omitted means every port (the model holds 0-65535 then).
    let ports_named = ports != [PortRange::ALL];
    let proto_and_port = match (q.proto, protocol) {
        (Proto::Tcp, Protocol::Tcp | Protocol::Any)
        | (Proto::Udp, Protocol::Udp | Protocol::Any) => {
            ports.iter().any(|p| p.lo <= q.port && q.port <= p.hi)
        }
        // "ICMP echo [...] reaches only the destinations of its `icmp`
        // rules and of its `any` rules that name no `ports`": an echo has
        // no port, so a rule limited to ports never allows one.
        (Proto::Icmp, Protocol::Icmp) => true,
        (Proto::Icmp, Protocol::Any) => !ports_named,
        _ => false,
    };
    in_nets && proto_and_port
}

/// "IPv4-mapped IPv6 destinations (`::ffff:192.0.2.7`) are judged as the
/// IPv4 address." (Inbound sources are never IPv4-mapped: see
/// `strategy::source`.)
fn judged_as(addr: IpAddr, direction: Direction) -> IpAddr {
    match (addr, direction) {
        (IpAddr::V6(a), Direction::Egress) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        _ => addr,
    }
}

/// "A rule may name them as well; they are stored as the IPv4 network they
/// mean": `::ffff:a.b.c.d/n` with n >= 96 is a.b.c.d/(n - 96).
fn stored_as(net: IpNetwork) -> IpNetwork {
    if let IpNetwork::V6(n) = net {
        if let Some(v4) = n.ip().to_ipv4_mapped() {
            if n.prefix() >= 96 {
                if let Ok(v4) = IpNetwork::new(IpAddr::V4(v4), n.prefix() - 96) {
                    return v4;
                }
            }
        }
    }
    net
}

/// Containment by arithmetic on the whole address, not by `ipnetwork`.
fn contains(net: &IpNetwork, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpNetwork::V4(n), IpAddr::V4(a)) => {
            let shift = 32 - u32::from(n.prefix());
            u32::from(a).checked_shr(shift).unwrap_or(0)
                == u32::from(n.network()).checked_shr(shift).unwrap_or(0)
        }
        (IpNetwork::V6(n), IpAddr::V6(a)) => {
            let shift = 128 - u32::from(n.prefix());
            u128::from(a).checked_shr(shift).unwrap_or(0)
                == u128::from(n.network()).checked_shr(shift).unwrap_or(0)
        }
        _ => false,
    }
}
