//! Project tasks: `cargo xtask <task>`. Every task first runs `setup`, which
//! installs what a fresh machine lacks and is quick when all is there.

mod bench;
mod bench_fleet;
mod bpf_linker;
mod build;
mod eval;
mod fuzz;
mod generated;
mod guest;
mod install;
mod lint;
mod package;
mod run;
mod setup;
mod soak;
mod steps;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "bulkhead's build, run, test and bench tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned toolchains, rust-src, bpf-linker and Debian packages.
    Setup {
        /// Also what a guest on this kernel needs (QEMU, virtme-ng, the kernel).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(guest::kernel_names()))]
        kernel: Option<String>,
    },
    /// Build the daemon (with its embedded eBPF object).
    Build {
        /// Build with the release profile (target/release/bulkhead).
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent on the example policies in `policies/`.
    Run {
        /// Extra arguments passed to `bulkhead run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite (unit tests, then the root integration tests),
    /// or the integration tests on another kernel (`--kernel debian-6.1`).
    Test(test::TestArgs),
    /// Check formatting and run clippy on every crate, warnings as errors.
    Lint,
    /// Measure hook cost side by side with nftables and iptables; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Measure the event pipeline: highest zero-loss decision rate, agent
    /// CPU per 100,000 events and memory, next to the load generator's
    /// ceiling; writes its section of BENCHMARKS.md.
    BenchEvents(bench::events::BenchEventsArgs),
    /// Measure fleet mode at scale against a real ClickHouse: the blast
    /// radius over 10,000 instances, three agents' ingest of 1,000,000 flow
    /// rows, storage per row, the exporter's CPU at 1,000 flows/s; writes
    /// its section of BENCHMARKS.md and the sizing table of docs/fleet.md.
    BenchFleet(bench_fleet::BenchFleetArgs),
    /// Replay the seeded synthetic anomaly workload through the detectors;
    /// prints precision, recall and false alarms per kind and writes
    /// docs/anomaly-eval.md.
    EvalAnomaly {
        /// Seed of the synthetic workload.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Fuzz every parser of outside input (cargo-fuzz, pinned nightly):
    /// prints executions and crashes per target. Not part of CI.
    Fuzz(fuzz::FuzzArgs),
    /// Build the release binary and install it with the systemd unit, the
    /// default config (never over an existing one) and the example policies.
    Install(install::InstallArgs),
    /// Run the agent for a long time under restarts, reloads, cgroup
    /// churn, a denial flood and normal traffic; checks every verdict and
    /// samples memory, descriptors, threads, maps and the decision log.
    Soak(soak::SoakArgs),
    /// A soak worker (started by `soak`, inside a service cgroup).
    #[command(hide = true)]
    SoakWorker(soak::worker::WorkerArgs),
    /// Build the Debian package (cargo-deb, installed if missing) with the
    /// same files as `install --prefix /usr`; prints the .deb's path.
    Package(package::PackageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One line per failure, no backtrace (RUST_BACKTRACE is often set in CI).
    task(cli.task).unwrap_or_else(|e| {
        eprintln!("xtask: error: {e:#}");
        ExitCode::FAILURE
    })
}

fn task(task: Task) -> anyhow::Result<ExitCode> {
    match task {
        Task::Setup { kernel } => {
            setup::run()?;
            if let Some(kernel) = guest::kernel(kernel.as_deref().unwrap_or(guest::HOST))? {
                guest::ensure(kernel, &util::target_dir()?)?;
            }
        }
        Task::Build { release } => {
            setup::ensure_build_tools()?;
            build::run(release)?;
        }
        // `run` passes the agent's own exit code on (e.g. after Ctrl-C).
        Task::Run { args } => {
            setup::run()?;
            return run::run(&args);
        }
        Task::Test(args) => {
            setup::run()?;
            test::run(&args)?;
        }
        // Linting compiles the agent, whose build script needs the eBPF tools.
        Task::Lint => {
            setup::ensure_build_tools()?;
            lint::run()?;
        }
        Task::Bench(args) => {
            setup::run()?;
            bench::run(&args)?;
        }
        Task::BenchEvents(args) => {
            setup::run()?;
            bench::events::run(&args)?;
        }
        Task::BenchFleet(args) => {
            setup::run()?;
            bench_fleet::run(&args)?;
        }
        Task::EvalAnomaly { seed } => {
            setup::ensure_build_tools()?;
            eval::run(seed)?;
        }
        // The fuzz crate builds the agent, whose build script needs the eBPF tools.
        Task::Fuzz(args) => {
            setup::ensure_build_tools()?;
            fuzz::run(&args)?;
        }
        // With --binary nothing is built, so no eBPF tools are needed.
        Task::Soak(args) => {
            setup::run()?;
            soak::run(&args)?;
        }
        // Started by the soak in a service cgroup: no set-up, no build.
        Task::SoakWorker(args) => soak::worker::run(&args)?,
        Task::Install(args) => {
            if args.binary.is_none() {
                setup::ensure_build_tools()?;
            }
            install::run(&args)?;
        }
        Task::Package(args) => {
            setup::ensure_build_tools()?;
            package::run(&args)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
