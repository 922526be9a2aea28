//! Which managed service, if any, the current task belongs to.

use agent_common::{ServiceEntry, MAX_CGROUP_DEPTH};
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};

use crate::maps::SERVICES;

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
    // Fast path: the task sits directly in the service's cgroup.
    if let Some(entry) = unsafe { SERVICES.get(&leaf) } {
        return Some(*entry);
    }
    let mut found = None;
    // Level 0 is the root (never a service); walk down to the leaf's parent.
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == leaf {
            break;
        }
        if let Some(entry) = unsafe { SERVICES.get(&id) } {
            found = Some(*entry);
        }
        level += 1;
    }
    found
}
