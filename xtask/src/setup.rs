//! `cargo xtask setup`: installs what a fresh machine lacks (the pinned eBPF
//! toolchain with rust-src, a matching bpf-linker, the Debian packages the
//! tests use). Idempotent, and quick when everything is already there.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    bpf_linker,
    util::{find_in_path, is_root, output_of, run_cmd, secs, workspace_root, EBPF_TOOLCHAIN},
};

/// Debian packages the integration tests need: `ip` for namespaces and veth
/// pairs, `bpftool` to check that no bulkhead program is left behind,
/// `chromium` to render the service map page headless (tests/tests/graph.rs),
/// `clickhouse-server` (18.16 on Debian 12) for fleet mode's tests: they
/// start their own servers on free loopback ports from temporary configs
/// (tests/src/clickhouse.rs). On a host run by systemd the package also
/// enables and starts its own service (ports 8123 and 9000), which the
/// tests do not use. `prometheus` (2.42 on Debian 12, with `promtool`) for
/// the shipped alerting rules and dashboard (tests/tests/monitoring.rs):
/// the tests start their own server on a free loopback port
/// (tests/src/prometheus_server.rs); the package's own service (port 9090)
/// is not used either. `logrotate` rotates a running agent's decision log
/// with the shipped config, `lintian` checks the .deb
/// (tests/tests/systemd/). `dnsmasq-base` (the server binary alone, no
/// service) and `bind9-dnsutils` (`dig`) for the DNS proxy's tests
/// (tests/tests/dns_proxy.rs): a real server on a free loopback port from
/// a temporary config (tests/src/dns_server.rs), queried by a real client;
/// `curl`, a real client of an allowed name (tests/tests/dns_load.rs);
/// `nft` for a host whose netfilter rewrites packet marks
/// (tests/tests/dns_names.rs).
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "chromium",
    "clickhouse-server",
    "prometheus",
    "logrotate",
    "lintian",
    // The DNS name tests: a real server and a real client.
    "dnsmasq-base",
    "bind9-dnsutils",
    "curl",
    "nftables",
];

/// Everything: build tools and the packages the tests need.
pub fn run() -> Result<()> {
    let start = Instant::now();
    let mut installed = ensure_build_tools()?;
    installed |= ensure_packages(TEST_PACKAGES)?;
    let what = if installed {
        "installed what was missing"
    } else {
        "everything was already present"
    };
    eprintln!("xtask: setup done in {:.1}s: {what}", secs(start));
    Ok(())
}

/// What building the agent needs: the eBPF toolchain and bpf-linker.
/// Returns whether anything had to be installed.
pub fn ensure_build_tools() -> Result<bool> {
    check_pin()?;
    let (sysroot, new_toolchain) = ensure_toolchain()?;
    let new_linker = bpf_linker::ensure(&sysroot)?;
    Ok(new_toolchain || new_linker)
}

/// Installs the Debian packages `pkgs` that are missing (apt-get, as root).
#[allow(dead_code, reason = "for `cargo xtask bench` (nftables, iptables)")]
pub fn ensure_debian_packages(pkgs: &[&str]) -> Result<()> {
    ensure_packages(pkgs).map(drop)
}

fn ensure_packages(pkgs: &[&str]) -> Result<bool> {
    if find_in_path("dpkg-query").is_none() {
        eprintln!(
            "xtask: not a Debian host; make sure these are installed: {}",
            pkgs.join(" ")
        );
        return Ok(false);
    }
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|pkg| !is_installed(pkg))
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: packages {}: present", pkgs.join(" "));
        return Ok(false);
    }
    let list = missing.join(" ");
    if !is_root() {
        let sudo = if find_in_path("sudo").is_some() {
            "sudo "
        } else {
            ""
        };
        bail!(
            "missing packages: {list}; install them as root: \
             {sudo}apt-get update && {sudo}env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y {list}"
        );
    }
    eprintln!("xtask: installing packages: {list}");
    run_cmd(apt().arg("update"))?;
    run_cmd(apt().args(["install", "-y"]).args(&missing))?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !is_installed(p)).collect();
    ensure!(
        still.is_empty(),
        "apt-get did not install: {}",
        still.join(" ")
    );
    Ok(true)
}

fn is_installed(pkg: &str) -> bool {
    output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// apt-get that never asks (CI has no stdin).
fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}

/// The eBPF toolchain's sysroot, installing the toolchain or its rust-src
/// first if needed; the bool says whether anything was installed.
fn ensure_toolchain() -> Result<(PathBuf, bool)> {
    let has_src = |sysroot: &PathBuf| sysroot.join("lib/rustlib/src/rust/library").is_dir();
    let installed = match sysroot() {
        Some(root) if has_src(&root) => {
            eprintln!("xtask: toolchain {EBPF_TOOLCHAIN} with rust-src: present");
            return Ok((root, false));
        }
        Some(_) => {
            eprintln!("xtask: adding rust-src to {EBPF_TOOLCHAIN}");
            run_cmd(
                rustup()
                    .args(["component", "add", "rust-src", "--toolchain"])
                    .arg(EBPF_TOOLCHAIN),
            )?;
            true
        }
        None => {
            eprintln!("xtask: installing toolchain {EBPF_TOOLCHAIN} with rust-src");
            run_cmd(
                rustup()
                    .args(["toolchain", "install", EBPF_TOOLCHAIN])
                    .args(["--profile", "minimal", "--component", "rust-src"])
                    .arg("--no-self-update"),
            )?;
            true
        }
    };
    let root =
        sysroot().with_context(|| format!("{EBPF_TOOLCHAIN} does not run after installing it"))?;
    ensure!(
        has_src(&root),
        "rust-src missing from {} after installing it",
        root.display()
    );
    Ok((root, installed))
}

/// The sysroot of the installed eBPF toolchain (None if it is not installed;
/// `rustup run` does not install toolchains by itself).
fn sysroot() -> Option<PathBuf> {
    output_of(rustup().args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"]))
        .map(|out| PathBuf::from(out.trim()))
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.stdin(Stdio::null());
    cmd
}

/// Fails unless `agent/build.rs` builds with the toolchain we install.
fn check_pin() -> Result<()> {
    let path = workspace_root().join("agent/build.rs");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        pins_toolchain(&text),
        "agent/build.rs does not name the eBPF toolchain \"{EBPF_TOOLCHAIN}\" that xtask \
         installs (util::EBPF_TOOLCHAIN): change both together"
    );
    Ok(())
}

fn pins_toolchain(build_rs: &str) -> bool {
    build_rs.contains(&format!("\"{EBPF_TOOLCHAIN}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_build_rs_names_our_toolchain() {
        check_pin().expect("agent/build.rs and xtask disagree on the eBPF toolchain");
    }

    #[test]
    fn pin_must_be_a_quoted_string() {
        assert!(pins_toolchain("Toolchain::Custom(\"nightly-2026-05-20\")"));
        assert!(!pins_toolchain("\"nightly-2026-05-200\""));
    }
}
