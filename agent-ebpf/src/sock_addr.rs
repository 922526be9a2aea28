//! The cgroup/sock_addr entry points (connect4/6, sendmsg4/6, bind4/6).
//! Each is a thin wrapper that turns the context into a destination and
//! asks `judge` (or `bind`) for a verdict.

use agent_common::{
    counter_slot, Event, FlowKey, DIRECTION_EGRESS, DIRECTION_INGRESS, FLAG_BIND, FLAG_INGRESS,
    FLAG_NAMES, HOOK_BIND, HOOK_CONNECT, HOOK_SENDMSG, KIND_VERDICT, LOST_VERDICT, MODE_AUDIT,
    PEER_SENT, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RULE_DEFAULT_DENY, RULE_UDP_REPLY,
    SERVICE_NONE, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated::bpf_get_current_comm},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;

use crate::{
    addr::{addr_field, set_addr, v6_bytes, Dest},
    events::{blank, count, emit, event_budget, fill_task, lost, remember_owner, submit},
    flows::{self, Caller, Report},
    helpers::{current_cgroup_id, now_ns, socket_cookie},
    maps::{bpf_log_enabled, observe_unmanaged, EVENTS},
    names, owners,
    process::{caller_mask, exe_of},
    rules::{match_ports, match_v4, match_v6, ANY_CALLER, NO_CALLER},
    service::{current_service, current_service_in},
    udp_peers,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    let (addr, port, proto) = v4_dest(&ctx);
    let (proto, port) = icmp_as_one(proto, port);
    judge(&ctx, Dest::V4(addr), port, proto, HOOK_CONNECT, false)
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    let (dest, port, proto) = v6_dest(&ctx);
    let (proto, port) = icmp_as_one(proto, port);
    judge(&ctx, dest, port, proto, HOOK_CONNECT, true)
}

/// A ping socket's connect(): ICMPv6 is judged as ICMP (one `icmp` rule
/// covers both), and the port (the echo identifier for ping sockets) as 0,
/// so that a rule's port list never matches an ICMP echo by accident.
#[inline(always)]
pub fn icmp_as_one(proto: u8, port: u16) -> (u8, u16) {
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        (PROTO_ICMP, 0)
    } else {
        (proto, port)
    }
}

/// sendmsg() of a UDP socket, unconnected, or connected but with control
/// messages (IP_TOS, IP_PKTINFO, IPV6_TCLASS...): the kernel then runs this
/// hook with no address at all (0.0.0.0:0, port 0 is otherwise refused
/// before the hook), and the datagram goes to the socket's connected peer,
/// which is what is judged.
#[cgroup_sock_addr(sendmsg4)]
pub fn bulkhead_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port, _) = v4_dest(&ctx);
    // One judge for both cases: inlined twice, it doubled the program
    // and its stack.
    let (addr, port) = if port == 0 && addr == [0; 4] {
        connected_peer_v4(&ctx)
    } else {
        (addr, port)
    };
    judge(&ctx, Dest::V4(addr), port, PROTO_UDP, HOOK_SENDMSG, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bulkhead_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let no_address = unsafe {
        let sa = &*ctx.sock_addr;
        sa.user_port == 0
            && (sa.user_ip6[0] | sa.user_ip6[1] | sa.user_ip6[2] | sa.user_ip6[3]) == 0
    };
    let (dest, port) = if no_address {
        connected_peer_v6(&ctx)
    } else {
        let (dest, port, _) = v6_dest(&ctx);
        (dest, port)
    };
    judge(&ctx, dest, port, PROTO_UDP, HOOK_SENDMSG, true)
}

/// The connected peer of the hook's socket (0.0.0.0:0 if none: denied).
#[inline(always)]
fn connected_peer_v4(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    // SAFETY: the hook's socket, a full socket; plain field reads.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return ([0; 4], 0);
    }
    // SAFETY: a non-null socket of the context; fields the hook may read.
    let (ip, port) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).dst_ip4),
            core::ptr::read_volatile(&(*sk).dst_port),
        )
    };
    (ip.to_ne_bytes(), u16::from_be(port))
}

#[inline(always)]
fn connected_peer_v6(ctx: &SockAddrContext) -> (Dest, u16) {
    // SAFETY: as above.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return (Dest::V6([0; 16]), 0);
    }
    // SAFETY: as above.
    let (w, port) = unsafe {
        (
            [
                core::ptr::read_volatile(&(*sk).dst_ip6[0]),
                core::ptr::read_volatile(&(*sk).dst_ip6[1]),
                core::ptr::read_volatile(&(*sk).dst_ip6[2]),
                core::ptr::read_volatile(&(*sk).dst_ip6[3]),
            ],
            core::ptr::read_volatile(&(*sk).dst_port),
        )
    };
    (v6_or_mapped(w), u16::from_be(port))
}

