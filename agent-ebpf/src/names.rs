//! Egress by DNS name, the kernel's half (docs/dns-names.md).
//!
//! - `redirect`: a managed service with name rules that connects or sends
//!   to port 53 (a resolver its rules allow) reaches the agent's proxy
//!   instead; the resolver it asked for is kept by socket cookie.
//! - `bulkhead_recvmsg4/6`, `bulkhead_getpeername4/6`: such a socket sees
//!   its resolver, not the proxy, as the source of answers and as its peer
//!   (resolvers check where an answer came from).
//! - `note_client`: the egress packet program tells the proxy who sent a
//!   packet to it, by the client's address and port, before it gets there.
//! - `learnt_rule`: the judge's fallback when address rules deny: an
//!   address the service learnt from its own lookup of an allowed name.
//!
//! When the proxy's heartbeat is stale, nothing is redirected (lookups go
//! to the resolver, nothing is learnt: new names fail closed) and learnt
//! addresses no longer expire (nothing could refresh them).

use agent_common::{
    DnsClientKey, DnsOrigin, DnsProxy, LearntKey, ServiceEntry, DNS_HEARTBEAT_GRACE_NS, FAMILY_V4,
    FAMILY_V6, FLAG_NAMES, PEER_SENT, PROTO_TCP, PROTO_UDP, RULE_DEFAULT_DENY,
};
use aya_ebpf::{
    macros::cgroup_sock_addr,
    programs::{SkBuffContext, SockAddrContext},
};

use crate::{
    addr::{set_addr, Dest},
    helpers::{now_ns, socket_cookie},
    linux::AF_INET6,
    maps::{any_service_has, DNS_CLIENTS, DNS_ORIGINS, DNS_PROXY, LEARNT},
    rules::match_ports,
    udp_peers,
};

/// The DNS port: what is redirected.
pub const DNS_PORT: u16 = 53;

/// The first IPv6 words of an IPv4-mapped address (::ffff:a.b.c.d).
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The proxy, when its heartbeat is fresh.
#[inline(always)]
fn live_proxy() -> Option<DnsProxy> {
    let proxy = *DNS_PROXY.get(0)?;
    let fresh = proxy.heartbeat_ns != 0
        && now_ns().saturating_sub(proxy.heartbeat_ns) < DNS_HEARTBEAT_GRACE_NS;
    fresh.then_some(proxy)
}

/// The rule that allows `dest` to the service `s` because `s` learnt it
/// (its expiry not past, or the proxy gone), or `RULE_DEFAULT_DENY`. The
/// learnt entry's bitmap picks the union ruleset of the name rules whose
/// names gave the address, so each rule's own ports and protocol apply.
/// A BPF subprogram, as is `maybe_redirect`: inlined, their keys and
/// values took the connect6 program past the 512-byte stack.
#[inline(never)]
pub fn learnt_rule(s: &ServiceEntry, dest: &Dest, proto: u8, port: u16) -> u32 {
    let mut key = LearntKey {
        name_key: s.name_key,
        family: 0,
        _pad: [0; 7],
        addr: [0; 16],
    };
    set_addr(&mut key.addr, &mut key.family, *dest);
    // SAFETY: copied out at once, under the program's RCU read lock.
    let Some((expires, rules)) = (unsafe { LEARNT.get(key) }).map(|v| (v.expires_ns, v.rules))
    else {
        return RULE_DEFAULT_DENY;
    };
    if expires <= now_ns() && live_proxy().is_some() {
        return RULE_DEFAULT_DENY;
    }
    match_ports(
        s.names_ruleset.wrapping_add(u32::from(rules & 0x0f)),
        proto,
        port,
    )
}

