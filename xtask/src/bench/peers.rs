//! The peers: the same rules as nftables and as iptables-legacy, loaded into
//! a case's own network namespace, each in the form an administrator would
//! choose for it.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::sandbox::{run_quiet, Netns};

const NFT_TABLE: &str = "bulkhead_bench";
const IPT_CHAIN: &str = "BULKHEAD_BENCH";

/// Where `nft` finds cgroups: it resolves `socket cgroupv2` paths under
/// this directory, so on a hybrid host the cgroup2 mount's `unified/` is
/// part of the path.
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The path nft needs for the cgroup `rel` under `mount`, or None when the
/// cgroup2 mount is not below `/sys/fs/cgroup` (nft cannot name it then).
pub fn nft_cgroup_path(mount: &Path, rel: &str) -> Option<String> {
    let under = mount.strip_prefix(NFT_CGROUP_ROOT).ok()?;
    let path = under.join(rel);
    Some(path.to_string_lossy().into_owned())
}

/// One rule matches the service's cgroup and jumps to its chain, where an
/// interval set holds the N destinations and the probe's 127.0.0.1;
/// anything else from the service is dropped. The counter on the jump shows
/// that the probes really went through the chain.
pub fn nft_ruleset(nft_cgroup: &str, destinations: &[Ipv4Addr]) -> String {
    let mut elements = String::with_capacity(destinations.len() * 16);
    for addr in destinations {
        let _ = write!(elements, "{addr}, ");
    }
    format!(
        "table ip {NFT_TABLE} {{\n\
         \x20 set allowed {{\n\
         \x20   type ipv4_addr\n\
         \x20   flags interval\n\
         \x20   elements = {{ {elements}127.0.0.1 }}\n\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter; policy accept;\n\
         \x20   socket cgroupv2 level 1 \"{nft_cgroup}\" counter jump service\n\
         \x20 }}\n\
         \x20 chain service {{\n\
         \x20   ip daddr @allowed accept\n\
         \x20   drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// The iptables equivalent: one `-m cgroup --path` rule jumps to the
/// service's chain, which has one ACCEPT per destination, then the probe's
/// 127.0.0.1 last, then DROP. A chain is linear, so 127.0.0.1 last is the
/// walk over all N rules (a destination in the middle would walk half).
/// `--path` on every rule instead would cost the same walk (the address is
/// compared before any match runs) but 4 KiB of kernel memory per rule, the
/// size of xt_cgroup's path buffer.
pub fn iptables_rules(cgroup_rel: &str, destinations: &[Ipv4Addr]) -> String {
    let mut out = String::with_capacity(destinations.len() * 48 + 256);
    let _ = write!(
        out,
        "*filter\n\
         :INPUT ACCEPT [0:0]\n\
         :FORWARD ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :{IPT_CHAIN} - [0:0]\n\
         -A OUTPUT -m cgroup --path /{cgroup_rel} -j {IPT_CHAIN}\n"
    );
    for addr in destinations {
        let _ = writeln!(out, "-A {IPT_CHAIN} -d {addr}/32 -j ACCEPT");
    }
    let _ = write!(
        out,
        "-A {IPT_CHAIN} -d 127.0.0.1/32 -j ACCEPT\n\
         -A {IPT_CHAIN} -j DROP\n\
         COMMIT\n"
    );
    out
}

/// Writes `text` to `file` and loads it with `nft -f`; returns how long
/// `nft` took.
pub fn load_nft(ns: &Netns, file: &Path, text: &str) -> Result<Duration> {
    fs::write(file, text).with_context(|| format!("write {}", file.display()))?;
    let start = Instant::now();
    run_quiet(ns.command("nft")?.arg("-f").arg(file)).context("load the nftables rules")?;
    Ok(start.elapsed())
}

/// Writes `text` to `file` and loads it with `iptables-legacy-restore`.
pub fn load_iptables(ns: &Netns, file: &Path, text: &str) -> Result<Duration> {
    fs::write(file, text).with_context(|| format!("write {}", file.display()))?;
    let start = Instant::now();
    run_quiet(ns.command("iptables-legacy-restore")?.arg(file))
        .context("load the iptables rules")?;
    Ok(start.elapsed())
}

/// Packets the nftables cgroup rule has matched so far.
pub fn nft_packets(ns: &Netns) -> Result<u64> {
    let out = run_quiet(
        ns.command("nft")?
            .args(["list", "chain", "ip", NFT_TABLE, "output"]),
    )?;
    parse_after(&out, "counter packets ").context("no counter in `nft list chain` output")
}

/// Packets the iptables cgroup rule has matched so far.
pub fn iptables_packets(ns: &Netns) -> Result<u64> {
    let out = run_quiet(
        ns.command("iptables-legacy")?
            .args(["-t", "filter", "-L", "OUTPUT", "-v", "-x", "-n"]),
    )?;
    // Columns: pkts bytes target prot opt in out source destination ...
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(IPT_CHAIN))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no jump rule in `iptables-legacy -L OUTPUT` output")
}

fn parse_after(text: &str, marker: &str) -> Option<u64> {
    let at = text.find(marker)? + marker.len();
    text[at..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_path_is_relative_to_sys_fs_cgroup() {
        let hybrid = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            nft_cgroup_path(hybrid, "bulkhead-bench-x").as_deref(),
            Some("unified/bulkhead-bench-x")
        );
        let pure = Path::new("/sys/fs/cgroup");
        assert_eq!(nft_cgroup_path(pure, "x").as_deref(), Some("x"));
        assert_eq!(nft_cgroup_path(Path::new("/mnt/cg2"), "x"), None);
    }

    #[test]
    fn rules_end_with_the_probe_then_drop() {
        let dests = [Ipv4Addr::new(127, 0, 9, 9)];
        let nft = nft_ruleset("unified/x", &dests);
        assert!(nft.contains("elements = { 127.0.9.9, 127.0.0.1 }"));
        assert!(nft.contains("socket cgroupv2 level 1 \"unified/x\" counter jump service"));
        let ipt = iptables_rules("x", &dests);
        let tail: Vec<&str> = ipt.lines().rev().take(3).collect();
        assert_eq!(
            tail,
            [
                "COMMIT",
                "-A BULKHEAD_BENCH -j DROP",
                "-A BULKHEAD_BENCH -d 127.0.0.1/32 -j ACCEPT"
            ]
        );
        assert!(ipt.contains("-A OUTPUT -m cgroup --path /x -j BULKHEAD_BENCH"));
    }

    #[test]
    fn counters_parse() {
        let nft =
            "\t\tsocket cgroupv2 level 1 \"unified/x\" counter packets 42 bytes 1 jump service\n";
        assert_eq!(parse_after(nft, "counter packets "), Some(42));
    }
}
