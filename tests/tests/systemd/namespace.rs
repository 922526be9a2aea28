//! The unit under a real systemd: PID 1 of its own PID, mount and cgroup
//! namespaces.

use std::{
    fs, net::Ipv4Addr, os::unix::fs::PermissionsExt as _, path::Path, path::PathBuf,
    process::Child, process::Command, process::Output, process::Stdio, time::Duration,
};

use integration_tests::{
    addr, bulkhead_bin, eventually, free_port_block, probe, process::output_with_timeout,
    process::signal, process::terminate, require_bpf, Probe, Proto,
};

use super::{http_get, repo, text, tool, unit_text};

/// Where the namespace's `bulkhead-dns.socket` listens (the shipped
/// addresses are the host's to use).
pub(super) const TEST_DNS_SOCKET: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 83, 99)), 53);
pub(super) const TEST_DNS_SOCKET6: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 8399);

/// The watchdog interval the namespaced systemd uses (a drop-in).
const NS_WATCHDOG: Duration = Duration::from_secs(2);

/// What a test of the unit under a namespaced systemd needs: BPF,
/// `unshare`, `nsenter` and systemd's binary, which it returns. `None`: a
/// test skips (a `SKIPPED` line), or it has failed already under
/// `BULKHEAD_REQUIRE_BPF=1`.
pub(super) fn ns_systemd_prerequisites() -> Option<PathBuf> {
    if !require_bpf() {
        return None;
    }
    tool("unshare", "util-linux")?;
    tool("nsenter", "util-linux")?;
    let systemd = systemd_binary();
    if systemd.is_none() {
        let _ = tool("systemd", "systemd"); // skips or fails with the package name
    }
    systemd
}

/// systemd's own binary (not systemctl): where Debian and others put it.
fn systemd_binary() -> Option<PathBuf> {
    ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// What runs inside the new namespaces before systemd: private mounts, a
/// cgroup2 view rooted at the test's cgroup, a fresh bpffs, an empty /run,
/// /var/log and /var/lib, the test's files under /etc/bulkhead (an overlay)
/// and the binary at /usr/local/bin/bulkhead (a tmpfs). Nothing reaches the
/// host's file systems.
const NS_SETUP: &str = r#"set -e
W="$1"; SYSTEMD="$2"
mount --make-rprivate /
mount -t proc proc /proc
umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/log
mount -t tmpfs tmpfs /var/lib
mkdir -p /var/lib/systemd
mount -t overlay overlay -o lowerdir=/etc,upperdir="$W/etc-upper",workdir="$W/etc-work" /etc
mount -t tmpfs tmpfs /usr/local/bin
cp "$W/bulkhead" /usr/local/bin/bulkhead
mkdir -p /sys/fs/cgroup/svc
export container=bulkhead-test SYSTEMD_UNIT_PATH="$W/units"
exec "$SYSTEMD" --system --unit=bulkhead-test.target --log-target=console --show-status=no
"#;

/// The first child process of `parent` (from `/proc/*/stat`).
fn child_of(parent: u32) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parens.
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(") ")?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
}

/// systemd running the unit in its own namespaces. `Drop` kills the whole
/// PID namespace and removes the test's cgroups.
pub(super) struct NsSystemd {
    /// `unshare`, whose forked child became systemd (PID 1 inside).
    unshare: Option<Child>,
    /// Host cgroup the namespace's cgroup2 root maps to.
    pub(super) cgroup: PathBuf,
    work: tempfile::TempDir,
}

impl NsSystemd {
    /// systemd's pid as seen from here.
    fn pid1(&self) -> u32 {
        let unshare = self.unshare.as_ref().expect("running").id();
        child_of(unshare)
            .unwrap_or_else(|| panic!("unshare ({unshare}) has no child: is systemd running?"))
    }

    /// Runs a command inside the namespaces (`systemctl ...`).
    pub(super) fn run(&self, args: &[&str]) -> Output {
        let pid = self.pid1().to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-m", "-p", "--"]).args(args);
        output_with_timeout(&mut cmd, Duration::from_secs(40))
    }

