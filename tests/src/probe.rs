//! Running `bulkhead-probe`: clients inside a service's cgroup, listeners on
//! loopback or inside a "remote host" namespace.
//!
//! Only integration tests know the probe's path
//! (`env!("CARGO_BIN_EXE_bulkhead-probe")`), so they get a probe from the
//! [`probe!`](crate::probe!) macro, which expands there.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::process::{kill, output_with_timeout};

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
    as_nobody: bool,
    source: Option<IpAddr>,
    step_timeout: Option<Duration>,
    /// `--bind SRC=DST`: files of the probe's own mount namespace.
    binds: Vec<(PathBuf, PathBuf)>,
    /// `--comm NAME`: a forged process name.
    comm: Option<String>,
}

impl Probe {
    /// A probe run from the test's own cgroup and namespace (unmanaged).
    #[must_use]
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            cgroup: None,
            netns: None,
            as_nobody: false,
            source: None,
            step_timeout: None,
            binds: Vec::new(),
            comm: None,
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

    /// The same probe, run as uid/gid 65534 once in its cgroup and
    /// namespace: a service's process that is not root.
    #[must_use]
    pub fn as_nobody(&self) -> Self {
        Self {
            as_nobody: true,
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

    /// The same probe with `src` bind-mounted over `dst` in a mount
    /// namespace of its own (e.g. its own `/etc/resolv.conf`); the host's
    /// file is untouched.
    #[must_use]
    pub fn bind_file(&self, src: &Path, dst: &Path) -> Self {
        let mut next = self.clone();
        next.binds.push((src.to_path_buf(), dst.to_path_buf()));
        next
    }

    /// The probe's binary.
    #[must_use]
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The same probe, run from `bin` instead (a copy of the probe under
    /// another path: another executable to the kernel).
    #[must_use]
    pub fn with_bin(&self, bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            ..self.clone()
        }
    }

    /// The same probe, its `comm` set to `name` (`prctl(PR_SET_NAME)`)
    /// once in its cgroup: a process that names itself what it is not.
    #[must_use]
    pub fn comm(&self, name: &str) -> Self {
        Self {
            comm: Some(name.to_owned()),
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
        if self.as_nobody {
            cmd.arg("--as-nobody");
        }
        if let Some(ip) = self.source {
            cmd.args(["--source", &ip.to_string()]);
        }
        for (src, dst) in &self.binds {
            let mut spec = src.clone().into_os_string();
            spec.push("=");
            spec.push(dst);
            cmd.arg("--bind").arg(spec);
        }
        if let Some(limit) = self.step_timeout {
            cmd.args(["--timeout-ms", &limit.as_millis().to_string()]);
        }
        if let Some(name) = &self.comm {
            cmd.args(["--comm", name]);
        }
        cmd
    }

    /// glibc's `getaddrinfo(name)`, then a TCP `connect()` to the first
    /// address it gave and a read of the listener's byte. A failed lookup
    /// fails at stage `resolve`.
    #[must_use]
    pub fn resolve_connect(&self, name: &str, port: u16) -> Outcome {
        self.run_client(&["resolve-connect", name, &port.to_string()])
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
        self.spawn_listener(&["listen", proto.as_str(), &addr.to_string()], proto, addr)
    }

    /// A TCP listener on `addr` answering each HTTP request `200 OK` with
    /// the body `k` (`listen-http`).
    #[must_use]
    pub fn listen_http(&self, addr: SocketAddr) -> Listener {
        self.spawn_listener(&["listen-http", &addr.to_string()], Proto::Tcp, addr)
    }

    fn spawn_listener(&self, args: &[&str], proto: Proto, addr: SocketAddr) -> Listener {
        let mut cmd = self.command();
        cmd.args(args)
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

    // Escape suite (sockets, egress)

    /// `socket()` only, of `AF_INET6` if `v6` else `AF_INET`: `kind` is
    /// `stream`, `dgram`, `seqpacket`, `raw` or `dccp`, `protocol` a name
    /// (`mptcp`, `sctp`, `dccp`, `udplite`, `l2tp`, ...) or a number. A
    /// refusal fails at stage `socket`.
    #[must_use]
    pub fn socket(&self, v6: bool, kind: &str, protocol: &str) -> Outcome {
        let family = if v6 { "inet6" } else { "inet" };
        self.run_client(&["socket", family, kind, protocol])
    }

    /// A socket of `kind`/`protocol` `connect()`s `addr`, then reads the
    /// listener's byte (`stream`) or sends and waits for the echo (`dgram`).
    #[must_use]
    pub fn proto_connect(&self, kind: &str, protocol: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["proto-connect", kind, protocol, &addr.to_string()])
    }

    /// An unconnected datagram socket of `protocol` `sendto()`s `addr`
    /// (stage `sendto`), then waits for the echo.
    #[must_use]
    pub fn proto_sendto(&self, protocol: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["proto-sendto", protocol, &addr.to_string()])
    }

    /// Starts a UDP-Lite echo listener on `addr` (port 0 = any).
    #[must_use]
    pub fn listen_udplite(&self, addr: SocketAddr) -> Listener {
        let mut cmd = self.command();
        cmd.args(["listen-udplite", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut listener = Listener {
            child,
            addr,
            proto: Proto::Udp,
        };
        listener.addr = listener.wait_bound(&cmd);
        listener
    }

    /// An ICMP echo from a ping socket (`SOCK_DGRAM` + `IPPROTO_ICMP`, or
    /// `IPPROTO_ICMPV6` for an IPv6 `ip`): `connect()`, `send()`, then waits
    /// for the reply. Needs [`crate::PingGroupRange`].
    #[must_use]
    pub fn ping(&self, ip: IpAddr) -> Outcome {
        self.run_client(&["ping", &ip.to_string()])
    }

    /// Like [`Self::ping`], with an unconnected `sendto()` (stage `sendto`).
    #[must_use]
    pub fn ping_sendto(&self, ip: IpAddr) -> Outcome {
        self.run_client(&["ping-sendto", &ip.to_string()])
    }

    /// A UDP socket `connect()`ed to `addr`, then `sendmsg()` without an
    /// address but with control message `cmsg` (`tos`, `pktinfo`, `tclass`
    /// or `segment`), then waits for the echo.
    #[must_use]
    pub fn udp_cmsg(&self, cmsg: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["udp-cmsg", cmsg, &addr.to_string()])
    }

    /// `setsockopt(IP_OPTIONS)` with a loose source route whose first hop is
    /// `hop` (stage `setsockopt`), then `sendto()` `addr` (stage `sendto`).
    #[must_use]
    pub fn ip_options_lsrr(&self, hop: Ipv4Addr, addr: SocketAddr) -> Outcome {
        self.run_client(&["ip-options-lsrr", &hop.to_string(), &addr.to_string()])
    }

    /// `setsockopt(IPV6_RTHDR)` with a segment routing header (type 4)
    /// whose first segment is `hop`, then `sendto()` `addr`.
    #[must_use]
    pub fn ipv6_rthdr(&self, hop: Ipv6Addr, addr: SocketAddr) -> Outcome {
        self.run_client(&["ipv6-rthdr", &hop.to_string(), &addr.to_string()])
    }

    /// Unconnected `sendmsg()` to `addr` with an `IP_RETOPTS` control
    /// message routing through `hop` first (stage `sendmsg`).
    #[must_use]
    pub fn retopts_sendmsg(&self, hop: Ipv4Addr, addr: SocketAddr) -> Outcome {
        self.run_client(&["retopts-sendmsg", &hop.to_string(), &addr.to_string()])
    }

    /// UDP `connect()` to `connected`, `connect(AF_UNSPEC)` (stage
    /// `disconnect`), then `sendto()` `other` (stage `sendto`) and waits for
    /// the echo.
    #[must_use]
    pub fn udp_unspec_sendto(&self, connected: SocketAddr, other: SocketAddr) -> Outcome {
        self.client("udp-unspec-sendto", &[connected, other])
    }

    /// [`Self::tcp_connect`] from another task: `via` is `thread`, `fork`
    /// (a `fork()`ed child) or `vfork` (a `clone(CLONE_VM | CLONE_VFORK)`
    /// child, which only connects).
    #[must_use]
    pub fn tcp_connect_via(&self, via: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["tcp-connect-via", via, &addr.to_string()])
    }

    /// Drops to uid/gid 65534, then writes its pid into `dir/cgroup.procs`:
    /// without `then` that write is the outcome (stage `move`); with it the
    /// probe goes on and [`Self::tcp_connect`]s `then`.
    #[must_use]
    pub fn drop_privs_move(&self, dir: &Path, then: Option<SocketAddr>) -> Outcome {
        let dir = dir.to_string_lossy();
        match then {
            None => self.run_client(&["drop-privs-move", &dir]),
            Some(addr) => self.run_client(&["drop-privs-move", &dir, &addr.to_string()]),
        }
    }

    /// The probe forks; the child joins cgroup `service`, and the parent
    /// (where this probe runs) passes it a fresh socket with `SCM_RIGHTS`;
    /// the child uses it towards `addr`: `how` is `tcp-connect` or
    /// `udp-sendto`. The outcome is the child's.
    #[must_use]
    pub fn scm_rights(&self, service: &Path, how: &str, addr: SocketAddr) -> Outcome {
        let dir = service.to_string_lossy();
        self.run_client(&["scm-rights", &dir, how, &addr.to_string()])
    }

    /// `IORING_OP_CONNECT` to `addr` (the completion's errno at stage
    /// `connect`), then reads the listener's byte. `mode` is `inline` (run
    /// by the submitting task) or `worker` (`IOSQE_ASYNC`: an io-wq thread).
    #[must_use]
    pub fn uring_connect(&self, mode: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["uring-connect", mode, &addr.to_string()])
    }

    /// `IORING_OP_SENDMSG` on an unconnected UDP socket to `addr` (the
    /// completion's errno at stage `sendmsg`), then waits for the echo;
    /// `mode` as for [`Self::uring_connect`].
    #[must_use]
    pub fn uring_sendmsg(&self, mode: &str, addr: SocketAddr) -> Outcome {
        self.run_client(&["uring-sendmsg", mode, &addr.to_string()])
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

    /// Like [`Self::deny_flood`], over `ports` ports from `addr`'s on in
    /// turn (a port scan: each port is a flow of its own), with a `pause`
    /// halfway (one process: the same flows go on after it). The flood's
    /// `elapsed` leaves the pause out.
    #[must_use]
    pub fn deny_scan(
        &self,
        proto: Proto,
        n: u64,
        ports: u16,
        pause: Duration,
        addr: SocketAddr,
    ) -> Flood {
        let outcome = self.run_client(&[
            "deny-scan",
            proto.as_str(),
            &n.to_string(),
            &ports.to_string(),
            &addr.to_string(),
            &pause.as_millis().to_string(),
        ]);
        Flood::parse(&outcome)
    }

    /// Like [`Self::deny_flood`], for `duration` instead of a count: a
    /// flood that lasts through something else the test does meanwhile.
    #[must_use]
    pub fn flood_for(&self, proto: Proto, duration: Duration, addr: SocketAddr) -> Flood {
        let ms = duration.as_millis().to_string();
        let outcome = self.run_client(&["deny-flood-for", proto.as_str(), &ms, &addr.to_string()]);
        Flood::parse(&outcome)
    }

    // Escape suite (pinholes)

    /// One process connects (TCP) to each of `peers` in turn, whatever each
    /// gives (a port scan); the outcome says only that it ran.
    #[must_use]
    pub fn tcp_connect_each(&self, peers: &[SocketAddr]) -> Outcome {
        self.client("tcp-connect-each", peers)
    }

    /// One unconnected UDP socket `sendto()`s each of `peers` in turn (all
    /// of one family), then takes every datagram that arrives within the
    /// step timeout ([`Self::step_timeout`]): [`Outcome::received_from`]
    /// says from whom.
    #[must_use]
    pub fn udp_sendto_each(&self, peers: &[SocketAddr]) -> Outcome {
        self.client("udp-sendto-each", peers)
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
    /// For [`Probe::udp_sendto_all`] and [`Probe::udp_sendto_each`]: the
    /// sender of each datagram received.
    pub received_from: Vec<SocketAddr>,
}

impl Outcome {
    pub(crate) fn parse(what: String, stdout: &str) -> Self {
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

    // Escape suite (sockets, egress)

    /// Asserts the step `stage` failed with `errno` (not a timeout).
    pub fn assert_errno_at(&self, errno: i32, stage: &str, why: &str) {
        assert!(
            !self.ok && self.errno == Some(errno) && self.stage.as_deref() == Some(stage),
            "{why}: `{}` should fail with errno {errno} at {stage}, got {}",
            self.what,
            self.json
        );
    }

    /// Asserts the kernel refused with `EPERM` at one of `stages`, and
    /// returns which.
    #[expect(
        clippy::must_use_candidate,
        reason = "called for its assertion; the stage is a convenience"
    )]
    pub fn assert_eperm_at_any<'a>(&self, stages: &[&'a str], why: &str) -> &'a str {
        let stage = stages
            .iter()
            .find(|s| self.stage.as_deref() == Some(**s))
            .filter(|_| !self.ok && self.errno == Some(libc::EPERM));
        let Some(stage) = stage else {
            panic!(
                "{why}: `{}` should fail with EPERM (errno {}) at one of {stages:?}, got {}",
                self.what,
                libc::EPERM,
                self.json
            );
        };
        stage
    }

    /// Asserts `socket()` failed: with `EPERM` (refused), or with
    /// `EPROTONOSUPPORT`/`ESOCKTNOSUPPORT` (the protocol is not available on
    /// this host, so there is nothing to refuse). Never a success.
    pub fn assert_refused_or_unsupported(&self, why: &str) {
        let refused = [libc::EPERM, libc::EPROTONOSUPPORT, libc::ESOCKTNOSUPPORT];
        assert!(
            !self.ok
                && self.stage.as_deref() == Some("socket")
                && self.errno.is_some_and(|e| refused.contains(&e)),
            "{why}: `{}` should fail at socket with EPERM, EPROTONOSUPPORT or \
             ESOCKTNOSUPPORT (errno {refused:?}), got {}",
            self.what,
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
    /// How many went through (audit mode, or allowed).
    pub connected: u64,
    /// How long the loop took.
    pub elapsed: Duration,
}

impl Flood {
    fn parse(outcome: &Outcome) -> Self {
        let value: Value = serde_json::from_str(&outcome.json).unwrap_or_default();
        let field = |name: &str| value.get(name).and_then(Value::as_u64);
        let (Some(attempts), Some(eperm), Some(connected), Some(ns), true) = (
            field("attempts"),
            field("eperm"),
            field("connected"),
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
            connected,
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
