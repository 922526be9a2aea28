//! The daemon's HTTP endpoint (`/metrics`, `/graph`): where it listens and
//! a minimal GET.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use crate::daemon::Daemon;

/// Where the daemon's metrics endpoint listens. The harness starts every
/// daemon with `--metrics-listen 127.0.0.1:0`, so the port is found the way
/// `ss -ltnp` would: the one listening TCP socket among the daemon's file
/// descriptors, looked up in `/proc/net/tcp`.
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
    match ports.as_slice() {
        [port] => SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
        _ => panic!("expected the daemon ({pid}) to listen on one IPv4 TCP port, found {ports:?}"),
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
    let what = request.lines().next().unwrap_or_default();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("set_read_timeout: {e}"));
    conn.write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("cannot send {what}: {e}"));
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("cannot read the response to {what}: {e}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no header block in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status code in {head:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
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

/// A series: metric name and its labels, sorted.
pub type SeriesKey = (String, Vec<(String, String)>);

/// Parses one sample line, `name{k="v",...} value` or `name value`, into
/// its series and its value as written (our label values hold no quotes,
/// commas or braces).
#[must_use]
pub fn parse_sample(line: &str) -> Option<(SeriesKey, String)> {
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            for pair in inner.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=')?;
                let v = v.strip_prefix('"')?.strip_suffix('"')?;
                labels.push((k.to_owned(), v.to_owned()));
            }
            labels.sort();
            (name, labels)
        }
    };
    Some(((name.to_owned(), labels), value.to_owned()))
}

/// Every sample of one `GET /metrics` of the daemon at `addr` (see
/// [`metrics_addr`]), by series; panics on a status other than 200 or a
/// line it cannot parse.
#[must_use]
pub fn scrape(addr: SocketAddr) -> BTreeMap<SeriesKey, String> {
    let (status, _head, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {text}");
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            parse_sample(line)
                .unwrap_or_else(|| panic!("unparsable sample line {line:?} in\n{text}"))
        })
        .collect()
}

/// The value of the series `name{labels}` (exactly those labels, in any
/// order) in `samples`, if there is one and it is a whole number.
#[must_use]
pub fn sample_count(
    samples: &BTreeMap<SeriesKey, String>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<u64> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels))?.parse().ok()
}

/// Scrapes the daemon at `addr` until the series `name{labels}` has a
/// value `done` accepts, and returns it; panics after `timeout` with
/// `what` and the last value (for what a daemon counts on a timer).
pub fn wait_sample(
    addr: SocketAddr,
    (name, labels): (&str, &[(&str, &str)]),
    what: &str,
    timeout: Duration,
    done: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = sample_count(&scrape(addr), name, labels);
        if let Some(value) = value.filter(|v| done(*v)) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} did not show {what} within {timeout:?}; last value: {value:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
