//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in `agent/Cargo.toml`. cargo-deb builds the
//! release binary itself, unless `--binary` gives one (the package test
//! gives the binary under test, saving a release build of the workspace:
//! minutes on two cores); the maintainer scripts are in `systemd/debian/`.
//!
//! The package carries the same files as `cargo xtask install --prefix
//! /usr`; a unit test here checks that the two lists agree.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::{output_of, target_dir, workspace_root, AYA_BUILD_SKIP};

/// The cargo-deb installed when none is present (`cargo install --locked`).
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// The workspace member whose metadata describes the package.
const PACKAGE: &str = "agent";

#[derive(clap::Args, Debug)]
pub struct PackageArgs {
    /// Write the .deb into DIR [default: TARGET_DIR/debian].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Package this bulkhead binary instead of building the release one
    /// (cargo-deb strips it, as it strips its own).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

/// Builds the .deb and returns its path.
pub fn run(args: &PackageArgs) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let generated = crate::generated::write(args.binary.is_none())?;
    // A given binary is packaged from a target directory of its own: the
    // assets name `target/release/...`, which cargo-deb reads from the
    // target directory, and nothing is built (`--no-build`).
    let staged = match &args.binary {
        Some(binary) => Some(stage(binary, &generated)?),
        None => None,
    };
    let output = match &args.output {
        Some(dir) => dir.clone(),
        None => target_dir()?.join("debian"),
    };
    std::fs::create_dir_all(&output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env_remove(AYA_BUILD_SKIP)
        .args(["deb", "--package", PACKAGE, "--locked", "--output"])
        .arg(&output)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(staged) = &staged {
        cmd.arg("--no-build").env("CARGO_TARGET_DIR", staged.path());
    }
    eprintln!("xtask: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    // cargo-deb prints the path of the package it wrote, last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = deb_path(&stdout)
        .with_context(|| format!("cargo deb did not say where the package is: {stdout:?}"))?;
    eprintln!("xtask: built {}", deb.display());
    println!("{}", deb.display());
    Ok(deb)
}

/// A temporary target directory with `binary` and the generated files
/// where the package's assets name them (`release/...`).
fn stage(binary: &Path, generated: &Path) -> Result<tempfile::TempDir> {
    ensure!(
        binary.is_file(),
        "no bulkhead binary at {}",
        binary.display()
    );
    let dir = tempfile::tempdir().context("cannot make a staging directory")?;
    let release = dir.path().join("release");
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
    };
    for sub in ["man", "completions"] {
        let to = release.join("generated").join(sub);
        std::fs::create_dir_all(&to).with_context(|| format!("cannot create {}", to.display()))?;
        let from = generated.join(sub);
        for entry in
            std::fs::read_dir(&from).with_context(|| format!("cannot read {}", from.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot read {}", from.display()))?
                .path();
            if let Some(name) = path.file_name() {
                copy(&path, &to.join(name))?;
            }
        }
    }
    copy(binary, &release.join("bulkhead"))?;
    Ok(dir)
}

/// The last line of cargo-deb's output that names a `.deb` file.
fn deb_path(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
}

/// Installs cargo-deb ([`CARGO_DEB_VERSION`]) unless a cargo-deb is there.
fn ensure_cargo_deb() -> Result<()> {
    if let Some(version) = cargo_deb_version() {
        if version == CARGO_DEB_VERSION {
            eprintln!("xtask: cargo-deb {version}: present");
        } else {
            eprintln!(
                "xtask: cargo-deb {version} is installed (xtask installs {CARGO_DEB_VERSION}); using it"
            );
        }
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (cargo install --locked)");
    crate::util::run_cmd(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--locked", "--version"])
            .arg(CARGO_DEB_VERSION)
            .stdin(Stdio::null()),
    )?;
    cargo_deb_version()
        .map(drop)
        .context("cargo-deb does not run after installing it")
}

/// The installed cargo-deb's version, from `cargo deb --version`.
fn cargo_deb_version() -> Option<String> {
    let out = output_of(Command::new("cargo").args(["deb", "--version"]))?;
    parse_version(&out)
}

/// `cargo-deb 3.8.0` (or `cargo-deb v3.8.0`) -> `3.8.0`.
fn parse_version(out: &str) -> Option<String> {
    let word = out.split_whitespace().last()?;
    let version = word.strip_prefix('v').unwrap_or(word);
    version
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;
    use crate::install;

    #[test]
    fn reads_cargo_deb_versions() {
        assert_eq!(parse_version("cargo-deb 3.8.0\n").as_deref(), Some("3.8.0"));
        assert_eq!(parse_version("cargo-deb v2.1.0").as_deref(), Some("2.1.0"));
        assert_eq!(parse_version("error: no such command: `deb`"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn finds_the_package_path_in_cargo_deb_output() {
        let out = "warning: something\n/x/target/debian/bulkhead_0.1.0-1_amd64.deb\n";
        assert_eq!(
            deb_path(out),
            Some(PathBuf::from("/x/target/debian/bulkhead_0.1.0-1_amd64.deb"))
        );
        assert_eq!(deb_path("nothing here\n"), None);
    }

    /// `[package.metadata.deb] assets` of `agent/Cargo.toml`, expanded to
    /// (absolute destination, mode), read through `cargo metadata`.
    /// Sources under `target/release/generated/` are read from `generated`.
    fn deb_assets(generated: &Path) -> BTreeSet<(PathBuf, u32)> {
        let meta = crate::util::cargo_metadata().expect("cargo metadata runs");
        let agent = meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .find(|p| p["name"] == PACKAGE)
            .expect("the agent package");
        let crate_dir = workspace_root().join("agent");
        let mut assets = BTreeSet::new();
        for asset in agent["metadata"]["deb"]["assets"]
            .as_array()
            .expect("[package.metadata.deb] assets")
        {
            let [src, dest, mode] = [0, 1, 2].map(|i| {
                asset[i]
                    .as_str()
                    .unwrap_or_else(|| panic!("asset {asset} is not [src, dest, mode]"))
            });
            let mode = u32::from_str_radix(mode, 8).expect("octal mode");
            let sources: Vec<PathBuf> =
                if let Some(rel) = src.strip_prefix("target/release/generated/") {
                    expand(&generated.join(rel))
                } else if src.starts_with("target/release/") {
                    vec![PathBuf::from(src)]
                } else {
                    expand(&crate_dir.join(src))
                };
            for source in sources {
                let dest = if dest.ends_with('/') {
                    Path::new("/")
                        .join(dest)
                        .join(source.file_name().expect("file name"))
                } else {
                    Path::new("/").join(dest)
                };
                assets.insert((dest, mode));
            }
        }
        assets
    }

    /// `dir/*.ext` (the only glob the assets use; `ext` may hold dots, as
    /// in `*.1.gz`) or a plain file.
    fn expand(pattern: &Path) -> Vec<PathBuf> {
        let name = pattern.file_name().and_then(|n| n.to_str()).expect("name");
        let Some(ext) = name.strip_prefix("*.") else {
            assert!(pattern.is_file(), "asset {} is missing", pattern.display());
            return vec![pattern.to_path_buf()];
        };
        let dir = pattern.parent().expect("a glob has a directory");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("asset directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&format!(".{ext}")))
            })
            .collect();
        found.sort();
        assert!(!found.is_empty(), "{} matches nothing", pattern.display());
        found
    }

    #[test]
    fn package_carries_what_install_lays_down() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let generated = install::tests::fake_generated(tmp.path());
        let layout = install::layout(
            &workspace_root(),
            Path::new("/usr"),
            Path::new("/bin/true"),
            &generated,
        )
        .expect("layout");
        let assets = deb_assets(&generated);
        for item in &layout.files {
            assert!(
                assets.contains(&(item.dest.clone(), item.mode)),
                "`cargo xtask install --prefix /usr` installs {} (mode {:04o}), \
                 the package does not: {assets:?}",
                item.dest.display(),
                item.mode
            );
        }
    }

    /// The changelog's newest entry is this version, with cargo-deb's
    /// default revision (`-1`).
    #[test]
    fn debian_changelog_names_this_version() {
        let path = workspace_root().join("systemd/debian/changelog");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let first = text.lines().next().unwrap_or_default();
        // The agent shares the workspace's version with xtask.
        let want = format!("bulkhead ({}-1) ", env!("CARGO_PKG_VERSION"));
        assert!(
            first.starts_with(&want),
            "{}: the first line {first:?} should start with {want:?}",
            path.display()
        );
    }

    #[test]
    fn maintainer_scripts_are_executable_shell() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = workspace_root().join("systemd/debian");
        for name in ["postinst", "prerm", "postrm"] {
            let path = dir.join(name);
            let mode = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "{name} must be executable");
            let status = Command::new("sh")
                .arg("-n")
                .arg(&path)
                .status()
                .expect("sh runs");
            assert!(status.success(), "{name} is not valid sh");
        }
    }
}
