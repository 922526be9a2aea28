//! setsockopt() of a managed service (cgroup/setsockopt at the cgroup2
//! root): options that would send packets to a first hop no hook judged
//! are refused with EPERM. These are source routes: IP_OPTIONS (any value:
//! LSRR and SSRR route around the hooks, and no service needs the other
//! IPv4 options; reading the options here cost the verifier more than the
//! rest of the programs together); an IPv6 routing header, set directly
//! (IPV6_RTHDR), among RFC 2292 sticky options (IPV6_2292PKTOPTIONS,
//! refused whatever it holds), or attached to a flow label
//! (IPV6_FLOWLABEL_MGR with options). The same routes given as control
//! messages to sendmsg() are dropped on the packet (see outbound.rs).
//! Every other option, and every unmanaged task, passes untouched.

use agent_common::{
    ServiceEntry, DIRECTION_EGRESS, HOOK_SETSOCKOPT, LOST_VERDICT, RULE_SOURCE_ROUTE, VERDICT_DENY,
};
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::{
    events::{emit, fill_task, refusal},
    helpers::current_cgroup_id,
    service::current_service,
};

const SOL_IP: i32 = 0;
const IP_OPTIONS: i32 = 4;
const SOL_IPV6: i32 = 41;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_FLOWLABEL_MGR: i32 = 32;
const IPV6_RTHDR: i32 = 57;
/// `struct in6_flowlabel_req`; options, if any, follow it.
const FLOWLABEL_REQ_LEN: i32 = 32;
/// The program sees at most one page of the value.
const VISIBLE: i32 = 4096;

/// What a cgroup/setsockopt program returns: go on, or fail with EPERM.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sockopt(setsockopt)]
pub fn bulkhead_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: plain fields of the context.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    let ip_options = level == SOL_IP && optname == IP_OPTIONS;
    let v6 = level == SOL_IPV6
        && matches!(
            optname,
            IPV6_RTHDR | IPV6_2292PKTOPTIONS | IPV6_FLOWLABEL_MGR
        );
    // An empty value removes the option: always fine.
    if !(ip_options || v6) || optlen <= 0 {
        return pass_on(&ctx, optlen);
    }
    let Some(service) = current_service() else {
        return pass_on(&ctx, optlen);
    };
    let source_route = match (level, optname) {
        (SOL_IP, _) => true,
        (_, IPV6_RTHDR) => true,
        (_, IPV6_FLOWLABEL_MGR) => optlen > FLOWLABEL_REQ_LEN,
        // RFC 2292 sticky options: control messages that may hold a
        // routing header. Walking them costs the verifier too much, and the
        // API is long superseded (RFC 3542's one option per call), so a
        // managed service may not set them at all.
        _ => true,
    };
    if !source_route {
        return pass_on(&ctx, optlen);
    }
    if refuse(&service) {
        REJECT
    } else {
        PROCEED
    }
}

/// Lets the kernel handle the option. A value larger than the page the
/// program sees must be handed back as "use the caller's own" (optlen 0):
/// kernels without that default (before 6.5) fail it with EFAULT otherwise.
#[inline(always)]
fn pass_on(ctx: &SockoptContext, optlen: i32) -> i32 {
    if optlen > VISIBLE {
        // SAFETY: optlen is writable in setsockopt programs.
        unsafe { (*ctx.sockopt).optlen = 0 };
    }
    PROCEED
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
        ev.cgroup_id = current_cgroup_id();
        fill_task(&mut ev);
        emit(&ev, LOST_VERDICT);
    }
    verdict == VERDICT_DENY
}
