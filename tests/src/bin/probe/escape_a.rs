//! The escape suite's client commands for socket kinds and egress paths
//! (usage in main.rs): each tries one technique a compromised service would
//! use to get around its policy, and says at which step it failed.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    ptr, thread,
    time::Duration,
};

use io_uring::{opcode, squeue, types, IoUring};
use libc::c_int;

use crate::{
    client::{self, at, Ctx, Failure},
    parse_addr, Step,
};

/// The commands of this module (see the probe's usage): `None` when
/// `command` is none of them.
pub fn dispatch(ctx: &mut Ctx, command: &[&str]) -> Result<Option<Step>, String> {
    Ok(Some(match command {
        ["socket", family, kind, proto] => Step::Client(socket(
            self::family(family)?,
            self::kind(kind)?,
            self::protocol(proto)?,
        )),
        ["proto-connect", kind, proto, addr] => Step::Client(proto_connect(
            ctx,
            self::kind(kind)?,
            self::protocol(proto)?,
            parse_addr(addr)?,
        )),
        ["proto-sendto", proto, addr] => {
            Step::Client(proto_sendto(ctx, self::protocol(proto)?, parse_addr(addr)?))
        }
        ["listen-udplite", addr] => Step::Serve(listen_udplite(parse_addr(addr)?)),
        ["ping", ip] => Step::Client(ping(ctx, self::ip(ip)?, true)),
        ["ping-sendto", ip] => Step::Client(ping(ctx, self::ip(ip)?, false)),
        ["udp-cmsg", cmsg, addr] => {
            Step::Client(udp_cmsg(ctx, &Cmsg::named(cmsg)?, parse_addr(addr)?))
        }
        ["ip-options-lsrr", hop, addr] => {
            Step::Client(lsrr_setsockopt(ctx, self::ip4(hop)?, parse_addr(addr)?))
        }
        ["ipv6-rthdr", hop, addr] => {
            Step::Client(rthdr_setsockopt(ctx, self::ip6(hop)?, parse_addr(addr)?))
        }
        ["retopts-sendmsg", hop, addr] => {
            Step::Client(retopts_sendmsg(ctx, self::ip4(hop)?, parse_addr(addr)?))
        }
        ["udp-unspec-sendto", a, b] => {
            Step::Client(udp_unspec_sendto(ctx, parse_addr(a)?, parse_addr(b)?))
        }
        ["tcp-connect-via", via @ ("thread" | "fork" | "vfork"), addr] => {
            Step::Client(tcp_connect_via(ctx, via, parse_addr(addr)?))
        }
        ["drop-privs-move", dir] => Step::Client(drop_privs_move(ctx, Path::new(dir), None)),
        ["drop-privs-move", dir, addr] => Step::Client(drop_privs_move(
            ctx,
            Path::new(dir),
            Some(parse_addr(addr)?),
        )),
        ["scm-rights", dir, how, addr] => Step::Client(scm_rights(
            ctx,
            Path::new(dir),
            &Passed::named(how)?,
            parse_addr(addr)?,
        )),
        ["uring-connect", mode, addr] => {
            Step::Client(uring_connect(ctx, uring_flags(mode)?, parse_addr(addr)?))
        }
        ["uring-sendmsg", mode, addr] => {
            Step::Client(uring_sendmsg(ctx, uring_flags(mode)?, parse_addr(addr)?))
        }
        _ => return Ok(None),
    }))
}

/// `SOCK_DCCP`, `IPPROTO_L2TP` and `UDP_SEGMENT` (not in the libc crate
/// for glibc targets).
const SOCK_DCCP: c_int = 6;
const IPPROTO_L2TP: c_int = 115;
const UDP_SEGMENT: c_int = 103;
/// `IPOPT_LSRR`: loose source and record route.
const IPOPT_LSRR: u8 = 0x83;
/// `IPV6_SRCRT_TYPE_4`: a segment routing header.
const IPV6_SRCRT_TYPE_4: u8 = 4;
/// The uid and gid `drop-privs-move` becomes (`nobody`/`nogroup`).
const NOBODY: u32 = 65534;
/// What every datagram client sends (and the echo listener returns).
const PING: &[u8] = b"ping";

