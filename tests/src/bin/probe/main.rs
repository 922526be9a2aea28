//! `bulkhead-probe`: the one program the integration tests run as a "service"
//! process or as a listener on a "remote host".
//!
//! ```text
//! bulkhead-probe [--cgroup DIR] [--netns NAME] [--as-nobody] [--source IP] [--timeout-ms N]
//!                [--comm NAME] [--wait-for PATH] COMMAND
//!   tcp-connect ADDR:PORT         connect(), then read the byte the listener sends
//!   tcp-fastopen ADDR:PORT        sendto(MSG_FASTOPEN) instead of connect(), then read
//!   udp-connect ADDR:PORT         connect a UDP socket, send, wait for the echo
//!   udp-sendto ADDR:PORT          unconnected sendto(), wait for the echo
//!   udp-sendto-all ADDR:PORT      unconnected sendto(), take every datagram until the timeout
//!   udp-connect-sendto A:P B:Q    connect a UDP socket to A:P, then sendto() B:Q
//!   tcp-bind|udp-bind ADDR:PORT   bind() a fresh socket (port 0: ephemeral)
//!   raw-socket inet|inet6         socket(SOCK_RAW, IPPROTO_ICMP / IPPROTO_ICMPV6)
//!   packet-socket                 socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)
//!   listen tcp|udp ADDR:PORT      print `ready ADDR:PORT` once bound, then serve
//!   serve tcp|udp ADDR:PORT       like listen, and print `peer ADDR:PORT` per peer served
//!   reflect udp ADDR:PORT         like serve, but answer from ADDR:PORT and from a second port
//!   tcp-connect-opts KIND ADDR:PORT  tcp-connect, the SYN carrying IPv6 extension headers
//!                                 (KIND hop, dst or hop+dst) or IPv4 options (ip-nop)
//!   udp-sendto-opts KIND ADDR:PORT  udp-sendto, the datagram carrying the same
//!   activate-listen DIR tcp ADDR:PORT  socket activation: listen here, fork a child that
//!                                 joins cgroup DIR and serves (like serve) on the inherited socket
//!   scm-listen DIR tcp ADDR:PORT  fork a child that joins cgroup DIR, listen here, pass the
//!                                 listener to it over a Unix socket (SCM_RIGHTS); it serves
//!   listen-unbound tcp inet|inet6 listen() without bind() (the kernel picks the port), then serve
//!   deny-flood udp|tcp N ADDR:PORT  pinned to CPU 0, N fresh sockets connect() to ADDR:PORT;
//!                                 prints how many got EPERM (and every other errno)
//!   deny-flood-for udp|tcp MS ADDR:PORT  the same for MS milliseconds
//!   resolve-connect NAME PORT     getaddrinfo(NAME) (glibc), TCP connect to the first
//!                                 address, read the byte; a failed lookup is stage `resolve`
//!   resolve-loop NAME PORT        per stdin line N: N rounds of resolve-connect, then one
//!                                 JSON line of exact counts (connected, eperm, peers...)
//!   exec CMD ARGS...              exec CMD in the probe's cgroup and mount namespace
//!   listen-http ADDR:PORT         like listen tcp, but read each request's head and answer
//!                                 `HTTP/1.0 200 OK` with the body `k` (for curl)
//! ```
//!
//! `--bind SRC=DST` (repeatable) moves the probe into a mount namespace of
//! its own (private) and bind-mounts SRC over DST there: a service with its
//! own `/etc/resolv.conf` and `/etc/nsswitch.conf`, the host's untouched.
//!
//! Escape suite, sockets and egress (each a technique a compromised service
//! would try; a step that fails is named as its stage: `socket`, `connect`,
//! `send` (on a connected socket), `sendto`, `sendmsg`, `setsockopt`,
//! `recv`, ...):
//!
//! ```text
//!   socket inet|inet6 TYPE PROTO  socket() only; TYPE stream|dgram|seqpacket|raw|dccp,
//!                                 PROTO a number or tcp|udp|icmp|icmpv6|sctp|dccp|udplite|mptcp|l2tp
//!   proto-connect TYPE PROTO A:P  that socket connect()s A:P, then reads the byte (stream)
//!                                 or sends and waits for the echo (dgram)
//!   proto-sendto PROTO A:P        an unconnected SOCK_DGRAM socket of PROTO: sendto(), echo
//!   listen-udplite A:P            a UDP-Lite echo listener (prints `ready ADDR:PORT`)
//!   ping IP                       ping socket (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6): connect(),
//!                                 send() an echo request, wait for the reply
//!   ping-sendto IP                the same with an unconnected sendto()
//!   udp-cmsg CMSG A:P             UDP connect(A:P), then sendmsg() with no address and one
//!                                 control message: tos (IP_TOS), pktinfo (IP_PKTINFO),
//!                                 tclass (IPV6_TCLASS) or segment (UDP_SEGMENT, 2 datagrams);
//!                                 wait for the echo
//!   ip-options-lsrr HOP A:P       setsockopt(IP_OPTIONS) with a loose source route via HOP,
//!                                 then sendto() A:P (no answer awaited)
//!   ipv6-rthdr HOP A:P            setsockopt(IPV6_RTHDR) with a segment routing header
//!                                 (type 4) via HOP, then sendto() A:P (no answer awaited)
//!   retopts-sendmsg HOP A:P       unconnected sendmsg() to A:P with an IP_RETOPTS control
//!                                 message routing via HOP (no answer awaited)
//!   udp-unspec-sendto A:P B:Q     UDP connect(A:P), connect(AF_UNSPEC) (stage `disconnect`),
//!                                 then sendto() B:Q and wait for the echo
//!   tcp-connect-via thread|fork|vfork A:P
//!                                 tcp-connect from a thread, a fork()ed child, or a
//!                                 clone(CLONE_VM|CLONE_VFORK) child (which only connects)
//!   drop-privs-move DIR [A:P]     setgroups/setgid/setuid to 65534, write the own pid into
//!                                 DIR/cgroup.procs (stage `move`); with A:P go on whatever
//!                                 the write did and tcp-connect A:P
//!   scm-rights DIR tcp-connect|udp-sendto A:P
//!                                 fork; the child joins cgroup DIR; the (unmanaged) parent
//!                                 makes a TCP/UDP socket and passes it with SCM_RIGHTS; the
//!                                 child connects it / sendto()s with it; the child's outcome
//!   uring-connect MODE A:P        IORING_OP_CONNECT (the CQE's errno at stage `connect`),
//!                                 then read the byte; MODE inline (in the submitting task)
//!                                 or worker (IOSQE_ASYNC: on an io-wq worker thread)
//!   uring-sendmsg MODE A:P        IORING_OP_SENDMSG on an unconnected UDP socket (the CQE's
//!                                 errno at stage `sendmsg`), then wait for the echo
//! ```
//!
//! Escape suite, UDP reply pinholes:
//!
//! ```text
//!   reflect-late udp A:P MS       like serve, but answer each datagram twice: at once, and
//!                                 again MS milliseconds later (then print `late PEER`)
//!   udp-sendto-each A:P [B:Q ...] one unconnected UDP socket sendto()s each address in turn,
//!                                 then takes every datagram until the timeout (received_from)
//! ```
//!
//! `--comm NAME` sets the probe's `comm` (`prctl(PR_SET_NAME)`), as any
//! process can; `--wait-for PATH` prints `waiting`, then holds until PATH
//! exists (a process already running when the test makes it act). Both
//! take effect where they stand among the options.
//!
//! `--cgroup DIR` writes the probe's own pid into `DIR/cgroup.procs` before
//! any socket exists (a socket belongs to the cgroup it was created in), and
//! `--netns NAME` joins `/var/run/netns/NAME` first. `--source IP` binds a
//! client's socket to `IP` (port 0) before it connects or sends, and
//! `--timeout-ms N` sets the limit of each client step (default 3000).
//! `--as-nobody` drops to uid/gid 65534 (no supplementary groups) once the
//! options before it are applied: a service's process that is not root.
//!
//! A client command prints one JSON line, `{"ok":true,"local":"..."}` or
//! `{"ok":false,"stage":"connect","errno":1,"error":"...","timed_out":false}`,
//! and exits 0: the test judges the outcome. `local` is the socket's own
//! address once the kernel gave it one (also after a failed connect);
//! `timed_out` says a step ran out of time rather than being refused;
//! `udp-sendto-all` and `udp-sendto-each` add `received_from`, the sender of
//! each datagram. Exit 2 means the probe itself could not run (bad usage,
//! could not join the cgroup or namespace).

