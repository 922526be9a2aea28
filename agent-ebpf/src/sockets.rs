//! Which kinds of socket a managed service may open. Raw inet sockets and
//! packet sockets build their own headers and never pass the connect/sendmsg
//! hooks, so they are denied unless the policy's `[sockets]` allows them.

use agent_common::{
    ServiceEntry, DIRECTION_EGRESS, FLAG_ALLOW_PACKET, FLAG_ALLOW_RAW, HOOK_LSM_SOCKET,
    HOOK_SOCK_CREATE, KIND_VERDICT, LOST_VERDICT, MODE_AUDIT, RULE_DEFAULT_DENY, VERDICT_AUDIT,
    VERDICT_DENY,
};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};

use crate::{
    events::{blank, emit, fill_task},
    service::current_service,
};

const SOCK_RAW: u32 = 3;
const AF_PACKET: i32 = 17;
const EPERM: i32 = 1;

/// socket() of an inet socket (cgroup/sock_create sees AF_INET/AF_INET6
/// only). 1 allows, 0 fails socket() with EPERM.
#[cgroup_sock(sock_create)]
pub fn bulkhead_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket.
    let (kind, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if kind != SOCK_RAW {
        return 1;
    }
    let Some(service) = current_service() else {
        return 1;
    };
    if service.flags & FLAG_ALLOW_RAW != 0 {
        return 1;
    }
    if refuse(&service, HOOK_SOCK_CREATE, protocol as u8) {
        0
    } else {
        1
    }
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
    if refuse(&service, HOOK_LSM_SOCKET, protocol as u8) {
        -EPERM
    } else {
        0
    }
}

/// Records a refused socket(); true when it must fail (enforce mode).
#[inline(always)]
fn refuse(service: &ServiceEntry, hook: u8, protocol: u8) -> bool {
    let enforce = service.mode != MODE_AUDIT;
    let mut ev = blank();
    ev.kind = KIND_VERDICT;
    ev.verdict = if enforce { VERDICT_DENY } else { VERDICT_AUDIT };
    ev.service_id = service.service_id;
    ev.mode = service.mode;
    ev.rule_id = RULE_DEFAULT_DENY;
    ev.hook = hook;
    ev.protocol = protocol;
    ev.direction = DIRECTION_EGRESS;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    fill_task(&mut ev);
    emit(&ev, LOST_VERDICT);
    enforce
}