    pub(super) fn show(&self, property: &str) -> String {
        let out = self.run(&["systemctl", "show", "bulkhead", "-p", property, "--value"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The agent's stdout and stderr (a file in the namespace's /run).
    pub(super) fn log(&self) -> String {
        // Never panics: `Drop` prints it while a test unwinds.
        let Some(pid1) = self.unshare.as_ref().and_then(|c| child_of(c.id())) else {
            return "(no log: systemd is not running)".to_owned();
        };
        let path = format!("/proc/{pid1}/root/run/bulkhead-test.log");
        if let Ok(log) = fs::read_to_string(&path) {
            return log;
        }
        // AgentOutput::Journal: the unit's and journald's own lines.
        let pid = pid1.to_string();
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "-p", "--", "journalctl", "--no-pager"])
            .args(["-u", "bulkhead.service", "-u", "systemd-journald.service"])
            .output()
            .map_or_else(
                |e| format!("(no log at {path}, no journalctl: {e})"),
                |out| text(&out),
            )
    }

    /// Waits until `ActiveState` is `want`; panics with the log otherwise.
    pub(super) fn wait_state(&self, want: &str, timeout: Duration) {
        // `failed` ends the wait early: it is final.
        let state = eventually(timeout, Duration::from_millis(200), || {
            let state = self.show("ActiveState");
            if state == want || state == "failed" {
                Ok(state)
            } else {
                Err(state)
            }
        })
        .unwrap_or_else(|last| last);
        if state == want {
            return;
        }
        panic!(
            "bulkhead.service is {state:?}, not {want:?}, after {timeout:?}; result {:?}; log:\n{}",
            self.show("Result"),
            self.log()
        );
    }
}

impl Drop for NsSystemd {
    fn drop(&mut self) {
        if std::thread::panicking() && self.unshare.is_some() {
            eprintln!("----- agent log -----\n{}\n-----", self.log());
        }
        if let Some(mut child) = self.unshare.take() {
            // SIGKILL to PID 1 of a PID namespace ends every process in it;
            // the namespace's mounts (bpffs, pins included) go with it.
            if let Some(pid1) = child_of(child.id()) {
                signal(pid1, libc::SIGKILL);
            }
            terminate(&mut child, Duration::from_secs(10));
        }
        // Children first; a cgroup whose processes are still exiting may
        // need a moment.
        let _gone = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            if !self.cgroup.exists() {
                return Ok(());
            }
            let mut dirs: Vec<PathBuf> = Vec::new();
            let mut stack = vec![self.cgroup.clone()];
            while let Some(dir) = stack.pop() {
                if let Ok(entries) = fs::read_dir(&dir) {
                    stack.extend(
                        entries
                            .filter_map(Result::ok)
                            .map(|e| e.path())
                            .filter(|p| p.is_dir()),
                    );
                }
                dirs.push(dir);
            }
            for dir in dirs.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            if self.cgroup.exists() {
                Err(())
            } else {
                Ok(())
            }
        });
        if self.cgroup.exists() {
            eprintln!("CLEANUP: could not remove {}", self.cgroup.display());
        }
        let _ = &self.work;
    }
}

/// Where the agent's stdout and stderr go in the namespace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum AgentOutput {
    /// A file (`NsSystemd::log`), through a drop-in.
    File,
    /// The unit's own setting (the journal): the namespace also runs
    /// systemd-journald, from the host's unit minus its `/dev/log` and
    /// audit sockets (the first would link the host's `/dev/log`).
    Journal,
}

