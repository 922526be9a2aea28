//! A real DNS server (Debian's `dnsmasq`, package `dnsmasq-base`, installed
//! by `cargo xtask setup`) for the DNS name tests: on 127.0.0.1 and a free
//! port, UDP and TCP, answering only from a hosts file of its own in a
//! temporary directory (no system configuration, no upstream, no
//! `/etc/hosts`), every answer with TTL 1. Rewriting the hosts file and
//! SIGHUP rotate the addresses ([`DnsServer::set_hosts`]). It runs in the
//! foreground and is stopped by its pid on `Drop`.
//!
//! [`dig`] runs Debian's `dig` (package `bind9-dnsutils`), a real client.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    eventually,
    ports::free_port_block,
    process::{output_with_timeout, scaled, signal, stop_server},
    require::server_binary,
};

/// `BULKHEAD_DNSMASQ`: the server binary to run instead of `dnsmasq`.
pub const SERVER_ENV: &str = "BULKHEAD_DNSMASQ";
/// `BULKHEAD_DIG`: the client binary to run instead of `dig`.
pub const DIG_ENV: &str = "BULKHEAD_DIG";
/// The name every server answers, for the readiness check.
const READY_NAME: &str = "ready.bulkhead.test";
const READY_ADDR: &str = "198.51.100.254";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `dnsmasq`; stopped (SIGTERM, then SIGKILL) and its files
/// removed on `Drop`, which never panics.
#[derive(Debug)]
pub struct DnsServer {
    child: Child,
    addr: SocketAddr,
    hosts: PathBuf,
    /// Hosts file, configuration and log; removed after it stops.
    dir: TempDir,
}

impl DnsServer {
    /// A server answering `hosts` (name, address; a name may appear many
    /// times) and the CNAMEs `cnames` (alias, target: dnsmasq answers an
    /// alias with the chain and the target's addresses). Panics with its
    /// log if it does not answer.
    #[must_use]
    pub fn start(hosts: &[(&str, IpAddr)], cnames: &[(&str, &str)]) -> Self {
        let port = free_port_block(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        Self::start_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), hosts, cnames)
    }

    /// [`Self::start`] on `addr`: port 53 of a loopback address of the
    /// test's own (127.0.53.N), where a client's `resolv.conf` (which has
    /// no port) or `dig @ADDR` finds it.
    #[must_use]
    pub fn start_at(addr: SocketAddr, hosts: &[(&str, IpAddr)], cnames: &[(&str, &str)]) -> Self {
        let bin = server_binary(SERVER_ENV, "dnsmasq", "/usr/sbin");
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-dnsmasq-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        let hosts_path = dir.path().join("hosts");
        write(&hosts_path, &hosts_text(hosts));
        let config = dir.path().join("dnsmasq.conf");
        write(&config, &config_text(addr, &hosts_path, cnames));
        let log = dir.path().join("dnsmasq.log");
        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--conf-file={}", config.display()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // The guard owns the child from here: a panic below stops it.
        let mut server = Self {
            child,
            addr,
            hosts: hosts_path,
            dir,
        };
        server.wait_ready(&bin);
        server
    }

    fn wait_ready(&mut self, bin: &Path) {
        let addr = self.addr;
        let timeout = scaled(READY_TIMEOUT);
        let child = &mut self.child;
        let ready = eventually(timeout, Duration::from_millis(50), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(Err(format!("exited with {status}")));
            }
            let got = dig(addr, READY_NAME, &[]);
            if dig_addresses(&got) == [READY_ADDR] {
                Ok(Ok(()))
            } else {
                Err(format!("{READY_NAME} answered {:?}", dig_text(&got)))
            }
        });
        let problem = match ready {
            Ok(Ok(())) => return,
            Ok(Err(problem)) => problem,
            Err(last) => format!("not ready within {timeout:?} ({last})"),
        };
        panic!(
            "{} on {addr}: {problem}; its log:\n{}",
            bin.display(),
            self.log()
        );
    }

    /// Replaces the hosts file with `hosts` and tells the server (SIGHUP);
    /// it rereads the file at once, answering the new addresses from its
    /// next query on (callers wait for that with [`eventually`]).
    pub fn set_hosts(&self, hosts: &[(&str, IpAddr)]) {
        let next = self.hosts.with_extension("next");
        write(&next, &hosts_text(hosts));
        fs::rename(&next, &self.hosts)
            .unwrap_or_else(|e| panic!("cannot replace {}: {e}", self.hosts.display()));
        assert!(
            signal(self.child.id(), libc::SIGHUP),
            "cannot SIGHUP dnsmasq {}",
            self.child.id()
        );
    }

    /// Where it answers, UDP and TCP.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        let path = self.dir.path().join("dnsmasq.log");
        fs::read_to_string(&path).unwrap_or_else(|e| format!("cannot read {}: {e}", path.display()))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        stop_server(&mut self.child, "dnsmasq", STOP_TIMEOUT);
    }
}