/// Sends an allowed port-53 call of `s` (which has name rules) to the
/// proxy, keeping `dest` as the socket's resolver. Returns where the call
/// now goes, or `None` when it goes where it was going (no live proxy for
/// that family, or the origin could not be kept: then the lookup reaches
/// the resolver and teaches nothing, which fails closed).
#[inline(always)]
pub fn redirect(
    ctx: &SockAddrContext,
    v6_hook: bool,
    s: &ServiceEntry,
    dest: Dest,
    port: u16,
    cookie: u64,
) -> Option<(Dest, u16)> {
    let proxy = live_proxy()?;
    let mut origin = DnsOrigin {
        name_key: s.name_key,
        service_id: s.service_id,
        port,
        family: 0,
        _pad: 0,
        addr: [0; 16],
    };
    set_addr(&mut origin.addr, &mut origin.family, dest);
    let v4 = matches!(dest, Dest::V4(_));
    if (v4 && proxy.port4 == 0) || (!v4 && proxy.port6 == 0) {
        return None;
    }
    DNS_ORIGINS.insert(cookie, origin, 0).ok()?;
    // SAFETY: the hook's context; user_ip4/user_ip6/user_port are
    // writable in the connect and sendmsg hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v4 {
        sa.user_port = u32::from(proxy.port4.to_be());
        if v6_hook {
            sa.user_ip6 = [0, 0, MAPPED_PREFIX, u32::from_ne_bytes(proxy.addr4)];
        } else {
            sa.user_ip4 = u32::from_ne_bytes(proxy.addr4);
        }
        return Some((Dest::V4(proxy.addr4), proxy.port4));
    }
    sa.user_port = u32::from(proxy.port6.to_be());
    sa.user_ip6 = words(proxy.addr6);
    Some((Dest::V6(proxy.addr6), proxy.port6))
}

#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// recvfrom() on a UDP socket: an answer from the proxy to a redirected
/// socket shows its resolver as the source.
#[cgroup_sock_addr(recvmsg4)]
pub fn bulkhead_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn bulkhead_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

/// getpeername() of a redirected socket (glibc connects its UDP socket;
/// a TCP client may ask): the resolver, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn bulkhead_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn bulkhead_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

/// The resolver a redirected socket asked for, if `ctx`'s socket is one.
#[inline(always)]
fn origin_of(ctx: &SockAddrContext) -> Option<DnsOrigin> {
    let cookie = socket_cookie(ctx);
    // SAFETY: copied out at once, under the program's RCU read lock.
    unsafe { DNS_ORIGINS.get(cookie) }.copied()
}

#[inline(always)]
fn restore_v4(ctx: &SockAddrContext) {
    if !any_service_has(FLAG_NAMES) {
        return;
    }
    let Some(proxy) = DNS_PROXY.get(0).copied() else {
        return;
    };
    // SAFETY: the hook's context; user_ip4/user_port readable and
    // writable in the recvmsg and getpeername hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    if proxy.port4 == 0
        || sa.user_ip4 != u32::from_ne_bytes(proxy.addr4)
        || sa.user_port != u32::from(proxy.port4.to_be())
    {
        return;
    }
    let Some(origin) = origin_of(ctx) else {
        return;
    };
    if origin.family == FAMILY_V4 {
        let a = origin.addr;
        sa.user_ip4 = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_port = u32::from(origin.port.to_be());
    }
}

#[inline(always)]
fn restore_v6(ctx: &SockAddrContext) {
    if !any_service_has(FLAG_NAMES) {
        return;
    }
    let Some(proxy) = DNS_PROXY.get(0).copied() else {
        return;
    };
    // SAFETY: as in `restore_v4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port = sa.user_port;
    let from_v6 = proxy.port6 != 0
        && ip == words(proxy.addr6)
        && port == u32::from(proxy.port6.to_be());
    let from_v4 = proxy.port4 != 0
        && ip == [0, 0, MAPPED_PREFIX, u32::from_ne_bytes(proxy.addr4)]
        && port == u32::from(proxy.port4.to_be());
    if !from_v6 && !from_v4 {
        return;
    }
    let Some(origin) = origin_of(ctx) else {
        return;
    };
    let a = origin.addr;
    sa.user_ip6 = if origin.family == FAMILY_V6 {
        words(a)
    } else {
        [0, 0, MAPPED_PREFIX, u32::from_ne_bytes([a[0], a[1], a[2], a[3]])]
    };
    sa.user_port = u32::from(origin.port.to_be());
}