/// `inet` or `inet6`.
pub fn family(s: &str) -> Result<c_int, String> {
    match s {
        "inet" => Ok(libc::AF_INET),
        "inet6" => Ok(libc::AF_INET6),
        _ => Err(format!("bad family {s:?} (want inet or inet6)")),
    }
}

/// A socket type by name.
pub fn kind(s: &str) -> Result<c_int, String> {
    match s {
        "stream" => Ok(libc::SOCK_STREAM),
        "dgram" => Ok(libc::SOCK_DGRAM),
        "seqpacket" => Ok(libc::SOCK_SEQPACKET),
        "raw" => Ok(libc::SOCK_RAW),
        "dccp" => Ok(SOCK_DCCP),
        _ => Err(format!(
            "bad socket type {s:?} (want stream, dgram, seqpacket, raw or dccp)"
        )),
    }
}

/// An IP protocol by name (as `[sockets] protocols` spells it) or number.
pub fn protocol(s: &str) -> Result<c_int, String> {
    Ok(match s {
        "tcp" => libc::IPPROTO_TCP,
        "udp" => libc::IPPROTO_UDP,
        "icmp" => libc::IPPROTO_ICMP,
        "icmpv6" => libc::IPPROTO_ICMPV6,
        "sctp" => libc::IPPROTO_SCTP,
        "dccp" => libc::IPPROTO_DCCP,
        "udplite" => libc::IPPROTO_UDPLITE,
        "mptcp" => libc::IPPROTO_MPTCP,
        "l2tp" => IPPROTO_L2TP,
        _ => s.parse().map_err(|_| {
            format!("bad protocol {s:?} (want a number or tcp, udp, icmp, icmpv6, sctp, dccp, udplite, mptcp, l2tp)")
        })?,
    })
}

/// An IPv4 or IPv6 address.
pub fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|e| format!("bad IP address {s:?}: {e}"))
}

/// An IPv4 address.
pub fn ip4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|e| format!("bad IPv4 address {s:?}: {e}"))
}

/// An IPv6 address.
pub fn ip6(s: &str) -> Result<Ipv6Addr, String> {
    s.parse()
        .map_err(|e| format!("bad IPv6 address {s:?}: {e}"))
}

/// `socket(family, kind, protocol)`: only creation is judged.
pub fn socket(family: c_int, kind: c_int, protocol: c_int) -> Result<(), Failure> {
    client::new_socket(family, kind, protocol).map(drop)
}

/// A socket of `kind`/`protocol` connected to `addr`, then one exchange
/// (see [`exchange`]).
pub fn proto_connect(
    ctx: &mut Ctx,
    kind: c_int,
    protocol: c_int,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let fd = client::new_socket(client::family_of(addr), kind, protocol)?;
    connect_exchange(ctx, fd, kind, addr)
}

/// An unconnected datagram socket of `protocol`: `sendto()` `addr`, then
/// waits for the echo.
pub fn proto_sendto(ctx: &mut Ctx, protocol: c_int, addr: SocketAddr) -> Result<(), Failure> {
    let fd = client::new_socket(client::family_of(addr), libc::SOCK_DGRAM, protocol)?;
    sendto_echo(ctx, &UdpSocket::from(fd), addr)
}

/// Connects `fd` (a socket of `kind`) to `addr`, then exchanges: a stream
/// reads the listener's byte, a datagram socket sends and waits for the
/// echo.
fn connect_exchange(
    ctx: &mut Ctx,
    fd: OwnedFd,
    kind: c_int,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let connected = connect_fd(&fd, addr, ctx.timeout);
    // connect() binds the socket implicitly, even when it fails later.
    ctx.local = client::local_addr(&fd).or(ctx.local);
    connected.map_err(at("connect"))?;
    if kind == libc::SOCK_STREAM {
        return client::read_one_byte(TcpStream::from(fd), ctx.timeout);
    }
    let sock = UdpSocket::from(fd);
    sock.send(PING).map_err(at("send"))?;
    recv_echo(&sock, ctx.timeout)
}

