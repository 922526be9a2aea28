//! The lookup client of the DNS names section (names.rs): a forked child
//! that joins a service's cgroup (it stays in the host's network
//! namespace, where the agent's proxy listens) and makes one A lookup each
//! time the parent asks, the way glibc's resolver makes one. Over UDP: a
//! new socket, connect() to the resolver, send(), recvfrom() of the answer,
//! whose source must be the resolver. Over TCP: a new socket, connect(),
//! the length-prefixed query written, the answer read, the peer
//! (getpeername) the resolver. Two such clients (a service with a
//! name rule, one without) are driven in turn by the parent, so their
//! lookups interleave one by one and see the same machine noise.
//!
//! Parent -> child: one command byte. Child -> parent: b'k' and a u64
//! (little-endian), or b'e', a u32 length and a UTF-8 message.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, OwnedFd},
    panic::{self, AssertUnwindSafe},
    path::Path,
};

use anyhow::{bail, Context, Result};

use super::{
    fork::{ensure_single_threaded, join_cgroup, pipe, wait},
    loadgen::{now_ns, set_timeout, socket, UDP_PORT},
    names::Over,
};

/// Time one lookup over UDP; the answer is the nanoseconds it took.
const LOOKUP: u8 = b'l';
/// The same over TCP.
const LOOKUP_TCP: u8 = b't';
/// connect() a UDP socket to 127.0.0.1:`UDP_PORT` (no packet is sent):
/// the answer is 0 if allowed, else the errno.
const CONNECT: u8 = b'c';
const QUIT: u8 = b'q';

/// The query's id is the lookup's number, so a late answer to an earlier
/// query is told apart.
pub struct Client {
    pid: libc::pid_t,
    commands: File,
    answers: File,
    next_id: u16,
}

impl Client {
    /// Forks a client in `cgroup` that looks `name` up at `resolver`.
    pub fn spawn(cgroup: &Path, resolver: SocketAddrV4, name: &str) -> Result<Self> {
        let query = Query::new(name)?;
        ensure_single_threaded()?;
        let (cmd_read, cmd_write) = pipe()?;
        let (ans_read, ans_write) = pipe()?;
        // SAFETY: the process has one thread (checked above); the child
        // leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error()).context("fork a lookup client");
        }
        if pid == 0 {
            drop(cmd_write);
            drop(ans_read);
            child(cgroup, resolver, &query, cmd_read, ans_write);
        }
        drop(cmd_read);
        drop(ans_write);
        Ok(Self {
            pid,
            commands: File::from(cmd_write),
            answers: File::from(ans_read),
            next_id: 0,
        })
    }

    /// One lookup over `over`, timed by the child; nanoseconds.
    pub fn lookup(&mut self, over: Over) -> Result<u64> {
        self.next_id = self.next_id.wrapping_add(1);
        let [hi, lo] = self.next_id.to_be_bytes();
        let command = match over {
            Over::Udp => LOOKUP,
            Over::Tcp => LOOKUP_TCP,
        };
        self.ask(&[command, hi, lo])
    }

    /// Whether the service may connect() a UDP socket to the probe's
    /// 127.0.0.1:`UDP_PORT`: Ok(0), or the errno.
    pub fn connect_errno(&mut self) -> Result<i32> {
        self.ask(&[CONNECT, 0, 0])
            .map(|v| i32::try_from(v).unwrap_or(i32::MAX))
    }

    fn ask(&mut self, command: &[u8; 3]) -> Result<u64> {
        self.commands
            .write_all(command)
            .context("the lookup client is gone")?;
        let mut tag = [0u8; 1];
        self.answers
            .read_exact(&mut tag)
            .context("the lookup client exited without answering")?;
        match tag[0] {
            b'k' => {
                let mut v = [0u8; 8];
                self.answers
                    .read_exact(&mut v)
                    .context("truncated answer")?;
                Ok(u64::from_le_bytes(v))
            }
            b'e' => {
                let mut len = [0u8; 4];
                self.answers
                    .read_exact(&mut len)
                    .context("truncated error")?;
                let len = usize::try_from(u32::from_le_bytes(len))
                    .unwrap_or(0)
                    .min(4096);
                let mut text = vec![0u8; len];
                self.answers
                    .read_exact(&mut text)
                    .context("truncated error")?;
                bail!("{}", String::from_utf8_lossy(&text))
            }
            other => bail!("the lookup client answered {other:#x}"),
        }
    }

    /// Tells the child to leave and reaps it.
    pub fn finish(mut self) -> Result<()> {
        let _ = self.commands.write_all(&[QUIT, 0, 0]);
        let status = wait(self.pid)?;
        self.pid = 0;
        if status != 0 {
            bail!("the lookup client exited with status {status}");
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own child, not reaped yet.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = wait(self.pid);
        }
    }
}

