//! The client commands: each tries one exchange and says where it failed.

use std::{
    io::{self, Read as _},
    mem,
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket,
    },
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// How long any single client step may take unless `--timeout-ms` says
/// otherwise: a denial must come at once, so a step that runs into this is
/// reported as a timeout, never a hang.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// What a client command is told (`--source`, `--timeout-ms`) and what it
/// learns on the way (its socket's local address, for the report).
pub struct Ctx {
    /// Bind the client socket to this address (port 0) before using it.
    pub source: Option<IpAddr>,
    /// The limit of each step (connect, recv).
    pub timeout: Duration,
    /// The socket's local address once the kernel has given it one.
    pub local: Option<SocketAddr>,
    /// The senders of the datagrams `udp-sendto-all` received, in order.
    pub received_from: Option<Vec<SocketAddr>>,
}

impl Default for Ctx {
    fn default() -> Self {
        Self {
            source: None,
            timeout: STEP_TIMEOUT,
            local: None,
            received_from: None,
        }
    }
}

/// A failed client step: which step, and the error it got.
pub struct Failure {
    /// `socket`, `bind`, `connect`, `send` or `recv`.
    pub stage: &'static str,
    pub err: io::Error,
}

impl Failure {
    /// Whether the step ran out of time (rather than being refused).
    pub fn timed_out(&self) -> bool {
        matches!(
            self.err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        )
    }
}

/// Maps an error to a failure at `stage`.
pub fn at(stage: &'static str) -> impl Fn(io::Error) -> Failure {
    move |err| Failure { stage, err }
}

/// `connect()` (from `--source`, if given), then reads the listener's byte.
/// A connection that does not complete within the step timeout is a
/// `connect` failure that timed out (no errno: nothing refused it).
pub fn tcp_connect(ctx: &mut Ctx, addr: SocketAddr) -> Result<(), Failure> {
    tcp_connect_with(ctx, addr, |_| Ok(()))
}

/// `tcp-connect-each A:P [B:Q ...]`: one TCP connect to each address in
/// turn from this one process (a port scan), whatever each gives: a test
/// of what the agent makes of the attempts, not of their outcomes, and
/// fast even where a process start is slow (an emulated guest).
pub fn tcp_connect_each(ctx: &mut Ctx, peers: &[SocketAddr]) {
    for &peer in peers {
        let _ = tcp_connect(ctx, peer);
    }
}

