//! Inbound enforcement (cgroup_skb/ingress at the cgroup2 root): who may
//! open a connection to, or send a datagram to, a service whose policy has
//! an `ingress` list, and on which ports a service with `[bind]` may
//! accept connections at all.
//!
//! - TCP: only a pure SYN to a listening socket is judged. A SYN that no
//!   rule allows is dropped before the kernel creates a request socket, so
//!   the accept queue never sees it. Packets of established connections,
//!   and replies to the service's own connections, are never judged.
//! - A packet to a TCP listener on a port `[bind]` does not list is
//!   dropped: the kernel binds a port with no bind() hook when listen() is
//!   called on an unbound socket (or one bound to port 0), and such a
//!   listener must not accept anything. (UDP sockets on such ports are
//!   clients' ephemeral ports and are not judged by `[bind]`.)
//! - UDP: datagrams to a connected socket come from its peer (the kernel
//!   filters them) and pass. For an unconnected socket, a datagram from a
//!   peer the socket sent to (UDP_PEERS, filled by sendmsg) passes; any other
//!   is judged.
//! - A packet for a restricted (or quarantined) service that cannot be read
//!   (an IPv6 extension-header chain past the bound, a truncated header) is
//!   dropped: it fails closed.
//!
//! Drops are counted per service; drop events are rate-limited.

use agent_common::{
    counter_slot, ServiceEntry, DIRECTION_INGRESS, FLAG_BIND, FLAG_INGRESS, FLAG_NAMES,
    FLAG_QUARANTINE, HOOK_INGRESS, LOST_INGRESS, PEER_LET_IN, PROTO_TCP, PROTO_UDP, RULE_BIND,
    RULE_DEFAULT_DENY, RULE_UNREADABLE, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock, helpers::generated::bpf_sk_fullsock, macros::cgroup_skb,
    programs::SkBuffContext,
};

use crate::{
    addr::{set_addr, Dest},
    events::{count, emit, refusal},
    helpers::{skb_cgroup_id, socket_cookie},
    linux::{TCP_FLAG_ACK, TCP_FLAG_SYN, TCP_LISTEN},
    maps::any_service_has,
    names, owners,
    packet::{parse, Packet},
    process::mask_of,
    rules::{match_ingress_v4, match_ingress_v6, match_ports, ANY_CALLER, NO_CALLER},
    service::socket_service,
    udp_peers,
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(ingress)]
pub fn bulkhead_ingress(ctx: SkBuffContext) -> i32 {
    // A query to the DNS proxy: who sent it (names.rs).
    if any_service_has(FLAG_NAMES) {
        names::stamp_query(&ctx);
    }
    // Every packet received on the host comes here: one array read when no
    // service restricts inbound traffic or binding.
    if !any_service_has(FLAG_INGRESS | FLAG_QUARANTINE | FLAG_BIND) {
        return PASS;
    }
    let skb = ctx.skb.skb;
    // SAFETY: skb is the context; sk may be null, checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let Some(service) = socket_service(&ctx) else {
        return PASS;
    };
    if service.flags & (FLAG_INGRESS | FLAG_QUARANTINE | FLAG_BIND) == 0 {
        return PASS;
    }
    // Request and time-wait sockets are not full sockets: they belong to
    // connections already accepted or closing.
    // SAFETY: sk is the context's socket, non-null (checked above).
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: a non-null full socket from bpf_sk_fullsock; plain fields.
    let (sk_proto, state, dst_port, src_port) =
        unsafe { ((*sk).protocol, (*sk).state, (*sk).dst_port, (*sk).src_port) };
    let listener = sk_proto == u32::from(PROTO_TCP) && state == TCP_LISTEN;
    // A listener on a port `[bind]` does not list (the socket's own port,
    // in host order: what it is bound to, whatever the packet says) gets
    // nothing, readable or not.
    let bind_refused = listener
        && service.flags & FLAG_BIND != 0
        && match_ports(service.bind_ruleset, PROTO_TCP, src_port as u16, NO_CALLER)
            == RULE_DEFAULT_DENY;
    let restricted = service.flags & (FLAG_INGRESS | FLAG_QUARANTINE) != 0;
    let Some(pkt) = parse(&ctx) else {
        if bind_refused {
            return refuse(&ctx, sk, &service, None, PROTO_TCP, RULE_BIND);
        }
        if !restricted {
            return PASS;
        }
        return refuse(&ctx, sk, &service, None, sk_proto as u8, RULE_UNREADABLE);
    };
    if bind_refused {
        return refuse(&ctx, sk, &service, Some(&pkt), PROTO_TCP, RULE_BIND);
    }
    if pkt.proto as u32 != sk_proto {
        return PASS; // for a raw or ping socket: not judged here
    }
    let pure_syn = pkt.proto == PROTO_TCP
        && listener
        && pkt.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if !restricted {
        return PASS;
    }
    // Quarantine cuts established connections too: every packet is judged.
    if service.flags & FLAG_QUARANTINE != 0 {
        return judge(&ctx, sk, &service, &pkt);
    }
    if service.flags & FLAG_INGRESS == 0 {
        return PASS;
    }
    if pkt.proto == PROTO_TCP {
        if !pure_syn {
            return PASS;
        }
    } else if pkt.proto == PROTO_UDP {
        if dst_port != 0 {
            return PASS; // connected: only its peer reaches it
        }
        let cookie = socket_cookie(&ctx);
        if udp_peers::is_open(
            &udp_peers::key(cookie, pkt.source, pkt.sport),
            service.service_id,
        ) {
            return PASS; // a reply to what this socket sent
        }
    } else {
        return PASS;
    }
    judge(&ctx, sk, &service, &pkt)
}