/// The child: never returns.
fn child(cgroup: &Path, resolver: SocketAddrV4, query: &Query, cmds: OwnedFd, out: OwnedFd) -> ! {
    let mut cmds = File::from(cmds);
    let mut out = File::from(out);
    let served = panic::catch_unwind(AssertUnwindSafe(|| -> Result<()> {
        join_cgroup(cgroup)?;
        let mut command = [0u8; 3];
        loop {
            if cmds.read_exact(&mut command).is_err() {
                return Ok(());
            }
            let answer = match command[0] {
                LOOKUP => lookup(
                    resolver,
                    query,
                    u16::from_be_bytes([command[1], command[2]]),
                ),
                LOOKUP_TCP => lookup_tcp(
                    resolver,
                    query,
                    u16::from_be_bytes([command[1], command[2]]),
                ),
                CONNECT => Ok(connect_errno()),
                _ => return Ok(()),
            };
            let bytes = match answer {
                Ok(v) => {
                    let mut b = vec![b'k'];
                    b.extend_from_slice(&v.to_le_bytes());
                    b
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    let mut b = vec![b'e'];
                    b.extend_from_slice(&u32::try_from(text.len()).unwrap_or(0).to_le_bytes());
                    b.extend_from_slice(text.as_bytes());
                    b
                }
            };
            out.write_all(&bytes).context("answer the parent")?;
        }
    }));
    let code = match served {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("xtask bench: lookup client: {e:#}");
            1
        }
        Err(_) => 2,
    };
    // SAFETY: ends this process without running the parent's destructors.
    unsafe { libc::_exit(code) }
}

/// One lookup as glibc makes it; the nanoseconds from socket() to the
/// answer in hand (close() is not timed).
fn lookup(resolver: SocketAddrV4, query: &Query, id: u16) -> Result<u64> {
    let wire = query.with_id(id);
    let to = sockaddr(resolver);
    let mut buf = [0u8; 1500];
    let start = now_ns();
    let sock = socket(libc::SOCK_DGRAM)?;
    set_timeout(&sock, libc::SO_RCVTIMEO)?;
    // SAFETY: a valid socket and a sockaddr_in of the length passed.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const to).cast(), SOCKADDR_LEN) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("connect() to the resolver");
    }
    // SAFETY: a valid socket and buffer of the length passed.
    let sent = unsafe { libc::send(sock.as_raw_fd(), wire.as_ptr().cast(), wire.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("send() the query");
    }
    loop {
        let (len, from) = recv_from(&sock, &mut buf).context("no answer")?;
        // The source must be the resolver asked (recvmsg4 shows it in place
        // of the proxy's address); glibc drops anything else.
        if from != resolver {
            bail!("the answer came from {from}, not from the resolver {resolver}");
        }
        if len >= 2 && buf[..2] == id.to_be_bytes() {
            let end = now_ns();
            check_answer(&buf[..len])?;
            return Ok(end.saturating_sub(start));
        }
    }
}

/// One lookup over TCP as glibc makes it (`use-vc`, or after a truncated
/// answer); the nanoseconds from socket() to the answer in hand.
fn lookup_tcp(resolver: SocketAddrV4, query: &Query, id: u16) -> Result<u64> {
    let wire = query.with_id(id);
    let mut framed = u16::try_from(wire.len())
        .context("a query over 65,535 bytes")?
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&wire);
    let to = sockaddr(resolver);
    let start = now_ns();
    let sock = socket(libc::SOCK_STREAM)?;
    set_timeout(&sock, libc::SO_RCVTIMEO)?;
    // SAFETY: a valid socket and a sockaddr_in of the length passed.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const to).cast(), SOCKADDR_LEN) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("connect() to the resolver over TCP");
    }
    let mut stream = File::from(sock);
    stream.write_all(&framed).context("write the query")?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).context("no answer's length")?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).context("a short answer")?;
    let end = now_ns();
    // The peer must be the resolver asked (getpeername4 shows it in place
    // of the proxy's address).
    let peer = peer_of(&stream)?;
    if peer != resolver {
        bail!("the TCP peer is {peer}, not the resolver {resolver}");
    }
    if answer.get(..2) != Some(&id.to_be_bytes()[..]) {
        bail!("the TCP answer is not to the query sent");
    }
    check_answer(&answer)?;
    Ok(end.saturating_sub(start))
}

