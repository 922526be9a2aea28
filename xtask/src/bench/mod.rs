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
mod loadgen;
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
    /// Where to write the report [default: BENCHMARKS.md at the workspace
    /// root, except for --quick runs].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Packages the peers and the sandbox need.
const PACKAGES: &[&str] = &["nftables", "iptables", "iproute2", "bpftool"];

pub fn run(args: &BenchArgs) -> Result<()> {
    let plan = plan::Plan::from_args(args)?;
    ensure!(
        is_root(),
        "cargo xtask bench needs root: it loads BPF programs and firewall rules and makes \
         cgroups and network namespaces"
    );
    setup::ensure_debian_packages(PACKAGES)?;
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
    let report = report::Report {
        plan: &plan,
        facts: &facts.finish(),
        results: &results,
        elapsed: start.elapsed(),
    };
    println!("{}", report.text());

    let output = args
        .output
        .clone()
        .or_else(|| (!plan.quick).then(|| workspace_root().join("BENCHMARKS.md")));
    if let Some(path) = output {
        // Keep the sections `cargo xtask bench-events` and `bench-fleet`
        // write, and the self-check's figures (measured by the drift suite).
        let old = fs::read_to_string(&path).unwrap_or_default();
        let events = events::section(&old);
        let text = format!(
            "{}{}{}{}",
            report.markdown(),
            events.unwrap_or_default(),
            crate::bench_fleet::section(&old).unwrap_or_default(),
            self_check_section(&old).unwrap_or_default()
        );
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    Ok(())
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
