//! `cargo xtask test`: the whole suite. Builds the daemon, runs the unit
//! tests (no root needed), then the root integration tests against that
//! freshly built binary. With `--kernel NAME` the integration tests run in a
//! guest booted on that kernel instead (see `guest.rs`).

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;

use crate::{
    guest::{self, GuestKernel, RunSpec, Suite},
    steps::Steps,
    util::{is_root, secs, target_dir, workspace_root, AYA_BUILD_SKIP},
};

#[derive(clap::Args)]
pub struct TestArgs {
    /// The kernel the integration tests run on: the host's own, or a guest
    /// booted on another one (its tools and kernel are installed on first
    /// use; the unit tests are left out).
    #[arg(long, default_value = guest::HOST, value_parser = PossibleValuesParser::new(guest::kernel_names()))]
    pub kernel: String,
    /// Only these integration suites (test targets of `tests/`, comma
    /// separated: `escape,egress,ingress,lifecycle`); the unit tests are
    /// left out.
    #[arg(long, value_delimiter = ',')]
    pub suites: Vec<String>,
    /// Extra arguments passed to the test binaries (e.g. a test name filter).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &TestArgs) -> Result<()> {
    match guest::kernel(&opts.kernel)? {
        None => run_host(opts),
        Some(kernel) => run_guest(kernel, opts),
    }
}

fn run_host(opts: &TestArgs) -> Result<()> {
    let bin = target_dir()?.join("debug").join("bulkhead");
    let require_bpf = env::var("BULKHEAD_REQUIRE_BPF").is_ok_and(|v| v == "1");
    if !is_root() {
        let then = if require_bpf {
            "fail (BULKHEAD_REQUIRE_BPF=1)"
        } else {
            "skip"
        };
        eprintln!("xtask: not root: the integration tests that need BPF will {then}");
    }

    let mut steps = Steps::default();
    let built = steps.run("build bulkhead", &mut build_bulkhead());
    if opts.suites.is_empty() {
        steps.run(
            "unit tests",
            with_args(
                cargo().args([
                    "test",
                    "--locked",
                    "--workspace",
                    "--exclude",
                    "integration-tests",
                ]),
                &[],
                &opts.args,
            ),
        );
    }
    if built {
        // One thread: the tests share kernel state (cgroups, attached programs).
        // BULKHEAD_REQUIRE_BPF passes through with the rest of the environment.
        let mut cmd = cargo();
        cmd.args(["test", "--locked", "-p", "integration-tests"])
            .env("BULKHEAD_BIN", &bin);
        for suite in &opts.suites {
            cmd.args(["--test", suite]);
        }
        steps.run(
            "integration tests",
            with_args(&mut cmd, &["--test-threads=1"], &opts.args),
        );
    } else {
        steps.skip("integration tests", "bulkhead did not build");
    }
    steps.finish("test")
}

/// Builds on the host, then runs the integration suites in one guest boot
/// with `BULKHEAD_REQUIRE_BPF=1`: each suite is a step of its own, timed in
/// the guest.
fn run_guest(kernel: &'static GuestKernel, opts: &TestArgs) -> Result<()> {
    let target = target_dir()?;
    let guest = guest::ensure(kernel, &target)?;
    let bin = target.join("debug").join("bulkhead");

    let mut steps = Steps::default();
    let built = steps.run("build bulkhead", &mut build_bulkhead());
    eprintln!("xtask: == build test binaries");
    let start = Instant::now();
    let suites = test_executables(&opts.suites);
    let suites = match suites {
        Ok(suites) => {
            steps.record("build test binaries", Ok(()), secs(start));
            suites
        }
        Err(e) => {
            steps.record("build test binaries", Err(e), secs(start));
            Vec::new()
        }
    };
    if !built || suites.is_empty() {
        steps.skip(kernel.name, "nothing to run: a build failed");
        return steps.finish("test");
    }
    let start = Instant::now();
    let spec = RunSpec {
        suites: &suites,
        args: &opts.args,
        bulkhead: &bin,
        cwd: &workspace_root().join("tests"),
    };
    match guest.run(&spec) {
        Ok(results) => {
            for r in results {
                let step = format!("{} {}", kernel.name, r.name);
                let outcome = if r.passed() {
                    Ok(())
                } else {
                    Err(suite_failure(&r))
                };
                steps.record(&step, outcome, r.secs);
            }
        }
        Err(e) => steps.record(kernel.name, Err(e), secs(start)),
    }
    for note in guest::skipped_note(&suites) {
        eprintln!("xtask: note: {note}");
    }
    steps.finish("test")
}

