//! Sets up every case once, then runs them round after round and collects
//! the samples.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    daemon::Daemon,
    decision_log,
    floor::{Floor, ALL_HOOKS, CALL_HOOKS},
    loadgen::{self, Probe, Spec},
    peers,
    plan::{Case, Kind, Plan},
    profile::{self, ProgramCost},
    rules,
    sandbox::{self, Cgroup, Netns, PREFIX},
    stats::Summary,
};

/// Programs from elsewhere (another agent, a test run) attached at the
/// cgroup2 root run in every case: the bench waits this long for them to
/// go, checking every `RETRY_WAIT`, and repeats a case up to `ATTEMPTS`
/// times when they come or go while it runs.
const FOREIGN_WAIT: Duration = Duration::from_secs(60);
const RETRY_WAIT: Duration = Duration::from_secs(5);
const ATTEMPTS: usize = 4;

/// In the work directory: the daemon's config and its decision log.
pub const CONFIG_FILE: &str = "bulkhead.toml";
pub const EVENTS_FILE: &str = "events.jsonl";

/// One case's cgroup and network namespace, with its rules loaded.
struct Env {
    case: Case,
    cgroup: Cgroup,
    netns: Netns,
    /// bulkhead's policy directory (bulkhead cases only).
    policy_dir: Option<PathBuf>,
}

/// What the daemon cost, per round.
#[derive(Default, Clone, Debug)]
pub struct DaemonStats {
    pub ready_after: Vec<Duration>,
    pub rss_kib: Vec<u64>,
    pub maps_kib: Vec<u64>,
    /// Daemon context switches per hooked call of the load generator.
    pub switches_per_call: Vec<f64>,
    /// Decision-log lines per call of each probe (its lines over its
    /// calls, warm-ups included).
    pub lines_per_call: BTreeMap<Probe, Vec<f64>>,
    /// Lines that belong to no probe, per hooked call.
    pub other_lines_per_call: Vec<f64>,
    /// IRQ-work interrupts (all CPUs) per hooked call: how a BPF ring
    /// buffer wakes its reader.
    pub irq_work_per_call: Vec<f64>,
}

pub struct Results {
    pub cases: Vec<Case>,
    pub summaries: BTreeMap<(Case, Probe), Summary>,
    /// Per rule count.
    pub daemon: BTreeMap<usize, DaemonStats>,
    /// How long `nft -f` / `iptables-legacy-restore` took, per case.
    pub peer_load: BTreeMap<Case, Duration>,
    /// The programs bulkhead had attached, as bpftool lists them.
    pub bulkhead_programs: Vec<String>,
    /// Per rule count: time inside each of bulkhead's programs.
    pub program_costs: BTreeMap<usize, Vec<ProgramCost>>,
    /// Things a reader must know (cases skipped, retries, foreign programs).
    pub notes: Vec<String>,
    pub timer_overhead_ns: u64,
    /// "N of M" runs measured with programs from elsewhere attached.
    pub foreign: Option<String>,
}

pub struct Runner<'a> {
    pub plan: &'a Plan,
    pub mount: &'a Path,
    pub bulkhead: &'a Path,
    pub work: &'a Path,
}

