//! `bulkhead flows` and the control socket, against a real daemon: the
//! denied connect of a real process shows up with its pid, comm, destination
//! and rule (the same record as in the decision log), `--follow` streams
//! events made after it started, the socket is root-only, and with no daemon
//! the command says so in one line.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    bulkhead, bulkhead_bin,
    daemon::{ready_timeout, STOP_TIMEOUT},
    detach_command, eventually, probe,
    process::{kill, output_with_timeout, signal, terminate, wait_deadline},
    require_bpf, service_policy, CgroupGuard, Daemon, Egress, Enforced, Listener, PolicyDir,
    Targets,
};
use serde_json::Value;

/// How long an event may take from the kernel to `bulkhead flows`.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe client may take (its own steps time out at 3 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// A daemon managing service `billing` (the test cgroup), which may reach
/// `allowed` and nothing else. Fields drop in order: the daemon first, the
/// cgroup last.
struct Setup {
    daemon: Daemon,
    /// The daemon's control socket.
    socket: PathBuf,
    allowed: Listener,
    denied: Listener,
    policies: PolicyDir,
    svc: CgroupGuard,
}

impl Setup {
    fn new() -> Self {
        let Targets {
            allowed, denied, ..
        } = Targets::loopback(&probe!());
        let rule = Egress::to(["127.0.0.1"])
            .ports([allowed.port()])
            .protocol("tcp");
        let Enforced {
            svc,
            policies,
            daemon,
        } = Enforced::start("billing.toml", |svc| {
            service_policy(svc, "enforce", &[rule])
        });
        let socket = control_socket(&daemon);
        Self {
            daemon,
            socket,
            allowed,
            denied,
            policies,
            svc,
        }
    }

    /// `bulkhead flows --socket <ours> ARGS`.
    fn flows(&self, args: &[&str]) -> Output {
        flows(&self.socket, args)
    }

    /// Polls `bulkhead flows --json ARGS` until it shows the event of `pid`.
    fn wait_event(&self, args: &[&str], pid: u32) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        eventually(EVENT_TIMEOUT, Duration::from_millis(100), || {
            let out = self.flows(&args);
            assert!(
                out.status.success(),
                "bulkhead flows {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let events = json_lines(&out.stdout);
            match events.iter().find(|ev| ev["pid"] == pid) {
                Some(ev) => Ok(ev.clone()),
                None => Err(events),
            }
        })
        .unwrap_or_else(|events| {
            panic!(
                "no event of pid {pid} in `bulkhead flows {args:?}` within {EVENT_TIMEOUT:?}; \
                 it showed {events:#?}"
            )
        })
    }
}

/// `bulkhead flows --socket SOCKET ARGS`.
fn flows(socket: &Path, args: &[&str]) -> Output {
    let mut all = vec![
        OsStr::new("flows"),
        OsStr::new("--socket"),
        socket.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    bulkhead(&all)
}

/// The control socket the harness gave `daemon`: the value of the last
/// `--control-socket` on its command line.
fn control_socket(daemon: &Daemon) -> PathBuf {
    let pid = daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("cannot read the daemon's command line: {e}"));
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let Some(pair) = args.windows(2).rfind(|w| w[0] == b"--control-socket") else {
        panic!("no --control-socket on the daemon's command line");
    };
    PathBuf::from(OsStr::from_bytes(pair[1]))
}

