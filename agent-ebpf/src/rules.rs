//! Which rule allows a flow: the lookup of (service, address) among the
//! EGRESS (destinations) or INGRESS (sources) entries gives a ruleset, whose
//! port/protocol checks give the rule. A whole address is looked up in its
//! hash first (one lookup, however many rules), then networks in the LPM
//! trie (a walk as deep as the trie); see agent_common::maps. The keys are
//! built by `agent_common::LpmV4Key::new`/`LpmV6Key::new` only, as the
//! daemon builds its entries.

use agent_common::{LpmV4Key, LpmV6Key, RuleSet, MAX_PORT_RANGES, PROTO_ANY, RULE_DEFAULT_DENY};
use aya_ebpf::maps::{lpm_trie::Key, HashMap, LpmTrie};

use crate::maps::{
    EGRESS_HOSTS_V4, EGRESS_HOSTS_V6, EGRESS_V4, EGRESS_V6, INGRESS_HOSTS_V4, INGRESS_HOSTS_V6,
    INGRESS_V4, INGRESS_V6, RULESETS,
};

/// The rule that allows (`service`, `addr`, `proto`, `port`) to a caller
/// that satisfies the qualified rules in `callers` (see
/// `process::caller_mask`; [`ANY_CALLER`] for a service without them), or
/// `RULE_DEFAULT_DENY`. For the socket-address programs' judge, run on
/// every call: the ports are scanned inline (see [`match_ports_inline`]).
#[inline(always)]
pub fn match_v4(service_id: u32, addr: [u8; 4], proto: u8, port: u16, callers: u32) -> u32 {
    egress_v4(service_id, addr, proto, port, callers, match_ports_inline)
}

#[inline(always)]
pub fn match_v6(service_id: u32, addr: [u8; 16], proto: u8, port: u16, callers: u32) -> u32 {
    egress_v6(service_id, addr, proto, port, callers, match_ports_inline)
}

/// The egress lookups with the port scan `ports` (inline for the judge,
/// the global function for the packet programs' subprograms).
#[inline(always)]
fn egress_v4(
    service_id: u32,
    addr: [u8; 4],
    proto: u8,
    port: u16,
    callers: u32,
    ports: impl Fn(u32, u8, u16, u32) -> u32,
) -> u32 {
    lookup_v4(
        &EGRESS_HOSTS_V4,
        &EGRESS_V4,
        service_id,
        addr,
        proto,
        port,
        callers,
        ports,
    )
}

#[inline(always)]
fn egress_v6(
    service_id: u32,
    addr: [u8; 16],
    proto: u8,
    port: u16,
    callers: u32,
    ports: impl Fn(u32, u8, u16, u32) -> u32,
) -> u32 {
    lookup_v6(
        &EGRESS_HOSTS_V6,
        &EGRESS_V6,
        service_id,
        addr,
        proto,
        port,
        callers,
        ports,
    )
}

/// `callers` where no process is asked: only rules that name no `exe` or
/// `uid` match (packets judged outside a process's call and with no owner
/// recorded on their socket, binds).
pub const NO_CALLER: u32 = 0;
/// `callers` of a service with no qualified rule.
pub const ANY_CALLER: u32 = u32::MAX;

/// The ingress rule that allows a peer at `addr` to reach local `port` of
/// a socket whose owner satisfies `callers`.
#[inline(always)]
pub fn match_ingress_v4(service_id: u32, addr: [u8; 4], proto: u8, port: u16, callers: u32) -> u32 {
    lookup_v4(
        &INGRESS_HOSTS_V4,
        &INGRESS_V4,
        service_id,
        addr,
        proto,
        port,
        callers,
        match_ports,
    )
}

#[inline(always)]
pub fn match_ingress_v6(
    service_id: u32,
    addr: [u8; 16],
    proto: u8,
    port: u16,
    callers: u32,
) -> u32 {
    lookup_v6(
        &INGRESS_HOSTS_V6,
        &INGRESS_V6,
        service_id,
        addr,
        proto,
        port,
        callers,
        match_ports,
    )
}

/// The same lookups as BPF subprograms, for the egress packet program:
/// inlined there beside a parsed packet, the two-map lookup raised the
/// register pressure until LLVM stored a register it had never written,
/// which the verifier refuses ("R4 !read_ok" in `bulkhead_egress_skb`).
/// The socket-address programs keep them inlined: a subprogram is verified
/// again at each call site, which made every agent start a third slower
/// here (and far slower in an emulated guest).
pub mod subprog {
    use super::{egress_v4, egress_v6, match_ports, NO_CALLER};

    #[inline(never)]
    pub fn match_v4(service_id: u32, addr: [u8; 4], proto: u8, port: u16) -> u32 {
        egress_v4(service_id, addr, proto, port, NO_CALLER, match_ports)
    }

    #[inline(never)]
    pub fn match_v6(service_id: u32, addr: [u8; 16], proto: u8, port: u16) -> u32 {
        egress_v6(service_id, addr, proto, port, NO_CALLER, match_ports)
    }

