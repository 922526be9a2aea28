//! Where the DNS proxy listens: a UDP socket and a TCP listener on one
//! loopback address and port, one pair per address family.
//!
//! Bound by the agent from `[dns] listen` and `listen6`, the sockets close
//! with it: a lookup sent while the agent restarts is lost and the client
//! retries (glibc after 5 s). Passed by the service manager instead, they
//! outlive the agent: such a lookup waits in the socket (the UDP receive
//! queue, the TCP accept queue) and the next agent answers it.

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

/// UDP and TCP on the same address and port.
#[derive(Debug)]
pub struct Listening {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl Listening {
    /// Binds both on `addr`; with port 0, one free port for both (the UDP
    /// port may be taken for TCP: a few tries).
    ///
    /// # Errors
    /// The sockets cannot be bound.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let tries = if addr.port() == 0 { 8 } else { 1 };
        let mut last = None;
        for _ in 0..tries {
            let udp = UdpSocket::bind(addr)?;
            match TcpListener::bind(udp.local_addr()?) {
                Ok(tcp) => return Ok(Self { udp, tcp }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
    }

    /// The address both listen on.
    ///
    /// # Errors
    /// The socket's address cannot be read.
    pub fn addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// What is wrong with the sockets the service manager passed.
#[derive(Debug, thiserror::Error)]
pub enum PassedError {
    #[error("LISTEN_FDS: {0}")]
    Environment(io::Error),
    #[error("passed socket (fd {fd}): {problem}")]
    Socket { fd: RawFd, problem: String },
    #[error("passed sockets on {addr}: {problem} (the socket unit needs ListenDatagram= and ListenStream= on the same address)")]
    Unpaired {
        addr: SocketAddr,
        problem: &'static str,
    },
}

/// Taken once: the descriptors are ours to own from then on.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets the service manager passed (`LISTEN_PID` is this process),
/// paired by address; none if it passed none (or they were taken before).
///
/// # Errors
/// A passed descriptor is not a bound loopback UDP socket or listening
/// TCP socket, or one has no partner on its address: the agent must not
/// start half-listening.
pub fn passed() -> Result<Vec<Listening>, PassedError> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let fds: Vec<OwnedFd> = sd_notify::listen_fds()
        .map_err(PassedError::Environment)?
        // SAFETY: sd_listen_fds(3): with LISTEN_PID naming this process,
        // descriptors 3 .. 3 + LISTEN_FDS were opened for it by the
        // service manager and nothing else in the agent uses them; TAKEN
        // makes this the only place that ever owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    pair(fds)
}

/// Pairs passed sockets by address (see [`passed`]).
///
/// # Errors
/// As [`passed`].
pub fn pair(fds: Vec<OwnedFd>) -> Result<Vec<Listening>, PassedError> {
    let mut by_addr: BTreeMap<SocketAddr, (Option<UdpSocket>, Option<TcpListener>)> =
        BTreeMap::new();
    for fd in fds {
        let raw = fd.as_raw_fd();
        let problem = |problem: String| PassedError::Socket { fd: raw, problem };
        set_cloexec(raw).map_err(|e| problem(format!("cannot set close-on-exec: {e}")))?;
        let kind =
            sock_opt(raw, libc::SO_TYPE).map_err(|e| problem(format!("not a socket: {e}")))?;
        let (addr, slot) = match kind {
            libc::SOCK_DGRAM => {
                let udp = UdpSocket::from(fd);
                let addr = udp
                    .local_addr()
                    .map_err(|e| problem(format!("not an inet datagram socket: {e}")))?;
                (addr, Slot::Udp(udp))
            }
            libc::SOCK_STREAM => {
                if sock_opt(raw, libc::SO_ACCEPTCONN).unwrap_or(0) == 0 {
                    return Err(problem("a stream socket that is not listening".into()));
                }
                let tcp = TcpListener::from(fd);
                let addr = tcp
                    .local_addr()
                    .map_err(|e| problem(format!("not an inet stream socket: {e}")))?;
                (addr, Slot::Tcp(tcp))
            }
            other => {
                return Err(problem(format!(
                    "socket type {other}, not datagram or stream"
                )))
            }
        };
        if !addr.ip().is_loopback() || addr.port() == 0 {
            return Err(problem(format!(
                "bound to {addr}: the proxy listens on a loopback address and port only"
            )));
        }
        let entry = by_addr.entry(addr).or_default();
        let duplicate = match slot {
            Slot::Udp(udp) => entry.0.replace(udp).is_some(),
            Slot::Tcp(tcp) => entry.1.replace(tcp).is_some(),
        };
        if duplicate {
            return Err(PassedError::Unpaired {
                addr,
                problem: "two sockets of one type",
            });
        }
    }
    by_addr
        .into_iter()
        .map(|(addr, pair)| match pair {
            (Some(udp), Some(tcp)) => Ok(Listening { udp, tcp }),
            (Some(_), None) => Err(PassedError::Unpaired {
                addr,
                problem: "a UDP socket without a TCP listener",
            }),
            (None, _) => Err(PassedError::Unpaired {
                addr,
                problem: "a TCP listener without a UDP socket",
            }),
        })
        .collect()
}

enum Slot {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

fn sock_opt(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len point at an int and its size, as SOL_SOCKET
    // options SO_TYPE and SO_ACCEPTCONN write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The service manager passes its sockets inheritable; the agent keeps
/// them to itself.
fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, flags only.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(pairs: Vec<Listening>) -> Vec<OwnedFd> {
        pairs
            .into_iter()
            .flat_map(|l| [OwnedFd::from(l.udp), OwnedFd::from(l.tcp)])
            .collect()
    }

    #[test]
    fn passed_sockets_pair_up_by_address() {
        let v4 = Listening::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let v4_addr = v4.addr().unwrap();
        let paired = pair(fds(vec![v4])).unwrap();
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].addr().unwrap(), v4_addr);
        assert_eq!(paired[0].tcp.local_addr().unwrap(), v4_addr);
    }

    #[test]
    fn a_socket_without_its_partner_is_an_error_naming_the_address() {
        let l = Listening::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.addr().unwrap();
        let err = pair(vec![OwnedFd::from(l.udp)]).unwrap_err().to_string();
        assert!(
            err.contains(&addr.to_string()) && err.contains("without a TCP listener"),
            "{err}"
        );
    }

    #[test]
    fn a_stream_socket_that_does_not_listen_is_refused() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let err = pair(vec![OwnedFd::from(client)]).unwrap_err().to_string();
        assert!(err.contains("not listening"), "{err}");
    }

    #[test]
    fn a_socket_off_loopback_is_refused() {
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        let err = pair(vec![OwnedFd::from(udp)]).unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
    }
}
