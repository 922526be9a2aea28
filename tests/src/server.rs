//! A listener that says whom it served: `bulkhead-probe serve`.
//!
//! [`crate::Listener`] only answers; a [`Server`] also reports every peer
//! whose connection it accepted or whose datagram it received, so that a
//! test of inbound filtering can assert that a dropped peer never reached
//! the socket at all (not merely that no answer came back).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    sync::{mpsc, Arc, Mutex, PoisonError},
    thread,
    time::Duration,
};

use crate::{
    eventually::eventually,
    probe::{Probe, Proto},
    process::kill,
};

/// How long a server may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

impl Probe {
    /// Starts `bulkhead-probe serve` on `addr` (port 0 = any) and waits
    /// until it is bound. TCP: each accepted connection gets one byte; UDP:
    /// each datagram is echoed. Every peer is recorded ([`Server::peers`]).
    #[must_use]
    pub fn serve(&self, proto: Proto, addr: SocketAddr) -> Server {
        let transport = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        self.start_server(&["serve", transport, &addr.to_string()], transport, addr)
    }

    /// Starts `bulkhead-probe reflect udp` on `addr`: like [`Self::serve`],
    /// but each datagram is answered twice, by an echo from `addr` and by
    /// one from a second socket on the same address and another port (a
    /// peer the sender never sent to).
    #[must_use]
    pub fn reflect_udp(&self, addr: SocketAddr) -> Server {
        self.start_server(&["reflect", "udp", &addr.to_string()], "udp", addr)
    }

