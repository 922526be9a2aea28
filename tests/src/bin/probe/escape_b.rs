//! The commands of the escape suite's `ingress` and `noise` tests: SYNs
//! carrying IP options or IPv6 extension headers, listeners the service did
//! not create itself (socket activation, a listener passed over a Unix
//! socket), `listen()` without `bind()`, and floods of denied connects.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    mem,
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    ptr, thread,
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    client::{self, at, Ctx, Failure},
    listen, parse_addr, Step,
};

/// The commands of this module (see the probe's usage): `None` when
/// `command` is none of them.
pub fn dispatch(ctx: &mut Ctx, command: &[&str]) -> Result<Option<Step>, String> {
    Ok(Some(match command {
        ["tcp-connect-opts", kind, addr] => {
            Step::Client(tcp_connect_opts(ctx, &options(kind)?, parse_addr(addr)?))
        }
        ["udp-sendto-opts", kind, addr] => {
            Step::Client(udp_sendto_opts(ctx, &options(kind)?, parse_addr(addr)?))
        }
        ["activate-listen", dir, "tcp", addr] => {
            Step::Serve(activate_listen(dir, parse_addr(addr)?))
        }
        ["activate-listen-leader-exits", dir, "tcp", addr, ms] => {
            let ms = ms
                .parse()
                .map_err(|e| format!("bad milliseconds {ms:?}: {e}"))?;
            Step::Serve(activate_listen_leader_exits(dir, parse_addr(addr)?, ms))
        }
        ["activate-listen-hide", dir, "tcp", addr, ms] => {
            let ms = ms
                .parse()
                .map_err(|e| format!("bad milliseconds {ms:?}: {e}"))?;
            Step::Serve(activate_listen_hide(dir, parse_addr(addr)?, ms))
        }
        ["scm-listen", dir, "tcp", addr] => Step::Serve(scm_listen(dir, parse_addr(addr)?)),
        ["listen-unbound", "tcp", "inet"] => Step::Serve(listen_unbound(false)),
        ["listen-unbound", "tcp", "inet6"] => Step::Serve(listen_unbound(true)),
        ["deny-flood", proto, n, addr] => {
            let n: u64 = n
                .parse()
                .map_err(|e| format!("bad count {n:?} for deny-flood: {e}"))?;
            Step::Serve(deny_flood(
                proto,
                Until::Count(n),
                1,
                Duration::ZERO,
                parse_addr(addr)?,
            ))
        }
        ["deny-scan", proto, n, ports, addr, rest @ ..] => {
            let pause = match rest {
                [] => Duration::ZERO,
                [ms] => Duration::from_millis(
                    ms.parse()
                        .map_err(|e| format!("bad pause {ms:?} for deny-scan: {e}"))?,
                ),
                _ => return Err(format!("deny-scan: unexpected arguments {rest:?}")),
            };
            let n: u64 = n
                .parse()
                .map_err(|e| format!("bad count {n:?} for deny-scan: {e}"))?;
            let ports: u16 = ports
                .parse()
                .map_err(|e| format!("bad ports {ports:?} for deny-scan: {e}"))?;
            Step::Serve(deny_flood(
                proto,
                Until::Count(n),
                ports,
                pause,
                parse_addr(addr)?,
            ))
        }
        ["deny-flood-for", proto, ms, addr] => {
            let ms: u64 = ms
                .parse()
                .map_err(|e| format!("bad milliseconds {ms:?}: {e}"))?;
            let until = Until::Elapsed(Duration::from_millis(ms));
            Step::Serve(deny_flood(
                proto,
                until,
                1,
                Duration::ZERO,
                parse_addr(addr)?,
            ))
        }
        _ => return Ok(None),
    }))
}