/// Boots systemd in new namespaces with only the repository's unit (plus
/// a drop-in for the test: a short watchdog, and with [`AgentOutput::File`] its
/// log to a file), the shipped config (its metrics port moved to
/// `metrics_port`, then `edit`ed) and `policy`.
pub(super) fn boot_ns_systemd(
    systemd: &Path,
    policy: &str,
    metrics_port: u16,
    edit: &dyn Fn(String) -> String,
    output: AgentOutput,
) -> NsSystemd {
    let work = tempfile::Builder::new()
        .prefix("bulkhead-test-systemd-")
        .tempdir()
        .expect("tempdir");
    let w = work.path();
    write_units(&w.join("units"), output);

    let etc = w.join("etc-upper/bulkhead");
    fs::create_dir_all(etc.join("policies")).expect("etc dirs");
    fs::create_dir_all(w.join("etc-work")).expect("overlay work dir");
    let config = edit(
        fs::read_to_string(repo().join("policies/config/bulkhead.toml"))
            .expect("default config")
            .replace("127.0.0.1:9469", &format!("127.0.0.1:{metrics_port}")),
    );
    fs::write(etc.join("bulkhead.toml"), config).expect("config");
    fs::write(etc.join("policies/svc.toml"), policy).expect("policy");
    for (path, mode) in [
        (etc.clone(), 0o755),
        (etc.join("policies"), 0o755),
        (etc.join("bulkhead.toml"), 0o644),
        (etc.join("policies/svc.toml"), 0o644),
    ] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    fs::copy(bulkhead_bin(), w.join("bulkhead")).expect("copy the binary");

    let cgroup = integration_tests::cgroup2_mount()
        .join(format!("bulkhead-test-{}-systemd", std::process::id()));
    fs::create_dir_all(&cgroup).expect("test cgroup");
    let log = fs::File::create(w.join("namespace.log")).expect("log");
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec unshare --mount --pid --cgroup --fork -- /bin/sh -c "$@""#)
        .arg("sh")
        .arg(&cgroup)
        .arg(NS_SETUP)
        .arg("setup")
        .arg(w)
        .arg(systemd)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start unshare");
    let ns = NsSystemd {
        unshare: Some(child),
        cgroup,
        work,
    };
    // systemd is up once systemctl answers.
    eventually(Duration::from_secs(30), Duration::from_millis(200), || {
        let up = ns
            .unshare
            .as_ref()
            .map(Child::id)
            .and_then(child_of)
            .is_some();
        if up && ns.run(&["systemctl", "is-system-running"]).stdout.len() > 1 {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| {
        panic!(
            "systemd did not come up in its namespace: {}",
            fs::read_to_string(ns.work.path().join("namespace.log")).unwrap_or_default()
        )
    });
    ns
}

/// The units systemd runs in the namespace, into `units`: empty default
/// targets, `bulkhead-test.target` wanting the unit (and journald for
/// [`AgentOutput::Journal`]), the repository's unit with its binary (in
/// `ExecStart=` and `ExecReload=`) at /usr/local/bin and the test's drop-in.
fn write_units(units: &Path, output: AgentOutput) {
    fs::create_dir_all(units.join("bulkhead.service.d")).expect("units dir");
    // The targets a default unit depends on, empty; one that wants us.
    for target in ["sysinit", "basic", "shutdown", "multi-user", "local-fs"] {
        fs::write(
            units.join(format!("{target}.target")),
            format!("[Unit]\nDescription={target} (empty, for the test)\n"),
        )
        .expect("target");
    }
    // A unit logging to the journal is only ordered after its socket:
    // the target pulls journald in.
    let journald = if output == AgentOutput::Journal {
        " systemd-journald.socket systemd-journald.service"
    } else {
        ""
    };
    fs::write(
        units.join("bulkhead-test.target"),
        format!("[Unit]\nDescription=bulkhead test\nWants=bulkhead.service{journald}\n"),
    )
    .expect("target");
    // ExecStart= and ExecReload= both run it.
    let unit = unit_text().replace("=/usr/bin/bulkhead ", "=/usr/local/bin/bulkhead ");
    fs::write(units.join("bulkhead.service"), unit).expect("unit");
    // The DNS proxy's sockets as shipped, on addresses of the test's own.
    let socket = fs::read_to_string(repo().join("systemd/bulkhead-dns.socket"))
        .expect("socket unit")
        .replace("127.0.83.53:53", &TEST_DNS_SOCKET.to_string())
        .replace("[::1]:8353", &TEST_DNS_SOCKET6.to_string());
    fs::write(units.join("bulkhead-dns.socket"), socket).expect("socket unit");
    let to_file = if output == AgentOutput::File {
        "StandardOutput=file:/run/bulkhead-test.log\nStandardError=inherit\n"
    } else {
        install_journald(units);
        ""
    };
    fs::write(
        units.join("bulkhead.service.d/test.conf"),
        format!(
            "[Service]\n{to_file}WatchdogSec={}s\n",
            NS_WATCHDOG.as_secs()
        ),
    )
    .expect("drop-in");
}

/// systemd-journald's units from the host, into `units`; the service
/// listens on its main socket only.
fn install_journald(units: &Path) {
    let dir = ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|d| d.join("systemd-journald.service").is_file())
        .unwrap_or_else(|| panic!("no systemd-journald.service on this host"));
    let service = fs::read_to_string(dir.join("systemd-journald.service"))
        .expect("read systemd-journald.service");
    let sockets = "Sockets=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald-audit.socket";
    assert_eq!(
        service.matches(sockets).count(),
        1,
        "systemd-journald.service has changed: {service}"
    );
    fs::write(
        units.join("systemd-journald.service"),
        service.replace(sockets, "Sockets=systemd-journald.socket"),
    )
    .expect("write systemd-journald.service");
    fs::copy(
        dir.join("systemd-journald.socket"),
        units.join("systemd-journald.socket"),
    )
    .expect("copy systemd-journald.socket");
}

/// `systemctl reload` runs `bulkhead reload`: applied, then refused (the
/// reload fails, the error where it is in the unit's output, the old policy
/// still enforced: `client` cannot reach `target`); SIGHUP still reloads.
fn assert_reloads(ns: &NsSystemd, client: &Probe, target: std::net::SocketAddr) {
    // systemctl reload -> `bulkhead reload` -> the policy is read again,
    // and the reload waits for it.
    let out = ns.run(&["systemctl", "reload", "bulkhead"]);
    assert!(out.status.success(), "systemctl reload: {}", text(&out));
    let log = ns.log();
    assert!(
        log.contains("bulkhead reload: the policy was applied")
            && log.contains("trigger=\"control\""),
        "systemctl reload did not reload through the control socket:\n{log}"
    );

    // A policy the agent refuses fails `systemctl reload`, the error where
    // it is in the journal, and the old policy stays enforced.
    let out = ns.run(&[
        "/bin/sh",
        "-c",
        "printf 'cgroup = \"/svc\"\\nmode = \"enforce\"\\nbogus = 1\\n' > /etc/bulkhead/policies/svc.toml",
    ]);
    assert!(out.status.success(), "writing a bad policy: {}", text(&out));
    let out = ns.run(&["systemctl", "reload", "bulkhead"]);
    assert!(
        !out.status.success(),
        "systemctl reload of a refused policy succeeded: {}\n{}",
        text(&out),
        ns.log()
    );
    let log = ns.log();
    assert!(
        log.contains("\n/etc/bulkhead/policies/svc.toml:3:1: unknown key `bogus`")
            && log.contains(
                "bulkhead reload: refused (1 error(s)); the policy in force is unchanged"
            ),
        "the refused reload's error is not in the unit's output:\n{log}"
    );
    assert_eq!(
        ns.show("ActiveState"),
        "active",
        "a refused reload stops nothing"
    );
    client
        .tcp_connect(target)
        .assert_eperm("after a refused systemctl reload");

    // SIGHUP still reloads.
    let out = ns.run(&["systemctl", "kill", "-s", "HUP", "bulkhead"]);
    assert!(
        out.status.success(),
        "systemctl kill -s HUP: {}",
        text(&out)
    );
    eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        if ns.log().contains("trigger=\"sighup\"") {
            Ok(())
        } else {
            Err(())
        }
    })
    .unwrap_or_else(|()| panic!("no reload after SIGHUP:\n{}", ns.log()));
}