/// bind(): the ports a service may listen on (`[bind]`), and where a
/// listener gets its owner recorded, so that connections it accepts (which
/// inherit the record) know their service.
#[cgroup_sock_addr(bind4)]
pub fn bulkhead_bind4(ctx: SockAddrContext) -> i32 {
    let (addr, port, proto) = v4_dest(&ctx);
    bind(&ctx, Dest::V4(addr), port, proto)
}

#[cgroup_sock_addr(bind6)]
pub fn bulkhead_bind6(ctx: SockAddrContext) -> i32 {
    let (dest, port, proto) = v6_dest(&ctx);
    bind(&ctx, dest, port, proto)
}

#[inline(always)]
fn bind(ctx: &SockAddrContext, local: Dest, port: u16, proto: u8) -> i32 {
    let mut ev = blank();
    let service = current_service();
    match service {
        Some(s) => {
            ev.service_id = s.service_id;
            ev.mode = s.mode;
        }
        None if observe_unmanaged() => ev.service_id = SERVICE_NONE,
        None => return ALLOW,
    }
    ev.cgroup_id = current_cgroup_id();
    fill_task(&mut ev);
    // Port 0 asks the kernel for an ephemeral port: always allowed, so that
    // outgoing connections keep working.
    if let Some(s) = service {
        if s.flags & FLAG_BIND != 0 && port != 0 {
            let rule = match_ports(s.bind_ruleset, proto, port, NO_CALLER);
            if rule == RULE_DEFAULT_DENY {
                let verdict = if s.mode == MODE_AUDIT {
                    VERDICT_AUDIT
                } else {
                    VERDICT_DENY
                };
                ev.kind = KIND_VERDICT;
                ev.verdict = verdict;
                ev.rule_id = rule;
                ev.protocol = proto;
                ev.hook = HOOK_BIND;
                ev.direction = DIRECTION_INGRESS;
                ev.ts_ns = now_ns();
                ev.socket_cookie = socket_cookie(ctx);
                set_addr(&mut ev.src_addr, &mut ev.family, local);
                ev.src_port = port;
                if let Some(n) = event_budget(verdict, ev.service_id, DIRECTION_INGRESS, true) {
                    ev.suppressed = n;
                    emit(&ev, LOST_VERDICT);
                }
                if verdict == VERDICT_DENY {
                    return DENY;
                }
            }
        }
    }
    // TCP: accepted connections know their service from it. Any socket of
    // a service with `exe`/`uid` rules: ingress rules ask who owns it.
    if proto == PROTO_TCP || service.is_some_and(|s| s.qualifiers != 0) {
        // SAFETY: valid context for this hook.
        remember_owner(ctx, unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }, &ev);
    }
    ALLOW
}

#[inline(always)]
fn v4_dest(ctx: &SockAddrContext) -> ([u8; 4], u16, u8) {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for these hooks.
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 and user_port are in network byte order: the bytes of the u32
    // as stored are the address octets.
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    (addr, port, sa.protocol as u8)
}

/// IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are judged as IPv4, so a
/// dual-stack socket cannot walk around an IPv4 rule.
#[inline(always)]
fn v6_dest(ctx: &SockAddrContext) -> (Dest, u16, u8) {
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    (v6_or_mapped(w), port, sa.protocol as u8)
}

