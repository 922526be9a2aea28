//! `listen` and `serve`: the far end of every test connection.
//!
//! `listen tcp|udp ADDR:PORT` prints `ready ADDR:PORT` once bound, then
//! serves silently. `serve` does the same and also prints one line per peer
//! it served (`peer ADDR:PORT`, before answering it), and `send-failed
//! ADDR:PORT ERROR` when the answer could not be sent: the test can tell
//! what reached the socket, not just what came back. `reflect udp` answers
//! every datagram twice: from its own port and from a second one.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
};

pub fn ready(local: io::Result<SocketAddr>) -> Result<(), String> {
    let local = local.map_err(|e| format!("local_addr: {e}"))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {local}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// One line on stdout; a reader that went away is not the server's problem.
pub fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Accepts forever; each connection gets one byte, then is closed. With
/// `report`, each accepted peer is printed first.
pub fn listen_tcp(addr: SocketAddr, report: bool) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    serve_tcp(&listener, report)
}

/// [`listen_tcp`] on a listener made elsewhere: prints `ready ADDR:PORT`
/// (its address), then accepts forever.
pub fn serve_tcp(listener: &TcpListener, report: bool) -> Result<(), String> {
    ready(listener.local_addr())?;
    for mut conn in listener.incoming().flatten() {
        let peer = conn.peer_addr().ok();
        if let (true, Some(peer)) = (report, peer) {
            say(&format!("peer {peer}"));
        }
        // A client that already went away is not the listener's problem.
        if let (Err(e), true, Some(peer)) = (conn.write_all(b"k"), report, peer) {
            say(&format!("send-failed {peer} {e}"));
        }
    }
    Ok(())
}

/// Echoes every datagram back to its sender, forever. With `report`, each
/// sender is printed first.
pub fn listen_udp(addr: SocketAddr, report: bool) -> Result<(), String> {
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    ready(sock.local_addr())?;
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            if report {
                say(&format!("peer {peer}"));
            }
            if let (Err(e), true) = (sock.send_to(&buf[..n], peer), report) {
                say(&format!("send-failed {peer} {e}"));
            }
        }
    }
}

/// Answers every datagram twice: an echo from `addr`, and one from a second
/// socket on the same address but another port (a "reply" from a peer the
/// sender never sent to). Prints `ready ADDR:PORT` (the first socket), then
/// `peer ADDR:PORT` per datagram.
pub fn reflect_udp(addr: SocketAddr) -> Result<(), String> {
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    let other_addr = SocketAddr::new(addr.ip(), 0);
    let other = UdpSocket::bind(other_addr).map_err(|e| format!("bind udp {other_addr}: {e}"))?;
    ready(sock.local_addr())?;
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            say(&format!("peer {peer}"));
            for from in [&other, &sock] {
                if let Err(e) = from.send_to(&buf[..n], peer) {
                    say(&format!("send-failed {peer} {e}"));
                }
            }
        }
    }
}

/// `listen-http ADDR:PORT`: accepts forever; answers each connection at
/// once `HTTP/1.0 200 OK` with the body `k`, then reads the request's
/// head (up to the blank line or the client's close, at most 8 KiB, 3 s)
/// so that closing sends no reset: what `curl` needs to succeed, and one
/// byte `H` for a plain client.
pub fn listen_http(addr: SocketAddr) -> Result<(), String> {
    use std::io::Read as _;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    ready(listener.local_addr())?;
    for mut conn in listener.incoming().flatten() {
        let _ =
            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nk");
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(3)));
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    }
    Ok(())
}
