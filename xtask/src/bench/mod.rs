//! `cargo xtask bench`: what bulkhead adds to a managed service's connect()
//! and sendto(), side by side with nftables and iptables enforcing the same
//! rules, in one run; writes BENCHMARKS.md. `cargo xtask bench-events`
//! (events.rs): the event pipeline's throughput, with the same sandbox
//! (cgroup guard), daemon runner and forked load generator (fork.rs).
//!
//! Speed is measured here only, never in timed tests.

pub mod daemon;
mod decision_log;
pub mod events;
mod floor;
pub mod fork;
mod goals;
mod interleave;
mod loadgen;
mod lookup;
mod names;
mod names_report;
mod peers;
mod plan;
mod profile;
pub mod report;
mod rules;
mod runner;
pub mod sandbox;
mod stats;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{ensure, Context, Result};

use crate::{
    build, setup,
    util::{find_in_path, is_root, target_dir, workspace_root},
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smoke run: 10 and 1,000 rules, 2 rounds, fewer calls. Prints the
    /// results; writes a file only with --output.
    #[arg(long)]
    pub quick: bool,
    /// Rounds over the whole case list, run forwards and backwards in turn
    /// [default: 5; --quick: 2].
    #[arg(long, value_name = "N")]
    pub rounds: Option<usize>,
    /// Rule counts to measure, comma-separated [default: 10,1000,100000;
    /// --quick: 10,1000].
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub rules: Option<Vec<usize>>,
    /// UDP connect() and sendto() calls per case and round [default: 20000;
    /// --quick: 2000].
    #[arg(long, value_name = "N")]
    pub iterations: Option<usize>,
    /// TCP connects per case and round [default: 2000; --quick: 200].
    #[arg(long, value_name = "N")]
    pub tcp_iterations: Option<usize>,
    /// bulkhead only: leave out the nftables and iptables cases.
    #[arg(long)]
    pub no_peers: bool,
    /// Measure even while programs from elsewhere (another agent, a test
    /// run) are attached at the cgroup2 root; they then run in every case
    /// and the report says so. By default the bench waits a minute for them
    /// to go and then stops.
    #[arg(long)]
    pub allow_foreign_programs: bool,
    /// Run one part only: `hooks` (the hook cases, side by side with
    /// nftables and iptables) or `names` (egress by DNS name: lookup
    /// latency through the agent, connect cost of a learnt name against
    /// address rules). Each rewrites its own part of the file and keeps
    /// the other's [default: both].
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Option<Only>,
    /// Lookups of each client per rule count and round in the names part
    /// [default: 1000; --quick: 200].
    #[arg(long, value_name = "N")]
    pub lookups: Option<usize>,
    /// Where to write the report [default: BENCHMARKS.md at the workspace
    /// root, except for --quick runs].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The parts of the bench.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Only {
    Hooks,
    Names,
}

/// Packages the peers and the sandbox need.
const PACKAGES: &[&str] = &["nftables", "iptables", "iproute2", "bpftool"];
/// The names part's resolver and the harness's readiness check of it.
const NAMES_PACKAGES: &[&str] = &["dnsmasq-base", "bind9-dnsutils"];