/// A connected socket's peer (IPv4).
fn peer_of(sock: &impl AsRawFd) -> Result<SocketAddrV4> {
    let mut peer = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut len = SOCKADDR_LEN;
    // SAFETY: a valid socket and a sockaddr_in of the length passed.
    let rc = unsafe { libc::getpeername(sock.as_raw_fd(), (&raw mut peer).cast(), &raw mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("getpeername()");
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(peer.sin_addr.s_addr)),
        u16::from_be(peer.sin_port),
    ))
}

fn recv_from(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
    let mut from = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut from_len = SOCKADDR_LEN;
    // SAFETY: a valid socket, a buffer and a sockaddr_in of the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut from).cast(),
            &raw mut from_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
    Ok((
        usize::try_from(n).unwrap_or(0),
        SocketAddrV4::new(addr, u16::from_be(from.sin_port)),
    ))
}

/// A UDP connect() to the probe's address: allowed (0) or the errno.
fn connect_errno() -> u64 {
    let Ok(sock) = socket(libc::SOCK_DGRAM) else {
        return u64::MAX;
    };
    let to = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, UDP_PORT));
    // SAFETY: a valid socket and a sockaddr_in of the length passed.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const to).cast(), SOCKADDR_LEN) };
    if rc < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .and_then(|e| u64::try_from(e).ok())
            .unwrap_or(u64::MAX)
    } else {
        0
    }
}

const SOCKADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An A query for one name, recursion desired (what a stub resolver sends).
struct Query(Vec<u8>);

impl Query {
    fn new(name: &str) -> Result<Self> {
        // Header: id (set per query), flags RD, one question.
        let mut wire = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            let len = u8::try_from(label.len())
                .ok()
                .filter(|l| (1..=63).contains(l));
            let Some(len) = len else {
                bail!("{name:?} is not a name a query can carry");
            };
            wire.push(len);
            wire.extend_from_slice(label.as_bytes());
        }
        // End of name; QTYPE A; QCLASS IN.
        wire.extend_from_slice(&[0, 0, 1, 0, 1]);
        Ok(Self(wire))
    }

    fn with_id(&self, id: u16) -> Vec<u8> {
        let mut wire = self.0.clone();
        wire[..2].copy_from_slice(&id.to_be_bytes());
        wire
    }
}

/// The answer must be a response, NOERROR, with at least one answer record.
fn check_answer(msg: &[u8]) -> Result<()> {
    let Some(header) = msg.get(..12) else {
        bail!(
            "an answer of {} bytes, shorter than a DNS header",
            msg.len()
        );
    };
    let qr = header[2] & 0x80 != 0;
    let rcode = header[3] & 0x0f;
    let answers = u16::from_be_bytes([header[6], header[7]]);
    if !qr || rcode != 0 || answers == 0 {
        bail!("the answer is not a NOERROR response with records (QR {qr}, RCODE {rcode}, {answers} answers)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_wire_format() {
        let q = Query::new("a.bc.test").expect("a name");
        let wire = q.with_id(0x1234);
        assert_eq!(&wire[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&wire[12..], b"\x01a\x02bc\x04test\x00\x00\x01\x00\x01");
        assert!(Query::new("a..test").is_err());
        assert!(Query::new(&"x".repeat(64)).is_err());
    }

    #[test]
    fn answers_are_checked() {
        let mut ok = vec![0u8; 12];
        ok[2] = 0x81;
        ok[3] = 0x80;
        ok[7] = 1;
        assert!(check_answer(&ok).is_ok());
        let mut refused = ok.clone();
        refused[3] = 0x85;
        assert!(check_answer(&refused).is_err());
        assert!(check_answer(&ok[..5]).is_err());
    }
}
