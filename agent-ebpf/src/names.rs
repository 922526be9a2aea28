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
//! - `learnt_rule`: the judge's first question for such a service (the
//!   address rules come second): an address the service learnt from its
//!   own lookup of an allowed name.
//!
//! When the proxy's heartbeat is stale, nothing is redirected (lookups go
//! to the resolver, nothing is learnt: new names fail closed); learnt
//! addresses stay allowed, since only the agent's sweep removes them.

use core::ptr::{read_volatile, write_volatile};

use agent_common::{
    dns_mark, DnsClientKey, DnsOrigin, DnsProxy, LearntKey, LearntV4Key, ServiceEntry,
    DNS_HEARTBEAT_GRACE_NS, FAMILY_V4, FAMILY_V6, FLAG_NAMES, PROTO_TCP, PROTO_UDP,
    RULE_DEFAULT_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    macros::cgroup_sock_addr,
    programs::{SkBuffContext, SockAddrContext},
};

use crate::{
    addr::{set_addr, Dest},
    helpers::{now_ns, socket_cookie},
    maps::{any_service_has, DNS_CLIENTS, DNS_ORIGINS, DNS_PROXY, LEARNT, LEARNT_V4},
    rules::match_ports_inline,
};

/// The DNS port: what is redirected.
pub const DNS_PORT: u16 = 53;

/// The first IPv6 words of an IPv4-mapped address (::ffff:a.b.c.d).
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether a heartbeat at `beat` is recent.
#[inline(always)]
fn fresh(beat: u64) -> bool {
    beat != 0 && now_ns().saturating_sub(beat) < DNS_HEARTBEAT_GRACE_NS
}

/// Whether `dest:port` is the proxy's address (either family). A lookup
/// already judged and redirected reaches a second program attached beside
/// ours with that destination: the previous agent's, while a start takes
/// over from it (both run until its are detached). That program must not
/// judge the proxy as the destination. A socket that calls the proxy
/// directly gains nothing: the proxy refuses a query whose socket no
/// redirect recorded (`DNS_CLIENTS`).
#[inline(always)]
pub fn is_proxy(dest: &Dest, port: u16) -> bool {
    let Some(proxy) = DNS_PROXY.get(0) else {
        return false;
    };
    match dest {
        Dest::V4(addr) => proxy.port4 != 0 && port == proxy.port4 && *addr == proxy.addr4,
        Dest::V6(addr) => proxy.port6 != 0 && port == proxy.port6 && *addr == proxy.addr6,
    }
}

/// The rule that allows `dest` to the service `s` because `s` learnt it,
/// or `RULE_DEFAULT_DENY`. The learnt entry's bitmap picks the union
/// ruleset of the name rules whose names gave the address, so each rule's
/// own ports and protocol apply. An IPv4 (or mapped) destination is asked
/// of LEARNT_V4, whose 8-byte key the kernel hashes and compares as it
/// does an address rule's, where LEARNT's 32 bytes are eight words; its
/// key carries the service's name key in 32 bits, so the entry must name
/// the service in full (agent_common::LearntV4Key).
///
/// An entry held is allowed: the agent's sweep removes it once its TTL has
/// run out (docs/dns-names.md, "TTLs, caps, memory"), so no clock is read
/// here, and with no agent nothing removes it (learnt addresses keep
/// working, new names fail closed). Inlined, with no helper call: where
/// the kernel returns through a thunk (SRSO "Safe RET") every call costs,
/// and the subprogram and the clock read made a learnt name's UDP
/// connect() 70 ns dearer than an address rule's, then 30, then about 10
/// with LEARNT_V4's earlier 12-byte key (A/B in docs/dns-names.md, "Added
/// latency and connect cost").
#[inline(always)]
pub fn learnt_rule(s: &ServiceEntry, dest: &Dest, proto: u8, port: u16, callers: u32) -> u32 {
    let rules = match *dest {
        // SAFETY: copied out at once, under the program's RCU read lock.
        Dest::V4(addr) => unsafe { LEARNT_V4.get(LearntV4Key::new(s.name_key, addr)) }
            .filter(|v| v.name_key == s.name_key)
            .map(|v| v.rules),
        // SAFETY: as above.
        Dest::V6(addr) => unsafe { LEARNT.get(LearntKey::v6(s.name_key, addr)) }.map(|v| v.rules),
    };
    let Some(rules) = rules else {
        return RULE_DEFAULT_DENY;
    };
    match_ports_inline(
        s.names_ruleset.wrapping_add(u32::from(rules & 0x0f)),
        proto,
        port,
        callers,
    )
}

