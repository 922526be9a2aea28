//! The kernel's list of inet sockets, over `NETLINK_SOCK_DIAG` (inet_diag).
//!
//! One dump per (family, protocol) gives, for every TCP or UDP socket of
//! this network namespace, its inode (what `/proc/PID/fd` links name), its
//! cookie (what `bpf_get_socket_cookie` returns to the packet programs), its
//! state, on Linux >= 5.7 (`INET_DIAG_CGROUP_ID`) the cgroup v2 id of the
//! cgroup it was created in (for an accepted connection: its listener's)
//! and, when asked for (`INET_DIAG_INFO`), a TCP socket's byte counters.
//! Dumps need no privilege. Used by the held-socket scan (`held`) and the
//! byte summaries of open TCP connections (`flows`).
//!
//! Written by hand: the message layout is small and fixed (linux/netlink.h,
//! linux/sock_diag.h, linux/inet_diag.h), and the one crate that speaks
//! inet_diag (netlink-packet-sock-diag) does not decode
//! `INET_DIAG_CGROUP_ID` (it surfaces as an unknown attribute) and brings
//! two more crates for one request type.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// struct nlmsghdr.
const NLMSG_HDR: usize = 16;
/// struct inet_diag_req_v2.
const REQ_LEN: usize = 56;
/// struct inet_diag_msg.
const MSG_LEN: usize = 72;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// The `struct tcp_info` attribute, and the bit that asks for it.
const INET_DIAG_INFO: u16 = 2;
pub const EXT_TCP_INFO: u8 = 1 << (INET_DIAG_INFO - 1);
/// Offsets in struct tcp_info (linux/tcp.h, stable ABI, Linux >= 4.1/4.2)
/// of tcpi_bytes_acked and tcpi_bytes_received.
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// TCP states (`include/net/tcp_states.h`), as `idiag_state` gives them.
pub const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
#[cfg(test)]
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSING: u8 = 11;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Every state of a full socket: time-wait and request sockets are not
/// full sockets (no inode, and the packet programs pass their packets).
pub const FULL_SOCKET_STATES: u32 = !((1 << TCP_TIME_WAIT) | (1 << TCP_NEW_SYN_RECV));

/// One socket of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// The socket's own address and port (`0.0.0.0`/`::` for a wildcard).
    pub local: SocketAddr,
    pub inode: u32,
    pub cookie: u64,
    pub state: u8,
    /// The cgroup v2 id of the cgroup the socket was created in; `None`
    /// on kernels that do not report it.
    pub cgroup_id: Option<u64>,
    /// A TCP socket's bytes acknowledged by the peer and bytes received
    /// (tcpi_bytes_acked, tcpi_bytes_received), when the dump asked for
    /// [`EXT_TCP_INFO`].
    pub tcp_bytes: Option<(u64, u64)>,
}

/// Dumps the sockets of `family` (`AF_INET`, `AF_INET6`) and `protocol`
/// (`IPPROTO_TCP`, `IPPROTO_UDP`) whose state is in `states` (a bit per
/// state) into `out`.
pub fn dump(family: u8, protocol: u8, states: u32, out: &mut Vec<DiagSocket>) -> io::Result<()> {
    dump_with(family, protocol, states, 0, out)
}

/// [`dump`], asking for the extensions in `ext` ([`EXT_TCP_INFO`]).
pub fn dump_with(
    family: u8,
    protocol: u8,
    states: u32,
    ext: u8,
    out: &mut Vec<DiagSocket>,
) -> io::Result<()> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = request(family, protocol, states, ext, 1);
    // SAFETY: a buffer and its length; the address is the kernel (all zero).
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // A dump comes in parts of at most a page or so each; 64 KiB holds any.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a buffer and its length. MSG_TRUNC makes a part that did
        // not fit show as longer than the buffer.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).map_err(io::Error::other)?;
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "sock_diag message of {n} bytes did not fit {} bytes",
                buf.len()
            )));
        }
        if parse(&buf[..n], out)? == Part::Done {
            return Ok(());
        }
    }
}