#[inline(always)]
fn v6_or_mapped(w: [u32; 4]) -> Dest {
    let b2 = w[2].to_ne_bytes();
    if w[0] == 0 && w[1] == 0 && b2 == [0, 0, 0xff, 0xff] {
        return Dest::V4(w[3].to_ne_bytes());
    }
    Dest::V6(v6_bytes(w))
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, dest: Dest, port: u16, proto: u8, hook: u8, v6_hook: bool) -> i32 {
    let cgroup_id = current_cgroup_id();
    let service = current_service_in(cgroup_id);
    // Not a managed service: untouched, and only seen when asked for.
    if service.is_none() && !observe_unmanaged() {
        return ALLOW;
    }
    // Asked once, for the rules and the flow alike: where every kernel
    // return goes through a thunk (AMD's SRSO "Safe RET"), each helper
    // call costs (BENCHMARKS.md).
    let pid_tgid = bpf_get_current_pid_tgid();
    let (service_id, mode, rule, verdict) = match service {
        Some(s) => {
            // Which of the service's `exe`/`uid` rules this caller
            // satisfies: lookups only for a service that has such rules.
            let callers = if s.qualifiers != 0 {
                caller_mask(&s, (pid_tgid >> 32) as u32)
            } else {
                ANY_CALLER
            };
            // An address the service learnt from its own lookup of a name
            // its rules allow. Looked up before the address rules (either
            // allows; names only widen), so that a call a learnt name
            // allows costs one lookup that hits, as one an address rule
            // allows does, not the address rules' two misses first.
            let mut rule = if s.flags & FLAG_NAMES != 0 {
                names::learnt_rule(&s, &dest, proto, port, callers)
            } else {
                RULE_DEFAULT_DENY
            };
            if rule == RULE_DEFAULT_DENY {
                rule = match dest {
                    Dest::V4(addr) => match_v4(s.service_id, addr, proto, port, callers),
                    Dest::V6(addr) => match_v6(s.service_id, addr, proto, port, callers),
                };
            }
            // Redirected to the proxy by a program that ran first (see
            // names::is_proxy): judged there as the resolver it asked
            // for. Asked only of a call the rules deny, so that an
            // allowed one (the common case) pays nothing for it.
            if rule == RULE_DEFAULT_DENY
                && s.flags & FLAG_NAMES != 0
                && names::is_proxy(&dest, port)
            {
                return ALLOW;
            }
            // A datagram answering a UDP peer that ingress let in.
            if rule == RULE_DEFAULT_DENY && hook == HOOK_SENDMSG && s.flags & FLAG_INGRESS != 0 {
                let cookie = socket_cookie(ctx);
                if udp_peers::is_open(&udp_peers::key(cookie, dest, port), s.service_id) {
                    rule = RULE_UDP_REPLY;
                }
            }
            let verdict = if rule != RULE_DEFAULT_DENY {
                VERDICT_ALLOW
            } else if s.mode == MODE_AUDIT {
                VERDICT_AUDIT
            } else {
                VERDICT_DENY
            };
            count(s.service_id, counter_slot(DIRECTION_EGRESS, proto, verdict));
            (s.service_id, s.mode, rule, verdict)
        }
        None => (SERVICE_NONE, 0, RULE_DEFAULT_DENY, VERDICT_ALLOW),
    };
    let allowed = verdict != VERDICT_DENY;

    // Counted in its flow; only a flow's first call (or one the full flow
    // table could not count) becomes a record.
    let (addr, family) = addr_field(dest);
    let mut key = FlowKey {
        cgroup_id,
        addr,
        service_id,
        rule_id: rule,
        tgid: (pid_tgid >> 32) as u32,
        port,
        local_port: bound_port(ctx),
        family,
        protocol: proto,
        hook,
        direction: DIRECTION_EGRESS,
        verdict,
        epoch: 0,
        _pad: [0; 2],
    };
    let report = if flows::count_existing(&mut key) {
        0
    } else {
        count_new_flow(ctx, &mut key, pid_tgid, mode)
    };
    // TCP: the connection's owner is recorded on the socket (sock_ops
    // reports it established and closed), which needs the task's identity.
    let tcp_connect = allowed && hook == HOOK_CONNECT && proto == PROTO_TCP;
    let record = report & 1 != 0;
    // Asked for only where used: the common case (a repeated UDP flow)
    // needs no cookie.
    let pinhole = hook == HOOK_SENDMSG && service.is_some_and(|s| s.flags & FLAG_INGRESS != 0);
    let cookie = if record || tcp_connect || pinhole {
        socket_cookie(ctx)
    } else {
        0
    };
    // The record is built only when sent or needed for the socket's owner:
    // a repeated flow (the common case) fills no 144-byte record.
    if record {
        send_record(&key, pid_tgid, cookie, mode, (report >> 32) as u32);
    }
    if tcp_connect {
        own_socket(ctx, &key, pid_tgid, mode, cookie);
    }

    // A lookup of a service with name rules goes to the agent's proxy
    // (judged above as the resolver it asked for).
    let proxy_port = match service {
        Some(s)
            if allowed && names::is_lookup(&s, port, proto) && !names::is_proxy(&dest, port) =>
        {
            names::redirect_lookup(ctx, &s, &dest, v6_hook)
        }
        _ => 0,
    };

    // An unconnected UDP socket of an ingress-restricted service: let the
    // replies from this peer in (see ingress.rs); from the proxy when the
    // datagram went there.
    if allowed && pinhole {
        if proxy_port != 0 {
            open_pinhole(cookie, &names::proxy_dest(dest), proxy_port, service_id);
        } else {
            open_pinhole(cookie, &dest, port, service_id);
        }
    }

    if !allowed && bpf_log_enabled() {
        debug!(
            ctx,
            "service {} denied port {} proto {}", service_id, port, proto
        );
    }
    if allowed {
        ALLOW
    } else {
        DENY
    }
}