/// Sends an allowed port-53 call of `s` (which has name rules) to the
/// proxy, keeping `dest` as the socket's resolver. Returns the proxy's
/// port when it did, or 0 when the call goes where it was going (no live
/// proxy for that family, or the origin could not be kept: then the
/// lookup reaches the resolver and teaches nothing, which fails closed).
/// Reads the proxy in place: a copy took stack the judge needs.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    v6_hook: bool,
    s: &ServiceEntry,
    dest: Dest,
    port: u16,
    cookie: u64,
) -> u16 {
    let Some(proxy) = DNS_PROXY.get(0) else {
        return 0;
    };
    if !fresh(proxy.heartbeat_ns) {
        return 0;
    }
    let v4 = matches!(dest, Dest::V4(_));
    let proxy_port = if v4 { proxy.port4 } else { proxy.port6 };
    if proxy_port == 0 {
        return 0;
    }
    let mut origin = DnsOrigin {
        name_key: s.name_key,
        service_id: s.service_id,
        port,
        family: 0,
        _pad: 0,
        addr: [0; 16],
    };
    set_addr(&mut origin.addr, &mut origin.family, dest);
    if DNS_ORIGINS.insert(cookie, origin, 0).is_err() {
        return 0;
    }
    set_port(ctx, proxy_port);
    if !v4 {
        set_ip6(ctx, words(proxy.addr6));
    } else if v6_hook {
        set_ip6(ctx, [0, 0, MAPPED_PREFIX, u32::from_ne_bytes(proxy.addr4)]);
    } else {
        set_ip4(ctx, u32::from_ne_bytes(proxy.addr4));
    }
    proxy_port
}

// The context's address fields are written one volatile store each, at a
// constant offset: the verifier refuses a store through a context pointer
// LLVM moved (as it does for an array written whole). The address setters
// are BPF subprograms: inlined, LLVM merged the IPv4 and IPv6 stores into
// one store at a selected offset, which the verifier refuses too.

/// Sets the context's port (host order in, network order stored).
#[inline(always)]
fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: user_port of the hook's context, writable in every
    // sock_addr hook this module runs in.
    unsafe { write_volatile(&raw mut (*ctx.sock_addr).user_port, u32::from(port.to_be())) };
}

#[inline(always)]
fn set_ip4(ctx: &SockAddrContext, ip: u32) {
    store_ip4(ctx.sock_addr, ip);
}

#[inline(never)]
fn store_ip4(sa: *mut bpf_sock_addr, ip: u32) {
    // SAFETY: as in `set_port`, user_ip4 of an IPv4 hook.
    unsafe { write_volatile(&raw mut (*sa).user_ip4, ip) };
}

#[inline(always)]
fn set_ip6(ctx: &SockAddrContext, w: [u32; 4]) {
    store_ip6(ctx.sock_addr, w[0], w[1], w[2], w[3]);
}

#[inline(never)]
fn store_ip6(sa: *mut bpf_sock_addr, w0: u32, w1: u32, w2: u32, w3: u32) {
    let w = [w0, w1, w2, w3];
    // SAFETY: as in `set_port`, user_ip6 of an IPv6 hook.
    unsafe {
        write_volatile(&raw mut (*sa).user_ip6[0], w[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], w[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], w[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], w[3]);
    }
}

