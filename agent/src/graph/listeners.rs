//! Listening sockets of managed services found by scanning `/proc`: a
//! service that was already listening when the agent started has no socket
//! owner record in the kernel, so its accepted connections produce no
//! lifecycle events to learn its listener from. The scan (at start and
//! every save) maps each TCP listening socket to its process, the process
//! to its cgroup, and the cgroup to a service of the policy.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::model::ListenKey;
use crate::policy::PolicySet;

/// `(address, port, inode)` of every TCP socket in LISTEN in one
/// `/proc/net/tcp{,6}` table.
fn listening(table: &str, v6: bool) -> Vec<(IpAddr, u16, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (addr, port) = f.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some((parse_addr(addr, v6)?, port, inode))
        })
        .collect()
}

/// The kernel prints addresses as 32-bit words in host (little-endian) order.
fn parse_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_le_bytes())
    };
    if !v6 {
        return (hex.len() == 8).then(|| word(0).map(|b| IpAddr::V4(Ipv4Addr::from(b))))?;
    }
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical())
}

/// The cgroup v2 path of `pid` (relative, without the leading `/`).
fn cgroup_of(pid: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

/// The service whose cgroup holds `path` (the deepest one when nested; the
/// closest selector when several name the same cgroup).
fn service_of<'a>(policy: &'a PolicySet, path: &str) -> Option<&'a str> {
    let mut at = path;
    loop {
        let owner = policy
            .services
            .iter()
            .filter_map(|s| Some((s.selector.names(at)?, s.name.as_str())))
            .max_by_key(|(closeness, _)| *closeness);
        if let Some((_, name)) = owner {
            return Some(name);
        }
        at = at.rsplit_once('/')?.0;
    }
}

/// Every TCP listener of a managed service, by scanning `/proc`.
pub fn scan(policy: &PolicySet) -> Vec<(ListenKey, String)> {
    let mut by_inode: HashMap<u64, Vec<(IpAddr, u16)>> = HashMap::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(table) = fs::read_to_string(file) {
            for (addr, port, inode) in listening(&table, v6) {
                by_inode.entry(inode).or_default().push((addr, port));
            }
        }
    }
    if by_inode.is_empty() || policy.services.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for proc_dir in procs.flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        let mut service: Option<Option<String>> = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(addrs) = by_inode.get(&inode) else {
                continue;
            };
            let svc = service.get_or_insert_with(|| {
                cgroup_of(&pid).and_then(|p| service_of(policy, &p).map(str::to_string))
            });
            let Some(svc) = svc else { break };
            for &(addr, port) in addrs {
                found.push((
                    ListenKey {
                        addr,
                        port,
                        protocol: "tcp".to_string(),
                    },
                    svc.clone(),
                ));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F91 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            listening(v4, false),
            vec![(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080, 12345)]
        );
        let v6 = "header\n   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1\n";
        assert_eq!(
            listening(v6, true),
            vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 80, 999)]
        );
    }

    #[test]
    fn nested_cgroups_belong_to_the_deepest_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("outer.toml"),
            "cgroup = \"/x\"\nmode = \"audit\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("inner.toml"),
            "cgroup = \"/x/y\"\nmode = \"audit\"\n",
        )
        .expect("write");
        let set = crate::policy::load_dir(dir.path()).expect("valid");
        assert_eq!(service_of(&set, "x/y/z"), Some("inner"));
        assert_eq!(service_of(&set, "x/w"), Some("outer"));
        assert_eq!(service_of(&set, "xy"), None);
    }
}