/// Opens the UDP pinhole for replies from `peer`:`port` (see
/// `udp_peers`): a BPF subprogram, as are the two below, so that its key
/// and value are not in the judge's frame (the 6.1 verifier rounds each
/// frame up to 32 bytes and refused 544 for the judge and the record).
#[inline(never)]
fn open_pinhole(cookie: u64, peer: &Dest, port: u16, service_id: u32) {
    udp_peers::open(
        &udp_peers::key(cookie, *peer, port),
        service_id,
        0,
        PEER_SENT,
    );
}

/// [`flows::count_new`] as a BPF subprogram (see [`send_record`]), for a
/// call whose flow has no entry of this epoch: 0 when the call was
/// counted, else 1 with the suppressed count in bits 32-63 (a record is to
/// be sent).
#[inline(never)]
fn count_new_flow(ctx: &SockAddrContext, key: &mut FlowKey, pid_tgid: u64, mode: u8) -> u64 {
    let caller = Caller {
        pid_tgid,
        socket_cookie: || socket_cookie(ctx),
        mode,
    };
    match flows::count_new(key, &caller) {
        Report::Counted => 0,
        Report::Record { suppressed } => 1 | (u64::from(suppressed) << 32),
    }
}

/// Sends the record of a flow's first call (`suppressed`: the denials
/// the rate limit held back before it). A BPF subprogram, as are
/// `count_new_flow` and `own_socket`, so that their records and keys are not in
/// the judge's frame: the 6.1 verifier rounds each frame up to 32 bytes
/// (and each call, a memset's included, costs 32 more), and the judge
/// with its record passed its 512-byte stack.
#[inline(never)]
fn send_record(key: &FlowKey, pid_tgid: u64, cookie: u64, mode: u8, suppressed: u32) {
    // Written field by field into the ring's memory: a record built on the
    // stack first took 224 bytes of this frame (and a call to memmove).
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        lost(LOST_VERDICT);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, ours until submitted; every
    // field is written (plain integers and arrays, nothing to drop).
    unsafe {
        (*ev).kind = KIND_VERDICT;
        (*ev).verdict = key.verdict;
        (*ev).family = key.family;
        (*ev).protocol = key.protocol;
        (*ev).hook = key.hook;
        (*ev).direction = key.direction;
        (*ev).mode = mode;
        (*ev).passive = 0;
        (*ev).service_id = key.service_id;
        (*ev).rule_id = key.rule_id;
        (*ev).ts_ns = now_ns();
        (*ev).cgroup_id = key.cgroup_id;
        (*ev).pid_tgid = pid_tgid;
        (*ev).uid_gid = bpf_get_current_uid_gid();
        (*ev).socket_cookie = cookie;
        // The helper writes the name (NUL-padded) in place; zeros if it
        // fails. No reference to the uninitialised field is made.
        if bpf_get_current_comm((&raw mut (*ev).comm).cast(), 16) != 0 {
            (*ev).comm = [0; 16];
        }
        (*ev).src_addr = [0; 16];
        (*ev).dst_addr = key.addr;
        (*ev).src_port = key.local_port;
        (*ev).dst_port = key.port;
        (*ev).suppressed = suppressed;
        (*ev).bytes_sent = 0;
        (*ev).bytes_received = 0;
        (*ev).duration_ns = 0;
        (*ev).exe = exe_of((pid_tgid >> 32) as u32);
    }
    submit(entry);
}

/// Records the calling task as the owner of an allowed TCP connect's
/// socket (sock_ops reports it established and closed).
#[inline(never)]
fn own_socket(ctx: &SockAddrContext, key: &FlowKey, pid_tgid: u64, mode: u8, cookie: u64) {
    // SAFETY: valid context for this hook.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    owners::own_connecting(sk, cookie, key.cgroup_id, key.service_id, mode, pid_tgid);
}

/// The local port of the hook's socket when it is bound (host order), else
/// 0: part of a flow's key, so that two sockets of one process sending to
/// the same peer are two flows.
#[inline(always)]
fn bound_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the hook's socket, a full socket; a plain field read.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: a non-null socket of the context.
    unsafe { core::ptr::read_volatile(&(*sk).src_port) as u16 }
}
