//! Outbound packets (cgroup_skb/egress at the cgroup2 root), for what the
//! socket-address hooks cannot see:
//!
//! - a ping socket's datagrams: sendto() on a ping socket passes no
//!   sendmsg hook, so each echo is judged here against the `icmp` rules
//!   (dropping it fails the sendto() with EPERM);
//! - source-routed packets (an IPv4 LSRR/SSRR option, an IPv6 routing
//!   header, set by a control message such as IP_RETOPTS that the
//!   setsockopt program never sees): their first hop was never judged, so a
//!   managed service's are dropped;
//! - a quarantined service: packets of connections opened before the
//!   quarantine are dropped unless they go to an exception;
//! - a DNS query to the agent's proxy: who sent it (names.rs).
//!
//! Every other packet passes after one array read, or a look at its IP
//! header in place when some service is managed.

use agent_common::{
    ServiceEntry, ACTIVE_ICMP, ACTIVE_MANAGED, DIRECTION_EGRESS, FLAG_NAMES, FLAG_QUARANTINE,
    HOOK_EGRESS_PACKET, LOST_VERDICT, MODE_AUDIT, PROTO_ICMP, PROTO_ICMPV6, RULE_DEFAULT_DENY,
    RULE_SOURCE_ROUTE, RULE_UNREADABLE, VERDICT_DENY,
};
use aya_ebpf::{helpers::generated::bpf_sk_fullsock, macros::cgroup_skb, programs::SkBuffContext};

use crate::{
    addr::{set_addr, Dest},
    events::{emit, refusal},
    helpers::{skb_cgroup_id, socket_cookie},
    linux::SOCK_DGRAM,
    maps::active_flags,
    names,
    packet::{is_ext, parse, Packet},
    rules::subprog::{match_ingress_v4, match_ingress_v6, match_v4, match_v6},
    service::socket_service,
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn bulkhead_egress_skb(ctx: SkBuffContext) -> i32 {
    let active = active_flags();
    if active & u32::from(FLAG_NAMES) != 0 {
        names::note_client(&ctx);
    }
    if active & (ACTIVE_MANAGED | u32::from(FLAG_QUARANTINE)) == 0 {
        return PASS;
    }
    // Fast path: with no quarantine, only packets with IPv4 options, IPv6
    // extension headers, or (when some service may ping) ICMP need a look.
    if active & u32::from(FLAG_QUARANTINE) == 0 && !worth_reading(&ctx, active) {
        return PASS;
    }
    let Some(service) = socket_service(&ctx) else {
        return PASS;
    };
    let quarantined = service.flags & FLAG_QUARANTINE != 0;
    let Some(pkt) = parse(&ctx) else {
        // A managed service sends nothing we cannot read (an extension
        // header chain past the bound could hide a routing header).
        return refuse(&ctx, &service, None, 0, RULE_UNREADABLE);
    };
    if pkt.source_routed {
        return refuse(&ctx, &service, Some(&pkt), pkt.proto, RULE_SOURCE_ROUTE);
    }
    if (pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6) && from_ping_socket(&ctx) {
        let rule = match pkt.local {
            Dest::V4(a) => match_v4(service.service_id, a, PROTO_ICMP, 0),
            Dest::V6(a) => match_v6(service.service_id, a, PROTO_ICMP, 0),
        };
        if rule == RULE_DEFAULT_DENY {
            return refuse(&ctx, &service, Some(&pkt), PROTO_ICMP, rule);
        }
        if !quarantined {
            return PASS;
        }
    }
    if quarantined {
        return quarantine(&service, &pkt);
    }
    PASS
}

/// Whether a packet may need judging (see the fast path above): read from
/// the IP header in place (direct packet access, no helper call); a packet
/// whose linear part is too short for that is read the slow way.
#[inline(always)]
fn worth_reading(ctx: &SkBuffContext, active: u32) -> bool {
    // SAFETY: plain context fields; the verifier turns them into packet
    // pointers and checks every access against `end` below.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if data + 10 > end {
        return true;
    }
    // SAFETY: within [data, end), checked above.
    let (first, byte6, byte9) = unsafe {
        (
            *(data as *const u8),
            *((data + 6) as *const u8),
            *((data + 9) as *const u8),
        )
    };
    let icmp = active & ACTIVE_ICMP != 0;
    match first >> 4 {
        // 0x45: no options.
        4 => first != 0x45 || (icmp && byte9 == PROTO_ICMP),
        6 => is_ext(byte6) || (icmp && byte6 == PROTO_ICMPV6),
        _ => false,
    }
}

/// Whether the packet's socket is a ping socket (SOCK_DGRAM, ICMP): the
/// kernel's own ICMP (echo replies, errors) goes out on raw sockets.
#[inline(always)]
fn from_ping_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context's socket; may be null, checked.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: the context's socket, non-null (checked above).
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null full socket from bpf_sk_fullsock; plain fields.
    let (kind, proto) = unsafe { ((*sk).type_, (*sk).protocol) };
    kind == SOCK_DGRAM && (proto == u32::from(PROTO_ICMP) || proto == u32::from(PROTO_ICMPV6))
}

/// A quarantined service's packet passes if the (exception-only) egress
/// rules allow its destination, or if it belongs to a connection an
/// exception opened to us (ingress rules, keyed by the remote address and
/// our local port).
#[inline(always)]
fn quarantine(service: &ServiceEntry, pkt: &Packet) -> i32 {
    let mut rule = match pkt.local {
        Dest::V4(a) => match_v4(service.service_id, a, pkt.proto, pkt.dport),
        Dest::V6(a) => match_v6(service.service_id, a, pkt.proto, pkt.dport),
    };
    if rule == RULE_DEFAULT_DENY {
        rule = match pkt.local {
            Dest::V4(a) => match_ingress_v4(service.service_id, a, pkt.proto, pkt.sport),
            Dest::V6(a) => match_ingress_v6(service.service_id, a, pkt.proto, pkt.sport),
        };
    }
    if rule == RULE_DEFAULT_DENY && service.mode != MODE_AUDIT {
        DROP
    } else {
        PASS
    }
}

/// An outbound packet refused (`rule` says why): counted, evented within
/// the rate limit, dropped unless the service is in audit mode. The
/// sendmsg() or connect() that sent it fails with EPERM.
#[inline(always)]
fn refuse(
    ctx: &SkBuffContext,
    service: &ServiceEntry,
    pkt: Option<&Packet>,
    proto: u8,
    rule: u32,
) -> i32 {
    let (verdict, ev) = refusal(service, DIRECTION_EGRESS, proto, HOOK_EGRESS_PACKET, rule);
    if let Some(mut ev) = ev {
        ev.cgroup_id = skb_cgroup_id(ctx);
        ev.socket_cookie = socket_cookie(ctx);
        if let Some(pkt) = pkt {
            set_addr(&mut ev.src_addr, &mut ev.family, pkt.source);
            ev.src_port = pkt.sport;
            set_addr(&mut ev.dst_addr, &mut ev.family, pkt.local);
            ev.dst_port = pkt.dport;
        }
        emit(&ev, LOST_VERDICT);
    }
    if verdict == VERDICT_DENY {
        DROP
    } else {
        PASS
    }
}