fn suite_failure(r: &guest::SuiteResult) -> anyhow::Error {
    let how = match r.code {
        None => "did not finish (guest crashed, hung or ran out of time)".to_owned(),
        Some(124 | 137) => "timed out in the guest".to_owned(),
        Some(code) => format!("exit code {code}"),
    };
    let failed = if r.failed.is_empty() {
        String::new()
    } else {
        format!("; failed: {}", r.failed.join(", "))
    };
    let summary = r
        .summary
        .as_deref()
        .map_or_else(String::new, |s| format!("; {s}"));
    anyhow::anyhow!("{how}{failed}{summary} (log: {})", r.log.display())
}

/// Builds the integration test executables (`suites`, or all of them) and
/// returns their paths, from cargo's JSON messages.
fn test_executables(suites: &[String]) -> Result<Vec<Suite>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--locked",
        "-p",
        "integration-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for suite in suites {
        cmd.args(["--test", suite]);
    }
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo's stdout is not piped")?;
    let mut found = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo's output")?;
        if let Some(suite) = test_artifact(&line) {
            found.push(suite);
        }
    }
    let status = child.wait().context("wait for cargo")?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    if suites.is_empty() {
        found.sort_by(|a, b| a.name.cmp(&b.name));
    } else {
        // In the order asked for.
        found.sort_by_key(|s| suites.iter().position(|n| *n == s.name));
    }
    if found.is_empty() {
        bail!("cargo built no integration test executable");
    }
    Ok(found)
}

/// The test executable a `compiler-artifact` message of cargo names, if any.
fn test_artifact(line: &str) -> Option<Suite> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
        return None;
    }
    let kinds = msg["target"]["kind"].as_array()?;
    if !kinds.iter().any(|k| k == "test") {
        return None;
    }
    Some(Suite {
        name: msg["target"]["name"].as_str()?.to_owned(),
        exe: PathBuf::from(msg["executable"].as_str()?),
    })
}

fn build_bulkhead() -> Command {
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "-p", "agent", "--bin", "bulkhead"]);
    cmd
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).env_remove(AYA_BUILD_SKIP);
    cmd
}

/// Appends `-- ours theirs` (the test binaries' own arguments), if any.
fn with_args<'a>(cmd: &'a mut Command, ours: &[&str], theirs: &[String]) -> &'a mut Command {
    if !ours.is_empty() || !theirs.is_empty() {
        cmd.arg("--").args(ours).args(theirs);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_test_targets_in_cargo_messages() {
        let test = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"escape"},"profile":{"test":true},"executable":"/t/debug/deps/escape-0123"}"#;
        let suite = test_artifact(test).expect("a test target");
        assert_eq!(suite.name, "escape");
        assert_eq!(suite.exe, PathBuf::from("/t/debug/deps/escape-0123"));
        let lib_tests = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"integration_tests"},"profile":{"test":true},"executable":"/t/debug/deps/integration_tests-1"}"#;
        assert!(test_artifact(lib_tests).is_none());
        let bin = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"bulkhead-probe"},"profile":{"test":false},"executable":"/t/debug/bulkhead-probe"}"#;
        assert!(test_artifact(bin).is_none());
        assert!(test_artifact("not json").is_none());
    }
}
