//! The load generator: a forked child that enters a case's network
//! namespace and cgroup (it is then the "managed service") and times each
//! probe syscall with `clock_gettime(CLOCK_MONOTONIC)` on either side.
//!
//! A fork rather than a second binary keeps the whole bench inside
//! `xtask/src/bench/`. xtask is single-threaded when it forks (checked), so
//! the child may allocate; it never returns into the caller's code (it ends
//! with `_exit`), so the caller's cleanup guards run only in the caller.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    panic::{self, AssertUnwindSafe},
    path::Path,
};

use anyhow::{bail, Context, Result};

use super::fork::{ensure_single_threaded, join_cgroup, pipe, wait};

/// The probes' ports on 127.0.0.1 (each case has its own network namespace,
/// so they never clash with the host's).
pub const UDP_PORT: u16 = 5555;
pub const TCP_PORT: u16 = 5556;
/// Allowed by no rule: bulkhead must refuse a connect() to it, which proves
/// the cgroup is managed and the numbers include the verdict path.
pub const DENIED_PORT: u16 = 5557;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    UdpConnect,
    UdpSendto,
    TcpConnect,
}

impl Probe {
    pub const ALL: [Probe; 3] = [Probe::UdpConnect, Probe::UdpSendto, Probe::TcpConnect];

    pub fn title(self) -> &'static str {
        match self {
            Probe::UdpConnect => "UDP connect() to 127.0.0.1",
            Probe::UdpSendto => "unconnected UDP sendto() to 127.0.0.1",
            Probe::TcpConnect => "TCP connect() to a loopback listener",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Probe::UdpConnect => "UDP connect",
            Probe::UdpSendto => "sendto",
            Probe::TcpConnect => "TCP connect",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// One run of the load generator.
pub struct Spec<'a> {
    /// The case's cgroup directory (under the cgroup2 mount).
    pub cgroup: &'a Path,
    /// The case's network namespace (`/run/netns/NAME`).
    pub netns: &'a Path,
    pub udp_iterations: usize,
    pub tcp_iterations: usize,
    /// bulkhead manages the cgroup: a connect() to `DENIED_PORT` must fail.
    pub expect_denied: bool,
}

impl Spec<'_> {
    /// Calls that pass a bulkhead hook, warm-ups and checks included.
    pub fn hooked_calls(&self) -> u64 {
        Probe::ALL.into_iter().map(|p| self.calls(p)).sum()
    }

    /// Calls of one probe, warm-ups included; UDP connect also counts the
    /// two calls of `check_verdicts`.
    pub fn calls(&self, probe: Probe) -> u64 {
        let udp = (warmup_udp(self.udp_iterations) + self.udp_iterations) as u64;
        match probe {
            Probe::UdpConnect => 2 + udp,
            Probe::UdpSendto => udp,
            Probe::TcpConnect => (warmup_tcp(self.tcp_iterations) + self.tcp_iterations) as u64,
        }
    }
}

/// Warm-up calls (discarded) fill caches and the trie path.
fn warmup_udp(n: usize) -> usize {
    n / 10 + 100
}

fn warmup_tcp(n: usize) -> usize {
    n / 10 + 20
}

/// Per-call nanoseconds, indexed by `Probe`.
pub struct Samples(pub [Vec<u64>; 3]);

impl Samples {
    pub fn get(&self, probe: Probe) -> &[u64] {
        &self.0[probe.index()]
    }
}

/// Runs the probes in a forked child and returns its samples.
pub fn run(spec: &Spec<'_>) -> Result<Samples> {
    let mut runs = in_child(|| probe_all(spec).map(|s| vec![s]))?;
    match (runs.pop(), runs.is_empty()) {
        (Some(samples), true) => Ok(samples),
        _ => bail!(
            "the load generator returned {} sets of samples, not one",
            runs.len() + 1
        ),
    }
}

/// Runs `body` in a forked child and returns the samples it made (one
/// set per cgroup it probed).
pub(super) fn in_child(body: impl FnOnce() -> Result<Vec<Samples>>) -> Result<Vec<Samples>> {
    ensure_single_threaded()?;
    let (read_end, write_end) = pipe()?;
    // SAFETY: the process has one thread (checked above), so the child gets
    // a consistent copy of every lock and allocator; it leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error()).context("fork the load generator");
    }
    if pid == 0 {
        drop(read_end);
        child(body, write_end);
    }
    drop(write_end);
    let mut bytes = Vec::new();
    let read = File::from(read_end).read_to_end(&mut bytes);
    let status = wait(pid)?;
    read.context("read the load generator's results")?;
    decode(&bytes).with_context(|| format!("load generator (exit status {status})"))
}

/// The child: never returns.
fn child(body: impl FnOnce() -> Result<Vec<Samples>>, out: OwnedFd) -> ! {
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    let (code, bytes) = match result {
        Ok(Ok(samples)) => (0, encode(&samples)),
        Ok(Err(e)) => (1, error_message(&format!("{e:#}"))),
        Err(_) => (2, error_message("panicked (see stderr)")),
    };
    let _ = File::from(out).write_all(&bytes);
    // SAFETY: ends this process without running the parent's destructors.
    unsafe { libc::_exit(code) }
}