impl Runner<'_> {
    pub fn run(&self) -> Result<Results> {
        let mut notes = Vec::new();
        let mut peer_load = BTreeMap::new();
        let envs = self.set_up(&mut notes, &mut peer_load)?;
        let cases: Vec<Case> = envs.iter().map(|e| e.case).collect();

        let mut rounds: BTreeMap<(Case, Probe), Vec<Vec<u64>>> = BTreeMap::new();
        let mut daemon: BTreeMap<usize, DaemonStats> = BTreeMap::new();
        let mut bulkhead_programs = Vec::new();
        let (mut runs, mut foreign_runs) = (0, 0);
        let mut foreign_programs = std::collections::BTreeSet::new();
        for round in 0..self.plan.rounds {
            for env in round_order(&envs, round) {
                let run = self.run_case(env, &mut notes)?;
                runs += 1;
                if !run.foreign_before.is_empty() {
                    foreign_runs += 1;
                    foreign_programs.extend(run.foreign_before.iter().filter_map(|l| {
                        // "ID ATTACH [FLAGS] NAME" without the id, which
                        // changes each time a test agent restarts.
                        let mut words = l.split_whitespace().skip(1);
                        Some(format!("{} {}", words.next()?, words.last()?))
                    }));
                }
                let udp = Summary::of(&[run.samples.get(Probe::UdpConnect).to_vec()]);
                eprintln!(
                    "xtask bench: round {}/{}: {} {}: UDP connect median {} ns",
                    round + 1,
                    self.plan.rounds,
                    env.case.label(),
                    env.case.rules,
                    udp.map_or(0, |s| s.median)
                );
                for probe in Probe::ALL {
                    rounds
                        .entry((env.case, probe))
                        .or_default()
                        .push(run.samples.get(probe).to_vec());
                }
                // The daemon's costs are reported per rule count, of the
                // plain bulkhead case.
                if let Some(d) = run.daemon.filter(|_| env.case.kind == Kind::Bulkhead) {
                    let stats = daemon.entry(env.case.rules).or_default();
                    stats.ready_after.push(d.ready_after);
                    stats.rss_kib.extend(d.rss_kib);
                    stats.maps_kib.extend(d.maps_kib);
                    stats.switches_per_call.extend(d.switches_per_call);
                    for (probe, v) in d.lines_per_call {
                        stats.lines_per_call.entry(probe).or_default().push(v);
                    }
                    stats.other_lines_per_call.extend(d.other_lines_per_call);
                    stats.irq_work_per_call.extend(d.irq_work_per_call);
                    bulkhead_programs = run.programs;
                }
            }
        }

        let foreign = (foreign_runs > 0).then(|| format!("{foreign_runs} of {runs}"));
        if foreign_runs > 0 {
            notes.push(format!(
                "{foreign_runs} of {runs} runs were measured with programs from elsewhere \
                 attached at the cgroup2 root (--allow-foreign-programs), so they ran in \
                 every one of those runs, the no-program case included: {}",
                foreign_programs.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }

        let mut program_costs = BTreeMap::new();
        for env in envs.iter().filter(|e| e.case.kind == Kind::Bulkhead) {
            sandbox::check_interrupted()?;
            match self.profile(env) {
                Ok(costs) => {
                    program_costs.insert(env.case.rules, costs);
                }
                Err(e) => notes.push(format!(
                    "no per-program run times for bulkhead {}: {e:#}",
                    env.case.rules
                )),
            }
        }

        let summaries = rounds
            .iter()
            .filter_map(|(key, r)| Summary::of(r).map(|s| (*key, s)))
            .collect();
        Ok(Results {
            cases,
            summaries,
            daemon,
            peer_load,
            bulkhead_programs,
            program_costs,
            notes,
            timer_overhead_ns: loadgen::timer_overhead_ns(),
            foreign,
        })
    }

    /// Creates every case's cgroup and namespace and loads the peers' rules
    /// (once: they live in their own namespace and cost nothing to the other
    /// cases). bulkhead's daemon is started per case and round, because its
    /// programs run for every cgroup on the host while it is attached.
    fn set_up(
        &self,
        notes: &mut Vec<String>,
        peer_load: &mut BTreeMap<Case, Duration>,
    ) -> Result<Vec<Env>> {
        let mut envs = Vec::new();
        for case in self.plan.cases() {
            sandbox::check_interrupted()?;
            let name = format!("{PREFIX}{}", case.slug());
            let nft_path = peers::nft_cgroup_path(self.mount, &name);
            if case.kind == Kind::Nftables && nft_path.is_none() {
                notes.push(format!(
                    "nftables cases skipped: the cgroup2 mount {} is not below /sys/fs/cgroup, \
                     where nft resolves `socket cgroupv2` paths",
                    self.mount.display()
                ));
                continue;
            }
            let cgroup = Cgroup::create(self.mount, &name)?;
            let netns = Netns::create(&name)?;
            let destinations = rules::destinations(case.rules)?;
            let mut policy_dir = None;
            match case.kind {
                Kind::Baseline | Kind::Floor | Kind::FloorAll => {}
                Kind::Bulkhead | Kind::BulkheadExe => {
                    let dir = self.work.join(format!("policy-{}", case.slug()));
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("create {}", dir.display()))?;
                    let file = dir.join("bench.toml");
                    let policy = if case.kind == Kind::BulkheadExe {
                        // The load generator is a fork of this process.
                        let exe = std::env::current_exe().context("this program's path")?;
                        rules::bulkhead_exe_policy(&name, &destinations, &exe)
                    } else {
                        rules::bulkhead_policy(&name, &destinations)
                    };
                    fs::write(&file, policy)
                        .with_context(|| format!("write {}", file.display()))?;
                    policy_dir = Some(dir);
                }
                Kind::Nftables => {
                    let text = peers::nft_ruleset(nft_path.as_deref().unwrap_or(""), &destinations);
                    let file = self.work.join(format!("{}.nft", case.slug()));
                    let took = peers::load_nft(&netns, &file, &text)?;
                    eprintln!("xtask bench: nft -f with {} rules: {took:.2?}", case.rules);
                    peer_load.insert(case, took);
                }
                Kind::Iptables => {
                    let text = peers::iptables_rules(&name, &destinations);
                    let file = self.work.join(format!("{}.rules", case.slug()));
                    let took = peers::load_iptables(&netns, &file, &text)?;
                    eprintln!(
                        "xtask bench: iptables-legacy-restore with {} rules: {took:.2?}",
                        case.rules
                    );
                    peer_load.insert(case, took);
                }
            }
            envs.push(Env {
                case,
                cgroup,
                netns,
                policy_dir,
            });
        }
        Ok(envs)
    }

    /// Runs one case; repeats it when programs from elsewhere came or went
    /// while it ran (a test run attaching or detaching its agent).
    fn run_case(&self, env: &Env, notes: &mut Vec<String>) -> Result<CaseRun> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let foreign = self.wait_until_clean(env)?;
            let run = self.attempt(env)?;
            // Steady: exactly the programs from elsewhere found before it
            // started (none, unless allowed) were in effect all along.
            if run.foreign_before == foreign && run.foreign_after == foreign {
                return Ok(run);
            }
            if attempt == ATTEMPTS {
                notes.push(format!(
                    "{} {}: programs from elsewhere came or went during the run even after \
                     {ATTEMPTS} tries ({}); that run's samples include them",
                    env.case.label(),
                    env.case.rules,
                    run.foreign_after.join("; ")
                ));
                return Ok(run);
            }
            eprintln!(
                "xtask bench: programs from elsewhere came or went during {} {}; repeating it",
                env.case.label(),
                env.case.rules
            );
        }
    }

    fn wait_until_clean(&self, env: &Env) -> Result<Vec<String>> {
        wait_until_clean(&env.cgroup.path, self.plan.allow_foreign)
    }

    fn spec<'e>(&self, env: &'e Env) -> Spec<'e> {
        Spec {
            cgroup: &env.cgroup.path,
            netns: &env.netns.path,
            udp_iterations: self.plan.udp_iterations,
            tcp_iterations: self.plan.tcp_iterations,
            expect_denied: env.case.is_bulkhead(),
        }
    }

    fn start_daemon(&self, policy_dir: &Path) -> Result<Daemon> {
        Daemon::start(
            self.bulkhead,
            &self.work.join(CONFIG_FILE),
            policy_dir,
            self.work,
        )
    }

    /// One more run of a bulkhead case with the kernel's BPF run-time
    /// statistics on: how long each of its programs takes per run.
    fn profile(&self, env: &Env) -> Result<Vec<ProgramCost>> {
        let Some(dir) = &env.policy_dir else {
            return Ok(Vec::new());
        };
        let daemon = self.start_daemon(dir)?;
        let ours = daemon.program_ids()?;
        // The cgroup programs among them (a tracing program may be pinned
        // too), with their hooks as bpftool names them.
        let programs: Vec<(u32, String, String)> =
            profile::parse_programs(&sandbox::effective_programs(&env.cgroup.path)?)
                .into_iter()
                .filter(|(id, _, _)| ours.contains(id))
                .collect();
        let stats_on = profile::enable_stats()?;
        let read = || -> Result<Vec<(u64, u64)>> {
            programs
                .iter()
                .map(|(id, _, _)| profile::program_stats(*id))
                .collect()
        };
        let before = read()?;
        loadgen::run(&self.spec(env))?;
        let after = read()?;
        drop(stats_on);
        daemon.stop()?;
        ensure_detached(env, &ours)?;
        let _ = fs::remove_file(self.work.join(EVENTS_FILE));
        Ok(programs
            .into_iter()
            .zip(before.into_iter().zip(after))
            .map(|((_, attach, name), ((t0, n0), (t1, n1)))| {
                let runs = n1.saturating_sub(n0);
                ProgramCost {
                    attach,
                    name,
                    runs,
                    ns_per_run: if runs == 0 {
                        0.0
                    } else {
                        t1.saturating_sub(t0) as f64 / runs as f64
                    },
                }
            })
            .collect())
    }

    /// One measurement of one case, verified: bulkhead must refuse a port
    /// no rule allows, the peers' cgroup rule must have seen every sendto(),
    /// and a stopped bulkhead or a detached floor must leave nothing
    /// attached.
    fn attempt(&self, env: &Env) -> Result<CaseRun> {
        let daemon = match &env.policy_dir {
            Some(dir) => Some(self.start_daemon(dir)?),
            None => None,
        };
        let floor = match env.case.kind {
            Kind::Floor => Some(Floor::attach(&env.cgroup.path, &CALL_HOOKS)?),
            Kind::FloorAll => Some(Floor::attach(&env.cgroup.path, &ALL_HOOKS)?),
            _ => None,
        };
        let ours = match (&daemon, &floor) {
            (Some(d), _) => d.program_ids()?,
            (None, Some(f)) => f.ids(),
            (None, None) => Vec::new(),
        };
        let split = |listing: Vec<String>| -> (Vec<String>, Vec<String>) {
            listing
                .into_iter()
                .partition(|l| program_id(l).is_some_and(|id| ours.contains(&id)))
        };
        let (programs, foreign_before) = split(sandbox::effective_programs(&env.cgroup.path)?);
        let counter = |env: &Env| -> Result<Option<u64>> {
            match env.case.kind {
                Kind::Nftables => peers::nft_packets(&env.netns).map(Some),
                Kind::Iptables => peers::iptables_packets(&env.netns).map(Some),
                Kind::Baseline
                | Kind::Floor
                | Kind::FloorAll
                | Kind::Bulkhead
                | Kind::BulkheadExe => Ok(None),
            }
        };
        let before = counter(env)?;
        let switches_before = daemon.as_ref().and_then(Daemon::context_switches);
        let irq_work_before = irq_work_interrupts();
        let spec = self.spec(env);
        let samples = loadgen::run(&spec)
            .with_context(|| format!("{} {}", env.case.label(), env.case.rules))?;
        let switches_after = daemon.as_ref().and_then(Daemon::context_switches);
        let irq_work_after = irq_work_interrupts();
        if let Some(f) = floor {
            f.detach()?;
            ensure_detached(env, &ours)?;
        }
        if let (Some(before), Some(after)) = (before, counter(env)?) {
            let seen = after.saturating_sub(before);
            let sent = samples.get(Probe::UdpSendto).len() as u64;
            if seen < sent {
                bail!(
                    "{} {}: its cgroup rule matched {seen} packets but the probes sent at \
                     least {sent}: the rules do not see the bench cgroup",
                    env.case.label(),
                    env.case.rules
                );
            }
        }
        let (_, foreign_after) = split(sandbox::effective_programs(&env.cgroup.path)?);
        let calls = spec.hooked_calls() as f64;
        let daemon_stats = match daemon {
            Some(d) => {
                let mut stats = RoundDaemon {
                    ready_after: d.ready_after,
                    rss_kib: d.rss_kib,
                    maps_kib: d.maps_kib,
                    switches_per_call: switches_before
                        .zip(switches_after)
                        .map(|(b, a)| a.saturating_sub(b) as f64 / calls),
                    lines_per_call: BTreeMap::new(),
                    other_lines_per_call: None,
                    irq_work_per_call: irq_work_before
                        .zip(irq_work_after)
                        .map(|(b, a)| a.saturating_sub(b) as f64 / calls),
                };
                d.stop()?;
                ensure_detached(env, &ours)?;
                // The decision log: counted, then removed (it grows by tens
                // of MB per case).
                let log = self.work.join(EVENTS_FILE);
                // No file: the daemon wrote no line at all.
                let text = match fs::read_to_string(&log) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                    other => other,
                };
                if let Ok(text) = text {
                    let counts = decision_log::count(&text);
                    for probe in Probe::ALL {
                        let lines = counts.per_probe.get(&probe).copied().unwrap_or(0);
                        stats
                            .lines_per_call
                            .insert(probe, lines as f64 / spec.calls(probe) as f64);
                    }
                    stats.other_lines_per_call = Some(counts.other as f64 / calls);
                }
                let _ = fs::remove_file(&log);
                Some(stats)
            }
            None => None,
        };
        Ok(CaseRun {
            samples,
            daemon: daemon_stats,
            programs,
            foreign_before,
            foreign_after,
        })
    }
}

