//! `cargo xtask eval-anomaly`: runs the agent's `eval-anomaly` example (the
//! detectors' own code, through the library; not part of the shipped
//! binary) in release mode and writes its report into docs/anomaly-eval.md.

use std::process::Command;

use anyhow::{bail, Result};

use crate::util::workspace_root;

pub fn run(seed: u64) -> Result<()> {
    let root = workspace_root();
    let out = root.join("docs/anomaly-eval.md");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
        .current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "agent",
            "--example",
            "eval-anomaly",
            "--",
        ])
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--out")
        .arg(&out)
        .status()?;
    if !status.success() {
        bail!("eval-anomaly: a case was missed or a false alarm raised (see above)");
    }
    println!("wrote {}", out.display());
    Ok(())
}
