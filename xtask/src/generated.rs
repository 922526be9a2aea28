//! The man pages and shell completions, generated from the command line's
//! clap definitions by the agent's `man-and-completions` example (never
//! written by hand, so they cannot drift from the binary).
//!
//! They are written under `TARGET/PROFILE/generated/`: `man/*.1` (one page
//! per command) and `completions/{bulkhead.bash,_bulkhead,bulkhead.fish}`.
//! The Debian package's assets name `target/release/generated/...`, which
//! cargo-deb finds in the target directory.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::util::{run_cmd, target_dir, workspace_root};

/// The completions: (file written, where it is installed under the prefix).
pub const COMPLETIONS: &[(&str, &str)] = &[
    ("bulkhead.bash", "share/bash-completion/completions/bulkhead"),
    ("_bulkhead", "share/zsh/vendor-completions/_bulkhead"),
    ("bulkhead.fish", "share/fish/vendor_completions.d/bulkhead.fish"),
];

/// Where the man pages go under the prefix (gzipped).
pub const MAN_DIR: &str = "share/man/man1";

/// Generates the files (`release`: with the release profile, which the
/// package and a plain install build anyway) and returns their directory.
pub fn write(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    let dir = target_dir()?.join(profile).join("generated");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["run", "--quiet", "--locked", "-p", "agent"])
        .args(release.then_some("--release"))
        .args(["--example", "man-and-completions", "--"])
        .arg(&dir);
    run_cmd(&mut cmd)?;
    Ok(dir)
}
