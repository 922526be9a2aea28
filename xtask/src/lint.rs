//! `cargo xtask lint`: formatting and clippy, as CI checks them.

use std::process::Command;

use anyhow::Result;

use crate::{
    steps::Steps,
    util::{workspace_root, AYA_BUILD_SKIP, EBPF_TOOLCHAIN},
};

pub fn run() -> Result<()> {
    let mut steps = Steps::default();
    steps.run("rustfmt", cargo().args(["fmt", "--all", "--", "--check"]));
    // --workspace covers every member, agent-ebpf included although it is not
    // a default member: its code is gated on target_arch = "bpf", so the host
    // build that clippy does is the thin shell around it...
    // AYA_BUILD_SKIP: the agent's build script embeds an empty eBPF object
    // instead of building one, which linting does not need (agent/build.rs).
    steps.run(
        "clippy",
        cargo()
            .env(AYA_BUILD_SKIP, "1")
            .args(["clippy", "--locked", "--workspace", "--all-targets"])
            .args(["--", "-D", "warnings"]),
    );
    // ...and the kernel programs themselves are checked for their own
    // target, with the eBPF toolchain (its clippy is added when missing).
    let has_clippy = steps.run(
        "clippy component of the eBPF toolchain",
        Command::new("rustup").args(["component", "add", "clippy", "--toolchain", EBPF_TOOLCHAIN]),
    );
    if has_clippy {
        let mut kernel = cargo();
        kernel
            .current_dir(workspace_root().join("agent-ebpf"))
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args([
                "clippy",
                "--locked",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]);
        steps.run("clippy (kernel programs, bpfel-unknown-none)", &mut kernel);
    } else {
        steps.skip(
            "clippy (kernel programs)",
            "no clippy for the eBPF toolchain",
        );
    }
    steps.finish("lint")
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}
