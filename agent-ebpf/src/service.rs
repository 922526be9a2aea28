//! Which managed service, if any, the current task belongs to.

use agent_common::{ServiceEntry, MAX_CGROUP_DEPTH};
use aya_ebpf::programs::SkBuffContext;

use crate::{
    helpers::{
        current_ancestor_cgroup_id, current_cgroup_id, skb_ancestor_cgroup_id, skb_cgroup_id,
        socket_cookie,
    },
    maps::{HELD_SOCKETS, SERVICES},
};

/// The service of the current task: the deepest managed cgroup among the
/// task's cgroup and its ancestors. A process in a child cgroup of a service
/// (`system.slice/x.service/worker`) belongs to that service, and a service
/// nested inside another service's cgroup is judged by its own policy.
///
/// Identity is the *task's* cgroup, not the socket's: a compromised service
/// that receives a socket from an unmanaged process is still judged as
/// itself.
#[inline(always)]
pub fn current_service() -> Option<ServiceEntry> {
    current_service_in(current_cgroup_id())
}

/// [`current_service`] for a caller that has the task's cgroup id already
/// (one helper call fewer on the verdict path).
#[inline(always)]
pub fn current_service_in(cgroup_id: u64) -> Option<ServiceEntry> {
    walk(cgroup_id, current_ancestor_cgroup_id)
}

/// The service a packet's socket belongs to, for cgroup_skb programs: the
/// managed service that holds it when the agent found it held by one it
/// was not created in (HELD_SOCKETS), else the cgroup it was created in.
#[inline(always)]
pub fn socket_service(ctx: &SkBuffContext) -> Option<ServiceEntry> {
    let cookie = socket_cookie(ctx);
    // SAFETY: copied out at once, as in `walk`.
    if let Some(cgroup) = unsafe { HELD_SOCKETS.get(cookie) } {
        // SAFETY: copied out at once, as in `walk`.
        if let Some(entry) = unsafe { SERVICES.get(cgroup) } {
            return Some(*entry);
        }
    }
    skb_service(ctx)
}

/// The service owning the socket an inbound packet is for (the cgroup the
/// socket was created in), for cgroup_skb programs.
#[inline(always)]
fn skb_service(ctx: &SkBuffContext) -> Option<ServiceEntry> {
    walk(skb_cgroup_id(ctx), |level| {
        skb_ancestor_cgroup_id(ctx, level)
    })
}

/// Deepest managed cgroup from `leaf` up, `ancestor(level)` giving the id
/// at each level (0 past the leaf).
#[inline(always)]
fn walk(leaf: u64, ancestor: impl Fn(i32) -> u64) -> Option<ServiceEntry> {
    // Fast path: the task sits directly in the service's cgroup.
    // SAFETY: the reference into the map is valid under the program's RCU
    // read lock; the agent may replace the entry meanwhile, so the value
    // is copied out at once (here and below) and the copy is judged.
    if let Some(entry) = unsafe { SERVICES.get(leaf) } {
        return Some(*entry);
    }
    // Kept as plain initialised values (not an Option built in the loop):
    // the verifier must see every register written on every path.
    let mut found = ServiceEntry {
        service_id: 0,
        mode: 0,
        flags: 0,
        sockets: 0,
        qualifiers: 0,
        bind_ruleset: 0,
        names_ruleset: 0,
        name_key: 0,
        exe_free: 0,
        uid_free: 0,
    };
    let mut have = false;
    // Level 0 is the root (never a service); walk down to the leaf's parent.
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 || id == leaf {
            break;
        }
        // SAFETY: as above.
        if let Some(entry) = unsafe { SERVICES.get(id) } {
            found = *entry;
            have = true;
        }
        level += 1;
    }
    if have {
        Some(found)
    } else {
        None
    }
}