/// What `tcp-connect-opts KIND` puts on the SYN (and `udp-sendto-opts`
/// on the datagram), as `setsockopt()` calls
/// (level, option, value).
pub struct Options(Vec<(libc::c_int, libc::c_int, &'static [u8])>);

/// An 8-byte IPv6 options header holding one `PadN` option (4 bytes of
/// padding): valid, and meaningless to every receiver. The kernel fills in
/// the next-header byte.
const PADN_HEADER: &[u8] = &[0, 0, 1, 4, 0, 0, 0, 0];
/// Four IPv4 No-Operation options: the header grows to 24 bytes.
const IPV4_NOPS: &[u8] = &[1, 1, 1, 1];

/// `hop` (a Hop-by-Hop Options header), `dst` (Destination Options),
/// `hop+dst` (both, a chain of two) or `ip-nop` (IPv4 options).
pub fn options(kind: &str) -> Result<Options, String> {
    let hop = (libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS, PADN_HEADER);
    let dst = (libc::IPPROTO_IPV6, libc::IPV6_DSTOPTS, PADN_HEADER);
    Ok(Options(match kind {
        "hop" => vec![hop],
        "dst" => vec![dst],
        "hop+dst" => vec![hop, dst],
        "ip-nop" => vec![(libc::IPPROTO_IP, libc::IP_OPTIONS, IPV4_NOPS)],
        _ => {
            return Err(format!(
                "bad option kind {kind:?} (want hop, dst, hop+dst or ip-nop)"
            ))
        }
    }))
}

/// `tcp-connect`, with `options` set on the socket first, so that every
/// packet of the connection (the SYN first) carries them. A refusal of the
/// option itself fails at stage `setsockopt`.
pub fn tcp_connect_opts(ctx: &mut Ctx, options: &Options, addr: SocketAddr) -> Result<(), Failure> {
    client::tcp_connect_with(ctx, addr, |fd| set_options(fd, options))
}

fn set_options(fd: &impl AsRawFd, options: &Options) -> Result<(), Failure> {
    for &(level, name, value) in &options.0 {
        let len = libc::socklen_t::try_from(value.len()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `value` is valid for `len` bytes.
        let rc =
            unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
        if rc != 0 {
            return Err(at("setsockopt")(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `udp-sendto`, with `options` set on the socket first: the datagram
/// carries them; then waits for the echo.
pub fn udp_sendto_opts(ctx: &mut Ctx, options: &Options, addr: SocketAddr) -> Result<(), Failure> {
    let sock = client::udp_socket(ctx, addr)?;
    set_options(&sock, options)?;
    sock.send_to(b"ping", addr).map_err(at("send"))?;
    let mut buf = [0u8; 16];
    sock.recv_from(&mut buf).map_err(at("recv"))?;
    Ok(())
}

/// Socket activation: this (unmanaged) process binds and listens on `addr`,
/// then forks a child that joins cgroup `dir` and serves on the inherited
/// listener like `serve tcp` (`ready ADDR:PORT`, then `peer ADDR:PORT` per
/// connection). The parent keeps its copy of the listener, as systemd
/// does, and waits; the child dies with it.
pub fn activate_listen(dir: &str, addr: SocketAddr) -> Result<(), String> {
    activated(dir, addr, |listener| listen::serve_tcp(&listener, true))
}

/// The socket activation all `activate-listen*` commands share: this
/// (unmanaged) process listens on `addr` and forks; the child joins cgroup
/// `dir` and runs `child` on the inherited listener; the parent keeps its
/// copy, as systemd does, and waits.
fn activated(
    dir: &str,
    addr: SocketAddr,
    child: impl FnOnce(TcpListener) -> Result<(), String>,
) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    match fork()? {
        Forked::Child => {
            crate::join_cgroup(dir)?;
            child(listener)
        }
        Forked::Parent(child) => wait_child(child),
    }
}

/// `activate-listen-leader-exits DIR tcp ADDR MS`: like `activate-listen`,
/// but the child serves from a second thread, and after `ms` milliseconds
/// its main thread exits alone (`SYS_exit`): the listener then shows in no
/// `/proc/PID/fd` (the leader is a zombie), only in the serving thread's
/// `/proc/PID/task/TID/fd`.
pub fn activate_listen_leader_exits(dir: &str, addr: SocketAddr, ms: u64) -> Result<(), String> {
    activated(dir, addr, |listener| {
        std::thread::spawn(move || listen::serve_tcp(&listener, true));
        std::thread::sleep(std::time::Duration::from_millis(ms));
        // SAFETY: ends this thread only; the serving thread keeps the
        // process alive.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        Err("SYS_exit returned".to_string())
    })
}

/// `activate-listen-hide DIR tcp ADDR MS`: like `activate-listen`, but the
/// child serves for `ms` milliseconds only; then it registers the listener
/// as an `io_uring` fixed file and closes its descriptor, and prints
/// `hidden`: no descriptor table of the child shows the listener any more,
/// and it still listens (connections queue up, never accepted).
pub fn activate_listen_hide(dir: &str, addr: SocketAddr, ms: u64) -> Result<(), String> {
    activated(dir, addr, |listener| {
        let until = Instant::now() + std::time::Duration::from_millis(ms);
        serve_until(&listener, until)?;
        let _ring = fixed_file_ring(listener.as_raw_fd())?;
        drop(listener);
        line("hidden");
        loop {
            std::thread::park();
        }
    })
}

/// Like `serve tcp` (`ready`, then `peer ADDR:PORT` per connection, each
/// getting one byte), until `until`.
fn serve_until(listener: &TcpListener, until: Instant) -> Result<(), String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    line(&format!("ready {local}"));
    while Instant::now() < until {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                line(&format!("peer {peer}"));
                let _ = conn
                    .set_nonblocking(false)
                    .and_then(|()| conn.write_all(b"k"));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

fn line(text: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// An `io_uring` instance holding `fd` as its fixed file 0.
fn fixed_file_ring(fd: RawFd) -> Result<OwnedFd, String> {
    const IORING_REGISTER_FILES: libc::c_uint = 2;
    // struct io_uring_params: 120 bytes, zero for the defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) with a params buffer of the kernel's size.
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
    if ring < 0 {
        return Err(format!("io_uring_setup: {}", io::Error::last_os_error()));
    }
    // SAFETY: a descriptor the kernel just returned to us.
    let ring = unsafe {
        OwnedFd::from_raw_fd(RawFd::try_from(ring).map_err(|e| format!("io_uring fd: {e}"))?)
    };
    let files = [fd];
    // SAFETY: io_uring_register(2) with an array of one descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_FILES,
            files.as_ptr(),
            1,
        )
    };
    if rc < 0 {
        return Err(format!(
            "io_uring_register(FILES): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(ring)
}

/// A listener handed over a Unix socket: this (unmanaged) process forks a
/// child that joins cgroup `dir` first; then it binds and listens on
/// `addr`, sends the listener to the child with `SCM_RIGHTS`, closes its own
/// copy, and waits. The child serves like `serve tcp`.
pub fn scm_listen(dir: &str, addr: SocketAddr) -> Result<(), String> {
    let (mut mine, mut theirs) =
        UnixStream::pair().map_err(|e| format!("socketpair(AF_UNIX): {e}"))?;
    match fork()? {
        Forked::Child => {
            drop(mine);
            crate::join_cgroup(dir)?;
            theirs
                .write_all(b"j")
                .map_err(|e| format!("tell the parent the cgroup is joined: {e}"))?;
            let listener = TcpListener::from(recv_fd(&theirs)?);
            listen::serve_tcp(&listener, true)
        }
        Forked::Parent(child) => {
            drop(theirs);
            let mut joined = [0u8; 1];
            mine.read_exact(&mut joined)
                .map_err(|e| format!("wait for the child to join {dir}: {e}"))?;
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
            send_fd(&mine, listener.as_raw_fd())?;
            drop(listener);
            wait_child(child)
        }
    }
}

/// `listen()` on a fresh TCP socket never bound: the kernel picks a port
/// itself (on the wildcard address; `inet6` is dual-stack). Then serves
/// like `serve tcp`.
pub fn listen_unbound(v6: bool) -> Result<(), String> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let fd = client::new_socket(family, libc::SOCK_STREAM, 0)
        .map_err(|f| format!("socket: {}", f.err))?;
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(format!("listen: {}", io::Error::last_os_error()));
    }
    listen::serve_tcp(&TcpListener::from(fd), true)
}

/// When a flood stops.
#[derive(Clone, Copy)]
pub enum Until {
    /// After this many calls.
    Count(u64),
    /// Once this long has passed (checked every call).
    Elapsed(Duration),
}

/// `deny-flood udp|tcp N ADDR:PORT` (`N` calls) and `deny-flood-for
/// udp|tcp MS ADDR:PORT` (for `MS` milliseconds): pinned to CPU 0, as fast
/// as it can: a fresh socket, `connect()` to `addr`, close. Prints one JSON
/// line: `{"ok":true,"attempts":N,"eperm":K,"connected":C,"errors":{"ERRNO":
/// COUNT},"elapsed_ns":T,"cpu":0}` (`errors` holds every other errno), or a
/// failure at stage `affinity` or `socket` like the client commands.
/// `deny-scan udp|tcp N PORTS ADDR:PORT [PAUSE_MS]`: the same over `PORTS`
/// ports from `addr`'s on, in turn (a port scan: each port a flow of its
/// own), pausing `PAUSE_MS` halfway (the same flows go on after it);
/// `elapsed_ns` leaves the pause out.
pub fn deny_flood(
    proto: &str,
    until: Until,
    ports: u16,
    pause: Duration,
    addr: SocketAddr,
) -> Result<(), String> {
    let kind = match proto {
        "udp" => libc::SOCK_DGRAM,
        "tcp" => libc::SOCK_STREAM,
        _ => return Err(format!("bad protocol {proto:?} (want udp or tcp)")),
    };
    let ctx = Ctx::default();
    if let Err(failure) = pin_to_cpu0() {
        crate::report(Err(failure), &ctx);
        return Ok(());
    }
    let sockaddrs: Vec<_> = (0..ports.max(1))
        .map(|i| {
            let mut to = addr;
            to.set_port(addr.port().wrapping_add(i));
            client::sockaddr(to)
        })
        .collect();
    let (mut eperm, mut connected) = (0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut n = 0u64;
    let mut paused = Duration::ZERO;
    while match until {
        Until::Count(count) => n < count,
        Until::Elapsed(limit) => started.elapsed() < limit,
    } {
        if let Until::Count(count) = until {
            if n == count / 2 && !pause.is_zero() {
                thread::sleep(pause);
                paused = pause;
            }
        }
        n += 1;
        let fd = match client::new_socket(client::family_of(addr), kind, 0) {
            Ok(fd) => fd,
            Err(failure) => {
                crate::report(Err(failure), &ctx);
                return Ok(());
            }
        };
        let (storage, len) = &sockaddrs[usize::try_from(n - 1).unwrap_or(0) % sockaddrs.len()];
        // SAFETY: `storage` is a valid sockaddr of `len` bytes.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), ptr::from_ref(storage).cast(), *len) };
        if rc == 0 {
            connected += 1;
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => eperm += 1,
            errno => *errors.entry(format!("{}", errno.unwrap_or(0))).or_default() += 1,
        }
    }
    let elapsed = started.elapsed().saturating_sub(paused);
    // SAFETY: sched_getcpu has no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    println!(
        "{}",
        json!({
            "ok": true,
            "attempts": n,
            "eperm": eperm,
            "connected": connected,
            "errors": errors,
            "elapsed_ns": u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            "cpu": cpu,
        })
    );
    Ok(())
}

fn pin_to_cpu0() -> Result<(), Failure> {
    // SAFETY: all-zero is an empty CPU set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &raw const set) } != 0
    {
        return Err(at("affinity")(io::Error::last_os_error()));
    }
    Ok(())
}

enum Forked {
    Child,
    Parent(libc::pid_t),
}

/// `fork()`; the child gets `SIGKILL` when this process dies (so a test that
/// kills the probe kills both).
fn fork() -> Result<Forked, String> {
    let _ = io::stdout().flush();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the probe is single-threaded, so the child may go on running
    // ordinary code.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", io::Error::last_os_error())),
        0 => {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number.
            let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            // SAFETY: getppid has no preconditions.
            if rc != 0 || unsafe { libc::getppid() } != parent {
                return Err("the parent went away before the child was set up".to_owned());
            }
            Ok(Forked::Child)
        }
        child => Ok(Forked::Parent(child)),
    }
}

/// Waits for `child`; an error unless it exited with status 0.
fn wait_child(child: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int into `status`.
        if unsafe { libc::waitpid(child, &raw mut status, 0) } == child {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(format!("waitpid({child}): {err}"));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!(
            "the child {child} ended with wait status {status:#x}"
        ))
    }
}

/// Room for one `SCM_RIGHTS` message of one descriptor, aligned for cmsghdr.
fn cmsg_buffer() -> (Vec<u64>, usize) {
    let fd_len = u32::try_from(mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = usize::try_from(unsafe { libc::CMSG_SPACE(fd_len) }).unwrap_or(usize::MAX);
    (vec![0u64; space.div_ceil(8)], space)
}

/// Sends `fd` over `sock` with `SCM_RIGHTS` (and one byte of data).
fn send_fd(sock: &UnixStream, fd: RawFd) -> Result<(), String> {
    let mut byte = [b'f'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let (mut buf, space) = cmsg_buffer();
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let fd_len = u32::try_from(mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: the control buffer has room for one cmsghdr with one fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = usize::try_from(libc::CMSG_LEN(fd_len)).unwrap_or(usize::MAX);
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` points at live buffers.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0) } != 1 {
        return Err(format!(
            "sendmsg(SCM_RIGHTS): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Receives one descriptor sent with `SCM_RIGHTS` over `sock`.
fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, String> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let (mut buf, space) = cmsg_buffer();
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at live buffers of the sizes given.
    let got = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(format!("recvmsg: {}", io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR checks
    // its length.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    // SAFETY: a non-null cmsg lies inside the buffer.
    let rights = !cmsg.is_null()
        && unsafe {
            (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        };
    if !rights {
        return Err(format!("recvmsg: no SCM_RIGHTS descriptor ({got} bytes)"));
    }
    // SAFETY: an SCM_RIGHTS message holds at least one fd, now ours.
    Ok(unsafe { OwnedFd::from_raw_fd(ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())) })
}
