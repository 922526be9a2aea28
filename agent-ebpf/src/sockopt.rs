//! setsockopt() of a managed service (cgroup/setsockopt at the cgroup2
//! root): options that would send packets to a first hop no hook judged
//! are refused with EPERM. These are source routes: IP_OPTIONS holding an
//! LSRR or SSRR option, and IPv6 routing headers (IPV6_RTHDR and its RFC
//! 2292 twin). The same routes given as control messages to sendmsg() are
//! dropped on the packet (see outbound.rs). Every other option, and every
//! unmanaged task, passes untouched.

use agent_common::{
    ServiceEntry, DIRECTION_EGRESS, HOOK_SETSOCKOPT, LOST_VERDICT, RULE_SOURCE_ROUTE, VERDICT_DENY,
};
use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, macros::cgroup_sockopt, programs::SockoptContext,
};

use crate::{
    events::{emit, fill_task, refusal},
    packet::options_source_route,
    service::current_service,
};

const SOL_IP: i32 = 0;
const IP_OPTIONS: i32 = 4;
const SOL_IPV6: i32 = 41;
const IPV6_2292RTHDR: i32 = 24;
const IPV6_RTHDR: i32 = 57;
/// What a cgroup/setsockopt program returns: go on, or fail with EPERM.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sockopt(setsockopt)]
pub fn bulkhead_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: plain fields of the context.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    let ip_options = level == SOL_IP && optname == IP_OPTIONS;
    let rthdr = level == SOL_IPV6 && (optname == IPV6_RTHDR || optname == IPV6_2292RTHDR);
    // An empty value removes the option: always fine.
    if !(ip_options || rthdr) || optlen <= 0 {
        return PROCEED;
    }
    let Some(service) = current_service() else {
        return PROCEED;
    };
    if ip_options && !options_source_route(|i| option_byte(&ctx, i)) {
        return PROCEED;
    }
    if refuse(&service) {
        REJECT
    } else {
        PROCEED
    }
}

/// Byte `i` of the option value the caller passed, `None` past its end.
#[inline(always)]
fn option_byte(ctx: &SockoptContext, i: usize) -> Option<u8> {
    // SAFETY: the kernel's copy of the value, [optval, optval_end); every
    // read is checked against the end first.
    unsafe {
        let start = (*ctx.sockopt).__bindgen_anon_2.optval.cast::<u8>();
        let end = (*ctx.sockopt).__bindgen_anon_3.optval_end.cast::<u8>();
        if i >= 64 {
            return None;
        }
        let p = start.add(i);
        if p.add(1) > end {
            return None;
        }
        Some(*p)
    }
}

/// Records the refusal; true when it must fail (enforce mode).
#[inline(always)]
fn refuse(service: &ServiceEntry) -> bool {
    let (verdict, ev) = refusal(
        service,
        DIRECTION_EGRESS,
        0,
        HOOK_SETSOCKOPT,
        RULE_SOURCE_ROUTE,
    );
    if let Some(mut ev) = ev {
        ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        fill_task(&mut ev);
        emit(&ev, LOST_VERDICT);
    }
    verdict == VERDICT_DENY
}