pub fn run(args: &BenchArgs) -> Result<()> {
    let plan = plan::Plan::from_args(args)?;
    ensure!(
        is_root(),
        "cargo xtask bench needs root: it loads BPF programs and firewall rules and makes \
         cgroups and network namespaces"
    );
    setup::ensure_debian_packages(PACKAGES)?;
    if plan.names {
        setup::ensure_debian_packages(NAMES_PACKAGES)?;
    }
    for tool in ["nft", "iptables-legacy-restore", "ip", "bpftool"] {
        ensure!(
            find_in_path(tool).is_some(),
            "`{tool}` is not on PATH (packages: {})",
            PACKAGES.join(" ")
        );
    }
    // The daemon as shipped: release build.
    build::run(true)?;
    let bulkhead = target_dir()?.join("release").join("bulkhead");

    sandbox::catch_sigint()?;
    let _lock = sandbox::lock()?;
    let mount = sandbox::cgroup2_mount()?;
    sandbox::remove_stale(&mount);
    daemon::detach_stale(&bulkhead)?;
    let work = tempfile::Builder::new()
        .prefix("bulkhead-bench")
        .tempdir()
        .context("create a work directory")?;
    let config = work.path().join(runner::CONFIG_FILE);
    fs::write(&config, daemon_config(work.path()))
        .with_context(|| format!("write {}", config.display()))?;

    let hooks = if plan.hooks {
        let facts = report::Facts::collect(&mount);
        eprintln!(
            "xtask bench: {} cases x {} rounds; load average {}",
            plan.cases().len(),
            plan.rounds,
            facts.load_before
        );
        let start = Instant::now();
        let results = runner::Runner {
            plan: &plan,
            mount: &mount,
            bulkhead: &bulkhead,
            work: work.path(),
        }
        .run()?;
        Some((facts.finish(), results, start.elapsed()))
    } else {
        None
    };
    let names = if plan.names {
        let facts = report::Facts::collect(&mount);
        eprintln!(
            "xtask bench: names: {} rule count(s) x {} rounds; load average {}",
            plan.rule_counts.len(),
            plan.rounds,
            facts.load_before
        );
        let start = Instant::now();
        let results = names::Section {
            plan: &plan,
            mount: &mount,
            bulkhead: &bulkhead,
            work: work.path(),
        }
        .run()?;
        Some((facts.finish(), results, start.elapsed()))
    } else {
        None
    };

    let command = reproduce(args);
    let hooks_report = hooks
        .as_ref()
        .map(|(facts, results, elapsed)| report::Report {
            plan: &plan,
            facts,
            results,
            elapsed: *elapsed,
        });
    let names_report = names
        .as_ref()
        .map(|(facts, results, elapsed)| names_report::NamesReport {
            results,
            facts,
            elapsed: *elapsed,
            command: &command,
        });
    if let Some(r) = &hooks_report {
        println!("{}", r.text());
    }
    if let Some(r) = &names_report {
        println!("{}", r.text());
    }

    let output = args
        .output
        .clone()
        .or_else(|| (!plan.quick).then(|| workspace_root().join("BENCHMARKS.md")));
    if let Some(path) = output {
        let old = fs::read_to_string(&path).unwrap_or_default();
        let names_section = names_report
            .as_ref()
            .map(|r| format!("\n{}\n", r.section()))
            .or_else(|| names_report::section(&old));
        let text = match &hooks_report {
            // Keep the sections `cargo xtask bench-events` and `bench-fleet`
            // write, and the self-check's figures (measured by the drift
            // suite); the names section is this run's or the file's.
            Some(report) => format!(
                "{}{}{}{}{}",
                report.markdown(),
                names_section.unwrap_or_default(),
                events::section(&old).unwrap_or_default(),
                crate::bench_fleet::section(&old).unwrap_or_default(),
                self_check_section(&old).unwrap_or_default()
            ),
            // The names part alone: the rest of the file as it was.
            None => match &names_report {
                Some(r) => names_report::replace_section(&old, &r.section()),
                None => old,
            },
        };
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    Ok(())
}

/// The command line that reproduces this run (the knobs given).
fn reproduce(args: &BenchArgs) -> String {
    let mut out = "cargo xtask bench".to_owned();
    if args.quick {
        out.push_str(" --quick");
    }
    if let Some(only) = args.only {
        out.push_str(match only {
            Only::Hooks => " --only hooks",
            Only::Names => " --only names",
        });
    }
    if let Some(n) = args.rounds {
        out.push_str(&format!(" --rounds {n}"));
    }
    if let Some(r) = &args.rules {
        let list: Vec<String> = r.iter().map(ToString::to_string).collect();
        out.push_str(&format!(" --rules {}", list.join(",")));
    }
    if let Some(n) = args.iterations {
        out.push_str(&format!(" --iterations {n}"));
    }
    if let Some(n) = args.tcp_iterations {
        out.push_str(&format!(" --tcp-iterations {n}"));
    }
    if let Some(n) = args.lookups {
        out.push_str(&format!(" --lookups {n}"));
    }
    if args.no_peers {
        out.push_str(" --no-peers");
    }
    if args.allow_foreign_programs {
        out.push_str(" --allow-foreign-programs");
    }
    out
}

/// The hand-written self-check section of a BENCHMARKS.md text, markers
/// included.
fn self_check_section(text: &str) -> Option<String> {
    const BEGIN: &str = "<!-- self-check:begin -->";
    const END: &str = "<!-- self-check:end -->";
    let b = text.find(BEGIN)?;
    let e = text[b..].find(END)? + b + END.len();
    Some(format!("\n{}\n", &text[b..e]))
}

/// An explicit config, so a host's /etc/bulkhead cannot change what is
/// measured: the defaults, except that everything the daemon writes stays
/// in the work directory and the metrics port is any free one (another
/// agent or a test run may hold the default port).
fn daemon_config(work: &Path) -> String {
    format!(
        "# Written by `cargo xtask bench`.\n\
         bpf_log = false\n\n\
         [events]\n\
         sink = {:?}\n\n\
         [metrics]\n\
         listen = \"127.0.0.1:0\"\n\n\
         [control]\n\
         socket = {:?}\n",
        work.join(runner::EVENTS_FILE).display().to_string(),
        work.join("control.sock").display().to_string(),
    )
}