/// A `SOCK_DIAG_BY_FAMILY` dump request (nlmsghdr + inet_diag_req_v2).
fn request(family: u8, protocol: u8, states: u32, ext: u8, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
                                              // inet_diag_req_v2: family, protocol, ext (no extensions), pad, states,
                                              // then a zero inet_diag_sockid (48 bytes: match everything).
    b.extend_from_slice(&[family, protocol, ext, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.resize(len, 0);
    b
}

#[derive(Debug, PartialEq, Eq)]
enum Part {
    More,
    Done,
}

/// Parses one datagram of a dump: its messages go to `out`.
fn parse(mut buf: &[u8], out: &mut Vec<DiagSocket>) -> io::Result<Part> {
    while buf.len() >= NLMSG_HDR {
        let len = u32_at(buf, 0)? as usize;
        let kind = u16_at(buf, 4)?;
        if len < NLMSG_HDR || len > buf.len() {
            return Err(bad("netlink message length out of bounds"));
        }
        let payload = &buf[NLMSG_HDR..len];
        match kind {
            NLMSG_DONE => {
                // Linux puts the dump's result (0 or -errno) here.
                if payload.len() >= 4 && i32_at(payload, 0)? < 0 {
                    return Err(io::Error::from_raw_os_error(-i32_at(payload, 0)?));
                }
                return Ok(Part::Done);
            }
            NLMSG_ERROR => {
                let errno = i32_at(payload, 0)?;
                if errno == 0 {
                    return Ok(Part::Done); // an acknowledgement
                }
                return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => out.push(socket(payload)?),
            _ => {} // nothing else is sent on this socket
        }
        // Messages are 4-byte aligned.
        let next = len.next_multiple_of(4);
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(Part::More)
}

/// One inet_diag_msg and its attributes.
fn socket(msg: &[u8]) -> io::Result<DiagSocket> {
    if msg.len() < MSG_LEN {
        return Err(bad("inet_diag_msg too short"));
    }
    // idiag_family, idiag_state, idiag_timer, idiag_retrans, then the
    // sockid: sport, dport (2+2), src (16), dst (16), if (4), cookie (2 x
    // u32, low half first), then expires, rqueue, wqueue, uid, inode.
    let state = msg[1];
    let port = u16::from_be_bytes(bytes(msg, 4)?);
    let addr = if i32::from(msg[0]) == libc::AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(bytes::<16>(msg, 8)?)).to_canonical()
    } else {
        IpAddr::V4(Ipv4Addr::from(bytes::<4>(msg, 8)?))
    };
    let cookie = u64::from(u32_at(msg, 44)?) | (u64::from(u32_at(msg, 48)?) << 32);
    let inode = u32_at(msg, 68)?;
    let mut cgroup_id = None;
    let mut tcp_bytes = None;
    let mut attrs = &msg[MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0)?);
        let kind = u16_at(attrs, 2)?;
        if len < 4 || len > attrs.len() {
            return Err(bad("rtattr length out of bounds"));
        }
        // Bit 15 and 14 are NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        if kind & 0x3fff == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = Some(u64_at(attrs, 4)?);
        }
        if kind & 0x3fff == INET_DIAG_INFO && len >= 4 + TCPI_BYTES_RECEIVED + 8 {
            tcp_bytes = Some((
                u64_at(attrs, 4 + TCPI_BYTES_ACKED)?,
                u64_at(attrs, 4 + TCPI_BYTES_RECEIVED)?,
            ));
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(DiagSocket {
        local: SocketAddr::new(addr, port),
        inode,
        cookie,
        state,
        cgroup_id,
        tcp_bytes,
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
}

fn bytes<const N: usize>(b: &[u8], at: usize) -> io::Result<[u8; N]> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| bad("message too short"))
}

fn u16_at(b: &[u8], at: usize) -> io::Result<u16> {
    bytes(b, at).map(u16::from_ne_bytes)
}

fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
    bytes(b, at).map(u32::from_ne_bytes)
}

fn i32_at(b: &[u8], at: usize) -> io::Result<i32> {
    bytes(b, at).map(i32::from_ne_bytes)
}

