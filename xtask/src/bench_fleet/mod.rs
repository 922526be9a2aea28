//! `cargo xtask bench-fleet`: fleet mode at the scale (docs/fleet.md,
//! "Scale"). Against a real ClickHouse server on loopback (the integration
//! harness's) and the release binary:
//!
//! 1. `fleet blast-radius` and `fleet graph` over 10,000 service instances
//!    and 100,000 flow rows (blast.rs; goal: at most 2 s);
//! 2. the ingest rate of three agents' delivery path, draining a backlog of
//!    1,000,000 flow rows queued while ClickHouse was down (ingest.rs;
//!    goal: at most 60 s);
//! 3. what those rows take on disk (storage.rs);
//! 4. the exporter's CPU at 1,000 flow rows per second (export_cpu.rs;
//!    goal: at most 2% of one core).
//!
//! Writes its marked section of BENCHMARKS.md and the sizing table of
//! docs/fleet.md (report.rs), leaving the rest of both files alone.

mod agent;
mod blast;
mod export_cpu;
mod ingest;
mod load;
mod report;
mod server;
mod storage;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::{
    bench::{daemon::detach_stale, sandbox},
    build,
    util::{secs, target_dir, workspace_root},
};

#[derive(clap::Args, Debug)]
pub struct BenchFleetArgs {
    /// Write the results into this file's fleet section [default: BENCHMARKS.md].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write the sizing table into this file's marked section [default:
    /// docs/fleet.md].
    #[arg(long, value_name = "FILE")]
    pub sizing: Option<PathBuf>,
    /// Flow rows the three agents queue before ClickHouse starts.
    #[arg(long, default_value_t = 1_000_000)]
    pub ingest_rows: u64,
    /// Rounds of the blast-radius commands and of the export CPU windows.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Rounds of the blast-radius commands.
    #[arg(long, default_value_t = 5)]
    pub blast_rounds: usize,
    /// Seconds of each export CPU window (after a 10 s warm-up).
    #[arg(long, default_value_t = 60)]
    pub cpu_secs: u64,
}

/// What every measurement needs.
pub struct Env {
    pub bin: PathBuf,
    /// The cgroup2 mount, where the services' cgroups go.
    pub mount: PathBuf,
}

pub fn run(args: &BenchFleetArgs) -> Result<()> {
    ensure!(
        crate::util::is_root(),
        "bench-fleet needs root (it loads the agent's programs)"
    );
    ensure!(
        args.rounds > 0 && args.blast_rounds > 0,
        "--rounds and --blast-rounds must be at least 1"
    );
    let started = Instant::now();
    build::run(true)?;
    let env = Env {
        bin: target_dir()?.join("release").join("bulkhead"),
        mount: sandbox::cgroup2_mount()?,
    };
    let _lock = sandbox::lock()?;
    sandbox::catch_sigint()?;
    sandbox::remove_stale(&env.mount);
    detach_stale(&env.bin)?;
    let work = tempfile::Builder::new()
        .prefix("bulkhead-bench-fleet")
        .tempdir()
        .context("create a work directory")?;

    let machine = crate::bench::report::Facts::collect(&env.mount);
    let mut server = server::Server::start();
    let version = server.query("SELECT version()")?.trim().to_owned();
    eprintln!(
        "xtask bench-fleet: ClickHouse {version} at {}",
        server.url()
    );
    let blast = blast::measure(&server, &env.bin, work.path(), args.blast_rounds)?;
    let ingest = ingest::measure(&env, &mut server, args.ingest_rows)?;
    eprintln!(
        "xtask bench-fleet: ingest: {} of {} rows stored in {:.2} s ({:.0} rows/s), {} lost",
        ingest.stored,
        ingest.rows,
        ingest.seconds,
        ingest.rate(),
        ingest.lost
    );
    let storage = storage::measure(&server)?;
    let cpu = export_cpu::measure(
        &env,
        &server,
        args.rounds,
        Duration::from_secs(args.cpu_secs),
    )?;
    drop(server);

    let facts = report::Facts {
        machine: machine.finish(),
        version,
        blast,
        ingest,
        storage,
        cpu,
        took_s: secs(started),
    };
    let section = report::benchmarks(&facts);
    println!("{section}");
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    report::write_marked(&output, "bench-fleet", &section)?;
    let sizing = args
        .sizing
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs").join("fleet.md"));
    report::write_marked(&sizing, "bench-fleet-sizing", &report::sizing(&facts))?;
    eprintln!(
        "xtask bench-fleet: wrote {} and {}",
        output.display(),
        sizing.display()
    );
    report::verdict(&facts)
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// This bench's marked section of a BENCHMARKS.md text, markers included
/// (`cargo xtask bench` rewrites the file and keeps it).
pub fn section(text: &str) -> Option<String> {
    report::section(text, "bench-fleet")
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert!((super::median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((super::median(&[4.0, 1.0, 3.0, 2.0]) - 2.5).abs() < 1e-12);
    }
}