mod client;
mod escape_a;
mod escape_b;
mod escape_c;
mod listen;
mod resolve;

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::Duration,
};

use serde_json::json;

use crate::client::{Ctx, Failure, Transport};

const USAGE: &str = "usage: bulkhead-probe [--cgroup DIR] [--netns NAME] [--as-nobody] [--source IP] \
    [--timeout-ms N] [--comm NAME] [--wait-for PATH] [--bind SRC=DST]... (resolve-connect|resolve-loop NAME PORT | exec CMD ARGS... \
    | tcp-connect|tcp-fastopen|udp-connect|udp-sendto ADDR:PORT \
    | tcp-connect-each ADDR:PORT... \
    | udp-sendto-all ADDR:PORT | udp-connect-sendto ADDR:PORT ADDR:PORT \
    | tcp-bind|udp-bind ADDR:PORT | raw-socket inet|inet6 | packet-socket \
    | listen|serve tcp|udp ADDR:PORT | reflect udp ADDR:PORT \
    | tcp-connect-opts|udp-sendto-opts hop|dst|hop+dst|ip-nop ADDR:PORT \
    | activate-listen|scm-listen DIR tcp ADDR:PORT | listen-unbound tcp inet|inet6 \
    | deny-flood udp|tcp N ADDR:PORT | deny-flood-for udp|tcp MS ADDR:PORT | ESCAPE-COMMAND ARGS...: \
    see the doc of bulkhead-probe)";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bulkhead-probe: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Applies the options (joining the cgroup and namespace at once) and
