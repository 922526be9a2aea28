//! The daemon's HTTP endpoint (`/metrics`, `/graph`): where it listens and
//! a minimal GET. Its Prometheus text is parsed in [`crate::prometheus`].

use std::{
    collections::HashSet,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use crate::daemon::Daemon;

/// Where the daemon's metrics endpoint listens. The harness starts every
/// daemon with `--metrics-listen 127.0.0.1:0`, so the port is found the way
/// `ss -ltnp` would: the one listening TCP socket among the daemon's file
/// descriptors, looked up in `/proc/net/tcp`. A daemon with name rules
/// listens on its DNS proxy's port too: of several, the one its log says
/// it serves metrics on (`serving http://ADDR/metrics`).
#[must_use]
pub fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    let fd_dir = format!("/proc/{pid}/fd");
    let inodes: HashSet<String> = fs::read_dir(&fd_dir)
        .unwrap_or_else(|e| panic!("cannot list {fd_dir}: {e}"))
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp")
        .unwrap_or_else(|e| panic!("cannot read /proc/net/tcp: {e}"));
    let ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") || !inodes.contains(*f.get(9)?) {
                return None;
            }
            let (_, port) = f.get(1)?.split_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect();
    let log = daemon.log();
    let serving: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| ports.len() == 1 || log.contains(&format!("serving http://127.0.0.1:{p}/")))
        .collect();
    match serving.as_slice() {
        [port] => SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
        _ => panic!(
            "expected the daemon ({pid}) to serve metrics on one IPv4 TCP port, found {ports:?} listening, {serving:?} of them in its log"
        ),
    }
}

/// `GET path` over HTTP/1.0; returns the status code, the header block
/// (lower-cased) and the body.
#[must_use]
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

/// Sends `request` as written (an HTTP/1.0 request, so the server closes
/// after its answer); returns as [`http_get`] does.
#[must_use]
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String, String) {
    try_http_request(addr, request).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http_request`], saying what went wrong instead of panicking (for
/// polling a server that is still starting).
///
/// # Errors
/// A message naming the request when it cannot be sent or its answer read.
pub fn try_http_request(addr: SocketAddr, request: &str) -> Result<(u16, String, String), String> {
    let what = request.lines().next().unwrap_or_default();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    conn.write_all(request.as_bytes())
        .map_err(|e| format!("cannot send {what}: {e}"))?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .map_err(|e| format!("cannot read the response to {what}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{what}: no header block in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what}: no status code in {head:?}"))?;
    Ok((status, head.to_ascii_lowercase(), body.to_owned()))
}

/// The body of a `Transfer-Encoding: chunked` answer, its chunks joined
/// (what is not a well-formed chunk ends it).
#[must_use]
pub fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = size.split(';').next().unwrap_or_default().trim();
        let Ok(len) = usize::from_str_radix(size, 16) else {
            break;
        };
        if len == 0 || after.len() < len {
            break;
        }
        let Some(chunk) = after.get(..len) else {
            break;
        };
        out.push_str(chunk);
        rest = after[len..].trim_start_matches("\r\n");
    }
    out
}

/// `n` TCP connections to `addr` that send nothing, held until dropped (a
/// connection the server has closed is still counted: it stays open here).
/// The caller raises its own descriptor limit first
/// ([`crate::process::raise_own_nofile`]).
#[must_use]
pub fn hold_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("idle connection {i} of {n} to {addr}: {e}"))
        })
        .collect()
}
