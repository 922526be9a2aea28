//! The bulkhead daemon under test, started like a `Type=notify` service and
//! stopped with SIGTERM; the guard stops it on error and panic too.

use std::{
    fs::{self, File, OpenOptions},
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
    /// Kernel memory of its maps right after READY=1 (the sum of their
    /// `memlock`, what the kernel charges for each), in KiB.
    pub maps_kib: Option<u64>,
}

impl Daemon {
    /// Starts `bin run` on `policy_dir` and waits for READY=1. `work` holds
    /// the notify socket and the daemon's log.
    pub fn start(bin: &Path, config: &Path, policy_dir: &Path, work: &Path) -> Result<Self> {
        Self::start_named(bin, config, policy_dir, work, "")
    }

    /// [`Self::start`] for one of several agents running at once
    /// (`bench-fleet`'s three hosts): `name` tells their pin directories
    /// apart.
    pub fn start_named(
        bin: &Path,
        config: &Path,
        policy_dir: &Path,
        work: &Path,
        name: &str,
    ) -> Result<Self> {
        let log = work.join("bulkhead.log");
        File::create(&log).with_context(|| format!("create {}", log.display()))?;
        // Its own pins and state: a stopped agent keeps enforcing through its
        // pins, so `stop` and Drop detach them (see `detach`).
        let sep = if name.is_empty() { "" } else { "-" };
        let pin_dir =
            Path::new(PIN_PARENT).join(format!("{PREFIX}{}{sep}{name}", std::process::id()));
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(work.join("state"));
        let (child, ready_after) = spawn_ready(cmd, work, &log)?;
        let rss_kib = rss_kib(child.id());
        let maps_kib = maps_kib(&pin_dir.join("current/maps"));
        Ok(Self {
            child: Some(child),
            bin: bin.to_path_buf(),
            pin_dir,
            log,
            ready_after,
            rss_kib,
            maps_kib,
        })
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
        log_tail(&self.log)
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

/// Starts `cmd` (a `bulkhead run`) like a `Type=notify` service, its output
/// appended to `log`, and waits for READY=1; `work` holds the notify
/// socket. Returns the child and how long it took to be ready.
pub fn spawn_ready(mut cmd: Command, work: &Path, log: &Path) -> Result<(Child, Duration)> {
    let socket_path = work.join("notify.sock");
    let _ = fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path)
        .with_context(|| format!("bind {}", socket_path.display()))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .context("notify socket timeout")?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone().context("clone the log file")?;
    let started = Instant::now();
    let mut child = cmd
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n)
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1") =>
            {
                return Ok((child, started.elapsed()));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("read the notify socket"),
        }
        let waited = if let Err(e) = super::sandbox::check_interrupted() {
            Some(Err(e))
        } else if let Some(status) = child.try_wait().context("poll the daemon")? {
            Some(Err(anyhow::anyhow!(
                "bulkhead exited ({status}) before READY=1:\n{}",
                log_tail(log)
            )))
        } else if started.elapsed() > READY_TIMEOUT {
            Some(Err(anyhow::anyhow!(
                "bulkhead sent no READY=1 within {READY_TIMEOUT:?}:\n{}",
                log_tail(log)
            )))
        } else {
            None
        };
        if let Some(result) = waited {
            let _ = child.kill();
            let _ = child.wait();
            return result;
        }
    }
}

/// The last 20 lines of a log.
pub fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
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
/// The kernel memory of the maps pinned in `dir`: each map's `memlock`
/// (`bpftool map show`), summed; None if any cannot be read.
fn maps_kib(dir: &Path) -> Option<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        let out = Command::new("bpftool")
            .args(["--json", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        bytes += v["bytes_memlock"].as_u64()?;
    }
    Some(bytes / 1024)
}

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