/// returns the client context and the command that follows them.
fn options(args: Vec<String>) -> Result<(Ctx, Vec<String>), String> {
    let mut args = args.into_iter();
    let mut command = Vec::new();
    let mut ctx = Ctx::default();
    let mut private_mounts = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bind" => resolve::bind(&args.next().ok_or(USAGE)?, &mut private_mounts)?,
            "--cgroup" => join_cgroup(&args.next().ok_or(USAGE)?)?,
            "--netns" => join_netns(&args.next().ok_or(USAGE)?)?,
            "--as-nobody" => become_nobody()?,
            "--source" => ctx.source = Some(parse_ip(&args.next().ok_or(USAGE)?)?),
            "--timeout-ms" => ctx.timeout = parse_ms(&args.next().ok_or(USAGE)?)?,
            "--comm" => set_comm(&args.next().ok_or(USAGE)?)?,
            "--wait-for" => wait_for(&args.next().ok_or(USAGE)?)?,
            _ => {
                command.push(arg);
                command.extend(args.by_ref());
            }
        }
    }
    Ok((ctx, command))
}

fn run(args: Vec<String>) -> Result<(), String> {
    let (mut ctx, command) = options(args)?;
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let outcome = match command.as_slice() {
        ["tcp-connect", addr] => client::tcp_connect(&mut ctx, parse_addr(addr)?),
        ["tcp-connect-each", peers @ ..] if !peers.is_empty() => {
            let peers = peers
                .iter()
                .map(|a| parse_addr(a))
                .collect::<Result<Vec<_>, _>>()?;
            client::tcp_connect_each(&mut ctx, &peers);
            Ok(())
        }
        ["tcp-fastopen", addr] => client::tcp_fastopen(&mut ctx, parse_addr(addr)?),
        ["udp-connect", addr] => client::udp_connect(&mut ctx, parse_addr(addr)?),
        ["udp-sendto", addr] => client::udp_sendto(&mut ctx, parse_addr(addr)?),
        ["udp-sendto-all", addr] => client::udp_sendto_all(&mut ctx, parse_addr(addr)?),
        ["udp-connect-sendto", a, b] => {
            client::udp_connect_sendto(&mut ctx, parse_addr(a)?, parse_addr(b)?)
        }
        ["tcp-bind", addr] => client::bind(&mut ctx, Transport::Tcp, parse_addr(addr)?),
        ["udp-bind", addr] => client::bind(&mut ctx, Transport::Udp, parse_addr(addr)?),
        ["raw-socket", "inet"] => client::raw_socket(false),
        ["raw-socket", "inet6"] => client::raw_socket(true),
        ["packet-socket"] => client::packet_socket(),
        ["listen", "tcp", addr] => return listen::listen_tcp(parse_addr(addr)?, false),
        ["listen", "udp", addr] => return listen::listen_udp(parse_addr(addr)?, false),
        ["serve", "tcp", addr] => return listen::listen_tcp(parse_addr(addr)?, true),
        ["serve", "udp", addr] => return listen::listen_udp(parse_addr(addr)?, true),
        ["reflect", "udp", addr] => return listen::reflect_udp(parse_addr(addr)?),
        ["listen-http", addr] => return listen::listen_http(parse_addr(addr)?),
        ["resolve-connect", name, port] => {
            resolve::resolve_connect(&mut ctx, name, parse_port(port)?)
        }
        ["resolve-loop", name, port] => {
            return resolve::resolve_loop(&mut ctx, name, parse_port(port)?)
        }
        ["exec", cmd @ ..] => return Err(resolve::exec(cmd)),
        other => {
            // The escape suite's commands, each module its own.
            let modules: [Dispatch; 3] =
                [escape_a::dispatch, escape_b::dispatch, escape_c::dispatch];
            let step = modules
                .iter()
                .find_map(|dispatch| dispatch(&mut ctx, other).transpose())
                .ok_or(USAGE)??;
            match step {
                Step::Client(outcome) => outcome,
                Step::Serve(served) => return served,
            }
        }
    };
    report(outcome, &ctx);
    Ok(())
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|e| format!("bad --source {s:?} (want an IPv4 or IPv6 address): {e}"))
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    s.parse()
        .map(Duration::from_millis)
        .map_err(|e| format!("bad --timeout-ms {s:?}: {e}"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|e| format!("bad port {s:?}: {e}"))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("bad address {s:?} (want ADDR:PORT or [ADDR6]:PORT): {e}"))
}