    /// Starts the probe with `args`, a command that prints `ready
    /// ADDR:PORT` once it serves (`addr` until then) and `peer ADDR:PORT`
    /// per peer, and waits for `ready`.
    pub(crate) fn start_server(
        &self,
        args: &[&str],
        transport: &'static str,
        addr: SocketAddr,
    ) -> Server {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take();
        // The guard owns the child from here, so a panic kills it.
        let mut server = Server {
            child,
            addr,
            transport,
            lines: Arc::default(),
        };
        let Some(stdout) = stdout else {
            panic!("{cmd:?}: no stdout pipe");
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = Arc::clone(&server.lines);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let _ = ready_tx.send(first);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        let first = ready_rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
        let bound = first
            .strip_prefix("ready ")
            .and_then(|a| a.trim().parse().ok());
        if let Some(bound) = bound {
            server.addr = bound;
            return server;
        }
        kill(&mut server.child);
        let mut stderr = String::new();
        if let Some(mut pipe) = server.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        panic!("{transport} server {cmd:?} did not get ready (stdout {first:?}): {stderr}");
    }

    /// Socket activation: the probe (from this probe's own cgroup: leave
    /// [`Self::in_cgroup`] unset, it is the unmanaged "init") listens on TCP
    /// `addr`, keeps the listener, and forks a child that joins cgroup
    /// `service` and serves on the inherited socket, reporting every peer
    /// like [`Self::serve`]. Returns once the child serves.
    #[must_use]
    pub fn serve_activated(&self, service: &Path, addr: SocketAddr) -> Server {
        let dir = service.to_string_lossy();
        self.start_server(
            &["activate-listen", &dir, "tcp", &addr.to_string()],
            "tcp",
            addr,
        )
    }
    /// [`Self::serve_activated`], but the child serves from a second
    /// thread and its main thread exits alone (`SYS_exit`) `after` it started:
    /// then no `/proc/PID/fd` shows the listener.
    #[must_use]
    pub fn serve_activated_leader_exits(
        &self,
        service: &Path,
        addr: SocketAddr,
        after: std::time::Duration,
    ) -> Server {
        let dir = service.to_string_lossy();
        let ms = after.as_millis().to_string();
        self.start_server(
            &[
                "activate-listen-leader-exits",
                &dir,
                "tcp",
                &addr.to_string(),
                &ms,
            ],
            "tcp",
            addr,
        )
    }
    /// [`Self::serve_activated`], but the child serves for `serving` only;
    /// then it keeps the listener as an `io_uring` fixed file and closes its
    /// descriptor (it prints `hidden`): no descriptor table shows it.
    #[must_use]
    pub fn serve_activated_then_hidden(
        &self,
        service: &Path,
        addr: SocketAddr,
        serving: std::time::Duration,
    ) -> Server {
        let dir = service.to_string_lossy();
        let ms = serving.as_millis().to_string();
        self.start_server(
            &["activate-listen-hide", &dir, "tcp", &addr.to_string(), &ms],
            "tcp",
            addr,
        )
    }
    /// A listener handed over: the probe forks a child that joins cgroup
    /// `service`, then (unmanaged, like [`Self::serve_activated`]) listens
    /// on TCP `addr`, sends the listener to the child over a Unix socket
    /// (`SCM_RIGHTS`) and closes its own copy. The child serves and
    /// reports every peer like [`Self::serve`].
    #[must_use]
    pub fn serve_passed(&self, service: &Path, addr: SocketAddr) -> Server {
        let dir = service.to_string_lossy();
        self.start_server(&["scm-listen", &dir, "tcp", &addr.to_string()], "tcp", addr)
    }
    /// `listen()` on a TCP socket never bound (the kernel picks the port,
    /// on the wildcard address: `[::]`, dual-stack, with `v6`), then serves
    /// like [`Self::serve`]. [`Server::addr`] is the wildcard and the port.
    #[must_use]
    pub fn serve_unbound(&self, v6: bool) -> Server {
        let (family, wildcard) = if v6 {
            (
                "inet6",
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            )
        } else {
            (
                "inet",
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
            )
        };
        self.start_server(&["listen-unbound", "tcp", family], "tcp", wildcard)
    }
    /// Starts `bulkhead-probe reflect-late udp` on `addr`: like
    /// [`Self::serve`], but each datagram is echoed twice, at once and again
    /// `delay` later from the same socket (an answer that comes after a
    /// pinhole should have closed); [`Server::lines`] then holds `late
    /// PEER` once that second answer went out.
    #[must_use]
    pub fn reflect_late_udp(&self, addr: SocketAddr, delay: Duration) -> Server {
        let delay = delay.as_millis().to_string();
        self.start_server(
            &["reflect-late", "udp", &addr.to_string(), &delay],
            "udp",
            addr,
        )
    }
}

/// A running `bulkhead-probe serve`; killed on `Drop`.
#[derive(Debug)]
pub struct Server {
    child: Child,
    addr: SocketAddr,
    transport: &'static str,
    /// What it printed after `ready`, read by a thread as it comes.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// The bound address (with the real port when it asked for port 0).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it serves on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far after `ready` (`peer ...`, `send-failed ...`).
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The peers served so far, in order (one per accepted connection or
    /// received datagram). IPv4 peers of a dual-stack socket are given as
    /// IPv4 (`198.51.100.3:4000`, not `[::ffff:198.51.100.3]:4000`).
    #[must_use]
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("peer "))
            .filter_map(|a| a.trim().parse::<SocketAddr>().ok())
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .collect()
    }

    /// Waits up to `timeout` for `peer` to be served; panics with what the
    /// server did report if it is not.
    pub fn wait_peer(&self, peer: SocketAddr, timeout: Duration) {
        eventually(timeout, Duration::from_millis(10), || {
            if self.peers().contains(&peer) {
                Ok(())
            } else {
                Err(())
            }
        })
        .unwrap_or_else(|()| {
            panic!(
                "{} server {} did not serve {peer} within {timeout:?}; it reported {:?}",
                self.transport,
                self.addr,
                self.lines()
            )
        });
    }

    /// Asserts that no connection or datagram from address `ip` (any port)
    /// reached the server.
    pub fn assert_never_served(&self, ip: std::net::IpAddr, why: &str) {
        let from_ip: Vec<SocketAddr> = self
            .peers()
            .into_iter()
            .filter(|p| p.ip() == ip.to_canonical())
            .collect();
        assert!(
            from_ip.is_empty(),
            "{why}: the {} server {} must never have seen {ip}, but it served {from_ip:?} \
             (all it reported: {:?})",
            self.transport,
            self.addr,
            self.lines()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
