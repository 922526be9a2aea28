//! `bulkhead-conn`: long-lived TCP clients and servers for the tests that
//! watch enforcement *change* under running traffic (reloads, restarts,
//! quarantine), where `bulkhead-probe`'s one exchange per process is too
//! coarse.
//!
//! ```text
//! bulkhead-conn [--cgroup DIR] [--cpu N] COMMAND
//!   connect-loop [--pause-us N] [--timeout-ms N] ADDR:PORT...
//!       connect() to each address in turn, over and over, until stdin is
//!       closed; one line per attempt: `attempt PORT START_NS END_NS RESULT`
//!       (`CLOCK_MONOTONIC` nanoseconds around socket()+connect(); RESULT is
//!       `ok`, `errno:N` or `timeout`, after 2 s or --timeout-ms)
//!   hold ADDR:PORT
//!       connect() once and keep the connection: stdin line `send TEXT`
//!       writes TEXT and prints `sent TEXT` (or `send-error errno:N`); what
//!       the peer sends is printed as `recv TEXT`, its close as `eof`
//!   udp-paced N PAUSE_US PORTS ADDR:PORT
//!       connect() one UDP socket N times, to ADDR and PORTS ports from PORT
//!       on in turn, sleeping PAUSE_US microseconds after each (no packet is
//!       sent); print `done N` and exit (exit 2 on an error)
//!   udp-sendto N PORTS ADDR:PORT
//!       sendto() one byte N times from one unconnected UDP socket, to
//!       ADDR and PORTS ports from PORT on in turn; print `done SENT EPERM`
//!       (the calls that went out, the calls refused with EPERM) and exit
//!       (exit 2 on any other error)
//!   refused-hold N ADDR:PORT
//!       N TCP sockets connect() to ADDR:PORT (IPv4), where nothing
//!       listens, and stay open: print `refused N` once all got
//!       ECONNREFUSED (exit 2 on any other outcome), then wait for stdin
//!       to close
//!   self-connect ADDR:PORT
//!       bind one TCP socket to ADDR:PORT (IPv4) and connect it to that same
//!       address (a simultaneous open with itself), send `hello`, read it
//!       back, close; print `self-connected` and exit (exit 2 on an error)
//!   sink ADDR:PORT
//!       listen; print `ready ADDR:PORT`, then `accepted PEER` per
//!       connection and `recv PEER TEXT` per chunk received; stdin line
//!       `send TEXT` writes TEXT to every accepted connection (`sent PEER
//!       TEXT` or `send-error PEER errno:N`), line `close` shuts the write
//!       side of each down (sends its FIN; `closed PEER`)
//! ```
//!
//! `--cgroup DIR` writes the process's own pid into `DIR/cgroup.procs` before
//! any socket exists. `--cpu N` runs it on CPU N only (the kernel's
//! per-CPU state, such as the denial rate limit's, is then one CPU's). Every line is flushed at once. The process exits when
//! stdin is closed (the test's guard closes it, or kills the process).
//! Exit 2: bad usage or set-up failure (message on stderr).

use std::{
    fs,
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread,
    time::Duration,
};

/// How long one `connect()` may take before it counts as a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: bulkhead-conn [--cgroup DIR] [--cpu N] \
    (connect-loop [--pause-us N] [--timeout-ms N] ADDR:PORT... | hold ADDR:PORT | udp-paced N PAUSE_US PORTS ADDR:PORT | udp-sendto N PORTS ADDR:PORT | refused-hold N ADDR:PORT | self-connect ADDR:PORT | sink ADDR:PORT)";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bulkhead-conn: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("--cgroup") {
        args.next();
        let dir = args.next().ok_or(USAGE)?;
        let procs = format!("{dir}/cgroup.procs");
        fs::write(&procs, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot join cgroup: write {procs}: {e}"))?;
    }
    if args.peek().map(String::as_str) == Some("--cpu") {
        args.next();
        let cpu = args.next().ok_or(USAGE)?;
        pin_to(cpu.parse().map_err(|e| format!("bad cpu {cpu:?}: {e}"))?)?;
    }
    let command = args.next().ok_or(USAGE)?;
    let rest: Vec<String> = args.collect();
    match (command.as_str(), rest.as_slice()) {
        ("connect-loop", rest) => connect_loop(rest),
        ("hold", [addr]) => hold(parse_addr(addr)?),
        ("self-connect", [addr]) => self_connect(parse_addr(addr)?),
        ("refused-hold", [n, addr]) => refused_hold(
            n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?,
            parse_addr(addr)?,
        ),
        ("udp-paced", [n, pause, ports, addr]) => udp_paced(
            n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?,
            Duration::from_micros(
                pause
                    .parse()
                    .map_err(|e| format!("bad pause {pause:?}: {e}"))?,
            ),
            ports
                .parse()
                .map_err(|e| format!("bad ports {ports:?}: {e}"))?,
            parse_addr(addr)?,
        ),
        ("udp-sendto", [n, ports, addr]) => udp_sendto(
            n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?,
            ports
                .parse()
                .map_err(|e| format!("bad ports {ports:?}: {e}"))?,
            parse_addr(addr)?,
        ),
        ("sink", [addr]) => sink(parse_addr(addr)?),
        _ => Err(USAGE.to_owned()),
    }
}

