//! The man pages and shell completions, generated from the command line's
//! clap definitions by the agent's `man-and-completions` example (never
//! written by hand, so they cannot drift from the binary).
//!
//! They are written under `TARGET/PROFILE/generated/`: `man/*.1.gz` (one
//! page per command, gzipped here: cargo-deb compresses only the files it
//! does not take from the target directory) and
//! `completions/{bulkhead.bash,_bulkhead,bulkhead.fish}`. The Debian
//! package's assets name `target/release/generated/...`, which cargo-deb
//! finds in the target directory.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::util::{run_cmd, target_dir, workspace_root};

/// The completions: (file written, where it is installed under the prefix).
pub const COMPLETIONS: &[(&str, &str)] = &[
    (
        "bulkhead.bash",
        "share/bash-completion/completions/bulkhead",
    ),
    ("_bulkhead", "share/zsh/vendor-completions/_bulkhead"),
    (
        "bulkhead.fish",
        "share/fish/vendor_completions.d/bulkhead.fish",
    ),
];

/// Where the man pages go under the prefix.
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
    // gzip -9n: no name or time stamp inside, so the same page gives the
    // same bytes (a reproducible package).
    let man = dir.join("man");
    let mut pages = Vec::new();
    for entry in fs::read_dir(&man).with_context(|| format!("cannot read {}", man.display()))? {
        let path = entry
            .with_context(|| format!("cannot read {}", man.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "1") {
            pages.push(path);
        }
    }
    anyhow::ensure!(!pages.is_empty(), "no man pages in {}", man.display());
    run_cmd(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    Ok(dir)
}
