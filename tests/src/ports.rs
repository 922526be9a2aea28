//! Finding free ports for tests that need specific, contiguous ones (port
//! ranges); everything else listens on port 0 and reads the port back.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::atomic::{AtomicU32, Ordering},
};

/// The first of `len` consecutive ports that are free for both TCP and UDP
/// on `ip` right now, searched in 20000..60000 from a start derived from the
/// pid (so two runs on one machine rarely probe the same ports) and from
/// the number of earlier calls in this process (so two tests running at
/// once do not find the same block before either has bound it). Panics if
/// none is.
#[must_use]
pub fn free_port_block(ip: IpAddr, len: u16) -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 40_000;
    // A prime stride apart: far more than any block a test asks for.
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(4099))
        % SPAN;
    let len32 = u32::from(len);
    (0..SPAN / len32)
        .filter_map(|i| u16::try_from(LOW + (start + i * len32) % (SPAN - len32)).ok())
        .find(|&base| (base..base + len).all(|port| is_free(SocketAddr::new(ip, port))))
        .unwrap_or_else(|| panic!("no {len} consecutive free ports on {ip}"))
}

fn is_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}