/// `sendto()` `addr` from `sock`, then waits for the echo.
fn sendto_echo(ctx: &mut Ctx, sock: &UdpSocket, addr: SocketAddr) -> Result<(), Failure> {
    sock.send_to(PING, addr).map_err(at("sendto"))?;
    ctx.local = sock.local_addr().ok().or(ctx.local);
    recv_echo(sock, ctx.timeout)
}

/// Waits up to `timeout` for one datagram.
fn recv_echo(sock: &UdpSocket, timeout: Duration) -> Result<(), Failure> {
    sock.set_read_timeout(Some(timeout)).map_err(at("recv"))?;
    let mut buf = [0u8; 64];
    sock.recv(&mut buf).map_err(at("recv"))?;
    Ok(())
}

/// A `connect()` that gives up after `timeout` (a denial comes at once).
fn connect_fd(fd: &OwnedFd, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    set_nonblocking(fd)?;
    let (storage, len) = client::sockaddr(addr);
    // SAFETY: `storage` is a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), ptr::from_ref(&storage).cast(), len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        client::wait_connected(fd, timeout)?;
    }
    client::set_blocking(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `listen-udplite ADDR`: a UDP-Lite echo listener (a UDP socket does not
/// receive UDP-Lite). Prints `ready ADDR:PORT`, then echoes forever.
pub fn listen_udplite(addr: SocketAddr) -> Result<(), String> {
    let fd = client::new_socket(
        client::family_of(addr),
        libc::SOCK_DGRAM,
        libc::IPPROTO_UDPLITE,
    )
    .map_err(|f| format!("socket(udplite): {}", f.err))?;
    client::bind_fd(&fd, addr).map_err(|e| format!("bind udplite {addr}: {e}"))?;
    let sock = UdpSocket::from(fd);
    let local = sock.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {local}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    drop(out);
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            // A sender that went away is not the listener's problem.
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}

/// An ICMP echo from a ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP` or
/// `IPPROTO_ICMPV6`) to `ip`: `connect()` then `send()` when `connect`,
/// else an unconnected `sendto()`; then waits for the echo reply.
pub fn ping(ctx: &mut Ctx, ip: IpAddr, connect: bool) -> Result<(), Failure> {
    let (family, protocol, request, reply) = match ip {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8, 0),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128, 129),
    };
    let sock = UdpSocket::from(client::new_socket(family, libc::SOCK_DGRAM, protocol)?);
    let to = SocketAddr::new(ip, 0);
    // Type, code, checksum and identifier (the kernel fills both), sequence 1.
    let echo = [request, 0, 0, 0, 0, 0, 0, 1, b'b', b'h'];
    if connect {
        sock.connect(to).map_err(at("connect"))?;
        sock.send(&echo).map_err(at("send"))?;
    } else {
        sock.send_to(&echo, to).map_err(at("sendto"))?;
    }
    ctx.local = sock.local_addr().ok();
    sock.set_read_timeout(Some(ctx.timeout))
        .map_err(at("recv"))?;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).map_err(at("recv"))?;
    if n < 8 || buf[0] != reply {
        return Err(at("recv")(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an echo reply (ICMP type {})", buf[0]),
        )));
    }
    Ok(())
}

/// One control message: level, type and data.
pub struct Cmsg {
    level: c_int,
    kind: c_int,
    data: Vec<u8>,
}