#[inline(always)]
fn judge(ctx: &SkBuffContext, sk: *mut bpf_sock, service: &ServiceEntry, pkt: &Packet) -> i32 {
    let callers = if service.qualifiers != 0 {
        owner_mask(ctx, sk, service)
    } else {
        ANY_CALLER
    };
    let rule = match pkt.source {
        Dest::V4(a) => match_ingress_v4(service.service_id, a, pkt.proto, pkt.dport, callers),
        Dest::V6(a) => match_ingress_v6(service.service_id, a, pkt.proto, pkt.dport, callers),
    };
    if rule == RULE_DEFAULT_DENY {
        return refuse(ctx, sk, service, Some(pkt), pkt.proto, rule);
    }
    count(
        service.service_id,
        counter_slot(DIRECTION_INGRESS, pkt.proto, VERDICT_ALLOW),
    );
    // A UDP peer let in may be answered (see sendmsg in sock_addr.rs).
    if pkt.proto == PROTO_UDP {
        remember_udp_peer(ctx, service, pkt);
    }
    // Accepted connections are reported by sock_ops (tcp_established with
    // the peer); only refusals are evented.
    PASS
}

/// The qualified rules the owner of the receiving socket satisfies (the
/// process that bound or connected it, recorded then); none when it has
/// no record.
#[inline(always)]
fn owner_mask(ctx: &SkBuffContext, sk: *mut bpf_sock, service: &ServiceEntry) -> u32 {
    let Some(info) = owner(sk, socket_cookie(ctx)) else {
        return NO_CALLER;
    };
    // SAFETY: an owner record of our value type; copied out at once.
    let (exe, uid) = unsafe { ((*info).exe, (*info).uid_gid as u32) };
    mask_of(service, exe, uid)
}

/// The owner record of the receiving socket `sk` (a full socket): a
/// listener's is whoever bound it, and only TCP sockets that connect have
/// one in the table (owners::find).
#[inline(always)]
fn owner(sk: *mut bpf_sock, cookie: u64) -> Option<*mut agent_common::SockInfo> {
    // SAFETY: a non-null full socket from bpf_sk_fullsock; plain fields.
    let (protocol, state) = unsafe { ((*sk).protocol, (*sk).state) };
    let storage_first = state == TCP_LISTEN || protocol != u32::from(PROTO_TCP);
    owners::find(sk, cookie, storage_first).map(|(info, _)| info)
}

#[inline(always)]
fn remember_udp_peer(ctx: &SkBuffContext, service: &ServiceEntry, pkt: &Packet) {
    let cookie = socket_cookie(ctx);
    let key = udp_peers::key(cookie, pkt.source, pkt.sport);
    udp_peers::open(&key, service.service_id, pkt.dport, PEER_LET_IN);
}

/// A packet no rule lets in (`rule` says why): counted, evented within the
/// rate limit, and dropped unless the service is in audit mode. `pkt` is
/// `None` for a packet that could not be read.
#[inline(always)]
fn refuse(
    ctx: &SkBuffContext,
    sk: *mut bpf_sock,
    service: &ServiceEntry,
    pkt: Option<&Packet>,
    proto: u8,
    rule: u32,
) -> i32 {
    let (verdict, ev) = refusal(service, DIRECTION_INGRESS, proto, HOOK_INGRESS, rule);
    if verdict == VERDICT_AUDIT && proto == PROTO_UDP {
        if let Some(pkt) = pkt {
            remember_udp_peer(ctx, service, pkt);
        }
    }
    if let Some(mut ev) = ev {
        ev.cgroup_id = skb_cgroup_id(ctx);
        ev.socket_cookie = socket_cookie(ctx);
        // The owner of the receiving socket, recorded at bind or connect.
        if let Some(info) = owner(sk, ev.socket_cookie) {
            // SAFETY: an owner record of our value type.
            unsafe {
                ev.pid_tgid = (*info).pid_tgid;
                ev.uid_gid = (*info).uid_gid;
                ev.comm = (*info).comm;
                ev.exe = (*info).exe;
            }
        }
        if let Some(pkt) = pkt {
            set_addr(&mut ev.src_addr, &mut ev.family, pkt.local);
            ev.src_port = pkt.dport;
            set_addr(&mut ev.dst_addr, &mut ev.family, pkt.source);
            ev.dst_port = pkt.sport;
        }
        emit(&ev, LOST_INGRESS);
    }
    if verdict == VERDICT_DENY {
        DROP
    } else {
        PASS
    }
}
