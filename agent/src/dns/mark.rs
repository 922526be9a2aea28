//! Each UDP query's mark (`agent_common::dns_mark`), read with the
//! datagram: the kernel's ingress program marks a query, as it reaches
//! the proxy's socket, with the service its client's entry names then,
//! and the proxy routes the query only as that service (docs/dns-names.md, "Who asked").
//!
//! Hand-written over `recvmsg(2)`: the standard library and tokio give a
//! datagram's source but no control messages, and the one needed here
//! (`SO_MARK` under `SO_RCVMARK`) is not one a socket crate parses.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd,
};

use tokio::{io::Interest, net::UdpSocket};

/// Asks the kernel for each datagram's mark (`SO_RCVMARK`, Linux 5.19).
///
/// # Errors
/// The kernel refused the option.
pub fn enable(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor, an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVMARK,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A datagram into `buf`: its length, source, and mark (0: none).
/// Cancel-safe as `recv_from` is: a datagram is read whole or left.
///
/// # Errors
/// The receive failed.
pub async fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, u32)> {
    socket
        .async_io(Interest::READABLE, || recv_once(socket, buf))
        .await
}

fn recv_once(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, u32)> {
    // SAFETY: plain C structs for which all zeros is a valid value.
    let mut source: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one control message of a u32, aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut source).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>() as _;
    // SAFETY: every pointer in `msg` is to a live buffer of the length
    // given, for the duration of the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    let len = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut mark = 0;
    // SAFETY: `msg` as the kernel filled it; the CMSG walk stays within
    // msg_controllen, and the data is read only from a message whose
    // length holds a u32.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SO_MARK
                && (*cmsg).cmsg_len as usize >= libc::CMSG_LEN(size_of::<u32>() as u32) as usize
            {
                mark = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u32>());
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((len, socket_addr(&source)?, mark))
}

/// The source address `recvmsg` wrote.
fn socket_addr(source: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match libc::c_int::from(source.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family checked).
            let a = unsafe { &*(&raw const *source).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::from((
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family checked).
            let a = unsafe { &*(&raw const *source).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        family => Err(io::Error::other(format!(
            "a datagram from address family {family}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mark a sender sets (SO_MARK needs CAP_NET_ADMIN: the tests run
    /// as root) arrives with the datagram; none arrives as 0.
    #[tokio::test]
    async fn a_datagrams_mark_comes_with_it() {
        let proxy = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        enable(&proxy).expect("SO_RCVMARK");
        let to = proxy.local_addr().expect("addr");
        let marked = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mark: libc::c_int = 0x5eed;
        // SAFETY: a valid descriptor, an int option.
        let rc = unsafe {
            libc::setsockopt(
                marked.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&raw const mark).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_MARK: {}", io::Error::last_os_error());
        marked.send_to(b"one", to).expect("send");
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        plain.send_to(b"three", to).expect("send");

        let mut buf = [0u8; 16];
        let (n, from, got) = recv_from(&proxy, &mut buf).await.expect("first");
        assert_eq!(
            (&buf[..n], from, got),
            (&b"one"[..], marked.local_addr().expect("addr"), 0x5eed)
        );
        let (n, from, got) = recv_from(&proxy, &mut buf).await.expect("second");
        assert_eq!(
            (&buf[..n], from, got),
            (&b"three"[..], plain.local_addr().expect("addr"), 0)
        );
    }
}
