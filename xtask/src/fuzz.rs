//! `cargo xtask fuzz [--target NAME] [--seconds N]`: runs the cargo-fuzz
//! targets in `fuzz/` (installing cargo-fuzz if missing), each for N
//! seconds from its committed seed corpus, and prints executions and
//! crashes per target. Needs the pinned nightly (the eBPF one); not in CI.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    util::EBPF_TOOLCHAIN,
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
    // Built once: `cargo fuzz run` would run the agent's build script (the
    // eBPF build) again for every target.
    run_cmd(
        cargo_fuzz(&fuzz_dir)
            .args(["build", "-O"])
            .args(args.target.as_deref()),
    )?;
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

/// `cargo +NIGHTLY fuzz` in the fuzz crate.
fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir)
        // The fuzz crate is a workspace of its own with its own target
        // directory (instrumented builds must not mix with the main ones).
        .env_remove("CARGO_TARGET_DIR")
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .arg("fuzz");
    cmd
}

/// One target, run straight from its built binary: new inputs go to a
/// scratch corpus under `fuzz/target`, the committed seeds are read only.
fn run_one(fuzz_dir: &Path, target: &'static str, seconds: u64) -> Result<Outcome> {
    let scratch = fuzz_dir.join("target/corpus").join(target);
    fs::create_dir_all(&scratch).with_context(|| format!("{}", scratch.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    fs::create_dir_all(&artifacts).with_context(|| format!("{}", artifacts.display()))?;
    let seeds = fuzz_dir.join("corpus").join(target);
    let bin = fuzz_dir
        .join("target")
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("release")
        .join(target);
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let out = Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        .arg(&scratch)
        .arg(&seeds)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
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
