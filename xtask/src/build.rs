//! `cargo xtask build`.
use std::process::Command;

use anyhow::Result;

use crate::util::{run_cmd, workspace_root, AYA_BUILD_SKIP};

pub fn run(release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env_remove(AYA_BUILD_SKIP)
        .args([
            "build",
            "--locked",
            "--package",
            "agent",
            "--bin",
            "bulkhead",
        ]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}
