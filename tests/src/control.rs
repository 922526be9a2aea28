//! Talking to a running daemon (`bulkhead status|reload|quarantine|release`),
//! following its `policy_change` audit events, and keeping the pins of a
//! daemon that is restarted (several `bulkhead run` on one `--pin-dir`).

use std::{
    ffi::OsString,
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    daemon::{bulkhead, detach_command, Daemon},
    eventually::eventually,
    process::try_output_with_timeout,
};

/// `bulkhead status --json` of `daemon`, parsed; panics if it fails.
#[must_use]
pub fn status(daemon: &Daemon) -> Value {
    let out = bulkhead(&[
        OsString::from("status"),
        "--json".into(),
        "--socket".into(),
        daemon.control_socket().into(),
    ]);
    assert!(
        out.status.success(),
        "bulkhead status failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bulkhead status --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The `kernel_features` entry `feature` of a `status` answer: whether it
/// is active and what status says about it; panics if absent.
#[must_use]
pub fn status_feature(status: &Value, feature: &str) -> (bool, String) {
    let f = status["kernel_features"]
        .as_array()
        .and_then(|all| all.iter().find(|f| f["feature"] == feature))
        .unwrap_or_else(|| panic!("no kernel feature {feature:?} in the status {status:#}"));
    let active = f["active"]
        .as_bool()
        .unwrap_or_else(|| panic!("feature {feature:?} without `active`: {f}"));
    (active, f["status"].as_str().unwrap_or_default().to_owned())
}

/// The entry of service `name` in a `status` answer; panics if absent.
#[must_use]
pub fn status_service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name:?} in the status {status:#}"))
}

/// Polls `bulkhead status --json` until `done` accepts it (returned), or
/// panics after `timeout` with `what` and the last answer.
#[must_use]
pub fn wait_status(
    daemon: &Daemon,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    eventually(timeout, Duration::from_millis(20), || {
        let now = status(daemon);
        if done(&now) {
            Ok(now)
        } else {
            Err(now)
        }
    })
    .unwrap_or_else(|now| panic!("status did not show {what} within {timeout:?}; last: {now:#}"))
}

/// `bulkhead quarantine SERVICE [--allow A]... --socket S` (not judged here).
#[must_use]
pub fn quarantine(daemon: &Daemon, service: &str, allow: &[&str]) -> Output {
    let mut args = vec![
        OsString::from("quarantine"),
        service.into(),
        "--socket".into(),
        daemon.control_socket().into(),
    ];
    for a in allow {
        args.extend([OsString::from("--allow"), (*a).into()]);
    }
    bulkhead(&args)
}

/// `bulkhead reload --socket S`: the agent reloads and this waits for the
/// outcome (not judged here).
#[must_use]
pub fn reload(daemon: &Daemon) -> Output {
    bulkhead(&[
        OsString::from("reload"),
        "--socket".into(),
        daemon.control_socket().into(),
    ])
}

/// `bulkhead ARGS --socket S` (`graph`, `learn`, ...) of `daemon`: its
/// stdout; panics with both outputs if it fails.
#[must_use]
pub fn cli(daemon: &Daemon, args: &[&str]) -> String {
    let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
    all.extend(["--socket".into(), daemon.control_socket().into()]);
    let out = bulkhead(&all);
    assert_success(&out, &format!("bulkhead {args:?}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bulkhead release SERVICE --socket S` (not judged here).
#[must_use]
pub fn release(daemon: &Daemon, service: &str) -> Output {
    bulkhead(&[
        OsString::from("release"),
        service.into(),
        "--socket".into(),
        daemon.control_socket().into(),
    ])
}

/// Asserts a one-shot command exited 0; `what` names it.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Follows a decision log from its start, keeping only `policy_change`
/// events. Reads only what was added since the last look, so it stays cheap
/// however many verdicts the log holds.
#[derive(Debug)]
pub struct PolicyChanges {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    seen: Vec<Value>,
}

impl PolicyChanges {
    /// Follows `daemon`'s decision log.
    #[must_use]
    pub fn of(daemon: &Daemon) -> Self {
        Self {
            path: daemon.events_path().to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Every `policy_change` event so far, in order.
    pub fn all(&mut self) -> &[Value] {
        self.read_more();
        &self.seen
    }

    fn read_more(&mut self) {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => panic!("cannot read the decision log {}: {e}", self.path.display()),
        };
        let mut added = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut added))
            .unwrap_or_else(|e| {
                panic!("cannot read the decision log {}: {e}", self.path.display())
            });
        self.offset += added.len() as u64;
        self.partial.extend_from_slice(&added);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|&b| b == b'\n') {
            // Cheap filter first: most lines are verdicts.
            if !line
                .windows(b"\"policy_change\"".len())
                .any(|w| w == b"\"policy_change\"")
            {
                continue;
            }
            let value: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "not a JSON line in the decision log ({e}): {}",
                    String::from_utf8_lossy(line)
                )
            });
            if value["type"] == "policy_change" {
                self.seen.push(value);
            }
        }
    }

    /// Waits until `count` events satisfy `matches`, and returns the
    /// `count`-th; panics after `timeout` with every policy change seen.
    pub fn wait_nth(
        &mut self,
        count: usize,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        eventually(timeout, Duration::from_millis(5), || {
            self.read_more();
            self.seen
                .iter()
                .filter(|e| matches(e))
                .nth(count - 1)
                .cloned()
                .ok_or(())
        })
        .unwrap_or_else(|()| {
            panic!(
                "fewer than {count} {what} in the decision log within {timeout:?}; \
                 the policy changes logged: {:#?}",
                self.seen
            )
        })
    }
}

