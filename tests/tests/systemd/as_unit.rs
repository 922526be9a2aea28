//! The daemon as the unit runs it.

use std::{
    ffi::OsString, fs, net::Ipv4Addr, path::Path, path::PathBuf, process::Child, process::Command,
    process::Stdio, time::Duration, time::Instant,
};

use integration_tests::{
    addr, bulkhead_bin, detach_command, free_port_block, notify::NotReady, notify::NotifySocket,
    probe, process::output_with_timeout, process::signal, process::terminate, require_bpf,
    service_policy, CgroupGuard, PolicyDir, Proto,
};

use super::{http_get, repo, section, service_setting, text, tool, unit_text};

/// What the test uses for `WatchdogSec=`: the unit's 30 s would make it
/// wait 15 s for the first ping.
const TEST_WATCHDOG: Duration = Duration::from_secs(2);

/// A daemon started the way systemd starts the unit. `Drop` stops it, takes
/// its pins out of the kernel, and prints its log if the test panicked.
struct UnitDaemon {
    child: Option<Child>,
    notify: NotifySocket,
    log: PathBuf,
    pins: PathBuf,
    control: PathBuf,
    _work: tempfile::TempDir,
}

impl UnitDaemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }
}

impl Drop for UnitDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), libc::SIGCONT);
            terminate(&mut child, Duration::from_secs(10));
        }
        if self.pins.join("current").exists() {
            let _ = detach_command(&self.pins, &self.control).output();
        }
        let _ = fs::remove_dir(&self.pins);
        if std::thread::panicking() {
            eprintln!(
                "----- bulkhead log ({}) -----\n{}----- end of bulkhead log -----",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// The shipped default config with every host path moved into `work`, the
/// policy directory set to `policies`, and metrics on `metrics_port`.
/// Panics if the config names a host path this test does not know, so a
/// new key cannot send a test daemon's files into the host's directories.
fn test_config(work: &Path, policies: &Path, pins: &Path, metrics_port: u16) -> String {
    let path = repo().join("policies/config/bulkhead.toml");
    let mut config =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let moves = [
        ("\"/etc/bulkhead/policies\"", policies.to_path_buf()),
        ("\"/sys/fs/bpf/bulkhead\"", pins.to_path_buf()),
        ("\"/var/lib/bulkhead\"", work.join("state")),
        (
            "\"/var/log/bulkhead/events.jsonl\"",
            work.join("log/events.jsonl"),
        ),
        (
            "\"/run/bulkhead/control.sock\"",
            work.join("run/control.sock"),
        ),
    ];
    for (from, to) in moves {
        assert_eq!(
            config.matches(from).count(),
            1,
            "{} should set {from} once",
            path.display()
        );
        config = config.replace(from, &format!("{:?}", to.display().to_string()));
    }
    let listen = "\"127.0.0.1:9469\"";
    assert_eq!(config.matches(listen).count(), 1, "metrics listen address");
    config = config.replace(listen, &format!("\"127.0.0.1:{metrics_port}\""));
    // Read, never written: the host's machine id names this host in fleet
    // rows (and fleet mode is off here).
    let read_only = "machine_id_file = \"/etc/machine-id\"";
    for line in config
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.trim() != read_only)
    {
        for host in ["\"/etc/", "\"/var/", "\"/run/", "\"/sys/fs/bpf/bulkhead\""] {
            assert!(
                !line.contains(host),
                "{} has a host path this test does not move: {line:?} (map it in test_config)",
                path.display()
            );
        }
    }
    config
}

/// Starts the daemon with the unit's `ExecStart=` (its binary and config
/// paths swapped for the test's), the unit's `Environment=`, what systemd
/// adds (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`, `JOURNAL_STREAM`),
/// `UMask=`, `NoNewPrivileges=`, `CapabilityBoundingSet=` and
/// `SupplementaryGroups=` (through `setpriv`).
fn start_as_unit(setpriv: &Path, policies: &Path, metrics_port: u16) -> UnitDaemon {
    let unit = unit_text();
    let work = tempfile::Builder::new()
        .prefix("bulkhead-test-unit-")
        .tempdir()
        .expect("tempdir");
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-test-{}-unit",
        std::process::id()
    ));
    let config = work.path().join("bulkhead.toml");
    fs::write(
        &config,
        test_config(work.path(), policies, &pins, metrics_port),
    )
    .expect("write the config");

    // ExecStart=, with the two host paths it names swapped.
    let exec_start = service_setting(&unit, "ExecStart");
    assert!(
        !exec_start.contains(['"', '\'', '$', '%']),
        "this test runs ExecStart= without quoting or specifiers: {exec_start}"
    );
    let mut argv: Vec<OsString> = Vec::new();
    for (i, word) in exec_start.split_whitespace().enumerate() {
        argv.push(match (i, word) {
            (0, "/usr/bin/bulkhead") => bulkhead_bin().into(),
            (0, other) => panic!("ExecStart= should run /usr/bin/bulkhead, not {other}"),
            (_, "/etc/bulkhead/bulkhead.toml") => config.clone().into(),
            (_, other) if other.starts_with('/') => {
                panic!("ExecStart= names {other}; map it to a test path here")
            }
            (_, other) => other.into(),
        });
    }

    let caps: Vec<String> = service_setting(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("not a capability name: {c}"))
                .to_ascii_lowercase()
        })
        .collect();
    assert_eq!(
        service_setting(&unit, "NoNewPrivileges"),
        "yes",
        "NoNewPrivileges="
    );
    let umask = service_setting(&unit, "UMask");
    let groups = service_setting(&unit, "SupplementaryGroups")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(",");

    let notify = NotifySocket::bind(&work.path().join("notify.sock"));
    let log = work.path().join("bulkhead.log");
    let out = fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file handle");
    let mut cmd = Command::new(setpriv);
    let bounding: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    cmd.arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg(format!("--groups={groups}"))
        .args(["--inh-caps=-all", "--no-new-privs", "--"])
        // systemd sets WATCHDOG_PID to the main process: the shell's pid,
        // which exec keeps.
        .args(["/bin/sh", "-c"])
        .arg(format!(
            "umask {umask} && WATCHDOG_PID=$$ && export WATCHDOG_PID && exec \"$@\""
        ))
        .arg("sh")
        .args(&argv)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", TEST_WATCHDOG.as_micros().to_string())
        // The journal's stream: systemd names the socket it gave as
        // stdout and stderr; here the log file stands in for it.
        .env("JOURNAL_STREAM", journal_stream(&log))
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
    for assignments in section(&unit, "Service")
        .get("Environment")
        .into_iter()
        .flatten()
    {
        for pair in assignments.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment= entry is not K=V: {pair}"));
            cmd.env(k, v);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    UnitDaemon {
        child: Some(child),
        notify,
        log,
        pins,
        control: work.path().join("run/control.sock"),
        _work: work,
    }
}

