//! Starting workers from the soak's side: each is this xtask binary's
//! hidden `soak-worker` task, started in the soak's network namespace,
//! its tallies read from its standard output.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::worker::Tally;
use crate::bench::sandbox::Netns;

/// What the soak learnt from its workers: their tallies and the lines that
/// name each wrong verdict.
#[derive(Debug, Default)]
pub struct Seen {
    pub tally: Tally,
    pub wrong: Vec<String>,
}

impl Seen {
    fn take_line(&mut self, line: &str) {
        if let Some(t) = Tally::from_json(line) {
            self.tally = t;
        } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(w) = v.get("wrong").and_then(serde_json::Value::as_str) {
                self.wrong.push(w.to_owned());
            }
        }
    }
}

fn command(ns: &Netns, cgroup: &Path, kind: &str) -> Result<std::process::Command> {
    let exe = std::env::current_exe().context("locate the xtask binary")?;
    let exe = exe
        .to_str()
        .context("the xtask binary's path is not UTF-8")?;
    let mut cmd = ns.command(exe)?;
    cmd.args(["soak-worker", "--kind", kind, "--cgroup"])
        .arg(cgroup)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    Ok(cmd)
}

/// A worker that runs until the soak ends; its running tally is kept by a
/// reader thread.
pub struct Running {
    child: Child,
    pub seen: Arc<Mutex<Seen>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Running {
    pub fn start(ns: &Netns, cgroup: &Path, kind: &str, rate: u32) -> Result<Self> {
        let mut child = command(ns, cgroup, kind)?
            .args(["--rate", &rate.to_string()])
            .spawn()
            .context("start a soak worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take_line(&line);
            }
        });
        Ok(Self {
            child,
            seen,
            reader: Some(reader),
        })
    }

    /// Whether it died (it never exits by itself).
    pub fn died(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn snapshot(&self) -> Tally {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tally
    }

    /// Kills it and returns everything it reported.
    pub fn finish(mut self) -> Seen {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one probe in `cgroup` and returns what it saw. `toggle_allowed`:
/// also check the toggle port, expecting this verdict.
pub fn probe(ns: &Netns, cgroup: &Path, toggle_allowed: Option<bool>) -> Result<Seen> {
    let mut cmd = command(ns, cgroup, "probe")?;
    if let Some(allowed) = toggle_allowed {
        cmd.args(["--toggle-allowed", if allowed { "true" } else { "false" }]);
    }
    let mut child = cmd.spawn().context("start a soak probe")?;
    let stdout = child.stdout.take().context("probe stdout")?;
    let reader = thread::spawn(move || {
        let mut seen = Seen::default();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            seen.take_line(&line);
        }
        seen
    });
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait for the probe")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "a probe in {} did not finish within {PROBE_TIMEOUT:?}",
                cgroup.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let seen = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the probe reader panicked"))?;
    if !status.success() {
        bail!("a probe in {} failed ({status})", cgroup.display());
    }
    Ok(seen)
}