impl Cmsg {
    /// `tos` (`IP_TOS`), `pktinfo` (`IP_PKTINFO`, all zero: no change),
    /// `tclass` (`IPV6_TCLASS`) or `segment` (`UDP_SEGMENT`, 4-byte segments).
    pub fn named(s: &str) -> Result<Self, String> {
        let (level, kind, data) = match s {
            "tos" => (
                libc::IPPROTO_IP,
                libc::IP_TOS,
                0x10_i32.to_ne_bytes().to_vec(),
            ),
            "pktinfo" => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                vec![0; mem::size_of::<libc::in_pktinfo>()],
            ),
            "tclass" => (
                libc::IPPROTO_IPV6,
                libc::IPV6_TCLASS,
                0x10_i32.to_ne_bytes().to_vec(),
            ),
            "segment" => (libc::SOL_UDP, UDP_SEGMENT, 4_u16.to_ne_bytes().to_vec()),
            _ => {
                return Err(format!(
                    "bad control message {s:?} (want tos, pktinfo, tclass or segment)"
                ))
            }
        };
        Ok(Self { level, kind, data })
    }

    /// `IP_RETOPTS` carrying a loose source route through `hop`.
    fn retopts(hop: Ipv4Addr) -> Self {
        Self {
            level: libc::IPPROTO_IP,
            kind: libc::IP_RETOPTS,
            data: lsrr(hop).to_vec(),
        }
    }

    /// `SCM_RIGHTS` passing `fd`.
    fn rights(fd: RawFd) -> Self {
        Self {
            level: libc::SOL_SOCKET,
            kind: libc::SCM_RIGHTS,
            data: fd.to_ne_bytes().to_vec(),
        }
    }
}

/// A UDP socket connected to `addr` (an allowed peer), then `sendmsg()`
/// without a destination but with control message `cmsg`, then waits for
/// the echo. With `UDP_SEGMENT` the 8-byte payload leaves as two datagrams.
pub fn udp_cmsg(ctx: &mut Ctx, cmsg: &Cmsg, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    sock.connect(addr).map_err(at("connect"))?;
    ctx.local = sock.local_addr().ok().or(ctx.local);
    sendmsg(sock.as_raw_fd(), None, Some(cmsg), b"pingpong").map_err(at("sendmsg"))?;
    recv_echo(&sock, ctx.timeout)
}