/// Mounts bpffs at /sys/fs/bpf unless it is there, as systemd does at boot.
fn mount_bpffs_like_systemd() {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounted = mountinfo.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(mount, fs)| {
            fs.starts_with("bpf ") && mount.split_whitespace().nth(4) == Some("/sys/fs/bpf")
        })
    });
    if !mounted {
        let out = output_with_timeout(
            Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "cannot mount bpffs: {}", text(&out));
    }
}

/// When `WATCHDOG=1` arrived during `watch`, from its start.
fn watchdog_pings(notify: &NotifySocket, watch: Duration) -> Vec<Duration> {
    let mut pings = Vec::new();
    let from = Instant::now();
    while from.elapsed() < watch {
        for msg in notify.pending() {
            if msg.lines().any(|l| l == "WATCHDOG=1") {
                pings.push(from.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pings.len() >= 4,
        "expected a WATCHDOG=1 every {:?} for {watch:?}, got them at {pings:?}",
        TEST_WATCHDOG / 2
    );
    let gaps: Vec<Duration> = pings
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    assert!(
        gaps.iter().all(|g| *g < TEST_WATCHDOG),
        "a gap between pings reached the watchdog interval {TEST_WATCHDOG:?}: {gaps:?}"
    );
    pings
}

/// `DEVICE:INODE` of `path`, as systemd sets `JOURNAL_STREAM`.
fn journal_stream(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("{}:{}", meta.dev(), meta.ino())
}

/// The journal stamps lines itself: when stderr is the stream
/// `JOURNAL_STREAM` names, the daemon's lines carry no timestamp and no
/// colour, and each starts with its level's syslog priority (`<6>` for
/// INFO, `<4>` WARN, `<3>` ERROR, `<7>` DEBUG), which systemd reads.
fn assert_journal_style(log: &str) {
    for (level, priority) in [(" INFO ", "<6>"), (" WARN ", "<4>"), ("ERROR ", "<3>")] {
        for line in log.lines().filter(|l| l.contains(level)) {
            assert!(
                line.starts_with(priority),
                "a line with {level:?} should start with {priority}: {line:?}"
            );
        }
    }
    assert!(log.contains("<6> INFO "), "no INFO line at <6>:\n{log}");
    for line in log.lines() {
        let line = line.get(3..).unwrap_or_default();
        let stamped = line.len() > 20
            && line.as_bytes()[4] == b'-'
            && line.as_bytes()[10] == b'T'
            && line.as_bytes()[..4].iter().all(u8::is_ascii_digit);
        assert!(
            !stamped && !line.contains('\u{1b}'),
            "under JOURNAL_STREAM log lines carry no timestamp or colour: {line:?}"
        );
    }
}

/// The decision log, made under the unit's `UMask=0077` and without
/// `CAP_CHOWN`, is 0640 and of group adm (the shipped `sink_group`, the
/// unit's `SupplementaryGroups=`), as docs/operations.md says.
fn assert_decision_log_is_for_the_log_group(daemon: &UnitDaemon) {
    use std::os::unix::fs::MetadataExt as _;
    let work = daemon.log.parent().expect("the work directory");
    let path = work.join("log/events.jsonl");
    let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode of {}", path.display());
    let adm = fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .find_map(|l| {
            l.strip_prefix("adm:x:")?
                .split(':')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .expect("group adm in /etc/group");
    assert_eq!(meta.gid(), adm, "group of {}", path.display());
}

#[test]
fn unit_command_line_is_ready_only_once_enforcing_and_pings_the_watchdog() {
    if !require_bpf() {
        return;
    }
    let Some(setpriv) = tool("setpriv", "util-linux") else {
        return;
    };
    let svc = CgroupGuard::new();
    let target = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let client = probe!().in_cgroup(svc.path());
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let port = free_port_block(Ipv4Addr::LOCALHOST.into(), 1);
    // Without CAP_SYS_ADMIN the daemon cannot mount bpffs itself; on a
    // systemd host PID 1 has mounted it long before.
    mount_bpffs_like_systemd();
    let mut daemon = start_as_unit(&setpriv, policies.path(), port);

    // READY=1, then at once freeze the daemon: whatever enforces now was
    // in place when it said it was ready.
    let mut seen = Vec::new();
    let started = Instant::now();
    let ready = {
        let child = daemon.child.as_mut().expect("running");
        daemon
            .notify
            .wait_ready(Duration::from_secs(30), &mut seen, || {
                child.try_wait().ok().flatten().is_some()
            })
    };
    let pid = daemon.pid();
    match ready {
        Ok(()) => assert!(signal(pid, libc::SIGSTOP), "cannot SIGSTOP bulkhead"),
        Err(NotReady::GaveUp) => panic!(
            "bulkhead exited before READY=1 under the unit's capabilities; notifications {seen:?}"
        ),
        Err(NotReady::Timeout) => panic!("no READY=1 within 30 s; notifications {seen:?}"),
        Err(NotReady::Io(e)) => panic!("notify socket failed: {e}"),
    }
    let ready_at = started.elapsed();
    client
        .tcp_connect(target.addr())
        .assert_eperm("right after READY=1, with the daemon stopped");
    assert!(signal(pid, libc::SIGCONT), "cannot SIGCONT bulkhead");

    let ready_msg = seen.last().expect("READY=1 was seen");
    let status = ready_msg
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 came without STATUS=: {ready_msg:?}"));
    assert!(
        status.starts_with("enforcing: 1 of 1 services"),
        "STATUS at READY=1: {status:?}"
    );
    assert!(
        seen[..seen.len() - 1]
            .iter()
            .all(|m| !m.contains("READY=1") && !m.contains("WATCHDOG=1")),
        "nothing says READY or pings before the one READY=1: {seen:?}"
    );

    // The endpoint the unit's IPAddressAllow=localhost leaves open.
    let health = http_get(port, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "/healthz: {health}");

    // Watchdog pings at half of WATCHDOG_USEC, for a few intervals.
    let pings = watchdog_pings(&daemon.notify, TEST_WATCHDOG * 2 + TEST_WATCHDOG / 2);
    assert_journal_style(&daemon.log());
    assert_decision_log_is_for_the_log_group(&daemon);

    // SIGTERM (systemctl stop): STOPPING=1, exit 0.
    let mut child = daemon.child.take().expect("running");
    let (status, killed) = terminate(&mut child, Duration::from_secs(10));
    assert!(!killed, "bulkhead ignored SIGTERM");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit status after SIGTERM"
    );
    let after = daemon.notify.pending();
    assert!(
        after.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 on SIGTERM: {after:?}"
    );
    eprintln!("READY=1 after {ready_at:?}; pings at {pings:?}");
}
