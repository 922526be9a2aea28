//! UDP pinholes of ingress-restricted services: the peers an unconnected
//! socket sent to (their answers come in) and the peers an ingress rule let
//! in (the service may answer them), keyed by (socket, peer). A pinhole
//! unused for the idle timeout is closed (the agent then removes it), and a
//! service holds at most its bound: one service's flood can neither evict
//! another's pinholes nor grow without limit. Past its bound a service's
//! new peers are still judged by the rules, datagram by datagram; they
//! only get no pinhole.

use agent_common::{UdpPeer, UdpPeerKey};
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};

use crate::{
    maps::{udp_peers_max, udp_reply_idle_ns, UDP_PEERS, UDP_PEER_COUNT},
    programs::{set_addr, Dest},
};

/// The key of (socket, peer address, peer port).
#[inline(always)]
pub fn key(socket_cookie: u64, peer: Dest, port: u16) -> UdpPeerKey {
    let mut key = UdpPeerKey {
        socket_cookie,
        addr: [0; 16],
        port,
        family: 0,
        _pad: [0; 5],
    };
    set_addr(&mut key.addr, &mut key.family, peer);
    key
}

/// Whether the pinhole exists and was used within the idle timeout.
#[inline(always)]
pub fn is_open(key: &UdpPeerKey) -> bool {
    let Some(peer) = (unsafe { UDP_PEERS.get(key) }) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    now.wrapping_sub(peer.seen_ns) <= udp_reply_idle_ns()
}

/// Opens the pinhole, or refreshes it. A new one counts against the
/// service's bound; past it, nothing is remembered.
#[inline(always)]
pub fn open(key: &UdpPeerKey, service_id: u32, local_port: u16, origin: u8) {
    let peer = UdpPeer {
        seen_ns: unsafe { bpf_ktime_get_ns() },
        service_id,
        local_port,
        origin,
        _pad: 0,
    };
    if UDP_PEERS.insert(key, peer, u64::from(BPF_EXIST)).is_ok() {
        return; // refreshed
    }
    let Some(count) = UDP_PEER_COUNT.get_ptr_mut(service_id) else {
        return;
    };
    // SAFETY: a slot of our array. The bpf target has no atomic
    // read-modify-write in Rust's core, so two CPUs opening pinholes of one
    // service at the same instant may count one; the agent's sweep recounts
    // every few seconds, so the bound is exact between sweeps up to that.
    unsafe {
        if *count >= u64::from(udp_peers_max()) {
            return;
        }
        if UDP_PEERS.insert(key, peer, u64::from(BPF_NOEXIST)).is_ok() {
            *count += 1;
        }
    }
}
