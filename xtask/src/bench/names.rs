//! The DNS names section of `cargo xtask bench` (issue 19, docs/dns-names.md):
//!
//! 1. What the agent adds to a lookup, end to end: the real agent runs
//!    with a policy whose service has a name rule; a client in that
//!    service's cgroup asks a real dnsmasq on port 53 of a loopback
//!    address (the kernel sends the query to the agent's proxy, which
//!    forwards it, learns the answer and replies; recvmsg4 shows the
//!    resolver as the source), interleaved one by one with the same query
//!    from a service without name rules (not redirected). lookup.rs.
//! 2. What a connect() costs when the destination is allowed by a name
//!    (its address learnt through the proxy, not in the service's address
//!    rules, so the judge takes the learnt path) against the same
//!    destination allowed by an address rule, both services with the same
//!    N generated destinations, under the same agent; next to the
//!    no-program case, and split by a third service with the name rule
//!    whose address rules allow the destination too (what having name
//!    rules costs, apart from the learnt path). The probes are
//!    loadgen.rs's.
//!
//! One agent serves the three services in a round, so the comparison shares its
//! start, its proxy and its maps; it is started and stopped each round
//! (its programs at the cgroup2 root would otherwise run in the
//! no-program case).

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use integration_tests::DnsServer;

use super::{
    daemon::Daemon,
    interleave,
    loadgen::{self, Probe, Spec},
    lookup::Client,
    plan::Plan,
    profile::{self, ProgramCost},
    rules,
    runner::{ensure_gone, program_id, wait_until_clean, CONFIG_FILE, EVENTS_FILE},
    sandbox::{self, Cgroup, Netns, PREFIX},
};

/// The bench's resolver: dnsmasq on port 53 of this loopback address, out
/// of the generated destinations' block (127.0.0.0/15), so it never adds
/// to or merges with them.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 2, 53, 1);
/// The name the name rule allows; the resolver answers it with 127.0.0.1,
/// where the probes' receivers listen.
pub const NAME: &str = "probe.bulkhead.test";

/// The cases of the connect part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Svc {
    /// No program attached (no agent running).
    Baseline,
    /// The probes' address allowed by an address rule.
    Cidr,
    /// A service with the same name rule whose probes' address its
    /// address rules allow too: what having name rules costs a connect()
    /// the address rules decide (the split of Name against Cidr).
    NameRulesByAddress,
    /// The probes' address allowed because the service learnt it from its
    /// own lookup of a name its rule allows.
    Name,
}

impl Svc {
    pub fn label(self) -> &'static str {
        match self {
            Svc::Baseline => "no programs",
            Svc::Cidr => "bulkhead, allowed by address (CIDR)",
            Svc::NameRulesByAddress => "bulkhead, with name rules, allowed by address",
            Svc::Name => "bulkhead, allowed by a learnt name",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Svc::Baseline => "base",
            Svc::Cidr => "cidr",
            Svc::NameRulesByAddress => "both",
            Svc::Name => "name",
        }
    }
}

/// How a lookup client reaches the resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// A service without name rules: straight to the resolver.
    Direct,
    /// A service with a name rule: through the agent's proxy.
    Proxy,
}

/// The transport a lookup goes over (glibc uses TCP after a truncated
/// UDP answer, or always with `options use-vc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Over {
    Udp,
    Tcp,
}

impl Over {
    pub const ALL: [Self; 2] = [Self::Udp, Self::Tcp];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
        }
    }
}

/// One transport's lookups of a run: direct, through the proxy, and the
/// pairwise added time (ns).
type Samples = (Vec<u64>, Vec<u64>, Vec<i64>);

/// Samples of every round, per rule count (the no-program case under 0).
#[derive(Default)]
pub struct NamesResults {
    pub rule_counts: Vec<usize>,
    /// Each round's lookup times (ns).
    pub lookups: BTreeMap<(usize, Over, Via), Vec<Vec<u64>>>,
    /// Each round's pairwise added time: a proxied lookup minus the direct
    /// one made next to it over the same transport (ns; negative when
    /// noise made it faster).
    pub added: BTreeMap<(usize, Over), Vec<Vec<i64>>>,
    /// Each round's probe samples (ns).
    pub connect: BTreeMap<(usize, Svc, Probe), Vec<Vec<u64>>>,
    /// Each round's block centres (interquartile means) of the services
    /// under the agent, in block order: block i of each service ran next to block i of the
    /// others (interleave.rs), so they are compared pairwise.
    pub blocks: BTreeMap<(usize, Svc, Probe), Vec<Vec<u64>>>,
    /// Time inside the agent's programs, per service, in one extra run at
    /// the largest rule count.
    pub program_costs: Option<(usize, BTreeMap<Svc, Vec<ProgramCost>>)>,
    pub notes: Vec<String>,
    pub rounds: usize,
    pub lookups_per_round: usize,
    pub warmup_lookups: usize,
    pub udp_iterations: usize,
    pub tcp_iterations: usize,
}