    #[inline(never)]
    pub fn match_ingress_v4(service_id: u32, addr: [u8; 4], proto: u8, port: u16) -> u32 {
        super::match_ingress_v4(service_id, addr, proto, port, super::NO_CALLER)
    }

    #[inline(never)]
    pub fn match_ingress_v6(service_id: u32, addr: [u8; 16], proto: u8, port: u16) -> u32 {
        super::match_ingress_v6(service_id, addr, proto, port, super::NO_CALLER)
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the maps, the question and how to scan the ports, all inlined"
)]
fn lookup_v4(
    hosts: &HashMap<LpmV4Key, u32>,
    trie: &LpmTrie<LpmV4Key, u32>,
    service_id: u32,
    addr: [u8; 4],
    proto: u8,
    port: u16,
    callers: u32,
    ports: impl Fn(u32, u8, u16, u32) -> u32,
) -> u32 {
    let key = LpmV4Key::new(service_id, addr);
    // SAFETY: copied out at once, under the program's RCU read lock.
    if let Some(ruleset) = unsafe { hosts.get(key) } {
        return ports(*ruleset, proto, port, callers);
    }
    match trie.get(Key::new(LpmV4Key::FULL_PREFIX, key)) {
        Some(ruleset) => ports(*ruleset, proto, port, callers),
        None => RULE_DEFAULT_DENY,
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the maps, the question and how to scan the ports, all inlined"
)]
fn lookup_v6(
    hosts: &HashMap<LpmV6Key, u32>,
    trie: &LpmTrie<LpmV6Key, u32>,
    service_id: u32,
    addr: [u8; 16],
    proto: u8,
    port: u16,
    callers: u32,
    ports: impl Fn(u32, u8, u16, u32) -> u32,
) -> u32 {
    let key = LpmV6Key::new(service_id, addr);
    // SAFETY: as above.
    if let Some(ruleset) = unsafe { hosts.get(key) } {
        return ports(*ruleset, proto, port, callers);
    }
    match trie.get(Key::new(LpmV6Key::FULL_PREFIX, key)) {
        Some(ruleset) => ports(*ruleset, proto, port, callers),
        None => RULE_DEFAULT_DENY,
    }
}

/// Linear scan of at most `MAX_PORT_RANGES` entries. A ruleset index with no
/// ruleset behind it (it cannot happen unless the maps are tampered with)
/// denies: fail closed.
#[inline(always)]
pub fn match_ports(index: u32, proto: u8, port: u16, callers: u32) -> u32 {
    match_ports_global(index, u32::from(proto), u32::from(port), callers)
}

/// [`match_ports`] inlined, for the judge of connect() and sendmsg(), run
/// on every call: there the global function's call and return took about
/// 20 ns of sendmsg4's 280 in the kernel's run-time statistics (higher in
/// 12 of 12 A/B rounds of 200,000 sendto() each, 2026-12-07, on a CPU whose
/// returns go through a thunk). The global saves verification, paid once
/// per start: verified instructions per start on this host's 6.18, about
/// 307,000 with the global everywhere, 359,000 with the judge's inlined (and no memset),
/// 521,000 with all inlined.
#[inline(always)]
pub fn match_ports_inline(index: u32, proto: u8, port: u16, callers: u32) -> u32 {
    let Some(set) = RULESETS.get(index) else {
        return RULE_DEFAULT_DENY;
    };
    scan(set, proto, port, callers)
}

/// [`match_ports`] as a global BPF function (exported and never inlined, so
/// its BTF linkage is global): the verifier checks it once per program, for
/// any arguments, instead of walking its 32 steps again on every path that
/// reaches it. Inlined, that walk was 62% of the ingress program's
/// verification (the verifier's own log, on this host's 6.18).
///
/// Every argument is a full `u32`, cut to its width here: the verifier
/// passes a global function's arguments as unknown 64-bit scalars, so the
/// callee relies on no extension its caller may or may not have done.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn match_ports_global(index: u32, proto: u32, port: u32, callers: u32) -> u32 {
    // Truncation is the intent: the caller widened a u8 and a u16.
    match_ports_inline(index, proto as u8, port as u16, callers)
}

/// A range of a qualified rule matches only a caller whose mask has the
/// rule's bit: the scan goes on to the next range otherwise, so an
/// unqualified rule for the same port still allows.
#[inline(always)]
fn scan(set: &RuleSet, proto: u8, port: u16, callers: u32) -> u32 {
    let len = set.len as usize;
    let mut i = 0;
    while i < MAX_PORT_RANGES {
        if i >= len {
            break;
        }
        let r = &set.ranges[i];
        if (r.proto == PROTO_ANY || r.proto == proto)
            && port >= r.lo
            && port <= r.hi
            && (r.qualifier == 0 || callers & (1u32 << ((r.qualifier - 1) & 31)) != 0)
        {
            return r.rule_id;
        }
        i += 1;
    }
    RULE_DEFAULT_DENY
}