/// Runs the process on CPU `cpu` only.
fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it
    // for cpu < CPU_SETSIZE (checked); sched_setaffinity reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("cpu {cpu} out of range"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(format!(
                "sched_setaffinity to cpu {cpu}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn udp_paced(n: u64, pause: Duration, ports: u16, addr: SocketAddr) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let sock = std::net::UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    for i in 0..n {
        let mut to = addr;
        let offset = u16::try_from(i % u64::from(ports.max(1))).unwrap_or(0);
        to.set_port(addr.port().wrapping_add(offset));
        sock.connect(to)
            .map_err(|e| format!("connect {i} of {n} to {to}: {e}"))?;
        thread::sleep(pause);
    }
    say(&format!("done {n}"));
    Ok(())
}

fn udp_sendto(n: u64, ports: u16, addr: SocketAddr) -> Result<(), String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let sock = std::net::UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    let (mut sent, mut eperm) = (0u64, 0u64);
    for i in 0..n {
        let mut to = addr;
        let offset = u16::try_from(i % u64::from(ports.max(1))).unwrap_or(0);
        to.set_port(addr.port().wrapping_add(offset));
        match sock.send_to(b"x", to) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(e) => return Err(format!("sendto {i} of {n} to {to}: {e}")),
        }
    }
    say(&format!("done {sent} {eperm}"));
    Ok(())
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("bad address {s:?} (want ADDR:PORT or [ADDR6]:PORT): {e}"))
}

/// One line on stdout, flushed; a reader that went away ends the process.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock the daemon stamps its events
/// with, `ktime_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Sets a flag once stdin reaches its end (or fails).
fn watch_stdin() -> Arc<AtomicBool> {
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = io::stdin().lock().read_to_end(&mut sink);
        flag.store(true, Ordering::SeqCst);
    });
    closed
}

fn connect_loop(args: &[String]) -> Result<(), String> {
    let mut pause = Duration::from_millis(1);
    let mut timeout = CONNECT_TIMEOUT;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--pause-us" {
            let n = args.next().ok_or(USAGE)?;
            pause = Duration::from_micros(
                n.parse()
                    .map_err(|e| format!("bad --pause-us {n:?}: {e}"))?,
            );
        } else if arg == "--timeout-ms" {
            let n = args.next().ok_or(USAGE)?;
            timeout = Duration::from_millis(
                n.parse()
                    .map_err(|e| format!("bad --timeout-ms {n:?}: {e}"))?,
            );
        } else {
            targets.push(parse_addr(arg)?);
        }
    }
    if targets.is_empty() {
        return Err(USAGE.to_owned());
    }
    let closed = watch_stdin();
    say("started");
    while !closed.load(Ordering::SeqCst) {
        for &target in &targets {
            let start = monotonic_ns();
            let result = TcpStream::connect_timeout(&target, timeout);
            let end = monotonic_ns();
            let result = match result {
                Ok(stream) => {
                    // Reset instead of a FIN: no TIME_WAIT, so thousands of
                    // connections do not use up the ephemeral ports.
                    reset_on_close(&stream);
                    drop(stream);
                    "ok".to_owned()
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => "timeout".to_owned(),
                Err(e) => format!("errno:{}", e.raw_os_error().unwrap_or(-1)),
            };
            say(&format!("attempt {} {start} {end} {result}", target.port()));
            thread::sleep(pause);
        }
    }
    Ok(())
}

/// `SO_LINGER` with a zero timeout: `close()` sends a reset.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8);
    // SAFETY: setsockopt reads `len` bytes from a valid `linger`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            len,
        );
    }
}

fn errno(e: &io::Error) -> String {
    format!("errno:{}", e.raw_os_error().unwrap_or(-1))
}

