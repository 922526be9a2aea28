//! Sockets held for the daemon the way systemd's socket units hold them
//! (`sd_listen_fds(3)`): bound by the test, passed to each daemon it starts
//! as descriptors 3.. with `LISTEN_FDS` and `LISTEN_PID`, and kept open
//! between daemons, so that what is sent while none runs waits in them.
//! The protocol is systemd's; the holder is the test (PID 1 here is not
//! systemd).

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
};

/// A UDP socket and a TCP listener on one loopback address and port: what
/// `bulkhead-dns.socket` holds for the DNS proxy.
#[derive(Debug)]
pub struct HeldSockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl HeldSockets {
    /// Binds both on `addr` (port 0: one free port for both).
    #[must_use]
    pub fn bind(addr: SocketAddr) -> Self {
        for _ in 0..8 {
            let udp =
                UdpSocket::bind(addr).unwrap_or_else(|e| panic!("cannot bind UDP on {addr}: {e}"));
            let bound = udp.local_addr().expect("UDP socket address");
            if let Ok(tcp) = TcpListener::bind(bound) {
                return Self { udp, tcp };
            }
        }
        panic!("no port on {addr} free for both UDP and TCP")
    }

    /// Where both listen.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.udp.local_addr().expect("UDP socket address")
    }

    /// `command` run through `sh`, which sets `LISTEN_PID` to its own pid
    /// and execs the program with the sockets as descriptors 3 (UDP) and 4
    /// (TCP) and `LISTEN_FDS=2`.
    #[must_use]
    pub fn passing_to(&self, command: &Command) -> Command {
        let mut wrapped = Command::new("/bin/sh");
        wrapped
            .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
            .arg(command.get_program())
            .args(command.get_args())
            .env("LISTEN_FDS", "2");
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        let (udp, tcp) = (self.udp.as_raw_fd(), self.tcp.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, dup2) on descriptors this process holds open.
        unsafe {
            wrapped.pre_exec(move || {
                // Copies above 4 first, so that neither source is 3 or 4
                // (dup2 onto itself would keep close-on-exec).
                let high_udp = libc::fcntl(udp, libc::F_DUPFD, 10);
                let high_tcp = libc::fcntl(tcp, libc::F_DUPFD, 10);
                if high_udp < 0
                    || high_tcp < 0
                    || libc::dup2(high_udp, 3) < 0
                    || libc::dup2(high_tcp, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(high_udp);
                libc::close(high_tcp);
                Ok(())
            });
        }
        wrapped
    }
}