/// The cases of one round: the baseline again before each rule count's
/// group (so every group has a baseline next to it in time), the whole list
/// reversed every other round (A B C, C B A: slow drift on the machine does
/// not always land on the same cases).
fn round_order(envs: &[Env], round: usize) -> Vec<&Env> {
    let baseline = envs.iter().find(|e| e.case.kind == Kind::Baseline);
    let mut order = Vec::new();
    for env in envs {
        match env.case.kind {
            Kind::Baseline | Kind::Floor | Kind::FloorAll => {}
            Kind::Bulkhead => {
                order.extend(baseline);
                order.push(env);
            }
            Kind::BulkheadExe | Kind::Nftables | Kind::Iptables => order.push(env),
        }
    }
    if order.is_empty() {
        order.extend(baseline);
    }
    // The trivial hooks once, right after the first baseline (they do not
    // depend on the rule count).
    let floors = envs
        .iter()
        .filter(|e| matches!(e.case.kind, Kind::Floor | Kind::FloorAll));
    for (i, floor) in floors.enumerate() {
        order.insert(
            (usize::from(baseline.is_some()) + i).min(order.len()),
            floor,
        );
    }
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

struct RoundDaemon {
    ready_after: Duration,
    rss_kib: Option<u64>,
    maps_kib: Option<u64>,
    switches_per_call: Option<f64>,
    lines_per_call: BTreeMap<Probe, f64>,
    other_lines_per_call: Option<f64>,
    irq_work_per_call: Option<f64>,
}

/// None of the stopped daemon's (or the floor's) programs may still be in effect (a
/// stopped agent keeps enforcing through its pins until detached; the
/// kernel releases a link shortly after its last pin goes, so this polls).
fn ensure_detached(env: &Env, ours: &[u32]) -> Result<()> {
    let what = format!("{} {}", env.case.label(), env.case.rules);
    ensure_gone(&env.cgroup.path, &what, ours)
}

/// [`ensure_detached`] for `cgroup`, naming the case `what`.
pub(super) fn ensure_gone(cgroup: &Path, what: &str, ours: &[u32]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = sandbox::effective_programs(cgroup)?
            .into_iter()
            .filter(|l| program_id(l).is_some_and(|id| ours.contains(&id)))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: its programs are still attached after it stopped and was detached: {}",
                left.join("; ")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `FOREIGN_WAIT` until no program from elsewhere is in
/// effect for `cgroup` (checked before bulkhead's own daemon starts). Such
/// programs run in every case, baseline included, so the bench stops
/// rather than measure on top of them, unless told to (`allow_foreign`):
/// then it goes on at once and returns them.
pub(super) fn wait_until_clean(cgroup: &Path, allow_foreign: bool) -> Result<Vec<String>> {
    let deadline = Instant::now() + FOREIGN_WAIT;
    loop {
        sandbox::check_interrupted()?;
        let foreign = sandbox::effective_programs(cgroup)?;
        if foreign.is_empty() || allow_foreign {
            return Ok(foreign);
        }
        if Instant::now() >= deadline {
            bail!(
                "programs from elsewhere stay attached at the cgroup2 root ({}): they \
                 would run in every case, the no-program one included. Stop the agent or \
                 test run that attached them (a stopped bulkhead keeps its programs \
                 pinned: `bulkhead detach --pin-dir DIR`), or pass \
                 --allow-foreign-programs to measure on top of them",
                foreign.join("; ")
            );
        }
        eprintln!(
            "xtask bench: programs from elsewhere are in effect ({}); waiting",
            foreign.join("; ")
        );
        thread::sleep(RETRY_WAIT);
    }
}

/// The program id at the start of a `bpftool cgroup show` line.
pub(super) fn program_id(line: &str) -> Option<u32> {
    line.split_whitespace().next()?.parse().ok()
}

/// IRQ-work interrupts so far, summed over CPUs (`IWI` in /proc/interrupts).
fn irq_work_interrupts() -> Option<u64> {
    let text = fs::read_to_string("/proc/interrupts").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("IWI:"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .map_while(|w| w.parse::<u64>().ok())
            .sum(),
    )
}

struct CaseRun {
    samples: loadgen::Samples,
    daemon: Option<RoundDaemon>,
    /// bulkhead's programs in effect (bulkhead cases).
    programs: Vec<String>,
    /// Programs from elsewhere in effect when the probes started and ended.
    foreign_before: Vec<String>,
    foreign_after: Vec<String>,
}