/// A case's cgroup and network namespace (the lookups run from the
/// cgroup in the host's namespace; the connect probes in the namespace).
struct Env {
    cgroup: Cgroup,
    netns: Netns,
}

impl Env {
    fn create(mount: &Path, slug: &str) -> Result<Self> {
        let name = format!("{PREFIX}{slug}");
        Ok(Self {
            cgroup: Cgroup::create(mount, &name)?,
            netns: Netns::create(&name)?,
        })
    }
}

/// One rule count's services and their policies.
struct Group {
    rules: usize,
    name: Env,
    cidr: Env,
    both: Env,
    policy_dir: PathBuf,
}

impl Group {
    fn env(&self, svc: Svc) -> &Env {
        match svc {
            Svc::Name => &self.name,
            Svc::NameRulesByAddress => &self.both,
            Svc::Cidr | Svc::Baseline => &self.cidr,
        }
    }
}

pub struct Section<'a> {
    pub plan: &'a Plan,
    pub mount: &'a Path,
    pub bulkhead: &'a Path,
    pub work: &'a Path,
}

/// Runs of each service's probes, in turn and the order reversed each
/// time, whose in-program times are summed: one run each left differences
/// of ±10 ns between runs of the same service.
pub const PROFILE_PASSES: usize = 6;

/// Discarded lookups before each round's measured ones.
fn warmup_lookups(n: usize) -> usize {
    n / 10 + 20
}

