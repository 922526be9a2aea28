//! TCP lifecycle of observed sockets (sock_ops): established, in both
//! directions, and closed with byte counts and duration. Runs for every TCP
//! socket on the host but does work only for sockets that have an owner
//! record (owners.rs: set at connect or bind by a managed or observed task).

use core::ptr::read_volatile;

use agent_common::{
    SockInfo, DIRECTION_EGRESS, DIRECTION_INGRESS, FAMILY_V4, FAMILY_V6, HOOK_SOCK_OPS,
    KIND_TCP_CLOSED, KIND_TCP_ESTABLISHED, LOST_TCP, PROTO_TCP, VERDICT_NONE,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::{
    addr::v6_bytes,
    events::{blank, emit},
    helpers::{now_ns, socket_cookie},
    linux::{
        AF_INET, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_FIN_WAIT2, TCP_FLAG_FIN, TCP_LAST_ACK,
    },
    owners,
};

#[sock_ops]
pub fn bulkhead_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // A state callback is asked for only on observed sockets, but runs
        // at each of their state changes (about six per connection): only
        // the close needs the socket's record, so the others cost no lookup.
        if ctx.arg(1) != TCP_CLOSE {
            return 1;
        }
    } else if op == BPF_SOCK_OPS_PARSE_HDR_OPT_CB {
        note_the_peers_fin(&ctx);
        return 1;
    } else if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // A connecting socket with its owner in SOCK_OWNERS asks for its
        // state changes before its SYN leaves (owners.rs).
        if owners::arm(socket_cookie(&ctx)) {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        return 1;
    } else if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        return 1;
    }
    // SAFETY: the context's socket; may be null, checked below.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    let cookie = socket_cookie(&ctx);
    // A connecting socket's record is in SOCK_OWNERS; an accepted
    // socket's is its storage, cloned from the listener's (owners.rs).
    let found = owners::find(sk, cookie, false);
    if crate::maps::bpf_log_enabled() {
        aya_log_ebpf::debug!(
            &ctx,
            "sock_ops op {} record {}",
            op,
            u8::from(found.is_some())
        );
    }
    let Some((info, in_table)) = found else {
        return 1;
    };
    let now = now_ns();
    // SAFETY: an owner record of our value type (owners::find).
    let info = unsafe { &mut *info };
    if op == BPF_SOCK_OPS_STATE_CB {
        if info.established_ns != 0 {
            let mut ev = record(&ctx, info, now, cookie);
            ev.kind = KIND_TCP_CLOSED;
            // SAFETY: plain context fields.
            let (acked, received, snd_una, snd_nxt, rcv_nxt) = unsafe {
                (
                    read_volatile(&(*ctx.ops).bytes_acked),
                    read_volatile(&(*ctx.ops).bytes_received),
                    read_volatile(&(*ctx.ops).snd_una),
                    read_volatile(&(*ctx.ops).snd_nxt),
                    read_volatile(&(*ctx.ops).rcv_nxt),
                )
            };
            let (our_fin, peers_fin) = fins_counted(ctx.arg(0), info, snd_una, snd_nxt, rcv_nxt);
            ev.bytes_sent = acked
                .saturating_sub(info.acked_base)
                .saturating_sub(u64::from(our_fin));
            ev.bytes_received = received
                .saturating_sub(info.received_base)
                .saturating_sub(u64::from(peers_fin));
            ev.duration_ns = now.wrapping_sub(info.established_ns);
            info.established_ns = 0;
            emit(&ev, LOST_TCP);
        }
        // A removal that fails (6.1's -EBUSY of a bucket another program
        // on this CPU holds) unarms the entry: the agent's sweep takes it.
        if in_table && !owners::forget(cookie) {
            info.armed = 0;
        }
        return 1;
    }
    info.established_ns = now;
    // SAFETY: plain context fields.
    unsafe {
        info.acked_base = read_volatile(&(*ctx.ops).bytes_acked);
        info.received_base = read_volatile(&(*ctx.ops).bytes_received);
    }
    info.passive = u8::from(op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB);
    info.peer_fin = 0;
    info.armed = 1;
    let mut ev = record(&ctx, info, now, cookie);
    ev.kind = KIND_TCP_ESTABLISHED;
    // The counters at establishment, for the agent's byte summaries of
    // the open connection (not logged with this event).
    ev.bytes_sent = info.acked_base;
    ev.bytes_received = info.received_base;
    emit(&ev, LOST_TCP);
    // Ask for state changes on this socket only, to see it close, and for
    // the segments the kernel checks outside its fast path, to see a FIN
    // from the peer (see note_the_peers_fin).
    let _ = ctx.set_cb_flags(
        (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
            as i32,
    );
    1
}