fn u64_at(b: &[u8], at: usize) -> io::Result<u64> {
    bytes(b, at).map(u64::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, UdpSocket},
        os::fd::AsRawFd,
    };

    use super::*;

    fn inode_of(fd: i32) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
        let link = link.to_str().expect("utf-8 link");
        link.strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse().ok())
            .expect("a socket link")
    }

    fn cookie_of(fd: i32) -> u64 {
        let mut value = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: an 8-byte buffer and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn a_dump_lists_this_processs_own_listener_and_udp_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let udp = UdpSocket::bind("[::1]:0").expect("udp");
        let mut tcp = Vec::new();
        dump(
            libc::AF_INET as u8,
            libc::IPPROTO_TCP as u8,
            FULL_SOCKET_STATES,
            &mut tcp,
        )
        .expect("TCP dump");
        let inode = inode_of(listener.as_raw_fd());
        let found = tcp
            .iter()
            .find(|s| s.inode == inode)
            .expect("our listener in the dump");
        assert_eq!(found.state, TCP_LISTEN);
        assert_eq!(found.local, listener.local_addr().expect("bound"));
        assert_ne!(found.cookie, 0);
        assert_eq!(found.cookie, cookie_of(listener.as_raw_fd()));
        let mut udp6 = Vec::new();
        dump(
            libc::AF_INET6 as u8,
            libc::IPPROTO_UDP as u8,
            u32::MAX,
            &mut udp6,
        )
        .expect("UDP dump");
        let inode = inode_of(udp.as_raw_fd());
        let found = udp6
            .iter()
            .find(|s| s.inode == inode)
            .expect("our UDP socket in the dump");
        assert_eq!(found.local, udp.local_addr().expect("bound"));
        assert_eq!(found.state, TCP_CLOSE);
        assert_eq!(found.cookie, cookie_of(udp.as_raw_fd()));
        // Both sockets were made in this process's cgroup.
        if let Some(id) = found.cgroup_id {
            let ours = tcp
                .iter()
                .find(|s| s.inode == inode_of(listener.as_raw_fd()));
            assert_eq!(ours.and_then(|s| s.cgroup_id), Some(id));
        }
    }

    /// Two datagrams' worth of a real dump, as Linux 6.18 (x86_64) sent
    /// them to a process that had one TCP listener on 127.0.0.1:58561 (as
    /// root, so INET_DIAG_MARK is there too): the listener's message
    /// (cookie 0x2fb70, inode 426052, cgroup 1 = the root; attributes
    /// SHUTDOWN, MARK, CGROUP_ID, SOCKOPT), then NLMSG_DONE.
    const CAPTURED: &str = "\
        7c00000014000200010000006a300000020a0000e4c100007f00000100000000 \
        0000000000000000000000000000000000000000000000000000000070fb0200 \
        0000000000000000000000008000000000000000448006000500080000000000 \
        08000f00000000000c0015000100000000000000060016005200000014000000 \
        03000200010000006a30000000000000";

    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("hex"), 16).expect("hex"))
            .collect()
    }

    #[test]
    fn a_captured_dump_parses() {
        let buf = unhex(CAPTURED);
        let mut out = Vec::new();
        assert_eq!(parse(&buf, &mut out).expect("parses"), Part::Done);
        assert_eq!(
            out,
            vec![DiagSocket {
                local: "127.0.0.1:58561".parse().expect("addr"),
                inode: 426_052,
                cookie: 0x2fb70,
                state: TCP_LISTEN,
                cgroup_id: Some(1),
                tcp_bytes: None,
            }]
        );
    }

    #[test]
    fn a_part_without_done_asks_for_more_and_errors_are_errors() {
        let buf = unhex(CAPTURED);
        let mut out = Vec::new();
        assert_eq!(parse(&buf[..0x7c], &mut out).expect("parses"), Part::More);
        // NLMSG_ERROR carrying -ENOENT (no udp_diag, say).
        let err = unhex("24000000 0200 0000 01000000 00000000 feffffff");
        let mut padded = err.clone();
        padded.resize(0x24, 0);
        let e = parse(&padded, &mut out).expect_err("an error");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A message claiming more than the datagram holds.
        let mut short = buf[..0x7c].to_vec();
        short.truncate(0x40);
        assert!(parse(&short, &mut out).is_err());
        // An attribute running past its message.
        let mut bad_attr = buf[..0x7c].to_vec();
        bad_attr[0x58] = 0xff;
        assert!(parse(&bad_attr, &mut out).is_err());
    }

    #[test]
    fn the_request_is_what_the_kernel_expects() {
        let r = request(
            libc::AF_INET6 as u8,
            libc::IPPROTO_UDP as u8,
            u32::MAX,
            0,
            7,
        );
        assert_eq!(r.len(), 72);
        assert_eq!(u32_at(&r, 0).expect("len"), 72);
        assert_eq!(u16_at(&r, 4).expect("type"), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16_at(&r, 6).expect("flags"), 0x301);
        assert_eq!(&r[16..20], &[libc::AF_INET6 as u8, 17, 0, 0]);
        assert_eq!(u32_at(&r, 20).expect("states"), u32::MAX);
    }
}
