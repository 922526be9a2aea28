//! Project tasks: `cargo xtask <task>`. Every task first runs `setup`, which
//! installs what a fresh machine lacks and is quick when all is there.

mod bench;
mod build;
mod run;
mod setup;
mod test;
mod util;

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
    Setup,
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
    /// Run the whole test suite (unit tests, then the root integration tests).
    Test {
        /// Extra arguments passed to the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure hook cost side by side with nftables and iptables; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build::run(release)
        }
        Task::Run { args } => {
            setup::run()?;
            run::run(&args)
        }
        Task::Test { args } => {
            setup::run()?;
            test::run(&args)
        }
        Task::Bench(args) => {
            setup::run()?;
            bench::run(&args)
        }
    }
}