/// `sendmsg()` of `payload` on `fd`, to `to` if given, with one control
/// message if given.
fn sendmsg(
    fd: RawFd,
    to: Option<SocketAddr>,
    cmsg: Option<&Cmsg>,
    payload: &[u8],
) -> io::Result<()> {
    // u64s: aligned for cmsghdr, 128 bytes (more than any message here).
    let mut control = [0_u64; 16];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let name = to.map(client::sockaddr);
    // SAFETY: all-zero is a valid msghdr (no name, no data, no control).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    if let Some((storage, len)) = &name {
        msg.msg_name = ptr::from_ref(storage).cast_mut().cast();
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if let Some(cmsg) = cmsg {
        let len = u32::try_from(cmsg.data.len()).unwrap_or(u32::MAX);
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic.
        let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(len), libc::CMSG_LEN(len)) };
        let space = usize::try_from(space).unwrap_or(usize::MAX);
        if space > mem::size_of_val(&control) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "control message too large",
            ));
        }
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes, so the first
        // header and its `len` data bytes fit.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&raw const msg);
            (*hdr).cmsg_level = cmsg.level;
            (*hdr).cmsg_type = cmsg.kind;
            (*hdr).cmsg_len = usize::try_from(cmsg_len).unwrap_or(usize::MAX);
            ptr::copy_nonoverlapping(cmsg.data.as_ptr(), libc::CMSG_DATA(hdr), cmsg.data.len());
        }
    }
    // SAFETY: every pointer in `msg` is valid for the lengths it gives.
    if unsafe { libc::sendmsg(fd, &raw const msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4 loose source route whose first hop is `hop` (and no further
/// hop), padded to 8 bytes: what `IP_OPTIONS` and `IP_RETOPTS` take.
fn lsrr(hop: Ipv4Addr) -> [u8; 8] {
    let [a, b, c, d] = hop.octets();
    [IPOPT_LSRR, 7, 4, a, b, c, d, 0]
}

/// An IPv6 segment routing header (type 4) with two segments: `hop` first,
/// then the destination (the kernel writes it into segment 0).
fn srh(hop: Ipv6Addr) -> [u8; 40] {
    let mut h = [0_u8; 40];
    // Next header (the kernel's), length in 8-byte units past the first 8,
    // type, segments left, last entry; flags and tag stay 0.
    h[..5].copy_from_slice(&[0, 4, IPV6_SRCRT_TYPE_4, 1, 1]);
    h[24..].copy_from_slice(&hop.octets());
    h
}

fn setsockopt_bytes(fd: RawFd, level: c_int, name: c_int, value: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `value` is valid for `len` bytes.
    if unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setsockopt(IP_OPTIONS)` with a loose source route through `hop` on a
/// UDP socket, then `sendto()` `addr`. Only the steps are judged: the
/// datagram leaves for `hop`, which does not forward it.
pub fn lsrr_setsockopt(ctx: &mut Ctx, hop: Ipv4Addr, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    setsockopt_bytes(
        sock.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_OPTIONS,
        &lsrr(hop),
    )
    .map_err(at("setsockopt"))?;
    sock.send_to(PING, addr).map_err(at("sendto"))?;
    ctx.local = sock.local_addr().ok();
    Ok(())
}

/// `setsockopt(IPV6_RTHDR)` with a segment routing header through `hop`
/// on a UDP socket, then `sendto()` `addr` (only the steps are judged).
pub fn rthdr_setsockopt(ctx: &mut Ctx, hop: Ipv6Addr, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    setsockopt_bytes(
        sock.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_RTHDR,
        &srh(hop),
    )
    .map_err(at("setsockopt"))?;
    sock.send_to(PING, addr).map_err(at("sendto"))?;
    ctx.local = sock.local_addr().ok();
    Ok(())
}

/// Unconnected `sendmsg()` to `addr` with an `IP_RETOPTS` control message
/// routing the datagram through `hop` first (only the send is judged).
pub fn retopts_sendmsg(ctx: &mut Ctx, hop: Ipv4Addr, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    sendmsg(
        sock.as_raw_fd(),
        Some(addr),
        Some(&Cmsg::retopts(hop)),
        PING,
    )
    .map_err(at("sendmsg"))?;
    ctx.local = sock.local_addr().ok();
    Ok(())
}

/// A UDP socket `connect()`ed to `allowed`, dissolved with
/// `connect(AF_UNSPEC)`, then `sendto()` `other` and wait for the echo.
pub fn udp_unspec_sendto(
    ctx: &mut Ctx,
    allowed: SocketAddr,
    other: SocketAddr,
) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, allowed)?;
    sock.connect(allowed).map_err(at("connect"))?;
    // SAFETY: all-zero is a valid sockaddr; only its family matters.
    let mut unspec: libc::sockaddr = unsafe { mem::zeroed() };
    unspec.sa_family = libc::sa_family_t::try_from(libc::AF_UNSPEC).unwrap_or_default();
    // SAFETY: `unspec` is a valid sockaddr of the length given.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &raw const unspec,
            client::socklen::<libc::sockaddr>(),
        )
    };
    if rc != 0 {
        return Err(at("disconnect")(io::Error::last_os_error()));
    }
    sendto_echo(ctx, &sock, other)
}

/// The stages a child process can report back (an index into this list;
/// `vfork_child` writes 0 and 1 itself).
const CHILD_STAGES: [&str; 7] = [
    "socket", "connect", "send", "sendto", "recv", "join", "recvmsg",
];

/// A child's outcome in 8 bytes: stage index (255: success), timed out,
/// two unused, errno (0: none).
fn encode(outcome: &Result<(), Failure>) -> [u8; 8] {
    let mut rec = [255, 0, 0, 0, 0, 0, 0, 0];
    if let Err(f) = outcome {
        rec[0] = CHILD_STAGES
            .iter()
            .position(|s| *s == f.stage)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(254);
        rec[1] = u8::from(f.timed_out());
        rec[4..].copy_from_slice(&f.err.raw_os_error().unwrap_or(0).to_ne_bytes());
    }
    rec
}

fn decode(rec: [u8; 8]) -> Result<(), Failure> {
    if rec[0] == 255 {
        return Ok(());
    }
    let stage = CHILD_STAGES
        .get(usize::from(rec[0]))
        .copied()
        .unwrap_or("child");
    let errno = i32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let err = match (errno, rec[1]) {
        (0, 0) => io::Error::other("failed in the child (no errno)"),
        (0, _) => io::Error::new(io::ErrorKind::TimedOut, "timed out in the child"),
        (e, _) => io::Error::from_raw_os_error(e),
    };
    Err(Failure { stage, err })
}

/// A fresh context for a child or thread, with the parent's settings.
fn child_ctx(ctx: &Ctx) -> Ctx {
    Ctx {
        source: ctx.source,
        timeout: ctx.timeout,
        ..Ctx::default()
    }
}

/// `tcp-connect` (connect, then read the listener's byte) from another
/// task of the probe: a `thread`, a `fork`ed child, or a `vfork` child
/// (`clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` makes, which only
/// connects: it shares the parent's memory and must not allocate).
pub fn tcp_connect_via(ctx: &mut Ctx, via: &str, addr: SocketAddr) -> Result<(), Failure> {
    match via {
        "thread" => {
            let mut inner = child_ctx(ctx);
            let outcome = thread::spawn(move || {
                let outcome = client::tcp_connect(&mut inner, addr);
                (outcome, inner.local)
            })
            .join();
            let (outcome, local) =
                outcome.map_err(|_| at("thread")(io::Error::other("the thread panicked")))?;
            ctx.local = local;
            outcome
        }
        "fork" => in_child(|| client::tcp_connect(&mut child_ctx(ctx), addr), || Ok(())),
        _ => vfork_connect(addr, ctx.timeout),
    }
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
}

/// What a `vfork` child is given and gives back (it shares our memory).
#[repr(C)]
struct VforkJob {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    timeout: libc::timeval,
    family: c_int,
    /// The outcome, as [`encode`] writes it.
    rec: [u8; 8],
}

/// The child of `vfork_connect`: `socket()`, `connect()`, nothing else (no
/// allocation, no locks: it runs on our memory while we wait).
extern "C" fn vfork_child(arg: *mut libc::c_void) -> c_int {
    // SAFETY: `arg` is the VforkJob the parent keeps alive until we exit.
    let job = unsafe { &mut *arg.cast::<VforkJob>() };
    let fail = |job: &mut VforkJob, stage: u8| {
        // SAFETY: errno is readable at any time.
        let errno = unsafe { *libc::__errno_location() };
        job.rec = [stage, 0, 0, 0, 0, 0, 0, 0];
        job.rec[4..].copy_from_slice(&errno.to_ne_bytes());
        1
    };
    // SAFETY: plain syscalls on our own fd and the job's valid buffers.
    unsafe {
        let fd = libc::socket(job.family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return fail(job, 0);
        }
        // Bounds a connect() that nobody answers (it then fails EINPROGRESS).
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            ptr::from_ref(&job.timeout).cast(),
            client::socklen::<libc::timeval>(),
        );
        if libc::connect(fd, ptr::from_ref(&job.addr).cast(), job.len) != 0 {
            return fail(job, 1);
        }
        job.rec = [255, 0, 0, 0, 0, 0, 0, 0];
        0
    }
}

/// `clone(CLONE_VM | CLONE_VFORK)`: a child on our memory that connects
/// to `addr` while we are suspended; success means it connected.
fn vfork_connect(addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let (storage, len) = client::sockaddr(addr);
    let mut job = VforkJob {
        addr: storage,
        len,
        timeout: libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        },
        family: client::family_of(addr),
        rec: [254, 0, 0, 0, 0, 0, 0, 0],
    };
    let mut stack = vec![0_u128; 4096]; // 64 KiB, 16-byte aligned
    let top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
    // SAFETY: the child runs on `stack` and writes only `job`; both outlive
    // it because CLONE_VFORK suspends us until it has exited.
    let pid = unsafe {
        libc::clone(
            vfork_child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut job).cast(),
        )
    };
    if pid < 0 {
        return Err(at("clone")(io::Error::last_os_error()));
    }
    reap(pid);
    decode(job.rec)
}

/// `drop-privs-move DIR [ADDR]`: becomes uid/gid `nobody` (no supplementary
/// groups), then writes its pid into `DIR/cgroup.procs`. Without `then`,
/// that write is the outcome (stage `move`); with it, the probe goes on
/// whatever the write did and `tcp-connect`s `then`.
pub fn drop_privs_move(ctx: &mut Ctx, dir: &Path, then: Option<SocketAddr>) -> Result<(), Failure> {
    // SAFETY: plain credential syscalls; the probe is single-threaded.
    let dropped = unsafe {
        libc::setgroups(0, ptr::null()) == 0
            && libc::setgid(NOBODY) == 0
            && libc::setuid(NOBODY) == 0
    };
    if !dropped {
        return Err(at("setuid")(io::Error::last_os_error()));
    }
    let moved = join(dir);
    match then {
        None => moved.map_err(at("move")),
        Some(addr) => client::tcp_connect(ctx, addr),
    }
}

/// Writes our pid into `DIR/cgroup.procs` (open for writing, no create).
fn join(dir: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?
        .write_all(format!("{}\n", std::process::id()).as_bytes())
}

/// What `scm-rights` does with the socket it received.
pub enum Passed {
    /// A TCP socket: connect, then read the listener's byte.
    TcpConnect,
    /// A UDP socket: `sendto()`, then wait for the echo.
    UdpSendto,
}

impl Passed {
    pub fn named(s: &str) -> Result<Self, String> {
        match s {
            "tcp-connect" => Ok(Self::TcpConnect),
            "udp-sendto" => Ok(Self::UdpSendto),
            _ => Err(format!("bad use {s:?} (want tcp-connect or udp-sendto)")),
        }
    }
}

/// `scm-rights DIR tcp-connect|udp-sendto ADDR`: the probe (unmanaged)
/// forks; the child joins cgroup `DIR`, then the parent creates a TCP or
/// UDP socket and passes it over a Unix socket (`SCM_RIGHTS`); the child
/// uses it towards `addr`. The outcome is the child's.
pub fn scm_rights(
    ctx: &mut Ctx,
    dir: &Path,
    how: &Passed,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let (ours, theirs) = UnixStream::pair().map_err(at("socketpair"))?;
    let timeout = ctx.timeout;
    let child = move || -> Result<(), Failure> {
        join(dir).map_err(at("join"))?;
        let fd = recv_fd(&theirs).map_err(at("recvmsg"))?;
        let mut inner = Ctx {
            timeout,
            ..Ctx::default()
        };
        match how {
            Passed::TcpConnect => connect_exchange(&mut inner, fd, libc::SOCK_STREAM, addr),
            Passed::UdpSendto => sendto_echo(&mut inner, &UdpSocket::from(fd), addr),
        }
    };
    // The child reports through the channel `in_child` makes; `ours` only
    // carries the socket.
    let kind = match how {
        Passed::TcpConnect => libc::SOCK_STREAM,
        Passed::UdpSendto => libc::SOCK_DGRAM,
    };
    in_child(child, move || {
        let sock = client::new_socket(client::family_of(addr), kind, 0)?;
        sendmsg(
            ours.as_raw_fd(),
            None,
            Some(&Cmsg::rights(sock.as_raw_fd())),
            b"s",
        )
        .map_err(at("sendmsg"))
    })
}

/// Runs `work` in a `fork()`ed child and returns its outcome (sent back
/// through a socket pair), while the parent runs `parent`: a parent failure
/// is the outcome (the child then sees its own channels close).
fn in_child(
    work: impl FnOnce() -> Result<(), Failure>,
    parent: impl FnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    let (mut ours, mut theirs) = UnixStream::pair().map_err(at("fork"))?;
    // SAFETY: the probe is single-threaded here, so the child may run Rust
    // code (and allocate) until it calls _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(at("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(ours);
        drop(parent);
        let _ = theirs.write_all(&encode(&work()));
        // SAFETY: _exit ends the child without running the parent's exit code.
        unsafe { libc::_exit(0) };
    }
    drop(theirs);
    drop(work);
    let sent = parent();
    let mut rec = [0_u8; 8];
    let read = ours.read_exact(&mut rec);
    reap(pid);
    sent?;
    read.map_err(|e| at("fork")(io::Error::other(format!("no outcome from the child: {e}"))))?;
    decode(rec)
}

/// Receives one file descriptor passed with `SCM_RIGHTS` on `sock`.
fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut control = [0_u64; 8];
    let mut byte = [0_u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control);
    // SAFETY: the buffers `msg` points to are valid for their lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg`; the header is checked before use.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&raw const msg);
        if hdr.is_null()
            || (*hdr).cmsg_level != libc::SOL_SOCKET
            || (*hdr).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::other("no SCM_RIGHTS message arrived"));
        }
        let fd = ptr::read_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Submits `entries` and waits for as many completions; returns the result
/// of the one with user data 1.
fn submit(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<i32> {
    for entry in entries {
        // SAFETY: every buffer an entry points to lives in the caller
        // until this function has collected all completions.
        unsafe { ring.submission().push(entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    ring.submit_and_wait(entries.len())?;
    ring.completion()
        .find(|c| c.user_data() == 1)
        .map(|c| c.result())
        .ok_or_else(|| io::Error::other("no io_uring completion"))
}

/// A CQE result as an outcome at `stage` (`-ECANCELED`: the linked timeout
/// fired, nothing refused it).
fn cqe(stage: &'static str, res: i32) -> Result<(), Failure> {
    match res {
        r if r >= 0 => Ok(()),
        r if -r == libc::ECANCELED => Err(at(stage)(io::Error::new(
            io::ErrorKind::TimedOut,
            "io_uring request timed out",
        ))),
        r => Err(at(stage)(io::Error::from_raw_os_error(-r))),
    }
}

/// How an `io_uring` request runs: `inline` (in the submitting task, as the
/// kernel tries first) or `worker` (`IOSQE_ASYNC`: forced onto an io-wq
/// worker thread).
pub fn uring_flags(mode: &str) -> Result<squeue::Flags, String> {
    match mode {
        "inline" => Ok(squeue::Flags::empty()),
        "worker" => Ok(squeue::Flags::ASYNC),
        _ => Err(format!(
            "bad io_uring mode {mode:?} (want inline or worker)"
        )),
    }
}

/// `IORING_OP_CONNECT` of a TCP socket to `addr` (bounded by a linked
/// timeout), then reads the listener's byte.
pub fn uring_connect(ctx: &mut Ctx, flags: squeue::Flags, addr: SocketAddr) -> Result<(), Failure> {
    let fd = client::new_socket(client::family_of(addr), libc::SOCK_STREAM, 0)?;
    let mut ring = IoUring::new(4).map_err(at("io_uring_setup"))?;
    let (storage, len) = client::sockaddr(addr);
    let limit = types::Timespec::from(ctx.timeout);
    let entries = [
        opcode::Connect::new(
            types::Fd(fd.as_raw_fd()),
            ptr::from_ref(&storage).cast(),
            len,
        )
        .build()
        .flags(flags | squeue::Flags::IO_LINK)
        .user_data(1),
        opcode::LinkTimeout::new(&raw const limit)
            .build()
            .user_data(2),
    ];
    let res = submit(&mut ring, &entries).map_err(at("io_uring_enter"))?;
    ctx.local = client::local_addr(&fd);
    cqe("connect", res)?;
    client::read_one_byte(TcpStream::from(fd), ctx.timeout)
}

/// `IORING_OP_SENDMSG` on an unconnected UDP socket to `addr`, then waits
/// for the echo.
pub fn uring_sendmsg(ctx: &mut Ctx, flags: squeue::Flags, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    let mut ring = IoUring::new(4).map_err(at("io_uring_setup"))?;
    let (storage, len) = client::sockaddr(addr);
    let mut iov = libc::iovec {
        iov_base: PING.as_ptr().cast_mut().cast(),
        iov_len: PING.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = ptr::from_ref(&storage).cast_mut().cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let entry = opcode::SendMsg::new(types::Fd(sock.as_raw_fd()), &raw const msg)
        .build()
        .flags(flags)
        .user_data(1);
    let res = submit(&mut ring, &[entry]).map_err(at("io_uring_enter"))?;
    ctx.local = sock.local_addr().ok().or(ctx.local);
    cqe("sendmsg", res)?;
    recv_echo(&sock, ctx.timeout)
}