/// Whether a `policy_change` event is `action` with `result`.
#[must_use]
pub fn is_change(ev: &Value, action: &str, result: &str) -> bool {
    ev["change"]["action"] == action && ev["change"]["result"] == result
}

/// A pin directory and a state directory shared by several daemons in turn
/// (a restart: pass [`Self::args`] to each `Daemon::spawn_run`, so that the
/// daemons' own guards leave the pins alone). `Drop` runs `bulkhead detach`
/// if pins are left and removes both directories; declare it before the
/// daemons, so that it drops after them. Never panics in `Drop`.
#[derive(Debug)]
pub struct SharedPins {
    pins: PathBuf,
    /// Holds the state directory and a control-socket path nothing listens on.
    work: TempDir,
}

impl SharedPins {
    /// `bulkhead run --policy-dir DIR` on these pins and state, ready.
    #[must_use]
    pub fn start(&self, policies: &crate::PolicyDir) -> Daemon {
        Self::ready(Daemon::spawn_run(&self.run_args(policies)))
    }

    /// [`Self::start`] with a daemon config file holding `config`.
    #[must_use]
    pub fn start_with_config(&self, policies: &crate::PolicyDir, config: &str) -> Daemon {
        Self::ready(Daemon::spawn_with_config(&self.run_args(policies), config))
    }

    /// [`Self::start`], the daemon given `held` as systemd's socket units
    /// give theirs.
    #[must_use]
    pub fn start_holding(&self, policies: &crate::PolicyDir, held: &crate::HeldSockets) -> Daemon {
        Self::ready(Daemon::spawn_run_holding(&self.run_args(policies), held))
    }

    fn run_args(&self, policies: &crate::PolicyDir) -> Vec<OsString> {
        let mut args = vec![OsString::from("--policy-dir"), policies.path().into()];
        args.extend(self.args());
        args
    }

    fn ready(mut daemon: Daemon) -> Daemon {
        daemon.wait_ready();
        daemon
    }

    /// A fresh, unused pin directory path under `/sys/fs/bpf` and a state
    /// directory.
    #[must_use]
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let work = tempfile::Builder::new()
            .prefix("bulkhead-test-shared-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test-{}-shared{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Self { pins, work }
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pins
    }

    /// The state directory (quarantines, names).
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.work.path().join("state")
    }

    /// `--pin-dir DIR --state-dir DIR`, for each daemon.
    #[must_use]
    pub fn args(&self) -> Vec<OsString> {
        vec![
            "--pin-dir".into(),
            self.pins.clone().into(),
            "--state-dir".into(),
            self.state_dir().into(),
        ]
    }

    /// Whether a daemon's programs are pinned there now.
    #[must_use]
    pub fn pinned(&self) -> bool {
        self.pins.join("current").exists()
    }

    /// `bulkhead detach` for these pins (no daemon may be running on them).
    ///
    /// # Errors
    ///
    /// What `bulkhead detach` printed, if it failed.
    pub fn detach(&self) -> Result<(), String> {
        let out = try_output_with_timeout(
            &mut detach_command(&self.pins, &self.work.path().join("nobody.sock")),
            Duration::from_secs(30),
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "bulkhead detach --pin-dir {} failed ({}): {}{}",
                self.pins.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Default for SharedPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SharedPins {
    fn drop(&mut self) {
        if self.pinned() {
            if let Err(e) = self.detach() {
                eprintln!("CLEANUP: {e}");
            }
        }
        let _ = fs::remove_dir(&self.pins);
    }
}
