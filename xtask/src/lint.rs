//! `cargo xtask lint`: formatting and clippy, as CI checks them.

use std::process::Command;

use anyhow::Result;

use crate::{steps::Steps, util::workspace_root};

pub fn run() -> Result<()> {
    let mut steps = Steps::default();
    steps.run("rustfmt", cargo().args(["fmt", "--all", "--", "--check"]));
    // --workspace covers every member, agent-ebpf included although it is not
    // a default member: its code is gated on target_arch = "bpf", so the host
    // build that clippy does is the thin shell around it.
    steps.run(
        "clippy",
        cargo()
            .args(["clippy", "--locked", "--workspace", "--all-targets"])
            .args(["--", "-D", "warnings"]),
    );
    steps.finish("lint")
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}
