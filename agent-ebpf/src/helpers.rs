//! Safe wrappers of the BPF helpers that take no pointer, or only the
//! program's own context (which the kernel hands over valid), so that the
//! programs call them without `unsafe`. Helpers that take any other
//! pointer stay `unsafe` at their call sites, each with its reason.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_comm, bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id,
            bpf_skb_cgroup_id,
        },
    },
    programs::SkBuffContext,
    EbpfContext,
};

/// CLOCK_MONOTONIC in nanoseconds (`bpf_ktime_get_ns`).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments; available to every program type.
    unsafe { bpf_ktime_get_ns() }
}

/// The cgroup (v2) id of the current task.
#[inline(always)]
pub fn current_cgroup_id() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// The id of the current task's cgroup ancestor at `level` (0 is the
/// root; 0 is returned past the task's own level).
#[inline(always)]
pub fn current_ancestor_cgroup_id(level: i32) -> u64 {
    // SAFETY: an integer argument only.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// The cookie of the socket of a program's context (sock_addr, sock_ops,
/// cgroup_skb).
#[inline(always)]
pub fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the program's own context, as the helper expects it.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The cgroup id of a packet's socket (the cgroup it was created in).
#[inline(always)]
pub fn skb_cgroup_id(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the program's own context.
    unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }
}

/// The id of the ancestor at `level` of a packet's socket's cgroup.
#[inline(always)]
pub fn skb_ancestor_cgroup_id(ctx: &SkBuffContext, level: i32) -> u64 {
    // SAFETY: the program's own context and an integer.
    unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) }
}

/// Writes the current task's name into `out` (zeros if the helper fails).
/// Straight into the caller's field: aya's `bpf_get_current_comm()`
/// returns a `Result` whose copy LLVM zeroes through calls to memset, and
/// each call costs the 6.1 verifier 32 bytes of its 512-byte stack.
#[inline(always)]
pub fn current_comm(out: &mut [u8; 16]) {
    // SAFETY: a writable buffer of exactly the size passed.
    if unsafe { bpf_get_current_comm(out.as_mut_ptr().cast(), 16) } != 0 {
        *out = [0; 16];
    }
}
