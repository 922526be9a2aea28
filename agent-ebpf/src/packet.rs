//! Reading IP packets in the cgroup_skb programs (the skb starts at the IP
//! header). IPv6 extension headers are walked to a fixed bound; what cannot
//! be read is reported as such, so that the callers can fail closed.

use agent_common::{PROTO_TCP, PROTO_UDP};
use aya_ebpf::programs::SkBuffContext;

use crate::addr::Dest;

/// IPv6 next-header values of the extension headers walked.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// At most this many extension headers before the transport header; a
/// longer chain is not read (and fails closed where it matters).
const MAX_EXT_HEADERS: usize = 8;
const _: () = assert!(MAX_EXT_HEADERS == 8, "for_each_step! takes 8 steps");

/// `MAX_EXT_HEADERS` steps of the chain walk, leaving the function with
/// the transport header (or `None`) as soon as one step says so.
macro_rules! for_each_step {
    ($walk:ident, $ctx:ident) => {
        for_each_step!(@ $walk, $ctx, 1 2 3 4 5 6 7 8)
    };
    (@ $walk:ident, $ctx:ident, $($n:literal)*) => {
        $(
            let _ = $n;
            if step($ctx, &mut $walk)? {
                return Some(($walk.off, $walk.next, $walk.routed));
            }
        )*
    };
}

/// A packet's addresses, protocol and ports. `source`/`local` name the ends
/// as seen by an inbound packet; for an outbound one `local` is the remote
/// end.
pub struct Packet {
    pub source: Dest,
    pub local: Dest,
    /// The transport protocol after any extension headers.
    pub proto: u8,
    /// Ports (TCP/UDP only; 0 otherwise).
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 otherwise).
    pub flags: u8,
    /// The packet may carry a source route: IPv4 options (LSRR/SSRR among
    /// them), an IPv6 routing header.
    pub source_routed: bool,
}

/// Reads the packet. `None`: it could not be read (truncated, an unknown
/// IP version, an extension-header chain longer than the bound, a
/// non-first fragment).
#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Option<Packet> {
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
            // Any IPv4 option counts: a managed service may set none (see
            // sockopt.rs), so one on its packet came from a control message.
            let source_routed = ihl > 20;
            transport(
                ctx,
                ihl,
                proto,
                Dest::V4(saddr),
                Dest::V4(daddr),
                source_routed,
            )
        }
        6 => {
            let next: u8 = ctx.skb.load(6).ok()?;
            let saddr: [u8; 16] = ctx.skb.load(8).ok()?;
            let daddr: [u8; 16] = ctx.skb.load(24).ok()?;
            let (off, proto, source_routed) = v6_chain(ctx, next)?;
            transport(
                ctx,
                off,
                proto,
                Dest::V6(saddr),
                Dest::V6(daddr),
                source_routed,
            )
        }
        _ => None,
    }
}

/// Walks the IPv6 extension headers from the fixed header: the offset and
/// protocol of the transport header, and whether a routing header was met.
///
/// Unrolled by hand (`MAX_EXT_HEADERS` steps, then the last look): as a
/// loop, LLVM may end the body with the helper call that reads the next
/// header, right before the loop head, and Linux 6.1's verifier refuses
/// that edge ("back-edge from insn"); later kernels accept it.
#[inline(always)]
fn v6_chain(ctx: &SkBuffContext, first: u8) -> Option<(usize, u8, bool)> {
    let mut walk = Chain {
        next: first,
        off: 40,
        routed: false,
    };
    // MAX_EXT_HEADERS (8) steps.
    for_each_step!(walk, ctx);
    (!is_ext(walk.next)).then_some((walk.off, walk.next, walk.routed))
}

/// Where the walk of an extension-header chain is.
struct Chain {
    next: u8,
    off: usize,
    routed: bool,
}

/// One step of the walk: `Some(true)` when it reached the transport
/// header, `Some(false)` after moving past one extension header, `None`
/// when the header cannot be read.
#[inline(always)]
fn step(ctx: &SkBuffContext, walk: &mut Chain) -> Option<bool> {
    let len = match walk.next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
            let len: u8 = ctx.skb.load(walk.off + 1).ok()?;
            (usize::from(len) + 1) * 8
        }
        NEXTHDR_FRAGMENT => {
            // A later fragment has no transport header to judge
            // (reassembly normally removes the header altogether).
            let frag: [u8; 2] = ctx.skb.load(walk.off + 2).ok()?;
            if u16::from_be_bytes(frag) & 0xfff8 != 0 {
                return None;
            }
            8
        }
        NEXTHDR_AUTH => {
            let len: u8 = ctx.skb.load(walk.off + 1).ok()?;
            (usize::from(len) + 2) * 4
        }
        _ => return Some(true),
    };
    if walk.next == NEXTHDR_ROUTING {
        walk.routed = true;
    }
    walk.next = ctx.skb.load(walk.off).ok()?;
    walk.off += len;
    Some(false)
}

/// Whether `next` starts an IPv6 extension header this walk reads
/// (hop-by-hop, routing, fragment, destination options, AH).
#[inline(always)]
pub fn is_ext(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT | NEXTHDR_AUTH
    )
}

#[inline(always)]
fn transport(
    ctx: &SkBuffContext,
    off: usize,
    proto: u8,
    source: Dest,
    local: Dest,
    source_routed: bool,
) -> Option<Packet> {
    let mut pkt = Packet {
        source,
        local,
        proto,
        sport: 0,
        dport: 0,
        flags: 0,
        source_routed,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Some(pkt);
    }
    let ports: [u8; 4] = ctx.skb.load(off).ok()?;
    pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
    pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if proto == PROTO_TCP {
        pkt.flags = ctx.skb.load(off + 13).ok()?;
    }
    Some(pkt)
}
