//! Running `bulkhead-probe`: clients inside a service's cgroup, listeners on
//! loopback or inside a "remote host" namespace.
//!
//! Only integration tests know the probe's path
//! (`env!("CARGO_BIN_EXE_bulkhead-probe")`), so they hand it to [`Probe::new`].

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::{
    process::{kill, output_with_timeout},
    server::Server,
};

/// A client step takes at most 3 s (the probe's own limit) per stage.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a listener may take to print `ready`.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// How a probe runs: the binary, and optionally the cgroup it joins, the
/// network namespace it enters first, the source address its client
/// sockets bind to and the limit of each client step.
#[derive(Debug, Clone)]
pub struct Probe {
    bin: PathBuf,
    cgroup: Option<PathBuf>,
    netns: Option<String>,
    source: Option<IpAddr>,
    step_timeout: Option<Duration>,
}

impl Probe {
    /// A probe run from the test's own cgroup and namespace (unmanaged).
    #[must_use]
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            cgroup: None,
            netns: None,
            source: None,
            step_timeout: None,
        }
    }

    /// The same probe, run inside cgroup directory `dir` (a service).
    #[must_use]
    pub fn in_cgroup(&self, dir: &Path) -> Self {
        Self {
            cgroup: Some(dir.to_path_buf()),
            ..self.clone()
        }
    }

    /// The same probe, run inside network namespace `name`.
    #[must_use]
    pub fn in_netns(&self, name: &str) -> Self {
        Self {
            netns: Some(name.to_owned()),
            ..self.clone()
        }
    }

    /// The same probe, its client sockets bound to `ip` (port 0) before
    /// they connect or send: one of several addresses of a "remote host".
    #[must_use]
    pub fn source(&self, ip: impl Into<IpAddr>) -> Self {
        Self {
            source: Some(ip.into()),
            ..self.clone()
        }
    }

    /// The same probe, each client step (connect, recv) limited to
    /// `limit` instead of the probe's default 3 s: how long a test waits
    /// for an answer that must not come.
    #[must_use]
    pub fn step_timeout(&self, limit: Duration) -> Self {
        Self {
            step_timeout: Some(limit),
            ..self.clone()
        }
    }

    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        if let Some(dir) = &self.cgroup {
            cmd.arg("--cgroup").arg(dir);
        }
        if let Some(name) = &self.netns {
            cmd.args(["--netns", name]);
        }
        if let Some(ip) = self.source {
            cmd.args(["--source", &ip.to_string()]);
        }
        if let Some(limit) = self.step_timeout {
            cmd.args(["--timeout-ms", &limit.as_millis().to_string()]);
        }
        cmd
    }

    /// TCP `connect()` to `addr`, then reads the listener's byte.
    #[must_use]
    pub fn tcp_connect(&self, addr: SocketAddr) -> Outcome {
        self.client("tcp-connect", &[addr])
    }

    /// UDP `connect()` to `addr`, `send()`, then waits for the echo.
    #[must_use]
    pub fn udp_connect(&self, addr: SocketAddr) -> Outcome {
        self.client("udp-connect", &[addr])
    }

    /// Unconnected UDP `sendto()` to `addr`, then waits for the echo.
    #[must_use]
    pub fn udp_sendto(&self, addr: SocketAddr) -> Outcome {
        self.client("udp-sendto", &[addr])
    }

    /// Unconnected UDP `sendto()` to `addr`, then every datagram that
    /// arrives within the step timeout ([`Self::step_timeout`]), not just
    /// the first: [`Outcome::received_from`] says from whom.
    #[must_use]
    pub fn udp_sendto_all(&self, addr: SocketAddr) -> Outcome {
        self.client("udp-sendto-all", &[addr])
    }

    /// TCP Fast Open: `sendto(MSG_FASTOPEN)` without `connect()`, then reads
    /// the listener's byte.
    #[must_use]
    pub fn tcp_fastopen(&self, addr: SocketAddr) -> Outcome {
        self.client("tcp-fastopen", &[addr])
    }

    /// UDP `connect()` to `connected`, then an explicit `sendto()` to `other`
    /// (only the send is judged: no echo comes back to a connected socket).
    #[must_use]
    pub fn udp_connect_sendto(&self, connected: SocketAddr, other: SocketAddr) -> Outcome {
        self.client("udp-connect-sendto", &[connected, other])
    }

    /// An explicit `bind()` of a fresh socket to `addr` (port 0: the kernel
    /// picks one); a refusal fails at stage `bind`.
    #[must_use]
    pub fn bind(&self, proto: Proto, addr: SocketAddr) -> Outcome {
        let what = match proto {
            Proto::Tcp => "tcp-bind",
            Proto::Udp => "udp-bind",
        };
        self.client(what, &[addr])
    }

    /// `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)`, or with `v6` its IPv6
    /// twin (`IPPROTO_ICMPV6`); a refusal fails at stage `socket`.
    #[must_use]
    pub fn raw_socket(&self, v6: bool) -> Outcome {
        self.run_client(&["raw-socket", if v6 { "inet6" } else { "inet" }])
    }

    /// `socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL))`; a refusal fails at
    /// stage `socket`.
    #[must_use]
    pub fn packet_socket(&self) -> Outcome {
        self.run_client(&["packet-socket"])
    }

    fn client(&self, what: &'static str, addrs: &[SocketAddr]) -> Outcome {
        let mut args = vec![what.to_owned()];
        args.extend(addrs.iter().map(ToString::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_client(&args)
    }

    fn run_client(&self, args: &[&str]) -> Outcome {
        let mut cmd = self.command();
        cmd.args(args);
        let out = output_with_timeout(&mut cmd, CLIENT_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "probe {cmd:?} could not run ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let what = match self.source {
            Some(ip) => format!("{} from {ip}", args.join(" ")),
            None => args.join(" "),
        };
        Outcome::parse(what, &stdout)
    }

    /// Starts a listener on `addr` (port 0 = any) and waits until it is bound.
    #[must_use]
    pub fn listen(&self, proto: Proto, addr: SocketAddr) -> Listener {
        let mut cmd = self.command();
        cmd.args(["listen", proto.as_str(), &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // The listener guard owns the child from here, so a panic kills it.
        let mut listener = Listener { child, addr, proto };
        listener.addr = listener.wait_bound(&cmd);
        listener
    }

    // Escape suite (ingress, noise)

    /// [`Self::tcp_connect`], its SYN (and every later packet) carrying
    /// `options`: IPv6 extension headers or IPv4 options. A refusal of the
    /// option itself fails at stage `setsockopt`.
    #[must_use]
    pub fn tcp_connect_opts(&self, options: SynOptions, addr: SocketAddr) -> Outcome {
        self.run_client(&["tcp-connect-opts", options.as_str(), &addr.to_string()])
    }

    /// [`Self::udp_sendto`], the datagram carrying `options`.
    #[must_use]
    pub fn udp_sendto_opts(&self, options: SynOptions, addr: SocketAddr) -> Outcome {
        self.run_client(&["udp-sendto-opts", options.as_str(), &addr.to_string()])
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

    /// Pinned to CPU 0, `n` fresh sockets of `proto` each `connect()` to
    /// `addr` as fast as they can: what a flood of denials looks like.
    #[must_use]
    pub fn deny_flood(&self, proto: Proto, n: u64, addr: SocketAddr) -> Flood {
        let outcome = self.run_client(&[
            "deny-flood",
            proto.as_str(),
            &n.to_string(),
            &addr.to_string(),
        ]);
        Flood::parse(&outcome)
    }
}

/// What a client probe reported.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was tried, e.g. `tcp-connect 127.0.0.1:4000`.
    pub what: String,
    /// The probe's JSON line.
    pub json: String,
    /// Whether every step succeeded.
    pub ok: bool,
    /// The failing step: `socket`, `connect`, `send` or `recv`.
    pub stage: Option<String>,
    /// The failing step's errno, if the kernel gave one.
    pub errno: Option<i32>,
    /// Whether the failing step ran out of time (nothing refused it).
    pub timed_out: bool,
    /// The client socket's own address, once the kernel gave it one (also
    /// after a connect that never completed).
    pub local: Option<SocketAddr>,
    /// For [`Probe::udp_sendto_all`]: the sender of each datagram received.
    pub received_from: Vec<SocketAddr>,
}

impl Outcome {
    fn parse(what: String, stdout: &str) -> Self {
        let line = stdout.lines().last().unwrap_or_default();
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: probe printed no JSON ({e}): {stdout:?}"));
        Self {
            ok: value.get("ok").and_then(Value::as_bool) == Some(true),
            stage: value
                .get("stage")
                .and_then(Value::as_str)
                .map(str::to_owned),
            errno: value
                .get("errno")
                .and_then(Value::as_i64)
                .and_then(|e| i32::try_from(e).ok()),
            timed_out: value.get("timed_out").and_then(Value::as_bool) == Some(true),
            local: value
                .get("local")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok()),
            received_from: value
                .get("received_from")
                .and_then(Value::as_array)
                .map(|senders| {
                    senders
                        .iter()
                        .filter_map(Value::as_str)
                        .filter_map(|a| a.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
            json: line.to_owned(),
            what,
        }
    }

    /// The client socket's local address; panics if the probe reported none.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
            .unwrap_or_else(|| panic!("`{}` reported no local address: {}", self.what, self.json))
    }

    /// Asserts the kernel refused with `EPERM` at `stage` (`socket`, `bind`,
    /// `connect`, `send`): at once, not after a timeout.
    pub fn assert_eperm_at(&self, stage: &str, why: &str) {
        assert!(
            !self.ok && self.errno == Some(libc::EPERM) && self.stage.as_deref() == Some(stage),
            "{why}: `{}` should fail with EPERM (errno {}) at {stage}, got {}",
            self.what,
            libc::EPERM,
            self.json
        );
    }

    /// Asserts the exchange got no answer at `stage` (`connect` for a TCP
    /// handshake, `recv` for a datagram) within the probe's step timeout:
    /// nothing refused it (no reset, no `EPERM`, no ICMP error), it was
    /// dropped.
    pub fn assert_timed_out(&self, stage: &str, why: &str) {
        assert!(
            !self.ok && self.timed_out && self.stage.as_deref() == Some(stage),
            "{why}: `{}` should get no answer (a timeout at {stage}), got {}",
            self.what,
            self.json
        );
    }

    /// Asserts the whole exchange went through (a denial or a timeout fails).
    pub fn assert_ok(&self, why: &str) {
        assert!(
            self.ok,
            "{why}: `{}` should be allowed, got {}",
            self.what, self.json
        );
    }

    /// Asserts the kernel refused with `EPERM` at once, at `connect()` or
    /// `sendto()` (not a timeout, not a refusal by the peer).
    pub fn assert_eperm(&self, why: &str) {
        assert!(
            !self.ok
                && self.errno == Some(libc::EPERM)
                && matches!(self.stage.as_deref(), Some("connect" | "send")),
            "{why}: `{}` should fail with EPERM (errno {}) at connect/send, got {}",
            self.what,
            libc::EPERM,
            self.json
        );
    }
}

/// A running `bulkhead-probe listen`; killed on `Drop`.
#[derive(Debug)]
pub struct Listener {
    child: Child,
    addr: SocketAddr,
    proto: Proto,
}

impl Listener {
    /// The bound address (with the real port when it asked for port 0).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The listener's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the `ready ADDR` line; panics with the probe's stderr if it
    /// exits or stays silent for [`LISTEN_TIMEOUT`].
    fn wait_bound(&mut self, cmd: &Command) -> SocketAddr {
        let Some(stdout) = self.child.stdout.take() else {
            panic!("{cmd:?}: no stdout pipe");
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(LISTEN_TIMEOUT).unwrap_or_default();
        let bound = line
            .strip_prefix("ready ")
            .and_then(|a| a.trim().parse().ok());
        if let Some(bound) = bound {
            return bound;
        }
        kill(&mut self.child);
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        panic!(
            "{} listener {cmd:?} did not get ready (stdout {line:?}): {stderr}",
            self.proto.as_str()
        );
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// Escape suite (ingress, noise): what the methods above take and return.

/// What [`Probe::tcp_connect_opts`] puts on a SYN (and
/// [`Probe::udp_sendto_opts`] on a datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynOptions {
    /// An IPv6 Hop-by-Hop Options header (`IPV6_HOPOPTS`).
    HopByHop,
    /// An IPv6 Destination Options header (`IPV6_DSTOPTS`).
    Destination,
    /// Both: a chain of two extension headers before TCP.
    HopByHopAndDestination,
    /// IPv4 options (four No-Operation options, `IP_OPTIONS`): a 24-byte
    /// IPv4 header.
    Ipv4Nops,
}

impl SynOptions {
    fn as_str(self) -> &'static str {
        match self {
            Self::HopByHop => "hop",
            Self::Destination => "dst",
            Self::HopByHopAndDestination => "hop+dst",
            Self::Ipv4Nops => "ip-nop",
        }
    }
}

/// What a [`Probe::deny_flood`] did.
#[derive(Debug, Clone)]
pub struct Flood {
    /// What was run, e.g. `deny-flood udp 5000 127.0.0.1:9`.
    pub what: String,
    /// The probe's JSON line.
    pub json: String,
    /// `connect()` calls made.
    pub attempts: u64,
    /// How many of them got `EPERM`.
    pub eperm: u64,
    /// How long the loop took.
    pub elapsed: Duration,
}

impl Flood {
    fn parse(outcome: &Outcome) -> Self {
        let value: Value = serde_json::from_str(&outcome.json).unwrap_or_default();
        let field = |name: &str| value.get(name).and_then(Value::as_u64);
        let (Some(attempts), Some(eperm), Some(ns), true) = (
            field("attempts"),
            field("eperm"),
            field("elapsed_ns"),
            outcome.ok,
        ) else {
            panic!("`{}` did not run its flood: {}", outcome.what, outcome.json);
        };
        Self {
            what: outcome.what.clone(),
            json: outcome.json.clone(),
            attempts,
            eperm,
            elapsed: Duration::from_nanos(ns),
        }
    }

    /// Asserts every one of the `n` calls got `EPERM`.
    pub fn assert_all_eperm(&self, n: u64, why: &str) {
        assert!(
            self.attempts == n && self.eperm == n,
            "{why}: all {n} connect() calls of `{}` should get EPERM, got {}",
            self.what,
            self.json
        );
    }
}
