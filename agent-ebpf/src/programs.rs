//! Entry points. Each is a thin wrapper that turns the context into a
//! destination and asks `judge` for a verdict.

use agent_common::{MODE_AUDIT, PROTO_UDP, RULE_DEFAULT_DENY};
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;

use crate::{
    egress::{match_v4, match_v6},
    maps::bpf_log_enabled,
    service::current_service,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Where the destination of a call is, in the form the maps use.
enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    let (addr, port, proto) = v4_dest(&ctx);
    judge(&ctx, Dest::V4(addr), port, proto)
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    let (dest, port, proto) = v6_dest(&ctx);
    judge(&ctx, dest, port, proto)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bulkhead_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port, _) = v4_dest(&ctx);
    judge(&ctx, Dest::V4(addr), port, PROTO_UDP)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bulkhead_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (dest, port, _) = v6_dest(&ctx);
    judge(&ctx, dest, port, PROTO_UDP)
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
    let w = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    let b2 = w[2].to_ne_bytes();
    if w[0] == 0 && w[1] == 0 && b2 == [0, 0, 0xff, 0xff] {
        return (Dest::V4(w[3].to_ne_bytes()), port, proto);
    }
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&b2);
    addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    (Dest::V6(addr), port, proto)
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, dest: Dest, port: u16, proto: u8) -> i32 {
    let Some(service) = current_service() else {
        return ALLOW; // not a managed service: untouched
    };
    let rule = match dest {
        Dest::V4(addr) => match_v4(service.service_id, addr, proto, port),
        Dest::V6(addr) => match_v6(service.service_id, addr, proto, port),
    };
    if rule != RULE_DEFAULT_DENY {
        return ALLOW;
    }
    if bpf_log_enabled() {
        debug!(
            ctx,
            "service {} denied port {} proto {} (mode {})",
            service.service_id,
            port,
            proto,
            service.mode
        );
    }
    if service.mode == MODE_AUDIT {
        ALLOW
    } else {
        DENY
    }
}
