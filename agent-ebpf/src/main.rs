//! bulkhead's kernel programs.
//!
//! Attached once at the cgroup2 root, they judge every connect() and
//! unconnected sendmsg() on the host, but only for tasks that belong to a
//! managed service (see `service.rs`); everything else is allowed untouched.
//!
//! Verdicts (the return value of a cgroup/sock_addr program):
//! - 1 = allow, 0 = deny: the kernel fails the call with EPERM.
//! - Every error path is deliberate and fails *closed* for a managed service
//!   (a ruleset index out of range or a missing ruleset denies) and *open*
//!   for an unmanaged task (not our business).
//!
//! Where things are: the entry points by hook, `sock_addr.rs`
//! (connect/sendmsg/bind), `sockets.rs` (socket creation), `sockopt.rs`,
//! `ingress.rs` and `outbound.rs` (cgroup_skb), `lifecycle.rs` (sock_ops),
//! `cgroups.rs` (cgroup_mkdir/rmdir tracepoints), `process.rs` (each
//! process's executable: exec/fork/exit tracepoints, `exe`/`uid` rules), `names.rs` (egress by
//! DNS name: the port-53 redirect, recvmsg/getpeername, learnt addresses); what they share,
//! `rules.rs` (the LPM lookups and port checks), `flows.rs` (counting
//! calls per flow), `owners.rs` (who owns a TCP socket; the sock_release
//! program), `service.rs` (task or
//! socket -> service), `events.rs`, `udp_peers.rs`, `packet.rs`,
//! `addr.rs`, `maps.rs`, `helpers.rs` (safe wrappers of the pointer-free
//! helpers), `linux.rs` (kernel ABI numbers).
//!
//! Every `unsafe` block says why it is sound in a `// SAFETY:` comment;
//! clippy (run for this target by `cargo xtask lint`) refuses one without.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Atomic adds to flow counters: the bpf target has no compare-and-swap, so
// core's atomic types offer no fetch_add, but the intrinsic compiles to
// the BPF atomic add instruction.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod cgroups;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod helpers;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod lifecycle;
#[cfg(target_arch = "bpf")]
mod linux;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod names;
#[cfg(target_arch = "bpf")]
mod outbound;
#[cfg(target_arch = "bpf")]
mod owners;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod rules;
#[cfg(target_arch = "bpf")]
mod service;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sockets;
#[cfg(target_arch = "bpf")]
mod sockopt;
#[cfg(target_arch = "bpf")]
mod udp_peers;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
