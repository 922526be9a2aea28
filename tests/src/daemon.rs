//! Driving the real `bulkhead` binary: one-shot commands and the daemon.

use std::{
    collections::BTreeSet,
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    bpf::prog_ids_held_by,
    eventually::eventually,
    notify::{NotReady, NotifySocket},
    policy::PolicyDir,
    process::{output_with_timeout, terminate, wait_deadline},
    socket_activation::HeldSockets,
};

/// How long the daemon may take from start to `READY=1`, unless
/// [`READY_TIMEOUT_ENV`] says otherwise.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// `BULKHEAD_READY_TIMEOUT_SECS`: a longer wait for `READY=1`, for kernels
/// run in an emulated guest (`cargo xtask test --kernel`), where verifying
/// the programs alone takes tens of seconds.
pub const READY_TIMEOUT_ENV: &str = "BULKHEAD_READY_TIMEOUT_SECS";

/// [`READY_TIMEOUT`], or the seconds [`READY_TIMEOUT_ENV`] gives; panics if
/// that is not a number.
#[must_use]
pub fn ready_timeout() -> Duration {
    match env::var(READY_TIMEOUT_ENV) {
        Ok(secs) => Duration::from_secs(secs.trim().parse().unwrap_or_else(|e| {
            panic!("{READY_TIMEOUT_ENV}={secs:?} is not a number of seconds: {e}")
        })),
        Err(_) => READY_TIMEOUT,
    }
}
/// How long the daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a one-shot command (`bulkhead check`) may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The `bulkhead` binary under test: `$BULKHEAD_BIN` (set by `cargo xtask
/// test`), else `bulkhead` in the target directory's `debug/`. Panics, saying
/// how to build it, if it is not there.
#[must_use]
pub fn bulkhead_bin() -> PathBuf {
    let path = match env::var_os("BULKHEAD_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            )
            .join("debug/bulkhead"),
    };
    assert!(
        path.is_file(),
        "the bulkhead binary is not at {}: run `cargo xtask test` (or \
         `cargo build -p agent --bin bulkhead` first), or set BULKHEAD_BIN",
        path.display()
    );
    path
}

/// `bulkhead detach` for the pins under `pins` (no daemon may be running on
/// them; `control` is the socket it checks for one): removes the programs a
/// stopped agent left enforcing. Not run yet.
#[must_use]
pub fn detach_command(pins: &Path, control: &Path) -> Command {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(["detach", "--config", "/dev/null", "--pin-dir"])
        .arg(pins)
        .arg("--control-socket")
        .arg(control);
    cmd
}

/// Runs `bulkhead ARGS` to completion (no `NOTIFY_SOCKET`), with a deadline.
#[must_use]
pub fn bulkhead<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let mut cmd = Command::new(bulkhead_bin());
    cmd.args(args).env_remove("NOTIFY_SOCKET");
    output_with_timeout(&mut cmd, CLI_TIMEOUT)
}

/// A running `bulkhead run`. Its stdout and stderr go to a log file, which
/// `Drop` prints when a test panics while the guard is alive (so panic
/// messages need not include it). `Drop` sends SIGTERM, waits
/// [`STOP_TIMEOUT`], then SIGKILLs; it never panics.
///
/// Each daemon is kept to itself, so tests (and test runs) can overlap:
/// its decision log and control socket live in its own temporary
/// directory, its metrics endpoint takes any free loopback port, and unless
/// the test passes `--config`, a config file of its own (empty: all
/// defaults; or what [`Daemon::start_with_config`] gives) stands in for the
/// host's `/etc/bulkhead/bulkhead.toml`.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    notify: NotifySocket,
    log: PathBuf,
    events: PathBuf,
    /// bpffs directory of this daemon's pins.
    pins: PathBuf,
    control: PathBuf,
    /// Holds the notify socket, the log and the other files; removed last.
    _work: TempDir,
}