/// Runs `dig @server NAME` with `args` (e.g. `+tcp`, `AAAA`), one try of
/// 2 s, and returns what it printed.
#[must_use]
pub fn dig(server: SocketAddr, name: &str, args: &[&str]) -> Output {
    let mut cmd = dig_command(server, name, args);
    output_with_timeout(&mut cmd, scaled(Duration::from_secs(10)))
}

/// [`dig`] from a process that joins the cgroup `service` before it runs.
#[must_use]
pub fn dig_in(service: &Path, server: SocketAddr, name: &str, args: &[&str]) -> Output {
    let mut cmd = dig_command(server, name, args);
    crate::cgroup::join_on_exec(&mut cmd, service);
    output_with_timeout(&mut cmd, scaled(Duration::from_secs(10)))
}

fn dig_command(server: SocketAddr, name: &str, args: &[&str]) -> Command {
    let bin = server_binary(DIG_ENV, "dig", "/usr/bin");
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+time=2", "+tries=1"])
        .args(args)
        .arg(name);
    cmd
}

/// dig's output as text (for messages).
#[must_use]
pub fn dig_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status dig printed (`NOERROR`, `SERVFAIL`, ...), if any.
#[must_use]
pub fn dig_status(out: &Output) -> Option<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = text.find("status: ")? + "status: ".len();
    let rest = &text[at..];
    Some(rest[..rest.find(',')?].to_owned())
}

/// Each answer of a dig that asked several names (`dig @S a b c`), in
/// order: its status and the addresses of its answer section. A query
/// that got no answer has no entry.
#[must_use]
pub fn dig_answers(out: &Output) -> Vec<(String, Vec<String>)> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(";; ->>HEADER<<-")
        .skip(1)
        .map(|answer| {
            let status = answer
                .split_once("status: ")
                .and_then(|(_, rest)| rest.split_once(','))
                .map_or_else(String::new, |(status, _)| status.to_owned());
            let addresses = answer
                .split_once(";; ANSWER SECTION:")
                .map(|(_, section)| {
                    section
                        .lines()
                        .skip(1)
                        .take_while(|l| !l.trim().is_empty())
                        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                            [_, _, "IN", "A" | "AAAA", addr] => Some(addr.to_owned()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (status, addresses)
        })
        .collect()
}

/// The flags of dig's header line (`qr aa rd ra`, `tc`...).
#[must_use]
pub fn dig_flags(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(at) = text.find("flags: ") else {
        return Vec::new();
    };
    let rest = &text[at + "flags: ".len()..];
    let end = rest.find(';').unwrap_or(rest.len());
    rest[..end].split_whitespace().map(str::to_owned).collect()
}

/// The A and AAAA addresses of dig's answer section, in order.
#[must_use]
pub fn dig_addresses(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(start) = text.find(";; ANSWER SECTION:") else {
        return Vec::new();
    };
    text[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields.as_slice() {
                [_, _, "IN", "A" | "AAAA", addr] => Some((*addr).to_owned()),
                _ => None,
            }
        })
        .collect()
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn hosts_text(hosts: &[(&str, IpAddr)]) -> String {
    let mut text = format!("{READY_ADDR} {READY_NAME}\n");
    for (name, addr) in hosts {
        let _ = writeln!(text, "{addr} {name}");
    }
    text
}

/// Only our hosts file, only on `addr`, in the foreground, as root (the
/// temporary directory is root's; dropping to `nobody` could not reread
/// it), no pid file (the harness keeps the pid), TTL 1.
fn config_text(addr: SocketAddr, hosts: &Path, cnames: &[(&str, &str)]) -> String {
    let mut text = format!(
        "keep-in-foreground\n\
         user=root\n\
         pid-file=\n\
         no-resolv\n\
         no-poll\n\
         no-hosts\n\
         addn-hosts={}\n\
         listen-address={}\n\
         port={}\n\
         bind-interfaces\n\
         local-ttl=1\n\
         log-facility=-\n",
        hosts.display(),
        addr.ip(),
        addr.port()
    );
    for (alias, target) in cnames {
        let _ = writeln!(text, "cname={alias},{target}");
    }
    text
}