/// An outbound packet to the proxy: records which service's socket, and
/// which resolver it asked for, under the client's address and port (all
/// the proxy sees). A socket that was never redirected has its stale entry
/// removed, so a direct query is refused, never answered as another's.
/// A BPF subprogram: inlined into the packet program it raised register
/// pressure there (see rules::subprog).
#[inline(never)]
pub fn note_client(ctx: &SkBuffContext) {
    let Some(proxy) = DNS_PROXY.get(0).copied() else {
        return;
    };
    let Some(key) = client_key(ctx, &proxy) else {
        return;
    };
    let cookie = socket_cookie(ctx);
    // SAFETY: copied out at once, under the program's RCU read lock.
    match unsafe { DNS_ORIGINS.get(cookie) }.copied() {
        Some(origin) => {
            let _ = DNS_CLIENTS.insert(key, origin, 0);
        }
        None => {
            let _ = DNS_CLIENTS.remove(key);
        }
    }
}

/// The sender's key when the packet is TCP or UDP to the proxy.
#[inline(always)]
fn client_key(ctx: &SkBuffContext, proxy: &DnsProxy) -> Option<DnsClientKey> {
    let first: u8 = ctx.load(0).ok()?;
    let mut key = DnsClientKey {
        protocol: 0,
        family: 0,
        port: 0,
        addr: [0; 16],
    };
    let (proto, l4, dport) = match first >> 4 {
        4 => {
            if proxy.port4 == 0 {
                return None;
            }
            let daddr: [u8; 4] = ctx.load(16).ok()?;
            if daddr != proxy.addr4 {
                return None;
            }
            let saddr: [u8; 4] = ctx.load(12).ok()?;
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&saddr);
            (ctx.load::<u8>(9).ok()?, usize::from(first & 0x0f) * 4, proxy.port4)
        }
        6 => {
            if proxy.port6 == 0 {
                return None;
            }
            let daddr: [u8; 16] = ctx.load(24).ok()?;
            if daddr != proxy.addr6 {
                return None;
            }
            key.family = FAMILY_V6;
            key.addr = ctx.load(8).ok()?;
            // Extension headers are not walked: such a query is refused.
            (ctx.load::<u8>(6).ok()?, 40, proxy.port6)
        }
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    if u16::from_be_bytes([ports[2], ports[3]]) != dport {
        return None;
    }
    key.protocol = proto;
    key.port = u16::from_be_bytes([ports[0], ports[1]]);
    Some(key)
}

/// Sends an allowed call of `s` to `dest` to the proxy when it is a
/// lookup of a service with name rules; `call` packs the port (bits
/// 0-15), the protocol (16-23) and whether the call opens a UDP pinhole
/// (bit 24: an unconnected sendmsg of an ingress-restricted service),
/// which then opens for the proxy, where the answer comes from. Packed,
/// as a BPF subprogram takes at most five arguments. Returns whether it
/// was redirected.
#[inline(never)]
pub fn maybe_redirect(ctx: &SockAddrContext, s: &ServiceEntry, dest: &Dest, call: u32) -> bool {
    let port = call as u16;
    let proto = (call >> 16) as u8;
    if port != DNS_PORT || s.flags & FLAG_NAMES == 0 || (proto != PROTO_UDP && proto != PROTO_TCP)
    {
        return false;
    }
    // SAFETY: the hook's context; a plain field read.
    let v6_hook = unsafe { (*ctx.sock_addr).user_family } == AF_INET6;
    let cookie = socket_cookie(ctx);
    let Some((proxy, proxy_port)) = redirect(ctx, v6_hook, s, *dest, port, cookie) else {
        return false;
    };
    if call & (1 << 24) != 0 {
        udp_peers::open(
            &udp_peers::key(cookie, proxy, proxy_port),
            s.service_id,
            0,
            PEER_SENT,
        );
    }
    true
}