/// Numbers the pin directories of the daemons of one test process.
static NEXT_PIN_DIR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Daemon {
    /// `bulkhead run --policy-dir DIR`, waiting for `READY=1`; panics with
    /// the daemon's log if it exits or is not ready within [`ready_timeout`].
    #[must_use]
    pub fn start(policies: &PolicyDir) -> Self {
        let mut daemon =
            Self::spawn_run(&[OsStr::new("--policy-dir"), policies.path().as_os_str()]);
        daemon.wait_ready();
        daemon
    }

    /// [`Self::start`] with a daemon config file holding `config` (TOML,
    /// e.g. `"[udp_replies]\nidle_timeout_secs = 2\n"`), written in the
    /// daemon's own temporary directory.
    #[must_use]
    pub fn start_with_config(policies: &PolicyDir, config: &str) -> Self {
        let mut daemon = Self::spawn_with_config(
            &[OsStr::new("--policy-dir"), policies.path().as_os_str()],
            config,
        );
        daemon.wait_ready();
        daemon
    }

    /// [`Self::start_with_config`] with `env` added to the daemon's
    /// environment (e.g. the test-only `BULKHEAD_TEST_FAULTS_FILE`).
    #[must_use]
    pub fn start_with_env(policies: &PolicyDir, config: &str, env: &[(&str, &OsStr)]) -> Self {
        let mut daemon = Self::spawn_full(
            &[OsStr::new("--policy-dir"), policies.path().as_os_str()],
            config,
            env,
        );
        daemon.wait_ready();
        daemon
    }

    /// [`Self::start_with_config`], the daemon in network namespace `netns`
    /// (made with `ip netns add`): a stand-in for another host, whose
    /// socket list and addresses are that namespace's. Only the network
    /// namespace changes (no `ip netns exec`, which would remount /sys and
    /// hide bpffs and the cgroup2 mount).
    #[must_use]
    pub fn start_in_netns(policies: &PolicyDir, config: &str, netns: &str) -> Self {
        let mut daemon = Self::spawn_inner(
            &[OsStr::new("--policy-dir"), policies.path().as_os_str()],
            config,
            &[],
            Some(netns),
        );
        daemon.wait_ready();
        daemon
    }

    /// Starts `bulkhead run ARGS` with `NOTIFY_SOCKET` set, without waiting.
    #[must_use]
    pub fn spawn_run<S: AsRef<OsStr>>(args: &[S]) -> Self {
        Self::spawn_with_config(args, "# all defaults\n")
    }

    /// [`Self::spawn_run`]; unless `args` has `--config`, the config file is
    /// one holding `config`.
    #[must_use]
    pub fn spawn_with_config<S: AsRef<OsStr>>(args: &[S], config: &str) -> Self {
        Self::spawn_full(args, config, &[])
    }

    /// [`Self::spawn_with_config`] with `env` added to the daemon's
    /// environment, without waiting.
    #[must_use]
    pub fn spawn_with_env<S: AsRef<OsStr>>(
        args: &[S],
        config: &str,
        env: &[(&str, &OsStr)],
    ) -> Self {
        Self::spawn_full(args, config, env)
    }

    fn spawn_full<S: AsRef<OsStr>>(args: &[S], config: &str, env: &[(&str, &OsStr)]) -> Self {
        Self::spawn_inner(args, config, env, None)
    }

    fn spawn_inner<S: AsRef<OsStr>>(
        args: &[S],
        config: &str,
        env: &[(&str, &OsStr)],
        netns: Option<&str>,
    ) -> Self {
        Self::spawn_holding(args, config, env, netns, None)
    }

    /// [`Self::spawn_run`] with `held` passed as systemd's socket units
    /// pass theirs (`LISTEN_FDS`), without waiting.
    #[must_use]
    pub fn spawn_run_holding<S: AsRef<OsStr>>(args: &[S], held: &HeldSockets) -> Self {
        Self::spawn_holding(args, "# all defaults\n", &[], None, Some(held))
    }

    fn spawn_holding<S: AsRef<OsStr>>(
        args: &[S],
        config: &str,
        env: &[(&str, &OsStr)],
        netns: Option<&str>,
        held: Option<&HeldSockets>,
    ) -> Self {
        let work = tempfile::Builder::new()
            .prefix("bulkhead-test-daemon-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let notify = NotifySocket::bind(&work.path().join("notify.sock"));
        let events = work.path().join("events.jsonl");
        let mut command_line: Vec<OsString> = vec![
            "run".into(),
            "--events".into(),
            events.clone().into(),
            "--control-socket".into(),
            work.path().join("control.sock").into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        // Each daemon pins into its own bpffs directory and keeps its own
        // state, so that daemons of different tests never take over from
        // each other; Drop detaches whatever is left pinned.
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test-{}-{}",
            std::process::id(),
            NEXT_PIN_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        if !args.iter().any(|a| a.as_ref() == "--pin-dir") {
            command_line.extend(["--pin-dir".into(), pins.clone().into()]);
        }
        if !args.iter().any(|a| a.as_ref() == "--state-dir") {
            command_line.extend(["--state-dir".into(), work.path().join("state").into()]);
        }
        if !args.iter().any(|a| a.as_ref() == "--config") {
            let path = work.path().join("bulkhead.toml");
            fs::write(&path, config)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            command_line.extend(["--config".into(), path.into()]);
        }
        command_line.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let log = work.path().join("bulkhead.log");
        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
        let bin = bulkhead_bin();
        let mut command = Command::new(&bin);
        command
            .args(&command_line)
            .env("NOTIFY_SOCKET", notify.path())
            .envs(env.iter().copied());
        if let Some(held) = held {
            command = held.passing_to(&command);
        }
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        // Kept open until the child has started.
        let _netns_file = netns.map(|name| enter_netns_on_exec(&mut command, name));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {command_line:?}: {e}", bin.display()));
        Self {
            child: Some(child),
            notify,
            log,
            events,
            pins,
            control: work.path().join("control.sock"),
            _work: work,
        }
    }

    /// The daemon's pin directory under bpffs.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pins
    }

    /// Runs `bulkhead detach` for this daemon's pins (after it stopped):
    /// removes its programs from the kernel. Panics if that fails.
    pub fn detach(&self) {
        let out = detach_command(&self.pins, &self.control)
            .output()
            .unwrap_or_else(|e| panic!("cannot run bulkhead detach: {e}"));
        assert!(
            out.status.success(),
            "bulkhead detach failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits for `READY=1`; panics with the log if the daemon exits first or
    /// does not get there within [`ready_timeout`].
    pub fn wait_ready(&mut self) {
        let mut seen = Vec::new();
        let timeout = ready_timeout();
        let child = self.child.as_mut();
        let mut exited = None;
        let result = match child {
            Some(child) => self.notify.wait_ready(timeout, &mut seen, || {
                exited = child.try_wait().ok().flatten();
                exited.is_some()
            }),
            None => Err(NotReady::GaveUp),
        };
        match result {
            Ok(()) => {}
            Err(NotReady::GaveUp) => panic!(
                "bulkhead exited ({}) before READY=1; notifications {seen:?} (its log follows)",
                exited.map_or_else(|| "status unknown".to_owned(), |s| s.to_string()),
            ),
            Err(NotReady::Timeout) => panic!(
                "bulkhead sent no READY=1 within {timeout:?}; notifications {seen:?} \
                 (its log follows)"
            ),
            Err(NotReady::Io(e)) => panic!("notify socket failed: {e}"),
        }
    }

    /// The daemon's pid.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Ids of the BPF programs the running daemon holds (see
    /// [`crate::bpf::prog_ids_held_by`]); empty once it has stopped.
    #[must_use]
    pub fn prog_ids(&self) -> BTreeSet<u64> {
        self.pid().map(prog_ids_held_by).unwrap_or_default()
    }

    /// The daemon's decision log (JSON lines), in its temporary directory.
    #[must_use]
    pub fn events_path(&self) -> &Path {
        &self.events
    }

    /// Everything the daemon has printed so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Waits until the daemon's log contains `needle`; panics after
    /// `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        eventually(timeout, Duration::from_millis(50), || {
            if self.log().contains(needle) {
                Ok(())
            } else {
                Err(())
            }
        })
        .unwrap_or_else(|()| panic!("the log did not show {needle:?} within {timeout:?}"));
    }

    /// Notifications sent since the last look (without waiting).
    #[must_use]
    pub fn notifications(&self) -> Vec<String> {
        self.notify.pending()
    }

    /// SIGTERM, then waits for the exit; panics if it had to
    /// be killed with SIGKILL after [`STOP_TIMEOUT`].
    #[must_use]
    pub fn stop(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("bulkhead was already stopped");
        };
        match terminate(&mut child, STOP_TIMEOUT) {
            (Some(status), false) => status,
            (status, _) => panic!(
                "bulkhead did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed: {status:?}; \
                 its log follows)"
            ),
        }
    }

    /// Waits for the daemon to exit by itself; panics if it
    /// is still running after `timeout`.
    #[must_use]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let Some(child) = self.child.as_mut() else {
            panic!("bulkhead was already stopped");
        };
        if let Some(status) = wait_deadline(child, timeout) {
            self.child = None;
            return status;
        }
        panic!("bulkhead still running after {timeout:?} (its log follows)");
    }
}