fn probe_all(spec: &Spec<'_>) -> Result<Samples> {
    enter_netns(spec.netns)?;
    // Opened before joining the cgroup, so they belong to the caller's
    // cgroup: the peer side is an unmanaged local server, and only the
    // service's own sockets are judged.
    let Peers { receiver, listener } = Peers::open()?;
    join_cgroup(spec.cgroup)?;
    check_verdicts(spec.expect_denied)?;

    let udp = spec.udp_iterations;
    let tcp = spec.tcp_iterations;
    udp_connect(warmup_udp(udp))?;
    let connect = udp_connect(udp)?;
    udp_sendto(&receiver, warmup_udp(udp))?;
    let sendto = udp_sendto(&receiver, udp)?;
    tcp_connect(&listener, warmup_tcp(tcp))?;
    let tcp = tcp_connect(&listener, tcp)?;
    Ok(Samples([connect, sendto, tcp]))
}

/// The probes' peers on 127.0.0.1: a UDP receiver and a TCP listener.
pub(super) struct Peers {
    pub receiver: UdpSocket,
    pub listener: TcpListener,
}

impl Peers {
    pub(super) fn open() -> Result<Self> {
        let localhost = Ipv4Addr::LOCALHOST;
        let receiver = UdpSocket::bind((localhost, UDP_PORT)).context("bind the UDP receiver")?;
        receiver
            .set_nonblocking(true)
            .context("UDP receiver non-blocking")?;
        let listener = TcpListener::bind((localhost, TCP_PORT)).context("bind the TCP listener")?;
        set_timeout(&listener, libc::SO_RCVTIMEO)?;
        Ok(Self { receiver, listener })
    }

    /// `n` timed calls of `probe`.
    pub(super) fn probe(&self, probe: Probe, n: usize) -> Result<Vec<u64>> {
        match probe {
            Probe::UdpConnect => udp_connect(n),
            Probe::UdpSendto => udp_sendto(&self.receiver, n),
            Probe::TcpConnect => tcp_connect(&self.listener, n),
        }
    }
}

/// The allowed probe must pass and, under bulkhead, a port no rule allows
/// must be refused with EPERM.
pub(super) fn check_verdicts(expect_denied: bool) -> Result<()> {
    let sock = socket(libc::SOCK_DGRAM)?;
    connect(&sock, UDP_PORT).with_context(|| {
        format!("UDP connect() to the allowed 127.0.0.1:{UDP_PORT} failed: the case's rules refuse the probe")
    })?;
    if expect_denied {
        match connect(&sock, DENIED_PORT) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => bail!("connect() to 127.0.0.1:{DENIED_PORT} failed with {e}, not EPERM"),
            Ok(()) => bail!(
                "bulkhead allowed 127.0.0.1:{DENIED_PORT}, which no rule allows: the bench \
                 cgroup is not managed, so the numbers would not include the verdict path"
            ),
        }
    }
    Ok(())
}

/// connect() on one UDP socket, again and again: no packet is sent, so this
/// is the syscall plus the connect4 hook (netfilter never sees it).
fn udp_connect(n: usize) -> Result<Vec<u64>> {
    let sock = socket(libc::SOCK_DGRAM)?;
    let addr = loopback(UDP_PORT);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        interruptible(i)?;
        // SAFETY: a valid socket and a sockaddr_in of the length passed.
        let ns = timed(|| unsafe {
            libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_LEN)
        })
        .context("UDP connect()")?;
        out.push(ns);
    }
    Ok(out)
}

/// sendto() of one byte on an unconnected UDP socket: the sendmsg4 hook and
/// the netfilter OUTPUT chain both see every call. The receiver is drained
/// after each call (untimed) so every send finds the same empty queue.
fn udp_sendto(receiver: &UdpSocket, n: usize) -> Result<Vec<u64>> {
    let sock = socket(libc::SOCK_DGRAM)?;
    let addr = loopback(UDP_PORT);
    let byte = [0u8; 1];
    let mut sink = [0u8; 16];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        interruptible(i)?;
        // SAFETY: a valid socket, a 1-byte buffer, a sockaddr_in of the
        // length passed.
        let ns = timed(|| unsafe {
            let sent = libc::sendto(
                sock.as_raw_fd(),
                byte.as_ptr().cast(),
                byte.len(),
                0,
                (&raw const addr).cast(),
                SOCKADDR_LEN,
            );
            if sent < 0 {
                -1
            } else {
                0
            }
        })
        .context("UDP sendto()")?;
        out.push(ns);
        while receiver.recv(&mut sink).is_ok() {}
    }
    Ok(out)
}

