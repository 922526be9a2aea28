//! Inbound enforcement (cgroup_skb/ingress at the cgroup2 root): who may
//! open a connection to, or send a datagram to, a service whose policy has
//! an `ingress` list.
//!
//! - TCP: only a pure SYN to a listening socket is judged. A SYN that no
//!   rule allows is dropped before the kernel creates a request socket, so
//!   the accept queue never sees it. Packets of established connections,
//!   and replies to the service's own connections, are never judged.
//! - UDP: datagrams to a connected socket come from its peer (the kernel
//!   filters them) and pass. For an unconnected socket, a datagram from a
//!   peer the socket sent to (UDP_PEERS, filled by sendmsg) passes; any other
//!   is judged.
//!
//! Drops are counted per service; drop events are rate-limited.

use agent_common::{
    counter_slot, ServiceEntry, SockInfo, DIRECTION_INGRESS, FLAG_INGRESS, FLAG_QUARANTINE,
    HOOK_INGRESS, INGRESS_EVENTS_PER_SEC, KIND_VERDICT, LOST_INGRESS, MODE_AUDIT, PROTO_TCP,
    PROTO_UDP, RULE_DEFAULT_DENY, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_socket_cookie, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id,
        },
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};

use crate::{
    egress::{match_ingress_v4, match_ingress_v6, match_v4, match_v6},
    events::{blank, count, emit},
    maps::{any_service_has, INGRESS_RATE, SOCK_INFO, UDP_PEERS},
    programs::{set_addr, udp_peer_key, Dest},
    service::skb_service,
};

const PASS: i32 = 1;
const DROP: i32 = 0;
const TCP_LISTEN: u32 = 10;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The parts of an inbound packet a verdict needs.
struct Inbound {
    source: Dest,
    local: Dest,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
}

#[cgroup_skb(ingress)]
pub fn bulkhead_ingress(ctx: SkBuffContext) -> i32 {
    // Every packet received on the host comes here: one array read when no
    // service restricts inbound traffic.
    if !any_service_has(FLAG_INGRESS | FLAG_QUARANTINE) {
        return PASS;
    }
    let skb = ctx.skb.skb;
    // SAFETY: skb is the context; sk may be null, checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let Some(service) = skb_service(skb) else {
        return PASS;
    };
    if service.flags & FLAG_INGRESS == 0 {
        return PASS;
    }
    // Request and time-wait sockets are not full sockets: they belong to
    // connections already accepted or closing.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return PASS;
    }
    let (sk_proto, state, dst_port) = unsafe { ((*sk).protocol, (*sk).state, (*sk).dst_port) };
    let Some(pkt) = parse(&ctx) else {
        // Not IPv4/IPv6 TCP/UDP we can read: judge by the socket alone.
        return PASS;
    };
    if pkt.proto as u32 != sk_proto {
        return PASS;
    }
    // Quarantine cuts established connections too: every packet is judged.
    if service.flags & FLAG_QUARANTINE != 0 {
        return judge(&ctx, sk, &service, &pkt);
    }
    if pkt.proto == PROTO_TCP {
        let pure_syn = pkt.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
        if state != TCP_LISTEN || !pure_syn {
            return PASS;
        }
    } else if pkt.proto == PROTO_UDP {
        if dst_port != 0 {
            return PASS; // connected: only its peer reaches it
        }
        let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
        let key = udp_peer_key(cookie, pkt.source, pkt.sport);
        if unsafe { UDP_PEERS.get(&key) }.is_some() {
            return PASS; // a reply to what this socket sent
        }
    } else {
        return PASS;
    }
    judge(&ctx, sk, &service, &pkt)
}