/// `bulkhead run` on a control socket the test chooses (the harness's
/// `Daemon` always picks its own), its output in `log`.
fn run_on(socket: &Path, policies: &PolicyDir, work: &Path, log: &str) -> Command {
    let config = work.join("empty.toml");
    fs::write(&config, "# all defaults\n")
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    let out =
        fs::File::create(work.join(log)).unwrap_or_else(|e| panic!("cannot create {log}: {e}"));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
    let mut cmd = Command::new(bulkhead_bin());
    cmd.arg("run")
        .arg("--policy-dir")
        .arg(policies.path())
        .arg("--control-socket")
        .arg(socket)
        .arg("--events")
        .arg(work.join(format!("{log}.jsonl")))
        .args(["--metrics-listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        // Never the host's default pins and state: see `Running`.
        .arg("--pin-dir")
        .arg(pin_dir(work))
        .arg("--state-dir")
        .arg(work.join("state"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd
}

/// A child process killed (SIGTERM, then SIGKILL) on `Drop`.
struct Running(Child, PathBuf);

/// The bpffs pin directory of the daemons started in `work`.
fn pin_dir(work: &Path) -> PathBuf {
    let name = work
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    // bpffs refuses names that start with a dot (tempdir names do).
    PathBuf::from(format!(
        "/sys/fs/bpf/bulkhead-test-flows-{}",
        name.trim_start_matches('.')
    ))
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = terminate(&mut self.0, STOP_TIMEOUT);
        // A stopped agent keeps enforcing through its pins: remove them.
        let _ = detach_command(&self.1, Path::new("/nonexistent")).output();
        let _ = fs::remove_dir(&self.1);
    }
}

/// A TCP connect from a probe process inside `cgroup`: its pid (which the
/// harness's `Probe` does not expose) and its report.
fn connect_from(cgroup: &Path, to: SocketAddr) -> (u32, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-probe"));
    cmd.arg("--cgroup")
        .arg(cgroup)
        .args(["tcp-connect", &to.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let Some(status) = wait_deadline(&mut child, PROBE_TIMEOUT) else {
        kill(&mut child);
        panic!("{cmd:?} still running after {PROBE_TIMEOUT:?}");
    };
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    assert!(
        status.success(),
        "{cmd:?} could not run ({status}): {stdout}"
    );
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{cmd:?} printed no JSON ({e}): {stdout:?}"));
    (pid, report)
}

fn assert_denied(report: &Value, what: &str) {
    assert!(
        report["ok"] == false && report["stage"] == "connect" && report["errno"] == libc::EPERM,
        "{what} should get EPERM at connect, got {report}"
    );
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[test]
fn flows_shows_the_denied_connect_with_its_process_and_rule() {
    if !require_bpf() {
        return;
    }
    let s = Setup::new();
    let (allowed_pid, report) = connect_from(s.svc.path(), s.allowed.addr());
    assert!(report["ok"] == true, "allowed connect failed: {report}");
    let (denied_pid, report) = connect_from(s.svc.path(), s.denied.addr());
    assert_denied(&report, "connect to an unlisted port");

    let ev = s.wait_event(&["--verdict", "deny"], denied_pid);
    let want = [
        ("schema", Value::from("bulkhead.event.v2")),
        ("type", "verdict".into()),
        ("service", "billing".into()),
        ("mode", "enforce".into()),
        ("cgroup_id", s.svc.id().into()),
        ("pid", denied_pid.into()),
        ("comm", "bulkhead-probe".into()),
        ("traffic_direction", "egress".into()),
        ("hook", "connect".into()),
        ("protocol", "tcp".into()),
        ("dst_ip", "127.0.0.1".into()),
        ("dst_port", s.denied.port().into()),
        ("verdict", "deny".into()),
        ("rule", "billing.toml#default-deny".into()),
    ];
    for (field, value) in &want {
        assert_eq!(
            &ev[field], value,
            "field {field} of the denied event {ev:#}"
        );
    }
    let denied_only = json_lines(&s.flows(&["--json", "--verdict", "deny"]).stdout);
    assert!(
        denied_only.iter().all(|e| e["verdict"] == "deny"),
        "--verdict deny showed other events: {denied_only:#?}"
    );

    let allowed = s.wait_event(&["--verdict", "allow", "--service", "billing"], allowed_pid);
    assert_eq!(allowed["rule"], "billing.toml#egress[0]", "{allowed:#}");
    assert_eq!(allowed["dst_port"], s.allowed.port(), "{allowed:#}");

    // `--json` is the decision log's record, field for field.
    let path = s.daemon.events_path();
    let log = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let logged: Vec<Value> = json_lines(&log)
        .into_iter()
        .filter(|e| e["pid"] == denied_pid && e["type"] == "verdict")
        .collect();
    assert_eq!(
        logged,
        [ev],
        "the decision log's record of the denied connect"
    );

    // The table: one line per event, with the service, process and verdict.
    let out = s.flows(&["--service", "billing"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "flows failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.starts_with("TIME "), "no header: {table}");
    let process = format!("bulkhead-probe[{denied_pid}]");
    let line = table
        .lines()
        .find(|l| l.contains(&process))
        .unwrap_or_else(|| panic!("no line for {process} in the table:\n{table}"));
    let dest = format!("127.0.0.1:{}", s.denied.port());
    for word in [
        "billing",
        "egress",
        "tcp",
        &dest,
        "deny",
        "billing.toml#default-deny",
    ] {
        assert!(
            line.split_whitespace().any(|w| w == word),
            "{word:?} missing from {line:?}"
        );
    }
}

#[test]
fn the_control_socket_is_root_only() {
    if !require_bpf() {
        return;
    }
    let s = Setup::new();
    let meta = fs::symlink_metadata(&s.socket)
        .unwrap_or_else(|e| panic!("no control socket at {}: {e}", s.socket.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        s.socket.display()
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "mode of {}",
        s.socket.display()
    );
    assert_eq!(meta.uid(), 0, "owner of {}", s.socket.display());

    // The harness keeps the socket in a 0700 directory; a hard link in a
    // 0755 one lets another user reach the socket itself, so that only its
    // own mode can stop them.
    let open = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    fs::set_permissions(open.path(), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", open.path().display()));
    let link = open.path().join("ctl.sock");
    fs::hard_link(&s.socket, &link).unwrap_or_else(|e| {
        panic!(
            "cannot link {} to {}: {e}",
            s.socket.display(),
            link.display()
        )
    });
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args([
        OsStr::new("flows"),
        OsStr::new("--socket"),
        link.as_os_str(),
    ])
    .uid(65534)
    .gid(65534);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "as nobody: {stderr}");
    assert_eq!(
        stderr,
        format!(
            "bulkhead flows: permission denied on {}: the control socket is root-only; run this \
             as root\n",
            link.display()
        )
    );
    assert!(out.stdout.is_empty());
    // Root gets through the same link.
    let out = flows(&link, &["--json"]);
    assert!(
        out.status.success(),
        "as root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `bulkhead flows --follow` in the background; its stdout lines arrive
/// on a channel. Killed on `Drop`.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl Follower {
    fn start(socket: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(bulkhead_bin())
            .args([
                OsStr::new("flows"),
                OsStr::new("--follow"),
                OsStr::new("--socket"),
            ])
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bulkhead flows --follow: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take();
        thread::spawn(move || {
            if let Some(stdout) = stdout {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads events until the one of `pid`; panics after [`EVENT_TIMEOUT`].
    fn wait_pid(&mut self, pid: u32) -> Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!(
                    "bulkhead flows --follow showed no event of pid {pid} within \
                     {EVENT_TIMEOUT:?}; it showed {:#?}",
                    self.seen
                );
            };
            let ev: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("--follow --json printed a non-JSON line ({e}): {line:?}")
            });
            self.seen.push(ev.clone());
            if ev["pid"] == pid {
                return ev;
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

#[test]
fn follow_shows_events_made_after_it_started() {
    if !require_bpf() {
        return;
    }
    let mut s = Setup::new();
    let (before, report) = connect_from(s.svc.path(), s.denied.addr());
    assert_denied(&report, "connect before following");
    s.wait_event(&[], before);

    let mut follow = Follower::start(&s.socket, &["--json", "--verdict", "deny"]);
    // The history comes first: once it is here, the follower is live.
    follow.wait_pid(before);
    let (allowed_pid, report) = connect_from(s.svc.path(), s.allowed.addr());
    assert!(report["ok"] == true, "allowed connect failed: {report}");
    let (after, report) = connect_from(s.svc.path(), s.denied.addr());
    assert_denied(&report, "connect while following");
    let ev = follow.wait_pid(after);
    assert_eq!(ev["verdict"], "deny", "{ev:#}");
    assert_eq!(ev["dst_port"], s.denied.port(), "{ev:#}");
    assert!(
        follow.seen.iter().all(|e| e["pid"] != allowed_pid),
        "--verdict deny showed the allowed connect: {:#?}",
        follow.seen
    );

    // The daemon stopping ends the stream: the follower says so and exits,
    // and the socket file is gone.
    let _ = s.daemon.stop();
    let status = wait_deadline(&mut follow.child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!("bulkhead flows --follow still running after the daemon stopped")
    });
    let mut stderr = String::new();
    if let Some(mut pipe) = follow.child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "flows --follow exited {status}: {stderr}");
    assert_eq!(stderr, "bulkhead flows: the daemon is stopping\n");
    assert!(
        !s.socket.exists(),
        "the daemon left its control socket behind"
    );
}

#[test]
fn one_daemon_per_control_socket_and_a_stale_one_is_replaced() {
    if !require_bpf() {
        return;
    }
    let mut s = Setup::new();
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));

    // A second daemon on the live socket refuses to start, in one line.
    // (output_with_timeout captures its output instead of the log file.)
    let out = output_with_timeout(
        &mut run_on(&s.socket, &s.policies, work.path(), "second.log"),
        ready_timeout(),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a second daemon on a live socket must refuse:\n{log}"
    );
    let want = format!(
        "bulkhead: another bulkhead daemon is already serving the control socket {}; stop it \
         first, or give this one its own (control.socket, --control-socket)",
        s.socket.display()
    );
    assert_eq!(log.lines().last(), Some(want.as_str()), "log:\n{log}");
    // The first daemon still answers on it.
    let out = s.flows(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A daemon killed outright leaves its socket file; the next one finds
    // nobody answering on it and takes its place.
    let pid = s
        .daemon
        .pid()
        .unwrap_or_else(|| panic!("the daemon is not running"));
    assert!(signal(pid, libc::SIGKILL), "cannot SIGKILL the daemon");
    let _ = s.daemon.wait_exit(STOP_TIMEOUT);
    assert!(s.socket.exists(), "SIGKILL leaves the socket file behind");
    let mut cmd = run_on(&s.socket, &s.policies, work.path(), "third.log");
    let mut third = Running(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        pin_dir(work.path()),
    );
    eventually(ready_timeout(), Duration::from_millis(100), || {
        if flows(&s.socket, &["--json"]).status.success() {
            return Ok(());
        }
        let log = fs::read_to_string(work.path().join("third.log")).unwrap_or_default();
        if let Ok(Some(status)) = third.0.try_wait() {
            panic!("the daemon on a stale socket exited ({status}):\n{log}");
        }
        Err(log)
    })
    .unwrap_or_else(|log| panic!("no answer on the replaced socket:\n{log}"));
    let log = fs::read_to_string(work.path().join("third.log")).unwrap_or_default();
    assert!(
        log.contains("removed a stale control socket"),
        "log:\n{log}"
    );
}

#[test]
fn flows_without_a_daemon_says_so_in_one_line() {
    // Needs no root: nothing is loaded.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = dir.path().join("nothing-here.sock");
    let config = dir.path().join("bulkhead.toml");
    fs::write(
        &config,
        format!("[control]\nsocket = {:?}\n", socket.display().to_string()),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    for args in [
        [OsStr::new("--socket"), socket.as_os_str()],
        [OsStr::new("--config"), config.as_os_str()],
    ] {
        let mut all = vec![OsStr::new("flows")];
        all.extend(args);
        let out = bulkhead(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        assert!(out.stdout.is_empty(), "{all:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "bulkhead flows: no bulkhead daemon is running (cannot connect to {}: No such \
                 file or directory)\n",
                socket.display()
            ),
            "{all:?}"
        );
    }
}
