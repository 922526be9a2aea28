//! "Remote hosts": a network namespace joined to the root namespace by a veth
//! pair, with documentation-range addresses only.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use crate::{eventually::eventually, process::try_output_with_timeout};

/// Every `ip` call is quick; anything slower is a broken host.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Number of /29 slots in 198.51.100.0/24 (each netns takes one).
const SLOTS: u8 = 32;

/// A network namespace `bulkhead-test-<pid>-<n>` with a veth pair to the
/// root namespace. Each guard takes a free slot `s`:
///
/// - IPv4 `198.51.100.(8s)/29`: `.8s+1` on the root side, `.8s+2..=.8s+6` usable
///   inside the namespace ([`Self::v4`]);
/// - IPv6 `2001:db8:b0:s::/64`: `::1` on the root side, anything else inside
///   ([`Self::v6`]).
///
/// The namespace gets `v4(2)` and `v6(2)`; [`Self::add_addr_v4`] /
/// [`Self::add_addr_v6`] add more. `Drop` kills the processes inside, deletes
/// the namespace and the root-side veth, and never panics.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
    host_if: String,
    peer_if: String,
    slot: u8,
}

impl NetnsGuard {
    /// Creates the namespace, the veth pair, the addresses, and brings every
    /// link (and `lo` inside) up; panics with the failing command if it cannot.
    #[must_use]
    pub fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let slot = free_slot(pid, n);
        // Interface names are limited to 15 bytes.
        let guard = Self {
            name: format!("bulkhead-test-{pid}-{n}"),
            host_if: format!("bhh{}n{n}", pid % 10_000_000),
            peer_if: format!("bhp{}n{n}", pid % 10_000_000),
            slot,
        };
        // From here on, a failing step panics and `guard`'s Drop cleans up.
        let (name, host, peer) = (&guard.name, &guard.host_if, &guard.peer_if);
        ip(&["netns", "add", name]);
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", peer, "netns", name,
        ]);
        ip(&["addr", "add", &format!("{}/29", guard.v4(1)), "dev", host]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", guard.v6(1)),
            "dev",
            host,
            "nodad",
        ]);
        ip(&["link", "set", host, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&["-n", name, "link", "set", peer, "up"]);
        guard.add_addr_v4(2);
        guard.add_addr_v6(2);
        guard.wait_up();
        guard
    }

    /// The namespace's name (for `ip -n` and `bulkhead-probe --netns`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root-side veth's name.
    #[must_use]
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Address `198.51.100.(8s + host)` of this namespace's /29
    /// (`host` 1 is the root side; 2..=6 are for the namespace).
    #[must_use]
    pub fn v4(&self, host: u8) -> Ipv4Addr {
        assert!((1..=6).contains(&host), "v4 host part {host} not in 1..=6");
        Ipv4Addr::new(198, 51, 100, self.slot * 8 + host)
    }

    /// Address `2001:db8:b0:s::host` of this namespace's /64.
    #[must_use]
    pub fn v6(&self, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xb0, u16::from(self.slot), 0, 0, 0, host)
    }

    /// Gives the namespace's veth the address [`Self::v4`]`(host)` too.
    #[expect(
        clippy::must_use_candidate,
        reason = "called for its effect; the result is a convenience"
    )]
    pub fn add_addr_v4(&self, host: u8) -> Ipv4Addr {
        let addr = self.v4(host);
        let cidr = format!("{addr}/29");
        ip(&["-n", &self.name, "addr", "add", &cidr, "dev", &self.peer_if]);
        addr
    }

    /// Address [`Self::v4`]`(host)` as a host that never answers: the
    /// root side has a permanent neighbour entry for it with an address no
    /// interface has, so a packet to it leaves the veth and the namespace
    /// drops it (another host's frame), with no ARP failure to report back.
    /// A TCP connect to it stays in `SYN_SENT`.
    #[must_use]
    pub fn silent_v4(&self, host: u8) -> Ipv4Addr {
        let addr = self.v4(host);
        ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            "02:00:00:00:00:01",
            "nud",
            "permanent",
            "dev",
            &self.host_if,
        ]);
        addr
    }

    /// Gives the namespace's veth the address [`Self::v6`]`(host)` too (no DAD,
    /// so it is usable at once).
    #[expect(
        clippy::must_use_candidate,
        reason = "called for its effect; the result is a convenience"
    )]
    pub fn add_addr_v6(&self, host: u16) -> Ipv6Addr {
        let addr = self.v6(host);
        let cidr = format!("{addr}/64");
        ip(&[
            "-n",
            &self.name,
            "-6",
            "addr",
            "add",
            &cidr,
            "dev",
            &self.peer_if,
            "nodad",
        ]);
        addr
    }

    /// Waits until both veth ends report carrier (`LOWER_UP`).
    fn wait_up(&self) {
        eventually(Duration::from_secs(5), Duration::from_millis(20), || {
            let host = ip(&["-o", "link", "show", "dev", &self.host_if]);
            let peer = ip(&["-n", &self.name, "-o", "link", "show", "dev", &self.peer_if]);
            if host.contains("LOWER_UP") && peer.contains("LOWER_UP") {
                Ok(())
            } else {
                Err((host, peer))
            }
        })
        .unwrap_or_else(|(host, peer)| {
            panic!(
                "veth {} / {} not up after 5 s:\n{host}\n{peer}",
                self.host_if, self.peer_if
            )
        });
    }

    fn cleanup(&self) -> Vec<String> {
        let mut errors = Vec::new();
        // A process still inside keeps the namespace (and its veth) alive.
        if let Ok(pids) = try_ip(&["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                crate::process::signal(pid, libc::SIGKILL);
            }
        }
        if let Err(e) = try_ip(&["netns", "del", &self.name]) {
            if !e.contains("No such file") {
                errors.push(e);
            }
        }
        // Deleting the namespace destroys the pair; this catches a half-made one.
        if let Err(e) = try_ip(&["link", "del", &self.host_if]) {
            if !e.contains("Cannot find device") {
                errors.push(e);
            }
        }
        errors
    }
}