/// connect() of a fresh TCP socket to the listener: the whole loopback
/// handshake plus the connect4 hook and netfilter on each packet. SO_LINGER
/// 0 makes close() send RST, so no TIME_WAIT piles up and ephemeral ports
/// never run out.
fn tcp_connect(listener: &TcpListener, n: usize) -> Result<Vec<u64>> {
    let addr = loopback(TCP_PORT);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        interruptible(i)?;
        let sock = socket(libc::SOCK_STREAM)?;
        set_linger_zero(&sock)?;
        set_timeout(&sock, libc::SO_SNDTIMEO)?;
        // SAFETY: a valid socket and a sockaddr_in of the length passed.
        let ns = timed(|| unsafe {
            libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_LEN)
        })
        .context("TCP connect()")?;
        let (peer, _) = listener.accept().context("accept the probe connection")?;
        drop(sock);
        drop(peer);
        out.push(ns);
    }
    Ok(out)
}

/// Ctrl-C reaches the load generator too (same process group): it stops at
/// the next check instead of finishing a long case (100,000 iptables rules
/// take seconds per thousand calls).
fn interruptible(i: usize) -> Result<()> {
    if i.is_multiple_of(1024) {
        super::sandbox::check_interrupted()?;
    }
    Ok(())
}

/// Nanoseconds taken by `call`, a syscall returning < 0 on error.
fn timed(call: impl FnOnce() -> libc::c_int) -> io::Result<u64> {
    let start = now_ns();
    let rc = call();
    let error = (rc < 0).then(io::Error::last_os_error);
    let end = now_ns();
    match error {
        Some(e) => Err(e),
        None => Ok(end.saturating_sub(start)),
    }
}

pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

const SOCKADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn loopback(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

pub(super) fn socket(kind: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket()");
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(sock: &OwnedFd, port: u16) -> io::Result<()> {
    let addr = loopback(port);
    // SAFETY: a valid socket and a sockaddr_in of the length passed.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_LEN) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_linger_zero(sock: &OwnedFd) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(sock.as_raw_fd(), libc::SO_LINGER, &linger).context("SO_LINGER")
}

/// A 5 s timeout, so a probe that netfilter silently drops fails instead of
/// hanging the bench.
pub(super) fn set_timeout(sock: &impl AsRawFd, option: libc::c_int) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    setsockopt(sock.as_raw_fd(), option, &tv).context("socket timeout")
}

fn setsockopt<T>(fd: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0);
    // SAFETY: `value` points to a live T of `len` bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(super) fn enter_netns(netns: &Path) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: a valid namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns({})", netns.display()));
    }
    Ok(())
}

// Wire format child -> parent: b'k', a u64 count of sample sets, then per
// set and probe a u64 count and that many u64 (all little-endian); or b'e'
// then a UTF-8 message.

fn encode(runs: &[Samples]) -> Vec<u8> {
    let total: usize = runs.iter().flat_map(|s| &s.0).map(Vec::len).sum();
    let mut out = Vec::with_capacity(9 + 8 * (3 * runs.len() + total));
    out.push(b'k');
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for probe in runs.iter().flat_map(|s| &s.0) {
        out.extend_from_slice(&(probe.len() as u64).to_le_bytes());
        for ns in probe {
            out.extend_from_slice(&ns.to_le_bytes());
        }
    }
    out
}

fn error_message(message: &str) -> Vec<u8> {
    let mut out = vec![b'e'];
    out.extend_from_slice(message.as_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<Samples>> {
    match bytes.split_first() {
        Some((b'k', mut rest)) => {
            let mut next = || -> Result<u64> {
                let (word, tail) = rest.split_first_chunk::<8>().context("truncated results")?;
                rest = tail;
                Ok(u64::from_le_bytes(*word))
            };
            let runs = usize::try_from(next()?).context("run count")?;
            let mut probe = || -> Result<Vec<u64>> {
                let n = usize::try_from(next()?).context("sample count")?;
                (0..n).map(|_| next()).collect()
            };
            (0..runs)
                .map(|_| Ok(Samples([probe()?, probe()?, probe()?])))
                .collect()
        }
        Some((b'e', message)) => bail!("{}", String::from_utf8_lossy(message)),
        _ => bail!("it exited without results"),
    }
}

/// How long an empty timed region takes (two clock reads): the floor under
/// every sample, the same in every case.
pub fn timer_overhead_ns() -> u64 {
    let mut v: Vec<u64> = (0..10_000).map(|_| timed(|| 0).unwrap_or(0)).collect();
    v.sort_unstable();
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trips() {
        let runs = [
            Samples([vec![1, 2], vec![], vec![u64::MAX]]),
            Samples([vec![], vec![7], vec![]]),
        ];
        let back = decode(&encode(&runs)).expect("decodes");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, runs[0].0);
        assert_eq!(back[1].0, runs[1].0);
        let err = decode(&error_message("no cgroup")).err().expect("an error");
        assert!(format!("{err}").contains("no cgroup"));
        assert!(decode(&[]).is_err());
        assert!(decode(&encode(&runs)[..20]).is_err());
    }
}