/// Whether our FIN and the peer's are in `bytes_acked` and `bytes_received`
/// (a FIN takes one sequence number) when the socket closes from `old`.
/// Ours: once acknowledged, so always from FIN_WAIT2, and from LAST_ACK or
/// CLOSING when nothing sent is unacknowledged (a reset there leaves it
/// out). The peer's: it came while we were open (CLOSE_WAIT, then LAST_ACK)
/// or while our FIN was out (CLOSING); from FIN_WAIT2 only if it was taken
/// in order: a socket that closed first also leaves from FIN_WAIT2 when the
/// peer has only acknowledged its FIN (an orphan, or `close()` after
/// `shutdown()`), and then the peer's FIN never counts here.
#[inline(always)]
fn fins_counted(
    old: u32,
    info: &SockInfo,
    snd_una: u32,
    snd_nxt: u32,
    rcv_nxt: u32,
) -> (bool, bool) {
    let our_fin =
        old == TCP_FIN_WAIT2 || ((old == TCP_LAST_ACK || old == TCP_CLOSING) && snd_una == snd_nxt);
    let peers_fin = old == TCP_CLOSE_WAIT
        || old == TCP_LAST_ACK
        || old == TCP_CLOSING
        || (old == TCP_FIN_WAIT2
            && info.peer_fin != 0
            && rcv_nxt.wrapping_sub(info.peer_fin_end) as i32 >= 0);
    (our_fin, peers_fin)
}

/// A segment reached an observed socket outside the kernel's fast path
/// (`PARSE_HDR_OPT_CB`, asked for at establishment: its TCP header checked,
/// not yet taken in). A FIN never takes the fast path, nor does any
/// segment once the socket closes, nor one out of order: if it carries the
/// peer's FIN, remember where that FIN ends in the peer's sequence space
/// (sequence number + payload + 1), for [`fins_counted`] to tell at the
/// close whether it was taken in. Asked for from establishment, not from
/// our close, because a FIN that came out of order before it is taken in
/// only once the gap fills.
#[inline(always)]
fn note_the_peers_fin(ctx: &SockOpsContext) {
    // SAFETY: plain context fields; skb_data and skb_data_end bound the
    // TCP header (the verifier checks the reads below against them).
    let (flags, len, data, end, sk) = unsafe {
        let o = ctx.ops;
        (
            read_volatile(&(*o).skb_tcp_flags),
            read_volatile(&(*o).skb_len),
            read_volatile(&(*o).__bindgen_anon_3.skb_data) as usize,
            read_volatile(&(*o).__bindgen_anon_4.skb_data_end) as usize,
            (*o).__bindgen_anon_2.sk,
        )
    };
    if flags & u32::from(TCP_FLAG_FIN) == 0 || sk.is_null() || data + 13 > end {
        return;
    }
    let header = data as *const u8;
    // SAFETY: bytes 4..13 of the header, within [data, end) as checked.
    let (seq, header_len) = unsafe {
        (
            u32::from_be_bytes([
                *header.add(4),
                *header.add(5),
                *header.add(6),
                *header.add(7),
            ]),
            u32::from(*header.add(12) >> 4) * 4,
        )
    };
    let Some((info, _)) = owners::find(sk, socket_cookie(ctx), false) else {
        return;
    };
    // SAFETY: an owner record of our value type.
    unsafe {
        (*info).peer_fin_end = seq
            .wrapping_add(len.saturating_sub(header_len))
            .wrapping_add(1);
        (*info).peer_fin = 1;
    }
}

#[inline(always)]
fn record(ctx: &SockOpsContext, info: &SockInfo, now: u64, cookie: u64) -> agent_common::Event {
    let mut ev = blank();
    ev.verdict = VERDICT_NONE;
    ev.protocol = PROTO_TCP;
    ev.hook = HOOK_SOCK_OPS;
    ev.passive = info.passive;
    ev.direction = if info.passive != 0 {
        DIRECTION_INGRESS
    } else {
        DIRECTION_EGRESS
    };
    ev.service_id = info.service_id;
    ev.mode = info.mode;
    ev.ts_ns = now;
    ev.cgroup_id = info.cgroup_id;
    ev.pid_tgid = info.pid_tgid;
    ev.uid_gid = info.uid_gid;
    ev.comm = info.comm;
    ev.exe = info.exe;
    ev.socket_cookie = cookie;
    // Read every context field unconditionally, with volatile loads: the
    // verifier only accepts ctx loads at a constant offset, and LLVM would
    // otherwise select between field addresses and load through the result.
    // SAFETY: plain fields of the context.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        let o = ctx.ops;
        (
            read_volatile(&(*o).family),
            read_volatile(&(*o).local_ip4),
            read_volatile(&(*o).remote_ip4),
            [
                read_volatile(&(*o).local_ip6[0]),
                read_volatile(&(*o).local_ip6[1]),
                read_volatile(&(*o).local_ip6[2]),
                read_volatile(&(*o).local_ip6[3]),
            ],
            [
                read_volatile(&(*o).remote_ip6[0]),
                read_volatile(&(*o).remote_ip6[1]),
                read_volatile(&(*o).remote_ip6[2]),
                read_volatile(&(*o).remote_ip6[3]),
            ],
            read_volatile(&(*o).local_port),
            read_volatile(&(*o).remote_port),
        )
    };
    if family == AF_INET {
        ev.family = FAMILY_V4;
        ev.src_addr[..4].copy_from_slice(&l4.to_ne_bytes());
        ev.dst_addr[..4].copy_from_slice(&r4.to_ne_bytes());
    } else {
        ev.family = FAMILY_V6;
        ev.src_addr = v6_bytes(l6);
        ev.dst_addr = v6_bytes(r6);
    }
    // local_port is in host order; remote_port holds the network-order port
    // in its upper 16 bits on little-endian hosts.
    ev.src_port = lport as u16;
    let raw = if rport > 0xffff { rport >> 16 } else { rport };
    ev.dst_port = u16::from_be(raw as u16);
    ev
}
