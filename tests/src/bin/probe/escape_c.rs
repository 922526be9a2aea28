//! The commands of the escape suite's `pinholes` tests: a reflector that
//! answers each datagram twice, at once and again after a delay (an answer
//! that comes after the pinhole should have closed), and a client that
//! sends from one unconnected socket to several peers in turn.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use crate::{
    client::{self, at, Ctx, Failure},
    listen::{ready, say},
    parse_addr, Step,
};

/// The commands of this module (see the probe's usage): `None` when
/// `command` is none of them.
pub fn dispatch(ctx: &mut Ctx, command: &[&str]) -> Result<Option<Step>, String> {
    Ok(Some(match command {
        ["reflect-late", "udp", addr, delay] => Step::Serve(reflect_late(parse_addr(addr)?, delay)),
        ["udp-sendto-each", peers @ ..] if !peers.is_empty() => {
            let peers = peers
                .iter()
                .map(|a| parse_addr(a))
                .collect::<Result<Vec<_>, _>>()?;
            Step::Client(udp_sendto_each(ctx, &peers))
        }
        _ => return Ok(None),
    }))
}

/// `reflect-late udp ADDR:PORT DELAY_MS`: prints `ready ADDR:PORT` once
/// bound; per datagram, prints `peer ADDR:PORT` and echoes it at once, then
/// `DELAY_MS` later echoes it again from the same socket and prints `late
/// ADDR:PORT` (or `send-failed ADDR:PORT ERROR` for either answer).
pub fn reflect_late(addr: SocketAddr, delay_ms: &str) -> Result<(), String> {
    let delay = delay_ms
        .parse()
        .map(Duration::from_millis)
        .map_err(|e| format!("bad delay {delay_ms:?} (want milliseconds): {e}"))?;
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    ready(sock.local_addr())?;
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        say(&format!("peer {peer}"));
        if let Err(e) = sock.send_to(&buf[..n], peer) {
            say(&format!("send-failed {peer} {e}"));
        }
        let late = match sock.try_clone() {
            Ok(late) => late,
            Err(e) => {
                say(&format!("send-failed {peer} {e}"));
                continue;
            }
        };
        let data = buf[..n].to_vec();
        thread::spawn(move || {
            thread::sleep(delay);
            match late.send_to(&data, peer) {
                Ok(_) => say(&format!("late {peer}")),
                Err(e) => say(&format!("send-failed {peer} {e}")),
            }
        });
    }
}

/// `udp-sendto-each A:P [B:Q ...]`: one unconnected UDP socket `sendto()`s
/// every address in turn (a failure is stage `send`), then takes every
/// datagram that arrives within the step timeout, like `udp-sendto-all`.
pub fn udp_sendto_each(ctx: &mut Ctx, peers: &[SocketAddr]) -> Result<(), Failure> {
    let Some(&first) = peers.first() else {
        return Err(at("send")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no peer to send to",
        )));
    };
    let sock = client::udp_socket(ctx, first)?;
    for peer in peers {
        sock.send_to(b"ping", peer).map_err(at("send"))?;
    }
    client::receive_all(ctx, &sock)
}
