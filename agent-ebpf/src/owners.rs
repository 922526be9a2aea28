//! Who owns an observed TCP socket (`SockInfo`): the task that connected
//! or bound it, written in its process context for the callbacks that run
//! in softirq (sock_ops reports the connection established and closed;
//! ingress asks a receiving socket's owner for `exe`/`uid` rules).
//!
//! - A connecting socket's owner goes into `SOCK_OWNERS`, a preallocated
//!   hash keyed by the socket cookie: socket storage allocated twice per
//!   connect (docs/performance.md), an entry of the table nothing. At
//!   `tcp_connect()` (sock_ops `TCP_CONNECT_CB`, before the SYN leaves,
//!   under the socket's lock) the socket asks for its state changes and its
//!   entry is marked armed, so that its close removes the entry
//!   (lifecycle.rs). A socket whose connect never got that far (refused
//!   before any packet: no route, no port) has an unarmed entry, which goes
//!   when the socket is released ([`bulkhead_sock_release`]): no packet was
//!   sent, so no callback can race that.
//! - A bound socket's owner (a listener, a UDP socket of a service with
//!   `exe`/`uid` rules) stays in socket storage, `SOCK_INFO`, which the
//!   kernel clones to every socket accepted from a listener; so does a
//!   connecting socket's when `SOCK_OWNERS` is full (reported all the
//!   same, the connect costs what it did before the table).
use agent_common::{SockInfo, FLOW_STAT_OWNERS_FULL, FLOW_STAT_OWNERS_LOST, PROTO_TCP};
use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::{bpf_get_current_uid_gid, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::SockContext,
};

use crate::{
    helpers::{current_comm, socket_cookie},
    linux::{
        E2BIG, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_WAIT1,
        TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_LISTEN,
    },
    maps::{FLOW_STATS, SOCK_INFO, SOCK_OWNERS},
    process::exe_of,
};

/// The task of `pid_tgid` (the current one) owns `sk`, which it is
/// connecting: its entry in `SOCK_OWNERS` under `cookie` (replacing one
/// of an earlier connect() of the same socket), else in socket storage.
#[inline(always)]
pub fn own_connecting(
    sk: *mut bpf_sock,
    cookie: u64,
    cgroup_id: u64,
    service_id: u32,
    mode: u8,
    pid_tgid: u64,
) {
    let mut info = SockInfo {
        cgroup_id,
        pid_tgid,
        uid_gid: bpf_get_current_uid_gid(),
        established_ns: 0,
        acked_base: 0,
        received_base: 0,
        comm: [0; 16],
        service_id,
        mode,
        passive: 0,
        peer_fin: 0,
        armed: 0,
        exe: exe_of((pid_tgid >> 32) as u32),
        peer_fin_end: 0,
        _pad2: [0; 4],
    };
    current_comm(&mut info.comm);
    match SOCK_OWNERS.insert(cookie, info, 0) {
        Ok(()) => return,
        // Full; any other error (6.1's -EBUSY of a bucket another
        // program on this CPU holds) falls back as well, uncounted.
        Err(E2BIG) => count(FLOW_STAT_OWNERS_FULL),
        Err(_) => {}
    }
    match stored(sk, true) {
        // SAFETY: the socket's own storage of our value type.
        Some(stored) => unsafe { *stored = info },
        None => count(FLOW_STAT_OWNERS_LOST),
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(count) = FLOW_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *count += 1 };
    }
}

/// `tcp_connect()` of the socket of `cookie`: if its owner is in
/// `SOCK_OWNERS`, the entry is marked armed and the caller has the socket
/// ask for its state changes, so that however it ends (established or
/// not) its close removes the entry. Returns whether it has an entry.
#[inline(always)]
pub fn arm(cookie: u64) -> bool {
    match SOCK_OWNERS.get_ptr_mut(cookie) {
        Some(info) => {
            // SAFETY: an entry of our value type; this socket's lock is
            // held (tcp_connect), and only its own callbacks write it.
            unsafe { (*info).armed = 1 };
            true
        }
        None => false,
    }
}

/// The owner record of `sk` (whose cookie is `cookie`): its
/// `SOCK_OWNERS` entry (`true` with it), else its socket storage; `None`
/// for an unobserved socket. `storage_first` looks in socket storage
/// first: for a listener, whose owner is whoever bound it (a connect that
/// failed on the same socket before its `listen()` may have left an entry
/// until its release). Everywhere else the table comes first: a socket
/// bound and then connected has both, and the connect's is the one in
/// force (an accepted socket's cookie is never in the table).
#[inline(always)]
pub fn find(sk: *mut bpf_sock, cookie: u64, storage_first: bool) -> Option<(*mut SockInfo, bool)> {
    if storage_first {
        if let Some(info) = stored(sk, false) {
            return Some((info, false));
        }
    }
    if let Some(info) = SOCK_OWNERS.get_ptr_mut(cookie) {
        return Some((info, true));
    }
    if storage_first {
        return None;
    }
    stored(sk, false).map(|info| (info, false))
}

/// Removes the `SOCK_OWNERS` entry of the socket of `cookie`; false if
/// that failed (it may be gone already).
#[inline(always)]
pub fn forget(cookie: u64) -> bool {
    SOCK_OWNERS.remove(cookie).is_ok()
}

/// The socket storage of `sk`, made if `create`.
#[inline(always)]
fn stored(sk: *mut bpf_sock, create: bool) -> Option<*mut SockInfo> {
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: sk is a non-null socket of the program's context; the map
    // is an sk_storage map of SockInfo.
    let info =
        unsafe { bpf_sk_storage_get(SOCK_INFO.as_ptr(), sk.cast(), core::ptr::null_mut(), flags) }
            .cast::<SockInfo>();
    (!info.is_null()).then_some(info)
}

/// A socket is released (its last file reference closed). An entry in
/// `SOCK_OWNERS` still unarmed belongs to a connect that never reached
/// `tcp_connect()`: no state callback will remove it, so it goes now.
/// An armed one goes at the close (lifecycle.rs), unless the socket is
/// closed already (its removal there failed: 6.1's -EBUSY): then now. A
/// socket in one of the states below got established, so it is armed
/// and open: no lookup. Kernel
/// sockets (the TCP socket under an `AF_SMC` one, MPTCP subflows) are
/// never released through this hook: an entry of theirs whose connect
/// failed before `tcp_connect()` stays (docs/events.md). Always 1:
/// releasing is never refused.
#[cgroup_sock(sock_release)]
pub fn bulkhead_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket; plain fields.
    let (protocol, state) = unsafe { ((*ctx.sock).protocol, (*ctx.sock).state) };
    if protocol != u32::from(PROTO_TCP) || armed(state) {
        return 1;
    }
    let cookie = socket_cookie(&ctx);
    // A lookup first: a delete takes the bucket's lock even to miss.
    if let Some(info) = SOCK_OWNERS.get_ptr_mut(cookie) {
        // SAFETY: an entry of our value type; no syscall runs on a
        // socket being released, an unarmed one sent no packet, and a
        // closed or listening one gets no more state callbacks.
        if unsafe { (*info).armed } == 0 || state == TCP_CLOSE || state == TCP_LISTEN {
            let _ = forget(cookie);
        }
    }
    1
}

/// States of a socket that was established and has not closed yet.
#[inline(always)]
fn armed(state: u32) -> bool {
    matches!(
        state,
        TCP_ESTABLISHED
            | TCP_FIN_WAIT1
            | TCP_FIN_WAIT2
            | TCP_CLOSE_WAIT
            | TCP_CLOSING
            | TCP_LAST_ACK
    )
}
