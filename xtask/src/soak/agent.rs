//! The agent under soak: started like a `Type=notify` service, stopped with
//! SIGTERM or killed with SIGKILL, and started again on the same pins (a
//! take-over), as systemd would. Read through `bulkhead status --json` and
//! its metrics endpoint.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::bench::daemon;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent is stopped before the next start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Term,
    Kill,
}

pub struct Agent {
    bin: PathBuf,
    work: PathBuf,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_port: u16,
    pub events: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Writes the agent's config into `work`; nothing runs yet.
    pub fn new(bin: &Path, work: &Path, pin_dir: PathBuf, metrics_port: u16) -> Result<Self> {
        let agent = Self {
            bin: bin.to_path_buf(),
            work: work.to_path_buf(),
            pin_dir,
            control_socket: work.join("control.sock"),
            metrics_port,
            events: work.join("events.jsonl"),
            child: None,
        };
        // Short intervals, so that the self-check and the detectors run
        // often during the soak.
        let config = format!(
            "[events]\nsink = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [control]\nsocket = \"{}\"\n\n[self_check]\ninterval_secs = 10\n\n\
             [anomaly]\ninterval_s = 10\n",
            agent.events.display(),
            agent.control_socket.display()
        );
        fs::write(work.join("bulkhead.toml"), config).context("write the agent's config")?;
        Ok(agent)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the agent and waits for READY=1; its output is appended to
    /// `agent.log` across restarts.
    pub fn start(&mut self, policy_dir: &Path) -> Result<Duration> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(self.work.join("bulkhead.toml"))
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.work.join("state"));
        let (child, ready) = daemon::spawn_ready(cmd, &self.work, &self.log_path())?;
        self.child = Some(child);
        Ok(ready)
    }

    /// Stops the agent; its programs stay attached through their pins. A
    /// SIGTERM must end in exit status 0 within `STOP_TIMEOUT`.
    pub fn stop(&mut self, how: Stop) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running");
        };
        if let Some(status) = child.try_wait().context("poll the agent")? {
            bail!(
                "the agent had exited by itself ({status}); see {}",
                self.log_path().display()
            );
        }
        if how == Stop::Kill {
            child.kill().context("SIGKILL the agent")?;
            child.wait().context("reap the agent")?;
            return Ok(());
        }
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().context("wait for the agent")? {
                if status.success() {
                    return Ok(());
                }
                bail!("the agent exited with {status} after SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.kill().context("SIGKILL the agent")?;
        child.wait().context("reap the agent")?;
        bail!("the agent did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it")
    }

    /// Whether the agent died on its own since the last look.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context("poll the agent"),
            None => Ok(None),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.join("agent.log")
    }

    /// `bulkhead status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--socket"])
            .arg(&self.control_socket)
            .stdin(Stdio::null())
            .output()
            .context("run bulkhead status")?;
        if !out.status.success() {
            bail!(
                "bulkhead status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("bulkhead status printed invalid JSON")
    }

    /// The metrics page, fetched over plain HTTP/1.1.
    pub fn scrape(&self) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port))
            .context("connect to the metrics endpoint")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .context("read the metrics page")?;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "the metrics endpoint answered {}",
                head.lines().next().unwrap_or("")
            );
        }
        Ok(body.to_owned())
    }

    /// Stops a running agent and removes its pinned programs from the
    /// kernel (`bulkhead detach`), so the soak leaves nothing behind.
    pub fn finish(mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop(Stop::Term)?;
        }
        daemon::detach(&self.bin, &self.pin_dir)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = daemon::detach(&self.bin, &self.pin_dir) {
            eprintln!("xtask soak: WARNING: {e:#}");
        }
    }
}

/// Figures about one process from /proc: resident memory, open
/// descriptors, threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessFigures {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

impl ProcessFigures {
    pub fn read(pid: u32) -> Option<Self> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let count = |dir: &str| fs::read_dir(proc.join(dir)).ok().map(|d| d.count() as u64);
        Some(Self {
            rss_kib: daemon::rss_kib(pid)?,
            fds: count("fd")?,
            threads: count("task")?,
        })
    }
}

/// Size of a file, 0 when it does not exist yet.
pub fn file_size(path: &Path) -> u64 {
    File::open(path)
        .and_then(|f| f.metadata())
        .map_or(0, |m| m.len())
}
