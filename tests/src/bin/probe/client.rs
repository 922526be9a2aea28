//! The client commands: each tries one exchange and says where it failed.

use std::{
    io::{self, Read as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

/// How long any single client step may take: a denial must come at once,
/// so a step that runs into this is reported as a timeout, never a hang.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed client step: which step, and the error it got.
pub struct Failure {
    /// `socket`, `connect`, `send` or `recv`.
    pub stage: &'static str,
    pub err: io::Error,
}

/// Maps an error to a failure at `stage`.
pub fn at(stage: &'static str) -> impl Fn(io::Error) -> Failure {
    move |err| Failure { stage, err }
}

/// `connect()`, then reads the listener's byte.
pub fn tcp_connect(addr: SocketAddr) -> Result<(), Failure> {
    let stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT).map_err(at("connect"))?;
    read_one_byte(stream)
}

/// Reads the byte every test listener sends on accepting.
fn read_one_byte(mut stream: TcpStream) -> Result<(), Failure> {
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(at("recv"))?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).map_err(at("recv"))? {
        0 => Err(Failure {
            stage: "recv",
            err: io::Error::new(io::ErrorKind::UnexpectedEof, "listener closed without data"),
        }),
        _ => Ok(()),
    }
}

/// An unbound UDP socket of `addr`'s family (v6 sockets are dual-stack, so
/// IPv4-mapped destinations work).
pub fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, Failure> {
    let local = match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let sock = UdpSocket::bind(local).map_err(at("socket"))?;
    sock.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(at("socket"))?;
    Ok(sock)
}

pub fn udp_connect(addr: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(addr)?;
    sock.connect(addr).map_err(at("connect"))?;
    sock.send(b"ping").map_err(at("send"))?;
    let mut buf = [0u8; 16];
    sock.recv(&mut buf).map_err(at("recv"))?;
    Ok(())
}

pub fn udp_sendto(addr: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(addr)?;
    sock.send_to(b"ping", addr).map_err(at("send"))?;
    let mut buf = [0u8; 16];
    sock.recv_from(&mut buf).map_err(at("recv"))?;
    Ok(())
}

/// Connects a UDP socket to `connected`, then `sendto()`s `other`, which a
/// connected socket may still name explicitly. Only the send is judged: a
/// connected socket takes replies from its peer alone, so no echo comes back.
pub fn udp_connect_sendto(connected: SocketAddr, other: SocketAddr) -> Result<(), Failure> {
    let sock = udp_socket(connected)?;
    sock.connect(connected).map_err(at("connect"))?;
    sock.send_to(b"ping", other).map_err(at("send"))?;
    Ok(())
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` connects and sends in one call,
/// without `connect()`. Then reads the listener's byte like `tcp_connect`.
pub fn tcp_fastopen(addr: SocketAddr) -> Result<(), Failure> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(at("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SO_SNDTIMEO bounds the wait for the handshake inside sendto().
    stream
        .set_write_timeout(Some(STEP_TIMEOUT))
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
    read_one_byte(stream)
}

/// `addr` as a C socket address.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
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
            std::mem::size_of::<libc::sockaddr_in>()
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
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (
        storage,
        libc::socklen_t::try_from(len).unwrap_or(libc::socklen_t::MAX),
    )
}

fn sa_family(family: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(family).unwrap_or_default()
}