impl Section<'_> {
    pub fn run(&self) -> Result<NamesResults> {
        let plan = self.plan;
        let server = DnsServer::start_at(
            SocketAddr::from((RESOLVER, 53)),
            &[(NAME, IpAddr::V4(Ipv4Addr::LOCALHOST))],
            &[],
        );
        eprintln!(
            "xtask bench: names: dnsmasq (pid {}) answers {NAME} on {}",
            server.pid(),
            server.addr()
        );
        let base = Env::create(self.mount, "names-base")?;
        let mut groups = Vec::new();
        for &rules in &plan.rule_counts {
            groups.push(self.group(rules)?);
        }
        let mut out = NamesResults {
            rule_counts: plan.rule_counts.clone(),
            rounds: plan.rounds,
            lookups_per_round: plan.lookups,
            warmup_lookups: warmup_lookups(plan.lookups),
            udp_iterations: plan.udp_iterations,
            tcp_iterations: plan.tcp_iterations,
            ..NamesResults::default()
        };
        for round in 0..plan.rounds {
            let forward = round % 2 == 0;
            let mut order: Vec<&Group> = groups.iter().collect();
            if !forward {
                order.reverse();
            }
            for group in order {
                sandbox::check_interrupted()?;
                if forward {
                    self.baseline(&base, &mut out)?;
                }
                self.with_agent(group, forward, &mut out)?;
                if !forward {
                    self.baseline(&base, &mut out)?;
                }
                let direct = out
                    .lookups
                    .get(&(group.rules, Over::Udp, Via::Direct))
                    .and_then(|r| r.last());
                let proxied = out
                    .lookups
                    .get(&(group.rules, Over::Udp, Via::Proxy))
                    .and_then(|r| r.last());
                eprintln!(
                    "xtask bench: names round {}/{}: {} rules: lookup medians {} ns direct, {} ns \
                     through the proxy",
                    round + 1,
                    plan.rounds,
                    group.rules,
                    direct.map_or(0, |v| median(v)),
                    proxied.map_or(0, |v| median(v)),
                );
            }
        }
        if let Some(group) = groups.last() {
            sandbox::check_interrupted()?;
            match self.profile(group) {
                Ok(costs) => out.program_costs = Some((group.rules, costs)),
                Err(e) => out.notes.push(format!(
                    "no per-program run times for the names section: {e:#}"
                )),
            }
        }
        drop(server);
        Ok(out)
    }

    fn group(&self, rules: usize) -> Result<Group> {
        let name = Env::create(self.mount, &format!("names-{rules}-{}", Svc::Name.slug()))?;
        let cidr = Env::create(self.mount, &format!("names-{rules}-{}", Svc::Cidr.slug()))?;
        let both = Env::create(
            self.mount,
            &format!("names-{rules}-{}", Svc::NameRulesByAddress.slug()),
        )?;
        let rel = |env: &Env| -> Result<String> {
            Ok(env
                .cgroup
                .path
                .strip_prefix(self.mount)
                .context("a bench cgroup outside the cgroup2 mount")?
                .display()
                .to_string())
        };
        let destinations = rules::destinations(rules)?;
        let [names_policy, cidr_policy, both_policy] = rules::names_policies(
            [&rel(&name)?, &rel(&cidr)?, &rel(&both)?],
            &destinations,
            RESOLVER,
            NAME,
        );
        let policy_dir = self.work.join(format!("policy-names-{rules}"));
        fs::create_dir_all(&policy_dir)
            .with_context(|| format!("create {}", policy_dir.display()))?;
        for (file, text) in [
            ("name.toml", names_policy),
            ("cidr.toml", cidr_policy),
            ("both.toml", both_policy),
        ] {
            let path = policy_dir.join(file);
            fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(Group {
            rules,
            name,
            cidr,
            both,
            policy_dir,
        })
    }

    fn spec<'e>(&self, env: &'e Env, expect_denied: bool) -> Spec<'e> {
        Spec {
            cgroup: &env.cgroup.path,
            netns: &env.netns.path,
            udp_iterations: self.plan.udp_iterations,
            tcp_iterations: self.plan.tcp_iterations,
            expect_denied,
        }
    }

    /// The probes with no agent running (and no program from elsewhere).
    fn baseline(&self, base: &Env, out: &mut NamesResults) -> Result<()> {
        let foreign = wait_until_clean(&base.cgroup.path, self.plan.allow_foreign)?;
        let samples = loadgen::run(&self.spec(base, false)).context("names: no programs")?;
        let after = sandbox::effective_programs(&base.cgroup.path)?;
        if !foreign.is_empty() || !after.is_empty() {
            out.notes.push(format!(
                "a no-program run had programs from elsewhere in effect: {}",
                after.join("; ")
            ));
        }
        push_samples(out, 0, Svc::Baseline, &samples);
        Ok(())
    }

    /// One round of a rule count with the agent running: the lookups
    /// (which also teach the name service the probes' address), then the
    /// connect probes of the two services, in `forward` order or reversed.
    fn with_agent(&self, group: &Group, forward: bool, out: &mut NamesResults) -> Result<()> {
        let foreign = wait_until_clean(&group.name.cgroup.path, self.plan.allow_foreign)?;
        let daemon = self.start_daemon(&group.policy_dir)?;
        let ours = daemon.program_ids()?;
        self.wait_start_check()?;
        let measured = self
            .lookups(group, self.plan.lookups)
            .with_context(|| format!("names {}: lookups", group.rules))?;
        for (over, (direct, proxied, added)) in measured {
            out.lookups
                .entry((group.rules, over, Via::Direct))
                .or_default()
                .push(direct);
            out.lookups
                .entry((group.rules, over, Via::Proxy))
                .or_default()
                .push(proxied);
            out.added
                .entry((group.rules, over))
                .or_default()
                .push(added);
        }
        let mut order = [Svc::Name, Svc::NameRulesByAddress, Svc::Cidr];
        if !forward {
            order.reverse();
        }
        let cgroups = order.map(|svc| group.env(svc).cgroup.path.as_path());
        let spec = interleave::Spec {
            cgroups: &cgroups,
            netns: &group.cidr.netns.path,
            udp_iterations: self.plan.udp_iterations,
            tcp_iterations: self.plan.tcp_iterations,
        };
        let runs = interleave::run(&spec)
            .with_context(|| format!("names {}: the services' probes", group.rules))?;
        for (svc, samples) in order.into_iter().zip(&runs) {
            push_samples(out, group.rules, svc, samples);
            for probe in Probe::ALL {
                out.blocks
                    .entry((group.rules, svc, probe))
                    .or_default()
                    .push(interleave::block_centres(
                        samples.get(probe),
                        spec.block_len(probe),
                    ));
            }
        }
        let foreign_after: Vec<String> = sandbox::effective_programs(&group.name.cgroup.path)?
            .into_iter()
            .filter(|l| program_id(l).is_none_or(|id| !ours.contains(&id)))
            .collect();
        if foreign_after != foreign {
            out.notes.push(format!(
                "names {}: programs from elsewhere came or went during a round ({}); its \
                 samples include them",
                group.rules,
                foreign_after.join("; ")
            ));
        }
        daemon.stop()?;
        ensure_gone(
            &group.name.cgroup.path,
            &format!("names {}", group.rules),
            &ours,
        )?;
        // The decision log grows with every lookup (a new socket each).
        let _ = fs::remove_file(self.work.join(EVENTS_FILE));
        Ok(())
    }

    /// Waits until the agent's start-up self-check has run: it reads every
    /// map entry (three services of 100,000 destinations: hundreds of
    /// milliseconds of a core here), and lookups measured during it would
    /// show a start-up cost, not what a lookup adds.
    fn wait_start_check(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = std::process::Command::new(self.bulkhead)
                .args(["status", "--json", "--config"])
                .arg(self.work.join(CONFIG_FILE))
                .stdin(std::process::Stdio::null())
                .output()
                .context("run bulkhead status")?;
            let checks = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get("self_check")?.get("checks")?.as_u64());
            if checks.is_some_and(|c| c >= 1) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the agent's start-up self-check did not finish within 60 s (bulkhead \
                     status: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
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

    /// `n` lookups from each service, interleaved (proxied then direct,
    /// then the other way round), after a discarded warm-up. Checked: the
    /// name service may not reach the probes' address before its lookups
    /// (the address rules deny it and nothing is learnt yet) and may after
    /// the warm-up (it learnt it: its lookups went through the proxy); the
    /// other service may all along. Each round of the loop makes the four
    /// lookups over UDP, then the four over TCP. Returns, per transport,
    /// (direct, proxied, added).
    fn lookups(&self, group: &Group, n: usize) -> Result<BTreeMap<Over, Samples>> {
        let resolver = SocketAddrV4::new(RESOLVER, 53);
        let mut proxied = Client::spawn(&group.name.cgroup.path, resolver, NAME)?;
        let mut direct = Client::spawn(&group.cidr.cgroup.path, resolver, NAME)?;
        match proxied.connect_errno()? {
            e if e == libc::EPERM => {}
            0 => bail!(
                "the name service could reach 127.0.0.1:{} before any lookup: its address \
                 rules allow it or something was learnt already, so the learnt path would \
                 not be measured",
                loadgen::UDP_PORT
            ),
            e => bail!("the name service's connect() failed with errno {e}, not EPERM"),
        }
        let e = direct.connect_errno()?;
        if e != 0 {
            bail!("the CIDR service may not connect() to the probe's address (errno {e})");
        }
        let warmup = warmup_lookups(n);
        let mut out: BTreeMap<Over, Samples> = BTreeMap::new();
        for i in 0..warmup + n {
            if i % 256 == 0 {
                sandbox::check_interrupted()?;
            }
            for over in Over::ALL {
                let (pt, dt) = if i % 2 == 0 {
                    let pt = proxied.lookup(over).with_context(|| {
                        format!("a lookup over {} through the proxy", over.label())
                    })?;
                    (
                        pt,
                        direct
                            .lookup(over)
                            .with_context(|| format!("a direct lookup over {}", over.label()))?,
                    )
                } else {
                    let dt = direct
                        .lookup(over)
                        .with_context(|| format!("a direct lookup over {}", over.label()))?;
                    (
                        proxied.lookup(over).with_context(|| {
                            format!("a lookup over {} through the proxy", over.label())
                        })?,
                        dt,
                    )
                };
                if i >= warmup {
                    let (d, p, added) = out.entry(over).or_default();
                    d.push(dt);
                    p.push(pt);
                    added.push(
                        i64::try_from(pt).unwrap_or(i64::MAX) - i64::try_from(dt).unwrap_or(0),
                    );
                }
            }
            if i + 1 == warmup {
                let e = proxied.connect_errno()?;
                if e != 0 {
                    bail!(
                        "after {warmup} lookups of {NAME} the name service still may not \
                         connect() to its address (errno {e}): nothing was learnt, so its \
                         lookups did not go through the agent's proxy"
                    );
                }
            }
        }
        proxied.finish()?;
        direct.finish()?;
        Ok(out)
    }

    /// One more run at `group`'s rule count with the kernel's BPF run-time
    /// statistics on: the mean time inside each program while each
    /// service's probes run, the services in turn, `PROFILE_PASSES` times.
    fn profile(&self, group: &Group) -> Result<BTreeMap<Svc, Vec<ProgramCost>>> {
        let daemon = self.start_daemon(&group.policy_dir)?;
        let ours = daemon.program_ids()?;
        let programs: Vec<(u32, String, String)> =
            profile::parse_programs(&sandbox::effective_programs(&group.name.cgroup.path)?)
                .into_iter()
                .filter(|(id, _, _)| ours.contains(id))
                .collect();
        self.wait_start_check()?;
        // Teaches the name service its address (checked), untimed.
        self.lookups(group, 10)?;
        let stats_on = profile::enable_stats()?;
        let read = || -> Result<Vec<(u64, u64)>> {
            programs
                .iter()
                .map(|(id, _, _)| profile::program_stats(*id))
                .collect()
        };
        // (time, runs) per service and program, summed over the passes.
        let mut sums: BTreeMap<Svc, Vec<(u64, u64)>> = BTreeMap::new();
        for pass in 0..PROFILE_PASSES {
            let mut order = [Svc::Name, Svc::NameRulesByAddress, Svc::Cidr];
            if pass % 2 == 1 {
                order.reverse();
            }
            for svc in order {
                let before = read()?;
                loadgen::run(&self.spec(group.env(svc), true))?;
                let after = read()?;
                let sum = sums
                    .entry(svc)
                    .or_insert_with(|| vec![(0, 0); programs.len()]);
                for ((t, n), ((t0, n0), (t1, n1))) in sum.iter_mut().zip(before.iter().zip(&after))
                {
                    *t += t1.saturating_sub(*t0);
                    *n += n1.saturating_sub(*n0);
                }
            }
        }
        let costs = sums
            .into_iter()
            .map(|(svc, sum)| {
                let each = programs
                    .iter()
                    .zip(sum)
                    .map(|((_, attach, name), (t, runs))| ProgramCost {
                        attach: attach.clone(),
                        name: name.clone(),
                        runs,
                        ns_per_run: if runs == 0 {
                            0.0
                        } else {
                            t as f64 / runs as f64
                        },
                    })
                    .collect();
                (svc, each)
            })
            .collect();
        drop(stats_on);
        daemon.stop()?;
        ensure_gone(&group.name.cgroup.path, "names profile", &ours)?;
        let _ = fs::remove_file(self.work.join(EVENTS_FILE));
        Ok(costs)
    }
}