impl Default for NetnsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for e in self.cleanup() {
            eprintln!("CLEANUP FAILED: netns {}: {e}", self.name);
        }
    }
}

/// Which addresses of a [`NetnsGuard`] an inbound test uses, for one IP
/// family: where the service listens, and two peers, one a policy allows
/// and one it does not.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// `IPv4` or `IPv6`, for messages.
    pub name: &'static str,
    /// The root side of the veth pair: where the service listens.
    pub local: IpAddr,
    /// The peer source address the policy allows.
    pub allowed: IpAddr,
    /// A second peer address in the same namespace, which it does not.
    pub denied: IpAddr,
}

impl Family {
    /// `v4(1)` local, `v4(2)` allowed, and `v4(3)` (added) denied.
    #[must_use]
    pub fn v4(remote: &NetnsGuard) -> Self {
        Self {
            name: "IPv4",
            local: remote.v4(1).into(),
            allowed: remote.v4(2).into(),
            denied: remote.add_addr_v4(3).into(),
        }
    }

    /// `v6(1)` local, `v6(2)` allowed, and `v6(3)` (added) denied.
    #[must_use]
    pub fn v6(remote: &NetnsGuard) -> Self {
        Self {
            name: "IPv6",
            local: remote.v6(1).into(),
            allowed: remote.v6(2).into(),
            denied: remote.add_addr_v6(3).into(),
        }
    }

    /// The local address with `port`.
    #[must_use]
    pub fn local(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.local, port)
    }
}

/// Whether a network namespace of that name exists (`ip netns list`).
#[must_use]
pub fn netns_exists(name: &str) -> bool {
    ip(&["netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Whether a link of that name exists in the root namespace.
#[must_use]
pub fn link_exists(name: &str) -> bool {
    try_ip(&["link", "show", "dev", name]).is_ok()
}

/// A /29 slot whose addresses no interface here uses yet (so two test runs
/// on one machine do not collide), starting from one derived from pid and n.
fn free_slot(pid: u32, n: usize) -> u8 {
    let used = ip(&["-o", "-4", "addr", "show"]);
    let start = usize::try_from(pid)
        .unwrap_or(0)
        .wrapping_mul(7)
        .wrapping_add(n);
    (0..usize::from(SLOTS))
        .filter_map(|i| u8::try_from((start + i) % usize::from(SLOTS)).ok())
        .find(|&s| {
            let prefix = format!(" 198.51.100.{}/", s * 8 + 1);
            !used.contains(&prefix)
        })
        .unwrap_or_else(|| panic!("all {SLOTS} test slots in 198.51.100.0/24 are in use"))
}

/// Runs `ip ARGS`, returning stdout; panics with the command and its stderr.
fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = try_output_with_timeout(Command::new("ip").args(args), IP_TIMEOUT)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
