//! One agent of the fleet bench: a release `bulkhead run` (bench's
//! daemon.rs) with its own service cgroup, policy, pins, state, control
//! socket, metrics port and `[fleet]` settings; and what the bench reads
//! of it: its metrics and its CPU time, whole or per thread.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use integration_tests::{free_port_block, http::try_http_request, prometheus::parse_sample};

use super::load;
use crate::bench::{
    daemon::Daemon,
    sandbox::{Cgroup, PREFIX},
};

/// The `[fleet]` part of an agent's config; `None`: fleet mode off.
pub struct Fleet<'a> {
    pub url: &'a str,
    pub batch_interval_secs: u64,
    pub queue_rows: u64,
    pub spool_bytes: u64,
}

/// The name of the thread the exporter runs on (agent/src/fleet/export/).
pub const EXPORTER_THREAD: &str = "bulkhead-fleet";

pub struct Agent {
    // Dropped first: the agent stops (and detaches) before its cgroup goes.
    daemon: Option<Daemon>,
    pub cgroup: Cgroup,
    metrics: SocketAddr,
    _work: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent of host `host` with one service, a new cgroup under
    /// `mount`, whose policy allows the load's destinations.
    pub fn start(bin: &Path, mount: &Path, host: &str, fleet: Option<&Fleet>) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix(&format!("bulkhead-bench-fleet-{host}-"))
            .tempdir()
            .context("create a work directory")?;
        let rel = format!("{PREFIX}fleet-{}-{host}", std::process::id());
        let cgroup = Cgroup::create(mount, &rel)?;
        let policies = work.path().join("policies");
        fs::create_dir_all(&policies).context("create the policy directory")?;
        write(&policies.join("svc.toml"), &load::policy(&rel))?;
        let metrics = SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            free_port_block(Ipv4Addr::LOCALHOST.into(), 1),
        ));
        let config = work.path().join("bulkhead.toml");
        write(&config, &config_toml(work.path(), metrics, host, fleet)?)?;
        let daemon = Daemon::start_named(bin, &config, &policies, work.path(), host)
            .with_context(|| format!("start the agent of {host}"))?;
        Ok(Self {
            daemon: Some(daemon),
            cgroup,
            metrics,
            _work: work,
        })
    }

    pub fn pid(&self) -> Result<u32> {
        self.daemon
            .as_ref()
            .and_then(Daemon::pid)
            .context("the agent is not running")
    }

    /// Stops it (SIGTERM; it must exit 0) and detaches its programs.
    pub fn stop(mut self) -> Result<()> {
        match self.daemon.take() {
            Some(d) => d.stop(),
            None => Ok(()),
        }
    }

    /// Its metrics now.
    pub fn metrics(&self) -> Result<Metrics> {
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics);
        let (status, _, body) = try_http_request(self.metrics, &request)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("scrape the agent at {}", self.metrics))?;
        if status != 200 {
            bail!("GET /metrics at {} answered {status}", self.metrics);
        }
        Ok(Metrics(body))
    }

    /// The agent's CPU time so far (user + system, all threads), in ticks.
    pub fn cpu_ticks(&self) -> Result<u64> {
        let pid = self.pid()?;
        cpu_ticks(&PathBuf::from(format!("/proc/{pid}/stat")))
    }

    /// The CPU time of its thread named `name`, in ticks.
    pub fn thread_cpu_ticks(&self, name: &str) -> Result<u64> {
        let pid = self.pid()?;
        let dir = PathBuf::from(format!("/proc/{pid}/task"));
        for task in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let task = task.with_context(|| format!("read {}", dir.display()))?;
            let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                return cpu_ticks(&task.path().join("stat"));
            }
        }
        bail!("the agent (pid {pid}) has no thread named {name}")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Daemon's own Drop stops and detaches it.
        drop(self.daemon.take());
    }
}

/// The agent's config: its own decision log, metrics port and control
/// socket in `work`, flow summaries every second, and `[fleet]`.
fn config_toml(
    work: &Path,
    metrics: SocketAddr,
    host: &str,
    fleet: Option<&Fleet>,
) -> Result<String> {
    let path = |name: &str| format!("{:?}", work.join(name).display().to_string());
    let mut text = format!(
        "[events]\nsink = {}\n[metrics]\nlisten = \"{metrics}\"\n[control]\nsocket = {}\n\
         [flows]\ninterval_secs = 1\n",
        path("events.jsonl"),
        path("control.sock"),
    );
    if let Some(f) = fleet {
        // A machine id of its own: the three agents stand for three hosts.
        let id = work.join("machine-id");
        let digits: String = host.bytes().map(|b| format!("{b:02x}")).collect();
        write(&id, &format!("{digits:0>32}\n"))?;
        text.push_str(&format!(
            "[fleet]\nenabled = true\nclickhouse_url = \"{}\"\nhost = \"{host}\"\n\
             machine_id_file = {}\nbatch_interval_secs = {}\nqueue_rows = {}\nspool_bytes = {}\n",
            f.url,
            path("machine-id"),
            f.batch_interval_secs,
            f.queue_rows,
            f.spool_bytes,
        ));
    }
    Ok(text)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// utime + stime of a `/proc/.../stat` file, in clock ticks.
fn cpu_ticks(stat: &Path) -> Result<u64> {
    let text = fs::read_to_string(stat).with_context(|| format!("read {}", stat.display()))?;
    // After the command name (which may hold spaces, so split after its
    // closing parenthesis): state is field 3, utime 14 and stime 15.
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    match (get(14), get(15)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("{}: no utime and stime in {text:?}", stat.display()),
    }
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// One scrape of an agent's `/metrics`.
pub struct Metrics(String);

impl Metrics {
    /// The sum of every series of `name` whose labels include all of
    /// `labels` (0 when there is none: a counter not yet counted).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .filter(|((n, have), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .filter_map(|(_, value)| value.parse::<f64>().ok())
            .sum()
    }

    /// `bulkhead_fleet_rows_total{table="flows",result}`.
    pub fn flow_rows(&self, result: &str) -> u64 {
        self.sum(
            "bulkhead_fleet_rows_total",
            &[("table", "flows"), ("result", result)],
        ) as u64
    }

    /// Flow rows lost or dropped, for any reason.
    pub fn flow_rows_lost(&self) -> u64 {
        [
            "refused",
            "dropped_full",
            "dropped_disk_error",
            "dropped_corrupt",
            "dropped_invalid",
        ]
        .iter()
        .map(|r| self.flow_rows(r))
        .sum()
    }

    pub fn queue_rows(&self) -> u64 {
        self.sum("bulkhead_fleet_queue_rows", &[]) as u64
    }

    pub fn spool_bytes(&self) -> u64 {
        self.sum("bulkhead_fleet_spool_bytes", &[]) as u64
    }

    pub fn spool_files(&self) -> u64 {
        self.sum("bulkhead_fleet_spool_files", &[]) as u64
    }
}