#[test]
fn unit_runs_under_systemd_in_a_namespace() {
    let Some(systemd) = ns_systemd_prerequisites() else {
        return;
    };
    let target = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let port = free_port_block(Ipv4Addr::LOCALHOST.into(), 1);
    let ns = boot_ns_systemd(
        &systemd,
        "cgroup = \"/svc\"\nmode = \"enforce\"\n",
        port,
        &|c| c,
        AgentOutput::File,
    );
    // The unit is wanted by the target systemd started with.
    ns.wait_state("active", Duration::from_secs(30));
    let status = ns.show("StatusText");
    assert!(
        status.starts_with("enforcing: 1 of 1"),
        "STATUS: {status:?}"
    );
    let client = probe!().in_cgroup(&ns.cgroup.join("svc"));
    client
        .tcp_connect(target.addr())
        .assert_eperm("a service under the unit's agent");
    let health = http_get(port, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "/healthz through IPAddressAllow=localhost: {health}"
    );
    let log = ns.log();
    for problem in [
        "Read-only file system",
        "Operation not permitted (os error 1)\n",
    ] {
        assert!(
            !log.contains(problem),
            "the sandbox got in the way ({problem}):\n{log}"
        );
    }
    assert!(
        log.contains("cgroup_mkdir tracepoint")
            && !log.contains("cannot attach the cgroup creation"),
        "the tracepoint must attach under the unit's syscall filter:\n{log}"
    );

    // Three watchdog intervals later it is still the same process.
    let pid = ns.show("MainPID");
    std::thread::sleep(NS_WATCHDOG * 3);
    assert_eq!(ns.show("MainPID"), pid, "the watchdog restarted the agent");
    assert_eq!(ns.show("NRestarts"), "0");

    assert_reloads(&ns, &client, target.addr());

    // systemctl stop: the agent exits cleanly and enforcement stays pinned;
    // `bulkhead detach` ends it.
    let out = ns.run(&["systemctl", "stop", "bulkhead"]);
    assert!(out.status.success(), "systemctl stop: {}", text(&out));
    assert_eq!(ns.show("Result"), "success", "log:\n{}", ns.log());
    client
        .tcp_connect(target.addr())
        .assert_eperm("after systemctl stop (pinned)");
    let out = ns.run(&["/usr/local/bin/bulkhead", "detach"]);
    assert!(out.status.success(), "bulkhead detach: {}", text(&out));
    client
        .tcp_connect(target.addr())
        .assert_ok("after bulkhead detach");
}

