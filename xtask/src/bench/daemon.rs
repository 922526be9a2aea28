//! The bulkhead daemon under test, started like a `Type=notify` service and
//! stopped with SIGTERM; the guard stops it on error and panic too.

use std::{
    fs::{self, File},
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::sandbox::{run_quiet, PREFIX};

/// Loading 100,000 prefixes takes well under a second here; this is only a
/// bound for a daemon that hangs.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Daemon {
    child: Option<Child>,
    bin: PathBuf,
    /// bpffs directory of its pins.
    pin_dir: PathBuf,
    log: PathBuf,
    /// From spawn to READY=1: policy load, compile, map fill, attach.
    pub ready_after: Duration,
    /// VmRSS right after READY=1.
    pub rss_kib: Option<u64>,
}

impl Daemon {
    /// Starts `bin run` on `policy_dir` and waits for READY=1. `work` holds
    /// the notify socket and the daemon's log.
    pub fn start(bin: &Path, config: &Path, policy_dir: &Path, work: &Path) -> Result<Self> {
        let socket_path = work.join("notify.sock");
        let _ = fs::remove_file(&socket_path);
        let socket = UnixDatagram::bind(&socket_path)
            .with_context(|| format!("bind {}", socket_path.display()))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("notify socket timeout")?;
        let log = work.join("bulkhead.log");
        let log_file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let log_err = log_file.try_clone().context("clone the log file")?;

        let started = Instant::now();
        // Its own pins and state: a stopped agent keeps enforcing through its
        // pins, so `stop` and Drop detach them (see `detach`).
        let pin_dir = Path::new(PIN_PARENT).join(format!("{PREFIX}{}", std::process::id()));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(work.join("state"))
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut daemon = Self {
            child: Some(child),
            bin: bin.to_path_buf(),
            pin_dir,
            log,
            ready_after: Duration::ZERO,
            rss_kib: None,
        };
        daemon.ready_after = daemon.wait_ready(&socket, started)?;
        daemon.rss_kib = daemon.pid().and_then(rss_kib);
        Ok(daemon)
    }

    fn wait_ready(&mut self, socket: &UnixDatagram, started: Instant) -> Result<Duration> {
        let mut buf = [0u8; 4096];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if text.lines().any(|l| l == "READY=1") {
                        return Ok(started.elapsed());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("read the notify socket"),
            }
            super::sandbox::check_interrupted()?;
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("poll the daemon")? {
                    self.child = None;
                    bail!(
                        "bulkhead exited ({status}) before READY=1:\n{}",
                        self.log_tail()
                    );
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "bulkhead sent no READY=1 within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Context switches of all the daemon's threads so far. Its event
    /// reader sleeps until the kernel wakes it, so the growth over a run,
    /// per probe call, says how often a call woke the daemon.
    pub fn context_switches(&self) -> Option<u64> {
        let pid = self.pid()?;
        let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut total = 0;
        for task in tasks.flatten() {
            let status = fs::read_to_string(task.path().join("status")).ok()?;
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v.trim().parse::<u64>().ok()?;
                }
            }
        }
        Some(total)
    }

    /// The ids of the programs this agent attached, from the links it
    /// pinned: exact even while other agents (test runs) attach and detach
    /// programs with the same names at the same root.
    pub fn program_ids(&self) -> Result<Vec<u32>> {
        let links = self.pin_dir.join("current").join("links");
        let entries = fs::read_dir(&links).with_context(|| format!("read {}", links.display()))?;
        let mut ids = Vec::new();
        for entry in entries.flatten() {
            let out = run_quiet(
                Command::new("bpftool")
                    .args(["link", "show", "pinned"])
                    .arg(entry.path())
                    .arg("--json"),
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("bpftool printed invalid JSON")?;
            if let Some(id) = v
                .get("prog_id")
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
            {
                ids.push(id);
            }
        }
        ensure!(!ids.is_empty(), "no pinned links under {}", links.display());
        Ok(ids)
    }

    /// Removes the stopped agent's pinned programs from the kernel.
    fn detach(&self) -> Result<()> {
        detach(&self.bin, &self.pin_dir)
    }

    /// SIGTERM, then waits (it must exit 0), then detaches its programs.
    pub fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return self.detach();
        };
        let stopped = terminate(&mut child)?;
        self.detach()?;
        match stopped {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("bulkhead exited with {status}:\n{}", self.log_tail()),
            None => bail!(
                "bulkhead did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it:\n{}",
                self.log_tail()
            ),
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = terminate(&mut child) {
                eprintln!("xtask bench: WARNING: stopping bulkhead: {e:#}");
            }
        }
        if let Err(e) = self.detach() {
            eprintln!("xtask bench: WARNING: {e:#}");
        }
    }
}

/// SIGTERM and wait up to `STOP_TIMEOUT`; SIGKILL after that. None if it
/// was killed. Either way its programs stay attached through their pins
/// until `detach`.
fn terminate(child: &mut Child) -> Result<Option<std::process::ExitStatus>> {
    if let Some(status) = child.try_wait().context("poll bulkhead")? {
        return Ok(Some(status));
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: signals our own child, which has not been reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("wait for bulkhead")? {
            return Ok(Some(status));
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().context("kill bulkhead")?;
    child.wait().context("reap bulkhead")?;
    Ok(None)
}

/// Where the bench's agents pin their programs (a directory per run).
const PIN_PARENT: &str = "/sys/fs/bpf";

/// `bulkhead detach` on `pin_dir` (a stopped agent's programs stay
/// attached through their pins), then removes the emptied directory.
pub fn detach(bin: &Path, pin_dir: &Path) -> Result<()> {
    if !pin_dir.join("current").exists() {
        let _ = fs::remove_dir(pin_dir);
        return Ok(());
    }
    // An empty config (the defaults) and a control socket no agent holds:
    // detach refuses while an agent answers on the socket.
    let out = Command::new(bin)
        .args(["detach", "--config", "/dev/null"])
        .args(["--control-socket", "/nonexistent"])
        .arg("--pin-dir")
        .arg(pin_dir)
        .stdin(Stdio::null())
        .output()
        .context("run bulkhead detach")?;
    let _ = fs::remove_dir(pin_dir);
    if !out.status.success() {
        bail!(
            "bulkhead detach --pin-dir {} failed: {}",
            pin_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Detaches what agents of a killed bench left pinned (their programs would
/// still run for every cgroup on the host and skew every case).
pub fn detach_stale(bin: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(PIN_PARENT) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            eprintln!(
                "xtask bench: detaching stale pins at {}",
                entry.path().display()
            );
            detach(bin, &entry.path())?;
        }
    }
    Ok(())
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
