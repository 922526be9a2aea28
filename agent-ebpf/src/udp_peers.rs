//! UDP pinholes of ingress-restricted services: the peers an unconnected
//! socket sent to (their answers come in) and the peers an ingress rule let
//! in (the service may answer them), keyed by (socket, peer). A pinhole
//! unused for the idle timeout is closed (the agent then removes it), and a
//! service holds at most its bound: one service's flood can neither evict
//! another's pinholes nor grow without limit. Past its bound a service's
//! new peers are still judged by the rules, datagram by datagram; they
//! only get no pinhole.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use agent_common::{UdpPeer, UdpPeerKey};
use aya_ebpf::bindings::BPF_NOEXIST;

use crate::{
    addr::{addr_field, Dest},
    helpers::now_ns,
    maps::{udp_peers_max, udp_reply_idle_ns, UDP_PEERS, UDP_PEER_COUNT, UDP_PEER_RELEASED},
};

/// The key of (socket, peer address, peer port).
#[inline(always)]
pub fn key(socket_cookie: u64, peer: Dest, port: u16) -> UdpPeerKey {
    let (addr, family) = addr_field(peer);
    UdpPeerKey {
        socket_cookie,
        addr,
        port,
        family,
        _pad: 0,
        _pad4: 0,
    }
}

/// Whether the pinhole exists for `service_id` and was used within the
/// idle timeout. One made under the policy a reload replaced is closed
/// until the agent has judged it again under the new one (it does so
/// right after the switch, and gives it the service's new id).
#[inline(always)]
pub fn is_open(key: &UdpPeerKey, service_id: u32) -> bool {
    // SAFETY: the reference is used at once, under the program's RCU read
    // lock; a concurrent update by the agent or another CPU gives the old
    // or the new time, either of which is a valid answer.
    let Some(peer) = (unsafe { UDP_PEERS.get(key) }) else {
        return false;
    };
    let now = now_ns();
    peer.service_id == service_id && now.wrapping_sub(peer.seen_ns) <= udp_reply_idle_ns()
}

/// Opens the pinhole, or refreshes it: an existing one only gets its time
/// renewed, never a new service id or origin (those are the agent's to
/// rewrite when it judges the pinhole again after a reload). A new one
/// counts against the service's bound; past it, nothing is remembered.
#[inline(always)]
pub fn open(key: &UdpPeerKey, service_id: u32, local_port: u16, origin: u8) {
    let now = now_ns();
    if let Some(existing) = UDP_PEERS.get_ptr_mut(key) {
        // SAFETY: a value of our map, updated in place.
        unsafe {
            if (*existing).service_id == service_id {
                (*existing).seen_ns = now;
            }
        }
        return;
    }
    let peer = UdpPeer {
        seen_ns: now,
        service_id,
        local_port,
        origin,
        _pad: 0,
    };
    let (Some(opened), Some(released)) = (
        UDP_PEER_COUNT.get_ptr_mut(service_id),
        UDP_PEER_RELEASED.get(service_id),
    ) else {
        return;
    };
    // SAFETY: slots of our arrays, valid under the program's RCU read lock.
    // The kernel only adds to `opened` (atomically: other CPUs open
    // pinholes of the same service) and the agent only writes `released`,
    // so no write of one side overwrites the other's. Two CPUs opening
    // pinholes of one service at the same instant may both pass the check:
    // the bound holds up to the CPUs that race.
    unsafe {
        let held = (*opened).wrapping_sub(*released);
        if held >= u64::from(udp_peers_max()) {
            return;
        }
        if UDP_PEERS.insert(key, peer, u64::from(BPF_NOEXIST)).is_ok() {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(opened, 1);
        }
    }
}