/// [`tcp_connect`], with `prepare` run on the fresh socket first (socket
/// options the connection must carry).
pub fn tcp_connect_with(
    ctx: &mut Ctx,
    addr: SocketAddr,
    prepare: impl FnOnce(&OwnedFd) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let fd = new_socket(family_of(addr), libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
    prepare(&fd)?;
    bind_source(ctx, &fd)?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` is a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) };
    let started = if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // connect() binds the socket implicitly: its port is known even if the
    // connection never completes.
    ctx.local = local_addr(&fd).or(ctx.local);
    match started {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            wait_connected(&fd, ctx.timeout).map_err(at("connect"))?;
        }
        Err(e) => return Err(at("connect")(e)),
    }
    set_blocking(&fd).map_err(at("connect"))?;
    read_one_byte(TcpStream::from(fd), ctx.timeout)
}

/// Waits until a non-blocking `connect()` completes, then returns its result.
pub fn wait_connected(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    if ready == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("not connected within {} ms", timeout.as_millis()),
        ));
    }
    let mut err: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: SO_ERROR writes one int into `err`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

pub fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the byte every test listener sends on accepting.
pub fn read_one_byte(mut stream: TcpStream, timeout: Duration) -> Result<(), Failure> {
    stream.set_read_timeout(Some(timeout)).map_err(at("recv"))?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).map_err(at("recv"))? {
        0 => Err(Failure {
            stage: "recv",
            err: io::Error::new(io::ErrorKind::UnexpectedEof, "listener closed without data"),
        }),
        _ => Ok(()),
    }
}

/// A UDP socket of `addr`'s family bound to `--source` or to the unspecified
/// address, port 0 (v6 sockets are dual-stack, so IPv4-mapped destinations
/// work).
pub fn udp_socket(ctx: &mut Ctx, addr: SocketAddr) -> Result<UdpSocket, Failure> {
    let local = match (ctx.source, addr) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        (None, SocketAddr::V6(_)) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let sock = UdpSocket::bind(local).map_err(at("socket"))?;
    ctx.local = sock.local_addr().ok();
    sock.set_read_timeout(Some(ctx.timeout))
        .map_err(at("socket"))?;
    Ok(sock)
}

pub fn udp_connect(ctx: &mut Ctx, addr: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(ctx, addr)?;
    sock.connect(addr).map_err(at("connect"))?;
    ctx.local = sock.local_addr().ok().or(ctx.local);
    sock.send(b"ping").map_err(at("send"))?;
    let mut buf = [0u8; 16];
    sock.recv(&mut buf).map_err(at("recv"))?;
    Ok(())
}

pub fn udp_sendto(ctx: &mut Ctx, addr: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(ctx, addr)?;
    sock.send_to(b"ping", addr).map_err(at("send"))?;
    let mut buf = [0u8; 16];
    sock.recv_from(&mut buf).map_err(at("recv"))?;
    Ok(())
}

/// Unconnected `sendto()`, then takes every datagram that arrives within
/// the step timeout (not only the first), recording whom each came from.
/// Succeeds once the send went out, however many answers came.
pub fn udp_sendto_all(ctx: &mut Ctx, addr: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(ctx, addr)?;
    sock.send_to(b"ping", addr).map_err(at("send"))?;
    receive_all(ctx, &sock)
}

/// Takes every datagram that arrives on `sock` within the step timeout,
/// recording whom each came from (`received_from`).
pub fn receive_all(ctx: &mut Ctx, sock: &UdpSocket) -> Result<(), Failure> {
    let deadline = Instant::now() + ctx.timeout;
    let mut senders = Vec::new();
    let mut buf = [0u8; 16];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left)).map_err(at("recv"))?;
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => senders.push(from),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(at("recv")(e)),
        }
    }
    ctx.received_from = Some(senders);
    Ok(())
}

/// Connects a UDP socket to `connected`, then `sendto()`s `other`, which a
/// connected socket may still name explicitly. Only the send is judged: a
/// connected socket takes replies from its peer alone, so no echo comes back.
pub fn udp_connect_sendto(
    ctx: &mut Ctx,
    connected: SocketAddr,
    other: SocketAddr,
) -> Result<(), Failure> {
    let sock = udp_socket(ctx, connected)?;
    sock.connect(connected).map_err(at("connect"))?;
    ctx.local = sock.local_addr().ok().or(ctx.local);
    sock.send_to(b"ping", other).map_err(at("send"))?;
    Ok(())
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` connects and sends in one call,
/// without `connect()`. Then reads the listener's byte like `tcp_connect`.
pub fn tcp_fastopen(ctx: &mut Ctx, addr: SocketAddr) -> Result<(), Failure> {
    let fd = new_socket(family_of(addr), libc::SOCK_STREAM, 0)?;
    bind_source(ctx, &fd)?;
    let stream = TcpStream::from(fd);
    // SO_SNDTIMEO bounds the wait for the handshake inside sendto().
    stream
        .set_write_timeout(Some(ctx.timeout))
        .map_err(at("socket"))?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: the buffer and the sockaddr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            stream.as_raw_fd(),
            b"x".as_ptr().cast(),
            1,
            libc::MSG_FASTOPEN,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    };
    if sent < 0 {
        return Err(at("send")(io::Error::last_os_error()));
    }
    ctx.local = stream.local_addr().ok();
    read_one_byte(stream, ctx.timeout)
}

/// Transport of a `bind` command.
#[derive(Clone, Copy)]
pub enum Transport {
    Tcp,
    Udp,
}

/// An explicit `bind()` of a fresh TCP or UDP socket to `addr` (port 0 asks
/// for an ephemeral port). Only the bind is judged; the socket is closed.
pub fn bind(ctx: &mut Ctx, transport: Transport, addr: SocketAddr) -> Result<(), Failure> {
    let kind = match transport {
        Transport::Tcp => libc::SOCK_STREAM,
        Transport::Udp => libc::SOCK_DGRAM,
    };
    let fd = new_socket(family_of(addr), kind, 0)?;
    bind_fd(&fd, addr).map_err(at("bind"))?;
    ctx.local = local_addr(&fd);
    Ok(())
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)` or its IPv6 twin
/// (`IPPROTO_ICMPV6`); only creation is judged, the socket is closed.
pub fn raw_socket(v6: bool) -> Result<(), Failure> {
    let (family, protocol) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_ICMP)
    };
    new_socket(family, libc::SOCK_RAW, protocol).map(drop)
}

/// `socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL))`, what a sniffer opens.
pub fn packet_socket() -> Result<(), Failure> {
    let all = libc::c_int::from(u16::try_from(libc::ETH_P_ALL).unwrap_or_default().to_be());
    new_socket(libc::AF_PACKET, libc::SOCK_RAW, all).map(drop)
}

/// `socket(family, kind | SOCK_CLOEXEC, protocol)`, owned at once.
pub fn new_socket(
    family: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> Result<OwnedFd, Failure> {
    // SAFETY: socket(2) has no memory arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(at("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds to `--source`, port 0, if one was given.
fn bind_source(ctx: &mut Ctx, fd: &OwnedFd) -> Result<(), Failure> {
    if let Some(ip) = ctx.source {
        bind_fd(fd, SocketAddr::new(ip, 0)).map_err(at("bind"))?;
        ctx.local = local_addr(fd);
    }
    Ok(())
}

pub fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` is a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockname()`, if the socket has an IPv4 or IPv6 address.
pub fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = socklen::<libc::sockaddr_storage>();
    // SAFETY: the kernel writes at most `len` bytes into `storage`.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            std::ptr::from_mut(&mut storage).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(std::ptr::from_ref(&storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read(std::ptr::from_ref(&storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub fn family_of(addr: SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

pub fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// `addr` as a C socket address.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: sa_family(libc::AF_INET),
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            socklen::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: sa_family(libc::AF_INET6),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            socklen::<libc::sockaddr_in6>()
        }
    };
    (storage, len)
}

fn sa_family(family: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(family).unwrap_or_default()
}
