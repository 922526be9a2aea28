//! `listen tcp|udp ADDR:PORT`: the far end of every test connection.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
};

fn ready(local: io::Result<SocketAddr>) -> Result<(), String> {
    let local = local.map_err(|e| format!("local_addr: {e}"))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {local}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// Accepts forever; each connection gets one byte, then is closed.
pub fn listen_tcp(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    ready(listener.local_addr())?;
    for mut conn in listener.incoming().flatten() {
        // A client that already went away is not the listener's problem.
        let _ = conn.write_all(b"k");
    }
    Ok(())
}

/// Echoes every datagram back to its sender, forever.
pub fn listen_udp(addr: SocketAddr) -> Result<(), String> {
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    ready(sock.local_addr())?;
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}