/// Prints everything `stream` receives as `recv {prefix}TEXT`, then `eof`.
fn print_received(mut stream: TcpStream, prefix: String) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    say(format!("eof {prefix}").trim_end());
                    return;
                }
                Ok(n) => say(&format!(
                    "recv {prefix}{}",
                    String::from_utf8_lossy(&buf[..n]).trim_end()
                )),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    say(&format!("recv-error {prefix}{}", errno(&e)));
                    return;
                }
            }
        }
    });
}

/// `addr` (IPv4) as a `sockaddr_in` and its length.
fn sockaddr_v4(addr: SocketAddr) -> Result<(libc::sockaddr_in, libc::socklen_t), String> {
    let SocketAddr::V4(v4) = addr else {
        return Err(format!("{addr}: IPv4 only"));
    };
    let sa = libc::sockaddr_in {
        // AF_INET is 2: it fits.
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16);
    Ok((sa, len))
}

/// A new TCP socket (IPv4), not connected.
fn tcp_socket() -> Result<TcpStream, String> {
    // SAFETY: a plain socket() call; the descriptor is owned by the
    // returned stream at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new socket no one else owns.
    Ok(unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn refused_hold(n: usize, addr: SocketAddr) -> Result<(), String> {
    let (sa, len) = sockaddr_v4(addr)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tcp_socket()?;
        // SAFETY: connect reads `len` bytes from a valid sockaddr_in.
        let rc = unsafe { libc::connect(stream.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len) };
        let error = io::Error::last_os_error();
        if rc == 0 || error.raw_os_error() != Some(libc::ECONNREFUSED) {
            return Err(format!("connect {addr}: {rc} {error}, not refused"));
        }
        held.push(stream);
    }
    say(&format!("refused {n}"));
    // Open until stdin closes.
    let _ = io::stdin().lock().read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}

fn self_connect(addr: SocketAddr) -> Result<(), String> {
    let (sa, len) = sockaddr_v4(addr)?;
    let mut stream = tcp_socket()?;
    let fd = stream.as_raw_fd();
    // SAFETY: bind and connect read `len` bytes from a valid sockaddr_in.
    unsafe {
        if libc::bind(fd, std::ptr::from_ref(&sa).cast(), len) != 0 {
            return Err(format!("bind {addr}: {}", io::Error::last_os_error()));
        }
        if libc::connect(fd, std::ptr::from_ref(&sa).cast(), len) != 0 {
            return Err(format!("connect {addr}: {}", io::Error::last_os_error()));
        }
    }
    stream
        .write_all(b"hello")
        .map_err(|e| format!("send: {e}"))?;
    let mut back = [0u8; 5];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("receive: {e}"))?;
    if &back != b"hello" {
        return Err(format!("received {back:?}"));
    }
    drop(stream);
    say("self-connected");
    Ok(())
}

fn hold(addr: SocketAddr) -> Result<(), String> {
    let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            say(&format!("connect-error {}", errno(&e)));
            return Ok(());
        }
    };
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let reader = stream
        .try_clone()
        .map_err(|e| format!("cannot clone the socket: {e}"))?;
    say(&format!("connected {local}"));
    print_received(reader, String::new());
    let mut writer = &stream;
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let Some(text) = line.strip_prefix("send ") else {
            return Err(format!("unknown command {line:?} (want `send TEXT`)"));
        };
        match writer.write_all(text.as_bytes()) {
            Ok(()) => say(&format!("sent {text}")),
            Err(e) => say(&format!("send-error {}", errno(&e))),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn sink(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let accepted: Arc<Mutex<Vec<(SocketAddr, TcpStream)>>> = Arc::default();
    let conns = Arc::clone(&accepted);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            say(&format!("accepted {peer}"));
            print_received(reader, format!("{peer} "));
            conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((peer, stream));
        }
    });
    say(&format!("ready {local}"));
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let conns = accepted.lock().unwrap_or_else(PoisonError::into_inner);
        if line == "close" {
            for (peer, stream) in conns.iter() {
                match stream.shutdown(Shutdown::Write) {
                    Ok(()) => say(&format!("closed {peer}")),
                    Err(e) => say(&format!("close-error {peer} {}", errno(&e))),
                }
            }
            continue;
        }
        let Some(text) = line.strip_prefix("send ") else {
            return Err(format!(
                "unknown command {line:?} (want `send TEXT` or `close`)"
            ));
        };
        for (peer, stream) in conns.iter() {
            let mut writer = stream;
            match writer.write_all(text.as_bytes()) {
                Ok(()) => say(&format!("sent {peer} {text}")),
                Err(e) => say(&format!("send-error {peer} {}", errno(&e))),
            }
        }
    }
    Ok(())
}
