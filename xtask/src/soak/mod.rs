//! `cargo xtask soak --minutes N`: the agent under everything at once for a
//! long time (restarts by SIGTERM and SIGKILL, good and bad reloads, cgroup
//! churn, a denial flood and normal traffic), with every verdict checked
//! against the policy in force and the agent's memory, descriptors,
//! threads, map occupancy and decision log sampled every minute. Exits with
//! an error on any wrong verdict or failed step. Not part of CI (time).

mod agent;
mod churn;
mod policy;
mod report;
pub mod worker;
mod workers;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use self::{
    agent::{Agent, ProcessFigures, Stop},
    policy::{PolicyDir, Variant, PORTS, PREFIX, SERVICE_CGROUP},
    report::{metric, Activity, Report, Sample},
    worker::Tally,
    workers::{Running, Seen},
};
use crate::{
    bench::{
        daemon,
        sandbox::{self, Cgroup, Netns},
    },
    build,
    util::{is_root, target_dir, workspace_root},
};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Length of the run, in minutes.
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// Seconds between two agent restarts (SIGTERM and SIGKILL in turn).
    #[arg(long, default_value_t = 300)]
    pub restart_every: u64,
    /// Seconds between two reloads (good and bad in turn).
    #[arg(long, default_value_t = 20)]
    pub reload_every: u64,
    /// Seconds between two samples.
    #[arg(long, default_value_t = 60)]
    pub sample_every: u64,
    /// Rounds of normal traffic per second (4 judged calls each).
    #[arg(long, default_value_t = 50)]
    pub traffic_rate: u32,
    /// Denied connects per second, each to another destination.
    #[arg(long, default_value_t = 2000)]
    pub flood_rate: u32,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Everything the soak made, removed in reverse order on every exit path.
/// Fields drop in order: the worker cgroups before the service cgroup they
/// live in.
struct Sandbox {
    traffic_cg: Cgroup,
    flood_cg: Cgroup,
    probe_cg: Cgroup,
    service: Cgroup,
    /// Shared with the churn thread.
    ns: Arc<Netns>,
    mount: PathBuf,
}

impl Sandbox {
    fn create() -> Result<Self> {
        let mount = sandbox::cgroup2_mount()?;
        let ns = Arc::new(Netns::create(&format!("{PREFIX}ns"))?);
        let service = Cgroup::create(&mount, SERVICE_CGROUP)?;
        let traffic_cg = Cgroup::create(&service.path, "traffic")?;
        let flood_cg = Cgroup::create(&service.path, "flood")?;
        let probe_cg = Cgroup::create(&service.path, "probe")?;
        Ok(Self {
            ns,
            service,
            traffic_cg,
            flood_cg,
            probe_cg,
            mount,
        })
    }
}

/// Removes what a killed soak left: its pins (detached first, as they
/// still judge every cgroup), cgroups and namespace.
fn remove_stale(bin: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                eprintln!(
                    "xtask soak: detaching stale pins at {}",
                    entry.path().display()
                );
                daemon::detach(bin, &entry.path())?;
            }
        }
    }
    let mount = sandbox::cgroup2_mount()?;
    for name in [policy::CHURN_CGROUP, SERVICE_CGROUP] {
        let dir = mount.join(name);
        if dir.exists() {
            eprintln!("xtask soak: removing stale cgroup {}", dir.display());
            for child in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    let _ = fs::remove_dir(child.path());
                }
            }
            let _ = fs::remove_dir(&dir);
        }
    }
    let ns = format!("{PREFIX}ns");
    if Path::new("/run/netns").join(&ns).exists() {
        let _ = sandbox::run_quiet(std::process::Command::new("ip").args(["netns", "del", &ns]));
    }
    Ok(())
}

/// Echoes what a connection sends on the allowed TCP port, from a thread
/// inside the namespace (outside every managed cgroup).
fn echo_listener(ns: &Netns) -> Result<()> {
    let file = fs::File::open(&ns.path).with_context(|| format!("open {}", ns.path.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error()));
            return;
        }
        let listener = match TcpListener::bind(("127.0.0.1", PORTS.tcp_allowed)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        for stream in listener.incoming().flatten() {
            echo(stream);
        }
    });
    rx.recv()
        .context("the echo listener thread ended")?
        .context("start the echo listener")
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 14];
    if stream.read_exact(&mut buf).is_ok() {
        let _ = stream.write_all(&buf);
    }
}

/// A free TCP port on 127.0.0.1 for the agent's metrics endpoint.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

