//! `cargo xtask fuzz [--target NAME] [--seconds N]`: runs the cargo-fuzz
//! targets in `fuzz/` (installing cargo-fuzz if missing), each for N
//! seconds from its committed seed corpus, and prints executions and
//! crashes per target. Needs the pinned nightly (the eBPF one); not in CI.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    setup::EBPF_TOOLCHAIN,
    util::{find_in_path, run_cmd, workspace_root},
};

/// Every parser of outside input, as a target name in fuzz/Cargo.toml.
pub const TARGETS: [&str; 7] = [
    "policy",
    "config",
    "control_request",
    "event_record",
    "graph_state",
    "anomaly_state",
    "quarantine",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Only this target (default: all of them).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

struct Outcome {
    target: &'static str,
    executions: u64,
    crash: Option<String>,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    if find_in_path("cargo-fuzz").is_none() {
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    let mut outcomes = Vec::new();
    for target in TARGETS
        .into_iter()
        .filter(|t| args.target.as_deref().is_none_or(|w| w == *t))
    {
        outcomes.push(run_one(&fuzz_dir, target, args.seconds)?);
    }
    println!("\n| target | seconds | executions | crashes |\n| --- | ---: | ---: | ---: |");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} |",
            o.target,
            args.seconds,
            o.executions,
            u8::from(o.crash.is_some())
        );
    }
    let crashed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.crash.as_ref().map(|c| format!("{}: {c}", o.target)))
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes (each input is a regression test to add):\n{}",
            crashed.join("\n")
        );
    }
    Ok(())
}

/// One target: new inputs go to a scratch corpus under `fuzz/target`, the
/// committed seeds are read only.
fn run_one(fuzz_dir: &Path, target: &'static str, seconds: u64) -> Result<Outcome> {
    let scratch = fuzz_dir.join("target/corpus").join(target);
    fs::create_dir_all(&scratch).with_context(|| format!("{}", scratch.display()))?;
    let seeds = fuzz_dir.join("corpus").join(target);
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let out = Command::new("cargo")
        .current_dir(fuzz_dir)
        // The fuzz crate is a workspace of its own with its own target
        // directory (instrumented builds must not mix with the main ones).
        .env_remove("CARGO_TARGET_DIR")
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["fuzz", "run", "-O", target])
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .output()
        .context("cannot run cargo fuzz")?;
    let log = String::from_utf8_lossy(&out.stderr);
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let crash = log
        .lines()
        .find(|l| l.contains("Test unit written to"))
        .map(str::to_string)
        .or_else(|| (!out.status.success()).then(|| format!("exit {}", out.status)));
    if crash.is_some() {
        eprintln!("{log}");
    }
    Ok(Outcome {
        target,
        executions,
        crash,
    })
}