#[inline(always)]
fn judge(ctx: &SkBuffContext, sk: *mut bpf_sock, service: &ServiceEntry, pkt: &Inbound) -> i32 {
    let rule = match pkt.source {
        Dest::V4(a) => match_ingress_v4(service.service_id, a, pkt.proto, pkt.dport),
        Dest::V6(a) => match_ingress_v6(service.service_id, a, pkt.proto, pkt.dport),
    };
    let verdict = if rule != RULE_DEFAULT_DENY {
        VERDICT_ALLOW
    } else if service.mode == MODE_AUDIT {
        VERDICT_AUDIT
    } else {
        VERDICT_DENY
    };
    count(
        service.service_id,
        counter_slot(DIRECTION_INGRESS, pkt.proto, verdict),
    );
    // A UDP peer let in may be answered (see sendmsg in programs.rs).
    if verdict != VERDICT_DENY && pkt.proto == PROTO_UDP {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
        let key = udp_peer_key(cookie, pkt.source, pkt.sport);
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = UDP_PEERS.insert(&key, &now, 0);
    }
    // Accepted connections are reported by sock_ops (tcp_established with
    // the peer); only refusals are evented here, within a rate limit.
    if verdict != VERDICT_ALLOW && may_emit(service.service_id) {
        let mut ev = blank();
        ev.kind = KIND_VERDICT;
        ev.verdict = verdict;
        ev.service_id = service.service_id;
        ev.mode = service.mode;
        ev.rule_id = rule;
        ev.protocol = pkt.proto;
        ev.hook = HOOK_INGRESS;
        ev.direction = DIRECTION_INGRESS;
        ev.ts_ns = unsafe { bpf_ktime_get_ns() };
        let skb = ctx.skb.skb;
        ev.cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
        ev.socket_cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
        // The owner of the receiving socket, recorded at bind time.
        let info =
            unsafe { bpf_sk_storage_get(SOCK_INFO.as_ptr(), sk.cast(), core::ptr::null_mut(), 0) }
                .cast::<SockInfo>();
        if !info.is_null() {
            // SAFETY: non-null storage of our value type.
            unsafe {
                ev.pid_tgid = (*info).pid_tgid;
                ev.uid_gid = (*info).uid_gid;
                ev.comm = (*info).comm;
            }
        }
        set_addr(&mut ev.src_addr, &mut ev.family, pkt.local);
        ev.src_port = pkt.dport;
        set_addr(&mut ev.dst_addr, &mut ev.family, pkt.source);
        ev.dst_port = pkt.sport;
        emit(&ev, LOST_INGRESS);
    }
    if verdict == VERDICT_DENY {
        DROP
    } else {
        PASS
    }
}

/// At most INGRESS_EVENTS_PER_SEC drop events per service per second (per
/// CPU): a flood is counted, not logged line by line.
#[inline(always)]
fn may_emit(service_id: u32) -> bool {
    let Some(state) = INGRESS_RATE.get_ptr_mut(service_id) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start_ns) >= 1_000_000_000 {
        state.window_start_ns = now;
        state.events = 0;
    }
    if state.events >= INGRESS_EVENTS_PER_SEC {
        state.suppressed = state.suppressed.wrapping_add(1);
        return false;
    }
    state.events += 1;
    true
}

/// Outbound packets of a quarantined service (cgroup_skb/egress): packets
/// of connections opened before the quarantine are dropped unless they go
/// to an exception. Services not quarantined pass untouched (one lookup).
#[cgroup_skb(egress)]
pub fn bulkhead_egress_skb(ctx: SkBuffContext) -> i32 {
    // Every packet sent on the host comes here: one array read when no
    // service is quarantined.
    if !any_service_has(FLAG_QUARANTINE) {
        return PASS;
    }
    let skb = ctx.skb.skb;
    let Some(service) = skb_service(skb) else {
        return PASS;
    };
    if service.flags & FLAG_QUARANTINE == 0 {
        return PASS;
    }
    let Some(pkt) = parse(&ctx) else {
        return DROP; // a quarantined service sends nothing we cannot read
    };
    // Outbound: the remote end is the destination. A packet passes if the
    // (exception-only) egress rules allow its destination, or if it belongs
    // to a connection an exception opened to us (ingress rules, keyed by
    // the remote address and our local port).
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

/// Reads the IP and transport headers (the skb starts at the IP header).
/// `source`/`local` name the packet's source and destination as seen by an
/// inbound packet; for an outbound one, `local` is the remote end.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Inbound> {
    let first: u8 = ctx.skb.load(0).ok()?;
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let proto: u8 = ctx.skb.load(9).ok()?;
            let saddr: [u8; 4] = ctx.skb.load(12).ok()?;
            let daddr: [u8; 4] = ctx.skb.load(16).ok()?;
            transport(ctx, ihl, proto, Dest::V4(saddr), Dest::V4(daddr))
        }
        6 => {
            let next: u8 = ctx.skb.load(6).ok()?;
            let saddr: [u8; 16] = ctx.skb.load(8).ok()?;
            let daddr: [u8; 16] = ctx.skb.load(24).ok()?;
            transport(ctx, 40, next, Dest::V6(saddr), Dest::V6(daddr))
        }
        _ => None,
    }
}

#[inline(always)]
fn transport(
    ctx: &SkBuffContext,
    off: usize,
    proto: u8,
    source: Dest,
    local: Dest,
) -> Option<Inbound> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: [u8; 4] = ctx.skb.load(off).ok()?;
    let flags: u8 = if proto == PROTO_TCP {
        ctx.skb.load(off + 13).ok()?
    } else {
        0
    };
    Some(Inbound {
        source,
        local,
        proto,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        flags,
    })
}
