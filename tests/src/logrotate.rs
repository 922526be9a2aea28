//! The repository's logrotate config (`systemd/logrotate/bulkhead`, shipped
//! as `/etc/logrotate.d/bulkhead`), run by the real `logrotate` against a
//! test daemon: the same file with the log's path and the signal's target
//! moved to the test's.

use std::{fs, path::Path, process::Command, time::Duration};

use crate::process::output_with_timeout;

/// The config's log path and its postrotate command, as shipped.
const SHIPPED_LOG: &str = "/var/log/bulkhead/events.jsonl";
const SHIPPED_SIGNAL: &str = "systemctl kill --kill-whom=main --signal=SIGUSR1 bulkhead.service";

/// The shipped config with `log` for the decision log and `kill -USR1
/// PID` for the unit's main process.
#[must_use]
pub fn test_config(log: &Path, pid: u32) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/logrotate/bulkhead");
    let shipped =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for needle in [SHIPPED_LOG, SHIPPED_SIGNAL] {
        assert_eq!(
            shipped.matches(needle).count(),
            1,
            "{} should name {needle:?} once",
            path.display()
        );
    }
    shipped
        .replace(SHIPPED_LOG, &log.display().to_string())
        .replace(SHIPPED_SIGNAL, &format!("kill -USR1 {pid}"))
}

/// `logrotate --force` with [`test_config`] (its state file beside the
/// config, in `work`); panics with logrotate's output if it fails.
pub fn force_rotation(logrotate: &Path, work: &Path, log: &Path, pid: u32) {
    let config = work.join("logrotate.conf");
    fs::write(&config, test_config(log, pid)).expect("write the logrotate config");
    let mut cmd = Command::new(logrotate);
    cmd.arg("--force")
        .arg("--state")
        .arg(work.join("logrotate.state"))
        .arg(&config);
    let out = output_with_timeout(&mut cmd, Duration::from_mins(1));
    assert!(
        out.status.success(),
        "logrotate failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