impl Daemon {
    /// The daemon's control socket (`bulkhead status|quarantine|release
    /// --socket PATH`).
    #[must_use]
    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The exit status if the daemon has exited (reaped: later calls and
    /// [`Self::pid`] see no child); `None` while it runs.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let killed = match self.child.take() {
            Some(mut child) => terminate(&mut child, STOP_TIMEOUT).1,
            None => false,
        };
        if killed {
            eprintln!("CLEANUP: bulkhead ignored SIGTERM for {STOP_TIMEOUT:?}; SIGKILLed it");
        }
        // A stopped agent keeps enforcing through its pins: remove them so
        // that no test leaves a policy behind.
        if self.pins.join("current").exists() {
            let _ = detach_command(&self.pins, &self.control).output();
        }
        let _ = fs::remove_dir(&self.pins);
        if killed || std::thread::panicking() {
            eprintln!(
                "----- bulkhead log ({}) -----\n{}----- end of bulkhead log -----",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Makes `command` enter network namespace `name` (`/run/netns/NAME`)
/// between fork and exec; returns the namespace's file, which must stay
/// open until the child is spawned.
fn enter_netns_on_exec(command: &mut Command, name: &str) -> fs::File {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let path = Path::new("/run/netns").join(name);
    let file =
        fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let fd = file.as_raw_fd();
    // SAFETY: setns(2) is async-signal-safe and touches only this child.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    file
}
