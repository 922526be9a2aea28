//! `cargo xtask test`: the whole suite. Builds the daemon, runs the unit
//! tests (no root needed), then the root integration tests against that
//! freshly built binary.

use std::{env, process::Command};

use anyhow::Result;

use crate::{
    steps::Steps,
    util::{is_root, target_dir, workspace_root},
};

pub fn run(args: &[String]) -> Result<()> {
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
    let built = steps.run(
        "build bulkhead",
        cargo().args(["build", "--locked", "-p", "agent", "--bin", "bulkhead"]),
    );
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
            args,
        ),
    );
    if built {
        // One thread: the tests share kernel state (cgroups, attached programs).
        // BULKHEAD_REQUIRE_BPF passes through with the rest of the environment.
        let mut cmd = cargo();
        cmd.args(["test", "--locked", "-p", "integration-tests"])
            .env("BULKHEAD_BIN", &bin);
        steps.run(
            "integration tests",
            with_args(&mut cmd, &["--test-threads=1"], args),
        );
    } else {
        steps.skip("integration tests", "bulkhead did not build");
    }
    steps.finish("test")
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Appends `-- ours theirs` (the test binaries' own arguments), if any.
fn with_args<'a>(cmd: &'a mut Command, ours: &[&str], theirs: &[String]) -> &'a mut Command {
    if !ours.is_empty() || !theirs.is_empty() {
        cmd.arg("--").args(ours).args(theirs);
    }
    cmd
}
