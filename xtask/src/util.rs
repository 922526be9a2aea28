//! Small helpers shared by the tasks.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// The nightly that builds the eBPF programs. `agent/build.rs` names the same
/// toolchain; `setup::check_pin` makes sure the two never drift apart.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// aya-build's switch (agent/build.rs): set, the agent embeds an empty eBPF
/// object. Only `cargo xtask lint` sets it; xtask's builds of the agent's
/// binary (build, and so bench and install; test; package) remove it from
/// cargo's environment.
pub const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs a command, echoing it, and fails if it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None if it could not run or failed.
pub fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether we run with uid 0 (BPF, apt-get and the integration tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The first executable called `name` on PATH, like `which`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `cargo metadata` of this workspace (its own packages, no network).
pub fn cargo_metadata() -> Result<serde_json::Value> {
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("`cargo metadata` printed invalid JSON")
}

/// Cargo's target directory for this workspace (honours `CARGO_TARGET_DIR` and
/// `build.target-dir`, which a hard-coded `target/` would not).
pub fn target_dir() -> Result<PathBuf> {
    cargo_metadata()?["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` has no target_directory")
}

/// Seconds since `start`, for progress and summary lines.
pub fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
