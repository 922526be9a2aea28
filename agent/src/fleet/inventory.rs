//! What the host offers to the fleet: its addresses, and the sockets its
//! services listen on, each with the service that owns it. Sockets come
//! from netlink socket diagnostics, which report every socket's cgroup and
//! need no privilege: walking other users' `/proc/PID/fd` is blind under
//! the shipped unit's `ProtectProc=` and without CAP_SYS_PTRACE. A
//! wildcard listener (`0.0.0.0`, `::`) is expanded to the host's addresses
//! of its family (`::` to both, as a dual-stack socket takes IPv4 too: the
//! blast radius would rather overstate reach than hide it).
//!
//! Not seen: a socket made by another process for the service (systemd
//! socket activation creates it in PID 1's cgroup), and sockets in network
//! namespaces other than the agent's.

use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::Path,
};

use crate::sock_diag::{self, DiagSocket, TCP_LISTEN};

/// One listening socket of a service, as the fleet stores it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listening {
    pub service: String,
    pub protocol: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

/// `TCP_CLOSE`: the state sock_diag gives an unconnected UDP socket.
const UDP_UNCONNECTED: u8 = 7;

/// The kernel's ephemeral port range: an unconnected UDP socket bound in
/// it is a client's (`sendto()` binds one there), not a listener.
fn ephemeral_ports() -> std::ops::RangeInclusive<u16> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(str::parse::<u16>);
            Some(it.next()?.ok()?..=it.next()?.ok()?)
        })
        .unwrap_or(32768..=60999)
}

/// Every cgroup under `relative` (itself included) with the id the kernel
/// gives it, mapped to `service`: sockets made in a service's child
/// cgroups are the service's too.
pub fn cgroup_owners(mount: &Path, relative: &str, service: &str, out: &mut HashMap<u64, String>) {
    let mut stack = vec![mount.join(relative)];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        out.insert(meta.ino(), service.to_string());
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
}

/// The addresses of this host's interfaces (loopback included).
pub fn host_addresses() -> io::Result<BTreeSet<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&raw mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                // Link-local addresses need a zone: nobody reaches a
                // service on another host through one.
                if !a.is_unicast_link_local() {
                    out.insert(IpAddr::V6(a));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// The listening sockets of this network namespace whose cgroup is in
/// `owners`, wildcards expanded to `addresses`.
///
/// # Errors
/// A dump failed (on kernels without `INET_DIAG_CGROUP_ID`, before 5.7,
/// every socket's owner is unknown and nothing is listed).
pub fn listening(
    owners: &HashMap<u64, String>,
    addresses: &BTreeSet<IpAddr>,
) -> io::Result<Vec<Listening>> {
    let mut out = BTreeSet::new();
    let ephemeral = ephemeral_ports();
    for (family, protocol, state, name) in [
        (libc::AF_INET, libc::IPPROTO_TCP, TCP_LISTEN, "tcp"),
        (libc::AF_INET6, libc::IPPROTO_TCP, TCP_LISTEN, "tcp"),
        (libc::AF_INET, libc::IPPROTO_UDP, UDP_UNCONNECTED, "udp"),
        (libc::AF_INET6, libc::IPPROTO_UDP, UDP_UNCONNECTED, "udp"),
    ] {
        let mut sockets = Vec::new();
        // The constants are small: AF_INET(6) and IPPROTO_TCP/UDP fit a byte.
        sock_diag::dump(family as u8, protocol as u8, 1 << state, &mut sockets)?;
        for s in &sockets {
            if name == "udp" && ephemeral.contains(&s.local.port()) {
                continue;
            }
            expand(s, name, owners, addresses, &mut out);
        }
    }
    Ok(out.into_iter().collect())
}

fn expand(
    s: &DiagSocket,
    protocol: &'static str,
    owners: &HashMap<u64, String>,
    addresses: &BTreeSet<IpAddr>,
    out: &mut BTreeSet<Listening>,
) {
    let Some(service) = s.cgroup_id.and_then(|id| owners.get(&id)) else {
        return;
    };
    // A UDP socket bound to no port is not a listener.
    if s.local.port() == 0 {
        return;
    }
    let at = |addr: IpAddr| Listening {
        service: service.clone(),
        protocol,
        addr,
        port: s.local.port(),
    };
    match s.local.ip() {
        IpAddr::V4(a) if a.is_unspecified() => {
            out.extend(addresses.iter().filter(|a| a.is_ipv4()).map(|&a| at(a)));
        }
        IpAddr::V6(a) if a.is_unspecified() => out.extend(addresses.iter().map(|&a| at(a))),
        addr => {
            out.insert(at(addr));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};

    use super::*;

    fn socket(local: &str, cgroup_id: u64) -> DiagSocket {
        DiagSocket {
            local: local.parse().expect("addr"),
            inode: 1,
            cookie: 1,
            state: TCP_LISTEN,
            cgroup_id: Some(cgroup_id),
            tcp_bytes: None,
        }
    }

    fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().expect("ip")).collect()
    }

    #[test]
    fn wildcards_expand_to_the_hosts_addresses_of_their_family() {
        let owners = HashMap::from([(5, "api".to_string())]);
        let host = addrs(&["127.0.0.1", "198.51.100.20", "::1", "2001:db8::20"]);
        let mut out = BTreeSet::new();
        expand(&socket("0.0.0.0:8080", 5), "tcp", &owners, &host, &mut out);
        let v4: Vec<String> = out
            .iter()
            .map(|l| format!("{}:{}", l.addr, l.port))
            .collect();
        assert_eq!(v4, ["127.0.0.1:8080", "198.51.100.20:8080"]);
        let mut out = BTreeSet::new();
        expand(&socket("[::]:9000", 5), "tcp", &owners, &host, &mut out);
        assert_eq!(out.len(), 4, "a dual-stack wildcard: both families");
        let mut out = BTreeSet::new();
        expand(
            &socket("198.51.100.20:22", 6),
            "tcp",
            &owners,
            &host,
            &mut out,
        );
        assert!(out.is_empty(), "cgroup 6 belongs to no service");
    }

    #[test]
    fn this_processs_listener_is_found_with_its_cgroup() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener
            .local_addr()
            .map(|a: SocketAddr| a.port())
            .expect("bound");
        // This process's cgroup, as the kernel names it.
        let cgroup = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let relative = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line")
            .trim_start_matches('/')
            .to_string();
        let mount = crate::cgroup::cgroup2_mount().expect("cgroup2");
        let mut owners = HashMap::new();
        cgroup_owners(&mount, &relative, "me", &mut owners);
        let host = host_addresses().expect("getifaddrs");
        assert!(host.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let found = listening(&owners, &host).expect("dump");
        assert!(
            found.contains(&Listening {
                service: "me".to_string(),
                protocol: "tcp",
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            }),
            "{found:?}"
        );
    }
}
