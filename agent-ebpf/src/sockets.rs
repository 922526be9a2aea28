//! Which kinds of socket a managed service may open. The agent judges a
//! socket's traffic at the socket-address hooks (connect, sendmsg, bind),
//! which run for TCP and UDP; ping sockets are judged by their packets (see
//! outbound.rs). Every other kind escapes those hooks (raw and packet
//! sockets build their own headers; SCTP, DCCP, MPTCP's extra subflows,
//! L2TP have no hook or run them outside the service), so a managed service
//! may open them only when its policy names them (`[sockets]`).

use agent_common::{
    ServiceEntry, DIRECTION_EGRESS, FLAG_ALLOW_PACKET, FLAG_ALLOW_RAW, HOOK_LSM_SOCKET,
    HOOK_SOCK_CREATE, LOST_VERDICT, PROTO_DCCP, PROTO_ICMP, PROTO_ICMPV6, PROTO_L2TP, PROTO_MPTCP,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE, RULE_DEFAULT_DENY, SOCKETS_DCCP, SOCKETS_ICMP,
    SOCKETS_L2TP, SOCKETS_MPTCP, SOCKETS_SCTP, SOCKETS_UDPLITE, VERDICT_DENY,
};
use aya_ebpf::{
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};

use crate::{
    events::{emit, fill_task, refusal},
    helpers::current_cgroup_id,
    linux::{AF_PACKET, EPERM, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM},
    service::current_service,
};

/// socket() of an inet socket (cgroup/sock_create sees AF_INET/AF_INET6
/// only, with the protocol already resolved: `socket(AF_INET, SOCK_STREAM,
/// 0)` arrives as TCP). 1 allows, 0 fails socket() with EPERM.
#[cgroup_sock(sock_create)]
pub fn bulkhead_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket.
    let (kind, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    // TCP and UDP, judged by the socket-address hooks: the common case,
    // decided before the service lookup.
    if (kind == SOCK_STREAM && protocol == u32::from(PROTO_TCP))
        || (kind == SOCK_DGRAM && protocol == u32::from(PROTO_UDP))
    {
        return 1;
    }
    let Some(service) = current_service() else {
        return 1;
    };
    if allowed(&service, kind, protocol) {
        return 1;
    }
    if refuse(&service, HOOK_SOCK_CREATE, protocol) {
        0
    } else {
        1
    }
}

/// Whether `service` may open a socket of `kind` and `protocol` (not TCP or
/// UDP, handled above).
#[inline(always)]
fn allowed(service: &ServiceEntry, kind: u32, protocol: u32) -> bool {
    if kind == SOCK_RAW {
        return service.flags & FLAG_ALLOW_RAW != 0;
    }
    let needs = match protocol {
        p if kind == SOCK_DGRAM && (p == u32::from(PROTO_ICMP) || p == u32::from(PROTO_ICMPV6)) => {
            SOCKETS_ICMP
        }
        PROTO_SCTP => SOCKETS_SCTP,
        PROTO_MPTCP => SOCKETS_MPTCP,
        PROTO_DCCP => SOCKETS_DCCP,
        PROTO_UDPLITE => SOCKETS_UDPLITE,
        PROTO_L2TP => SOCKETS_L2TP,
        // Anything else: no name in the policy can allow it.
        _ => return false,
    };
    service.sockets & needs != 0
}

/// socket() of any family, through BPF LSM (where the host has it): the
/// only place packet sockets can be seen. 0 allows, -EPERM refuses.
#[lsm(hook = "socket_create")]
pub fn bulkhead_socket_create(ctx: LsmContext) -> i32 {
    // int family, int type, int protocol, int kern, then the return value
    // of earlier LSM programs.
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if family != AF_PACKET || kern != 0 {
        return 0;
    }
    let Some(service) = current_service() else {
        return 0;
    };
    if service.flags & FLAG_ALLOW_PACKET != 0 {
        return 0;
    }
    let protocol: i32 = ctx.arg(2);
    if refuse(&service, HOOK_LSM_SOCKET, protocol as u32) {
        -EPERM
    } else {
        0
    }
}

/// Records a refused socket(); true when it must fail (enforce mode). The
/// record carries the whole protocol number in `dst_port` (MPTCP's 262 does
/// not fit the one-byte protocol field).
#[inline(always)]
fn refuse(service: &ServiceEntry, hook: u8, protocol: u32) -> bool {
    let (verdict, ev) = refusal(
        service,
        DIRECTION_EGRESS,
        protocol as u8,
        hook,
        RULE_DEFAULT_DENY,
    );
    if let Some(mut ev) = ev {
        ev.dst_port = protocol as u16;
        ev.cgroup_id = current_cgroup_id();
        fill_task(&mut ev);
        emit(&ev, LOST_VERDICT);
    }
    verdict == VERDICT_DENY
}
