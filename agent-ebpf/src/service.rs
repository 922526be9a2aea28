//! Which managed service, if any, the current task belongs to.

use agent_common::{ServiceEntry, MAX_CGROUP_DEPTH};
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        generated::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    },
};

use crate::maps::{HELD_SOCKETS, SERVICES};

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
    // SAFETY: helpers with no memory arguments.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    walk(leaf, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The service a packet's socket belongs to, for cgroup_skb programs: the
/// managed service that holds it when the agent found it held by one it
/// was not created in (HELD_SOCKETS), else the cgroup it was created in.
#[inline(always)]
pub fn socket_service(skb: *mut __sk_buff) -> Option<ServiceEntry> {
    // SAFETY: skb is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    if let Some(cgroup) = unsafe { HELD_SOCKETS.get(cookie) } {
        if let Some(entry) = unsafe { SERVICES.get(cgroup) } {
            return Some(*entry);
        }
    }
    skb_service(skb)
}

/// The service owning the socket an inbound packet is for (the cgroup the
/// socket was created in), for cgroup_skb programs.
#[inline(always)]
fn skb_service(skb: *mut __sk_buff) -> Option<ServiceEntry> {
    // SAFETY: skb is the program's context.
    let leaf = unsafe { bpf_skb_cgroup_id(skb) };
    walk(leaf, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}

/// Deepest managed cgroup from `leaf` up, `ancestor(level)` giving the id
/// at each level (0 past the leaf).
#[inline(always)]
fn walk(leaf: u64, ancestor: impl Fn(i32) -> u64) -> Option<ServiceEntry> {
    // Fast path: the task sits directly in the service's cgroup.
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
        _pad: 0,
        bind_ruleset: 0,
        _pad2: 0,
    };
    let mut have = false;
    // Level 0 is the root (never a service); walk down to the leaf's parent.
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 || id == leaf {
            break;
        }
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
