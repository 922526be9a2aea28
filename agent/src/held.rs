//! Sockets a managed service holds but did not create.
//!
//! The packet programs (inbound rules, quarantine, `[bind]` on listeners)
//! find a socket's service from the cgroup the socket was *created* in. A
//! listener made by systemd socket activation, inherited from an unmanaged
//! parent or received over a Unix socket (SCM_RIGHTS) was created
//! elsewhere, so by that alone its SYNs would pass every rule of the
//! service that accepts on it. No cgroup hook runs when a process accepts,
//! inherits or receives a socket, so the agent looks: every
//! [`SCAN_INTERVAL`] it walks the processes of each service that restricts
//! inbound traffic or binding (or is quarantined), takes a reference to
//! each of their sockets (pidfd_getfd), and records the listeners and
//! unconnected UDP sockets (every TCP/UDP socket of a quarantined service)
//! by socket cookie in the kernel's `HELD_SOCKETS` map, where the packet
//! programs look first. Until a scan has seen a socket, it is judged by
//! its creator's policy: the window is one interval at most.
//!
//! Reading another user's file descriptors needs CAP_SYS_PTRACE (the unit
//! grants it for this); a process that cannot be read is logged and counted
//! (`bulkhead_held_socket_scan_errors_total`), never skipped silently.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// How often the held sockets are looked for.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// A managed service to scan.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Relative to the cgroup2 mount.
    pub cgroup_path: &'a str,
    /// The id under which SERVICES knows the service.
    pub cgroup_id: u64,
    /// Every TCP/UDP socket (quarantine cuts established connections),
    /// not only listeners and unconnected UDP sockets.
    pub all_sockets: bool,
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct Found {
    /// Socket cookie -> cgroup id of the service holding the socket.
    pub held: HashMap<u64, u64>,
    /// Processes whose descriptors could not be read, with why.
    pub unreadable: Vec<(u32, String)>,
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct HeldStats {
    /// Sockets in HELD_SOCKETS after the last scan.
    pub sockets: AtomicU64,
    /// Processes whose descriptors a scan could not read.
    pub scan_errors: AtomicU64,
    /// Sockets that did not fit HELD_SOCKETS.
    pub overflow: AtomicU64,
}

impl HeldStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Scans `targets`. `managed` holds every managed service's cgroup path:
/// a service nested in another's cgroup is its own target, not part of the
/// outer one.
pub fn scan(mount: &Path, targets: &[Target<'_>], managed: &HashSet<&str>) -> Found {
    let mut found = Found::default();
    for target in targets {
        let mut seen = HashSet::new();
        for pid in pids_below(mount, target.cgroup_path, managed) {
            if let Err(e) = scan_process(pid, target, &mut seen, &mut found.held) {
                // Gone in the meantime: nothing to judge.
                if e.raw_os_error() != Some(libc::ESRCH) && e.kind() != io::ErrorKind::NotFound {
                    found.unreadable.push((pid, e.to_string()));
                }
            }
        }
    }
    found
}

/// The pids in cgroup `relative` and its descendants, minus those of
/// nested managed services.
fn pids_below(mount: &Path, relative: &str, managed: &HashSet<&str>) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![relative.to_string()];
    while let Some(dir) = dirs.pop() {
        let path = mount.join(&dir);
        if let Ok(text) = fs::read_to_string(path.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child = format!("{dir}/{}", entry.file_name().to_string_lossy());
                if !managed.contains(child.as_str()) {
                    dirs.push(child);
                }
            }
        }
    }
    pids
}

fn scan_process(
    pid: u32,
    target: &Target<'_>,
    seen: &mut HashSet<u64>,
    held: &mut HashMap<u64, u64>,
) -> io::Result<()> {
    let pidfd = pidfd_open(pid)?;
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(link) = fs::read_link(entry.path()) else {
            continue; // closed meanwhile
        };
        let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        if !seen.insert(inode) {
            continue; // the same socket through another descriptor
        }
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let sock = match pidfd_getfd(&pidfd, fd) {
            Ok(sock) => sock,
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => continue,
            Err(e) => return Err(e),
        };
        if judged_on_packets(&sock, target.all_sockets) {
            held.insert(sockopt_u64(&sock, libc::SO_COOKIE)?, target.cgroup_id);
        }
    }
    Ok(())
}

/// Whether the packet programs judge this socket's traffic by its service:
/// an inet TCP listener or unconnected UDP socket (any TCP/UDP socket with
/// `all`).
fn judged_on_packets(sock: &OwnedFd, all: bool) -> bool {
    let domain = sockopt_u64(sock, libc::SO_DOMAIN).unwrap_or(0);
    if domain != libc::AF_INET as u64 && domain != libc::AF_INET6 as u64 {
        return false;
    }
    match sockopt_u64(sock, libc::SO_PROTOCOL).unwrap_or(0) {
        p if p == libc::IPPROTO_TCP as u64 => {
            all || sockopt_u64(sock, libc::SO_ACCEPTCONN).unwrap_or(0) != 0
        }
        p if p == libc::IPPROTO_UDP as u64 => all || !connected(sock),
        _ => false,
    }
}

fn connected(sock: &OwnedFd) -> bool {
    // SAFETY: a sockaddr_storage buffer and its length.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getpeername(sock.as_raw_fd(), (&raw mut addr).cast(), &mut len) == 0
    }
}

/// An integer socket option (SO_COOKIE is 8 bytes, the others 4).
fn sockopt_u64(sock: &OwnedFd, name: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: an 8-byte buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if len == 4 {
        u64::from(value as u32)
    } else {
        value
    })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned(fd)
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: as above.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    owned(fd)
}

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(io::Error::other)?;
    // SAFETY: a descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn listeners_and_unconnected_udp_sockets_are_judged_on_packets() {
        let own = pidfd_open(std::process::id()).expect("pidfd of this test");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let connected_udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        connected_udp
            .connect(udp.local_addr().expect("addr"))
            .expect("connect");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("tcp client");
        let dup = |fd: i32| pidfd_getfd(&own, fd).expect("pidfd_getfd of our own socket");
        assert!(judged_on_packets(&dup(listener.as_raw_fd()), false));
        assert!(judged_on_packets(&dup(udp.as_raw_fd()), false));
        assert!(!judged_on_packets(&dup(connected_udp.as_raw_fd()), false));
        assert!(!judged_on_packets(&dup(client.as_raw_fd()), false));
        assert!(judged_on_packets(&dup(client.as_raw_fd()), true));
        // The cookie is the socket's, whichever descriptor asks.
        let a = sockopt_u64(&dup(listener.as_raw_fd()), libc::SO_COOKIE).expect("cookie");
        let b = sockopt_u64(&dup(listener.as_raw_fd()), libc::SO_COOKIE).expect("cookie");
        assert_eq!(a, b);
        assert_ne!(a, 0);
    }
}