fn push_samples(out: &mut NamesResults, rules: usize, svc: Svc, samples: &loadgen::Samples) {
    for probe in Probe::ALL {
        out.connect
            .entry((rules, svc, probe))
            .or_default()
            .push(samples.get(probe).to_vec());
    }
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        0
    } else {
        super::stats::median(&v)
    }
}

/// Median and p99 of signed samples, as stats.rs computes them for
/// unsigned ones (the median of an even count rounds up).
pub fn signed_summary(rounds: &[Vec<i64>]) -> Option<(i64, i64, Vec<i64>)> {
    let sorted = |v: &[i64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    let mid = |v: &[i64]| -> i64 {
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            let (a, b) = (v[n / 2 - 1], v[n / 2]);
            a + (b - a + 1) / 2
        }
    };
    let all = sorted(&rounds.concat());
    if all.is_empty() {
        return None;
    }
    let rank = (all.len() * 99).div_ceil(100).max(1);
    let per_round = rounds
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| mid(&sorted(r)))
        .collect();
    Some((mid(&all), all[rank - 1], per_round))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_summary_matches_the_unsigned_one() {
        let v: Vec<i64> = (1..=100).collect();
        let (m, p99, runs) = signed_summary(&[v]).expect("samples");
        assert_eq!((m, p99), (51, 99));
        assert_eq!(runs, [51]);
        let (m, _, runs) = signed_summary(&[vec![-5, -1], vec![3]]).expect("samples");
        assert_eq!(m, -1);
        assert_eq!(runs, [-3, 3]);
        assert!(signed_summary(&[vec![]]).is_none());
    }
}