fn join_cgroup(dir: &str) -> Result<(), String> {
    let procs = format!("{dir}/cgroup.procs");
    fs::write(&procs, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot join cgroup: write {procs}: {e}"))
}

fn become_nobody() -> Result<(), String> {
    const NOBODY: libc::uid_t = 65534;
    // SAFETY: plain syscalls; the probe is single-threaded here.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(NOBODY) == 0
            && libc::setuid(NOBODY) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot drop to 65534: {}",
            io::Error::last_os_error()
        ))
    }
}

/// `prctl(PR_SET_NAME)`: the name `comm` shows, which any process may set.
fn set_comm(name: &str) -> Result<(), String> {
    let c = std::ffi::CString::new(name).map_err(|e| format!("bad --comm {name:?}: {e}"))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (at most 16 bytes
    // are kept) from a valid pointer.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) } != 0 {
        return Err(format!(
            "prctl(PR_SET_NAME): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Prints `waiting`, then polls until `path` exists (at most a minute): a
/// process that is already running when the test makes it act.
fn wait_for(path: &str) -> Result<(), String> {
    use std::io::Write as _;
    println!("waiting");
    io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while !std::path::Path::new(path).exists() {
        if std::time::Instant::now() > deadline {
            return Err(format!("--wait-for {path}: still absent after 60 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn join_netns(name: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{name}");
    let ns = fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    // SAFETY: setns on a valid open fd; the probe is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns({path}): {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Prints the outcome as one JSON line.
/// An escape-suite module's commands: `None` for a command not its own.
type Dispatch = fn(&mut Ctx, &[&str]) -> Result<Option<Step>, String>;

/// What an escape-suite command came to: a client step to report, or a
/// server's run (it returns once killed or failed).
pub enum Step {
    Client(Result<(), Failure>),
    Serve(Result<(), String>),
}

fn report(outcome: Result<(), Failure>, ctx: &Ctx) {
    let local = ctx.local.map(|a| a.to_string());
    let mut line = match outcome {
        Ok(()) => json!({ "ok": true, "local": local }),
        Err(failure) => json!({
            "ok": false,
            "stage": failure.stage,
            "errno": failure.err.raw_os_error(),
            "error": failure.err.to_string(),
            "timed_out": failure.timed_out(),
            "local": local,
        }),
    };
    if let Some(senders) = &ctx.received_from {
        let senders: Vec<String> = senders.iter().map(ToString::to_string).collect();
        line["received_from"] = json!(senders);
    }
    println!("{line}");
}