/// The fleet exporter's listener inventory under the unit's sandboxing
/// (`ProtectProc=`, none of `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`): a
/// listener of a service that runs as nobody is found (netlink socket
/// diagnostics, not `/proc/PID/fd`) and reaches `ClickHouse` as an
/// `endpoints` row of that service.
#[test]
fn fleet_inventory_under_the_unit_finds_a_non_root_services_listener() {
    let Some(systemd) = ns_systemd_prerequisites() else {
        return;
    };
    let ch = integration_tests::ClickHouse::start();
    let url = ch.url();
    ch.fleet_init();
    let port = free_port_block(Ipv4Addr::LOCALHOST.into(), 1);
    let fleet = move |c: String| {
        // The shipped config has fleet mode off, its URL unset.
        for line in [
            "enabled = false\n",
            "clickhouse_url = \"\"\n",
            "batch_interval_secs = 5\n",
        ] {
            assert_eq!(c.matches(line).count(), 1, "the shipped config's {line:?}");
        }
        c.replacen("enabled = false\n", "enabled = true\n", 1)
            .replacen(
                "clickhouse_url = \"\"",
                &format!("clickhouse_url = \"{url}\""),
                1,
            )
            .replacen("batch_interval_secs = 5", "batch_interval_secs = 1", 1)
    };
    let ns = boot_ns_systemd(
        &systemd,
        "cgroup = \"/svc\"\nmode = \"audit\"\n",
        port,
        &fleet,
        AgentOutput::File,
    );
    ns.wait_state("active", Duration::from_secs(30));
    let listener = probe!()
        .in_cgroup(&ns.cgroup.join("svc"))
        .as_nobody()
        .listen(Proto::Tcp, addr("127.0.0.1:0"));
    let sql = format!(
        "SELECT service, addr FROM bulkhead.endpoints WHERE kind = 'listener' AND port = {} \
         GROUP BY service, addr FORMAT TabSeparated",
        listener.port()
    );
    eventually(Duration::from_secs(90), Duration::from_millis(500), || {
        let got = ch.query(&sql);
        if got == "svc\t127.0.0.1\n" {
            Ok(())
        } else {
            Err(got)
        }
    })
    .unwrap_or_else(|got| panic!("{sql}: {got:?}; the agent's log:\n{}", ns.log()));
    let log = ns.log();
    assert!(
        !log.contains("cannot list"),
        "the inventory was refused under the unit:\n{log}"
    );
}