pub fn run(args: &SoakArgs) -> Result<()> {
    if !is_root() {
        bail!("the soak loads eBPF programs and makes cgroups: run it as root");
    }
    sandbox::catch_sigint()?;
    build::run(true)?;
    let bin = target_dir()?.join("release").join("bulkhead");
    remove_stale(&bin)?;
    let work = target_dir()?.join("soak");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let sandbox = Sandbox::create()?;
    echo_listener(&sandbox.ns)?;
    let pin_dir = Path::new("/sys/fs/bpf").join(format!("{PREFIX}{}", std::process::id()));
    let mut agent = Agent::new(&bin, &work, pin_dir, free_port()?)?;
    let mut variant = Variant::A;
    let policies = PolicyDir::create(&work, variant)?;
    let mut activity = Activity::default();
    activity
        .ready_ms
        .push(agent.start(&policies.dir)?.as_millis());
    eprintln!(
        "xtask soak: {} minutes; agent log, decision log and policies in {}",
        args.minutes,
        work.display()
    );

    let mut traffic = Running::start(
        &sandbox.ns,
        &sandbox.traffic_cg.path,
        "traffic",
        args.traffic_rate,
    )?;
    let mut flood = Running::start(
        &sandbox.ns,
        &sandbox.flood_cg.path,
        "flood",
        args.flood_rate,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let churn = churn::start(
        Arc::clone(&sandbox.ns),
        &sandbox.mount,
        &sandbox.service.path,
        Arc::clone(&stop),
    );

    let mut state = Soak {
        agent: &mut agent,
        policies: &policies,
        ns: &sandbox.ns,
        probe_cg: &sandbox.probe_cg.path,
        variant: &mut variant,
        activity: &mut activity,
        probes: Seen::default(),
        failures: Vec::new(),
        samples: Vec::new(),
        run: 1,
        start: Instant::now(),
    };
    let result = state.main_loop(args, &mut traffic, &mut flood, &churn);
    stop.store(true, Ordering::SeqCst);
    let churned = churn.finish();
    state.failures.extend(churned.failures);
    state.activity.churn_cycles = churned.cycles;
    if let Err(e) = result {
        state.failures.push(format!("{e:#}"));
    }
    let mut total = Tally::default();
    let mut wrong_lines = std::mem::take(&mut state.probes.wrong);
    total.add(state.probes.tally);
    total.add(churned.seen.tally);
    wrong_lines.extend(churned.seen.wrong);
    for w in [traffic.finish(), flood.finish()] {
        total.add(w.tally);
        wrong_lines.extend(w.wrong);
    }
    let Soak {
        failures, samples, ..
    } = state;
    let mut failures = failures;
    if let Err(e) = agent.finish() {
        failures.push(format!("stopping the agent at the end: {e:#}"));
    }
    // Every self-check that found the maps differing from the policy: the
    // soak changes nothing behind the agent's back, so any is a bug.
    let log = fs::read_to_string(work.join("agent.log")).unwrap_or_default();
    failures.extend(
        log.lines()
            .filter(|l| l.contains("ENFORCEMENT DRIFT"))
            .take(5)
            .map(|l| format!("the agent reported drift: {l}")),
    );
    drop(sandbox);

    let report = Report {
        minutes: args.minutes,
        command: format!("cargo xtask soak --minutes {}", args.minutes),
        samples: &samples,
        activity: &activity,
        total,
        wrong_lines: &wrong_lines,
        failures: &failures,
    };
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &args.report {
        let path = if path.is_absolute() {
            path.clone()
        } else {
            workspace_root().join(path)
        };
        fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    if !report.passed() {
        bail!(
            "the soak failed: {} wrong verdicts, {} failed steps (above)",
            total.wrong,
            failures.len()
        );
    }
    Ok(())
}

/// The soak's own state while it runs.
struct Soak<'a> {
    agent: &'a mut Agent,
    policies: &'a PolicyDir,
    ns: &'a Netns,
    probe_cg: &'a Path,
    variant: &'a mut Variant,
    activity: &'a mut Activity,
    /// What the soak's own probes (after reloads and restarts) saw.
    probes: Seen,
    failures: Vec<String>,
    samples: Vec<Sample>,
    /// Which start of the agent is running.
    run: u32,
    start: Instant,
}

const WAIT_FOR_RELOAD: Duration = Duration::from_secs(30);

impl Soak<'_> {
    fn main_loop(
        &mut self,
        args: &SoakArgs,
        traffic: &mut Running,
        flood: &mut Running,
        churn: &churn::Churn,
    ) -> Result<()> {
        let end = self.start + Duration::from_secs(args.minutes * 60);
        let mut next_sample = self.start;
        let mut next_reload = self.start + Duration::from_secs(args.reload_every);
        let mut next_restart = self.start + Duration::from_secs(args.restart_every);
        let mut good_next = true;
        let mut kill_next = false;
        loop {
            sandbox::check_interrupted()?;
            let now = Instant::now();
            if let Some(status) = self.agent.exited()? {
                bail!(
                    "the agent exited by itself ({status}); see {}",
                    self.agent.log_path().display()
                );
            }
            if traffic.died() || flood.died() {
                bail!("a traffic or flood worker died");
            }
            if now >= next_sample {
                self.sample(traffic, flood, churn);
                next_sample += Duration::from_secs(args.sample_every);
                if now >= end {
                    return Ok(());
                }
            }
            if now >= next_restart {
                let how = if kill_next { Stop::Kill } else { Stop::Term };
                self.restart(how)?;
                kill_next = !kill_next;
                next_restart += Duration::from_secs(args.restart_every);
            } else if now >= next_reload {
                if good_next {
                    self.good_reload()?;
                } else {
                    self.bad_reload()?;
                }
                good_next = !good_next;
                next_reload += Duration::from_secs(args.reload_every);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Probes the toggle port (and the fixed ones) from the service; a
    /// wrong verdict is kept with what the soak was doing.
    fn probe(&mut self, during: &str) -> Result<()> {
        let seen = workers::probe(self.ns, self.probe_cg, Some(self.variant.toggle_allowed()))?;
        self.probes.tally.add(seen.tally);
        self.probes
            .wrong
            .extend(seen.wrong.into_iter().map(|w| format!("{during}: {w}")));
        Ok(())
    }

    fn restart(&mut self, how: Stop) -> Result<()> {
        self.agent.stop(how)?;
        // Enforcement survives the agent: judged by the pinned programs.
        self.probe(&format!("agent stopped ({how:?})"))?;
        let ready = self.agent.start(&self.policies.dir)?;
        self.activity.ready_ms.push(ready.as_millis());
        self.run += 1;
        match how {
            Stop::Term => self.activity.restarts_term += 1,
            Stop::Kill => self.activity.restarts_kill += 1,
        }
        self.probe("after a restart")
    }

    fn service_status(&self) -> Result<(u64, u64, Option<u64>)> {
        let v = self.agent.status()?;
        let applied = v["reloads_applied"].as_u64().unwrap_or(0);
        let refused = v["reloads_refused"].as_u64().unwrap_or(0);
        let rules = v["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "soak-svc"))
            .and_then(|s| s["rules"].as_u64());
        Ok((applied, refused, rules))
    }

    /// Waits until `done(applied, refused, rules)` holds.
    fn wait_status(&self, what: &str, done: impl Fn(u64, u64, Option<u64>) -> bool) -> Result<()> {
        let deadline = Instant::now() + WAIT_FOR_RELOAD;
        loop {
            let (applied, refused, rules) = self.service_status()?;
            if done(applied, refused, rules) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not seen in `bulkhead status` within {WAIT_FOR_RELOAD:?} (applied {applied}, refused {refused}, rules {rules:?})");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn good_reload(&mut self) -> Result<()> {
        let next = self.variant.other();
        self.policies.write_service(&policy::service(next))?;
        self.wait_status("a good reload", |_, _, rules| rules == Some(next.rules()))?;
        *self.variant = next;
        self.activity.reloads_good += 1;
        self.probe("after a good reload")
    }

    fn bad_reload(&mut self) -> Result<()> {
        let (_, refused_before, _) = self.service_status()?;
        self.policies.write_service(&policy::broken_service())?;
        self.wait_status("a bad reload refused", |_, refused, _| {
            refused > refused_before
        })?;
        let rules = self.variant.rules();
        self.wait_status("the policy in force kept", |_, _, r| r == Some(rules))?;
        self.probe("after a bad reload")?;
        let (applied_before, _, _) = self.service_status()?;
        self.policies
            .write_service(&policy::service(*self.variant))?;
        self.wait_status("the good file put back", |applied, _, _| {
            applied > applied_before
        })?;
        self.activity.reloads_bad += 1;
        Ok(())
    }

    fn sample(&mut self, traffic: &Running, flood: &Running, churn: &churn::Churn) {
        let mut sample = Sample {
            minute: self.start.elapsed().as_secs_f64() / 60.0,
            run: self.run,
            log_bytes: agent::file_size(&self.agent.events),
            ..Sample::default()
        };
        if let Some(f) = self.agent.pid().and_then(ProcessFigures::read) {
            sample.rss_kib = f.rss_kib;
            sample.fds = f.fds;
            sample.threads = f.threads;
        }
        match self.agent.scrape() {
            Ok(page) => {
                let map = |m: &str| {
                    metric(
                        &page,
                        "bulkhead_bpf_map_entries",
                        Some(&format!("map=\"{m}\"")),
                    )
                };
                sample.services_entries = map("SERVICES");
                // Networks in the trie, whole addresses in the hash.
                sample.egress_v4_entries = map("EGRESS_V4") + map("EGRESS_HOSTS_V4");
                sample.rulesets_entries = map("RULESETS");
                sample.lost = report::lost_by_source(&page);
            }
            Err(e) => self
                .failures
                .push(format!("scrape at minute {:.1}: {e:#}", sample.minute)),
        }
        let mut total = self.probes.tally;
        total.add(traffic.snapshot());
        total.add(flood.snapshot());
        total.add(churn.snapshot());
        sample.judged = total.right + total.wrong;
        sample.wrong = total.wrong;
        sample.errors = total.errors;
        eprintln!(
            "xtask soak: minute {:.1}: RSS {} KiB, {} fds, {} threads, SERVICES {}, log {} bytes, {} judged, {} wrong",
            sample.minute,
            sample.rss_kib,
            sample.fds,
            sample.threads,
            sample.services_entries,
            sample.log_bytes,
            sample.judged,
            sample.wrong
        );
        self.samples.push(sample);
    }
}