/// The context's (address words, port) as the IPv6 hooks hold them.
#[inline(always)]
fn get_ip6(ctx: &SockAddrContext) -> ([u32; 4], u32) {
    // SAFETY: plain reads of the hook's context, at constant offsets.
    unsafe {
        let sa = ctx.sock_addr;
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            read_volatile(&raw const (*sa).user_port),
        )
    }
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
    // SAFETY: plain reads of the hook's context, at constant offsets.
    let (ip, port) = unsafe {
        (
            read_volatile(&raw const (*ctx.sock_addr).user_ip4),
            read_volatile(&raw const (*ctx.sock_addr).user_port),
        )
    };
    if proxy.port4 == 0
        || ip != u32::from_ne_bytes(proxy.addr4)
        || port != u32::from(proxy.port4.to_be())
    {
        return;
    }
    let Some(origin) = origin_of(ctx) else {
        return;
    };
    if origin.family == FAMILY_V4 {
        let a = origin.addr;
        set_ip4(ctx, u32::from_ne_bytes([a[0], a[1], a[2], a[3]]));
        set_port(ctx, origin.port);
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
    let (ip, port) = get_ip6(ctx);
    let from_v6 =
        proxy.port6 != 0 && ip == words(proxy.addr6) && port == u32::from(proxy.port6.to_be());
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
    set_ip6(
        ctx,
        if origin.family == FAMILY_V6 {
            words(a)
        } else {
            [
                0,
                0,
                MAPPED_PREFIX,
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            ]
        },
    );
    set_port(ctx, origin.port);
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

/// A UDP query arriving at the proxy's socket (the ingress packet program,
/// after netfilter, whose rules may rewrite a mark set on the way out:
/// wg-quick's `meta mark set ct mark`, CONNMARK --restore-mark): marked
/// with the service its client's entry names now, a moment after the
/// sender's own packet wrote it, for the proxy to check against the entry
/// when it reads the query, by which time the entry may name another
/// service (see `dns_mark`). Every other packet costs one map read and a
/// compare of the receiving socket's port. A BPF subprogram, as
/// `note_client`.
#[inline(never)]
pub fn stamp_query(ctx: &SkBuffContext) {
    let Some(proxy) = DNS_PROXY.get(0).copied() else {
        return;
    };
    // SAFETY: the context's skb; `local_port` is the receiving socket's
    // port in host order, a context field.
    let local = unsafe { read_volatile(&(*ctx.skb.skb).local_port) };
    if local == 0 || (local != u32::from(proxy.port4) && local != u32::from(proxy.port6)) {
        return;
    }
    let Some(key) = client_key(ctx, &proxy) else {
        return;
    };
    if key.protocol != PROTO_UDP {
        return;
    }
    // No entry here: the mark is left as it is. While an agent takes over,
    // both agents' programs run, the previous one's first; a query whose
    // way out only the previous agent's programs saw (ours not attached
    // yet) is in its map alone, and it has stamped the mark: writing 0
    // over it had the proxy refuse that query once the entry was carried
    // over (found by the 20-restart test: REFUSED lookups). A query with
    // no entry in any map is refused by the proxy whatever its mark.
    // SAFETY: copied out at once, under the program's RCU read lock.
    let Some(mark) = (unsafe { DNS_CLIENTS.get(key) }).map(|origin| dns_mark(origin.name_key))
    else {
        return;
    };
    // SAFETY: the context's skb; `mark` is writable from cgroup_skb
    // programs.
    unsafe { write_volatile(&mut (*ctx.skb.skb).mark, mark) };
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
            (
                ctx.load::<u8>(9).ok()?,
                usize::from(first & 0x0f) * 4,
                proxy.port4,
            )
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

/// Whether an allowed call of `s` is a lookup the proxy answers: to port
/// 53, over UDP or TCP, of a service with name rules. Inlined into the
/// judge, so that the calls that are not lookups (nearly all) skip the
/// subprogram call of [`redirect_lookup`].
#[inline(always)]
pub fn is_lookup(s: &ServiceEntry, port: u16, proto: u8) -> bool {
    port == DNS_PORT && s.flags & FLAG_NAMES != 0 && (proto == PROTO_UDP || proto == PROTO_TCP)
}

/// Sends a call [`is_lookup`] said is a lookup to the proxy. `v6_hook`
/// must be a constant of the calling program (connect6, sendmsg6), so
/// that the verifier never walks a store to an IPv4 field in an IPv6 hook.
/// Returns the proxy's port when it was redirected, else 0.
#[inline(never)]
pub fn redirect_lookup(ctx: &SockAddrContext, s: &ServiceEntry, dest: &Dest, v6_hook: bool) -> u16 {
    redirect(ctx, v6_hook, s, *dest, DNS_PORT, socket_cookie(ctx))
}

/// Where a call [`redirect_lookup`] sent to the proxy's `port` goes: the
/// proxy's address of the destination's family.
#[inline(always)]
pub fn proxy_dest(dest: Dest) -> Dest {
    let proxy = DNS_PROXY.get(0);
    match (dest, proxy) {
        (Dest::V4(_), Some(p)) => Dest::V4(p.addr4),
        (Dest::V6(_), Some(p)) => Dest::V6(p.addr6),
        (d, None) => d,
    }
}
