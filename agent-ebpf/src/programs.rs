//! cgroup/sock_addr entry points. Each is a thin wrapper that turns the
//! context into a destination and asks `judge` for a verdict.

use agent_common::{
    counter_slot, DIRECTION_EGRESS, HOOK_CONNECT, HOOK_SENDMSG, KIND_VERDICT, LOST_VERDICT,
    MODE_AUDIT, PROTO_TCP, PROTO_UDP, RULE_DEFAULT_DENY, SERVICE_NONE, VERDICT_ALLOW,
    VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, generated::bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;

use crate::{
    egress::{match_v4, match_v6},
    events::{blank, count, emit, fill_task, remember_owner},
    maps::{bpf_log_enabled, observe_unmanaged},
    service::current_service,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Where the destination of a call is, in the form the maps use.
#[derive(Clone, Copy)]
pub enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    let (addr, port, proto) = v4_dest(&ctx);
    judge(&ctx, Dest::V4(addr), port, proto, HOOK_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    let (dest, port, proto) = v6_dest(&ctx);
    judge(&ctx, dest, port, proto, HOOK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bulkhead_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port, _) = v4_dest(&ctx);
    judge(&ctx, Dest::V4(addr), port, PROTO_UDP, HOOK_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bulkhead_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (dest, port, _) = v6_dest(&ctx);
    judge(&ctx, dest, port, PROTO_UDP, HOOK_SENDMSG)
}

/// bind() is where a listener gets its owner recorded, so that connections
/// it accepts (which inherit the record) know their service.
#[cgroup_sock_addr(bind4)]
pub fn bulkhead_bind4(ctx: SockAddrContext) -> i32 {
    remember_bound(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn bulkhead_bind6(ctx: SockAddrContext) -> i32 {
    remember_bound(&ctx);
    ALLOW
}

#[inline(always)]
fn remember_bound(ctx: &SockAddrContext) {
    // SAFETY: valid context for this hook.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol as u8 != PROTO_TCP {
        return;
    }
    let mut ev = blank();
    match current_service() {
        Some(s) => {
            ev.service_id = s.service_id;
            ev.mode = s.mode;
        }
        None if observe_unmanaged() => ev.service_id = SERVICE_NONE,
        None => return,
    }
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    fill_task(&mut ev);
    remember_owner(ctx, unsafe { sa.__bindgen_anon_1.sk }, &ev);
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
    let proto = sa.protocol as u8;
    let b2 = w[2].to_ne_bytes();
    if w[0] == 0 && w[1] == 0 && b2 == [0, 0, 0xff, 0xff] {
        return (Dest::V4(w[3].to_ne_bytes()), port, proto);
    }
    (Dest::V6(v6_bytes(w)), port, proto)
}

#[inline(always)]
pub fn v6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    addr
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, dest: Dest, port: u16, proto: u8, hook: u8) -> i32 {
    let service = current_service();
    let mut ev = blank();
    let (verdict, allowed) = match service {
        Some(s) => {
            let rule = match dest {
                Dest::V4(addr) => match_v4(s.service_id, addr, proto, port),
                Dest::V6(addr) => match_v6(s.service_id, addr, proto, port),
            };
            ev.service_id = s.service_id;
            ev.mode = s.mode;
            ev.rule_id = rule;
            if rule != RULE_DEFAULT_DENY {
                (VERDICT_ALLOW, true)
            } else if s.mode == MODE_AUDIT {
                (VERDICT_AUDIT, true)
            } else {
                (VERDICT_DENY, false)
            }
        }
        // Not a managed service: untouched, and only seen when asked for.
        None if observe_unmanaged() => {
            ev.service_id = SERVICE_NONE;
            ev.rule_id = RULE_DEFAULT_DENY;
            (VERDICT_ALLOW, true)
        }
        None => return ALLOW,
    };
    if ev.service_id != SERVICE_NONE {
        count(
            ev.service_id,
            counter_slot(DIRECTION_EGRESS, proto, verdict),
        );
    }

    ev.kind = KIND_VERDICT;
    ev.verdict = verdict;
    ev.protocol = proto;
    ev.hook = hook;
    ev.direction = DIRECTION_EGRESS;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    fill_task(&mut ev);
    match dest {
        Dest::V4(addr) => {
            ev.family = 4;
            ev.dst_addr[..4].copy_from_slice(&addr);
        }
        Dest::V6(addr) => {
            ev.family = 6;
            ev.dst_addr = addr;
        }
    }
    ev.dst_port = port;
    emit(&ev, LOST_VERDICT);

    if allowed && hook == HOOK_CONNECT && proto == PROTO_TCP {
        // SAFETY: valid context for this hook.
        remember_owner(ctx, unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }, &ev);
    }
    if !allowed && bpf_log_enabled() {
        debug!(
            ctx,
            "service {} denied port {} proto {}", ev.service_id, port, proto
        );
    }
    if allowed {
        ALLOW
    } else {
        DENY
    }
}
