//! `cargo xtask install`: the binary, the systemd unit, the default config
//! and the example policies, laid out as the Debian package lays them out
//! (with `--prefix /usr`, exactly so).
//!
//! | what | where | mode |
//! | --- | --- | --- |
//! | the daemon | `PREFIX/bin/bulkhead` | 0755 |
//! | the unit (`ExecStart=`, `ExecReload=` running that binary) | `PREFIX/lib/systemd/system/bulkhead.service` | 0644 |
//! | the DNS proxy's socket unit (the unit's `Sockets=`) | `PREFIX/lib/systemd/system/bulkhead-dns.socket` | 0644 |
//! | the default config, unless one exists | `/etc/bulkhead/bulkhead.toml` | 0644 |
//! | the policy directory, empty | `/etc/bulkhead/policies/` | 0755 |
//! | a pristine copy of the default config | `PREFIX/share/bulkhead/bulkhead.toml` | 0644 |
//! | the example policies | `PREFIX/share/bulkhead/examples/policies/*.toml` | 0644 |
//! | the Prometheus alerting rules and their promtool test | `PREFIX/share/bulkhead/prometheus/` | 0644 |
//! | the Grafana dashboard | `PREFIX/share/bulkhead/grafana/bulkhead.json` | 0644 |
//! | the logrotate config, unless one exists | `/etc/logrotate.d/bulkhead` | 0644 |
//! | the man pages (gzipped), generated | `PREFIX/share/man/man1/bulkhead*.1.gz` | 0644 |
//! | bash, zsh, fish completions, generated | `PREFIX/share/bash-completion/completions/bulkhead`, `PREFIX/share/zsh/vendor-completions/_bulkhead`, `PREFIX/share/fish/vendor_completions.d/bulkhead.fish` | 0644 |
//!
//! The config and policies always go to `/etc/bulkhead` whatever the
//! prefix: that is where the daemon and the unit look. The examples are not
//! installed as policies: a policy is enforced as soon as the agent starts,
//! so the operator chooses each one (docs/operations.md). Every file is
//! written to a temporary name and renamed into place, so a running binary
//! is replaced, never overwritten in place.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    build, generated,
    util::{find_in_path, is_root, run_cmd, target_dir, workspace_root},
};

/// Where the unit template runs the daemon from; replaced by
/// `PREFIX/bin/bulkhead` when installed.
pub const UNIT_BINARY: &str = "/usr/bin/bulkhead";
/// The unit file in the repository.
pub const UNIT_SOURCE: &str = "systemd/bulkhead.service";
/// The socket unit of the DNS proxy in the repository (installed as is).
pub const SOCKET_UNIT_SOURCE: &str = "systemd/bulkhead-dns.socket";
/// The default daemon config in the repository.
pub const CONFIG_SOURCE: &str = "policies/config/bulkhead.toml";
/// The example policies in the repository: the small ones the docs use,
/// and those for real services (nginx, PostgreSQL, ...).
pub const EXAMPLES_SOURCES: [&str; 2] = ["policies", "policies/examples"];
/// Monitoring files shipped as they are: (source in the repository, where
/// under `PREFIX/share/bulkhead`).
pub const MONITORING: [(&str, &str); 3] = [
    (
        "contrib/prometheus/bulkhead.rules.yml",
        "prometheus/bulkhead.rules.yml",
    ),
    (
        "contrib/prometheus/bulkhead.rules.test.yml",
        "prometheus/bulkhead.rules.test.yml",
    ),
    ("contrib/grafana/bulkhead.json", "grafana/bulkhead.json"),
];
/// Where the config and policies go (what the daemon reads by default).
pub const CONFIG_DIR: &str = "/etc/bulkhead";
/// The logrotate config in the repository.
pub const LOGROTATE_SOURCE: &str = "systemd/logrotate/bulkhead";
/// Where logrotate reads it.
pub const LOGROTATE_DEST: &str = "/etc/logrotate.d/bulkhead";

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Stage the files under DIR instead of / (for packaging, or to look
    /// before installing); paths inside it are as they would be on the host.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// Prefix for the binary, the unit and the examples (`/usr` is where
    /// the Debian package puts them).
    #[arg(long, value_name = "PREFIX", default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Install this bulkhead binary instead of building the release one.
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

/// What one installed file is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file copied as it is.
    File(PathBuf),
    /// Generated contents.
    Text(String),
}

/// One file to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub source: Source,
    /// Absolute path on the installed system (DESTDIR not included).
    pub dest: PathBuf,
    pub mode: u32,
    /// Leave an existing file alone (the operator's config).
    pub keep_existing: bool,
}

/// Everything an install lays down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Directories made if missing, with their mode: (path, mode).
    pub dirs: Vec<(PathBuf, u32)>,
    pub files: Vec<Item>,
}

pub fn run(args: &InstallArgs) -> Result<()> {
    check_prefix(&args.prefix)?;
    let root = args.destdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    if args.destdir.is_none() && !is_root() {
        bail!(
            "installing into / needs root: run `sudo cargo xtask install` \
             (or stage the files with --destdir DIR)"
        );
    }
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => {
            build::run(true)?;
            target_dir()?.join("release").join("bulkhead")
        }
    };
    // Release when the binary is built here (the profile is built anyway).
    let generated = generated::write(args.binary.is_none())?;
    ensure!(
        binary.is_file(),
        "no bulkhead binary at {}",
        binary.display()
    );
    let layout = layout(&workspace_root(), &args.prefix, &binary, &generated)?;
    let report = install(&layout, &root)?;
    for line in &report {
        eprintln!("xtask: {line}");
    }
    if report.iter().any(|l| l.starts_with("kept the existing")) {
        eprintln!(
            "xtask: this version's default config is {}: compare it with yours",
            under(&root, &args.prefix.join("share/bulkhead/bulkhead.toml")).display()
        );
    }
    if args.destdir.is_none() {
        after_install(&args.prefix)?;
    }
    Ok(())
}

/// The prefix must be absolute and plain (no `..`): it ends up in the unit.
fn check_prefix(prefix: &Path) -> Result<()> {
    ensure!(
        prefix.is_absolute(),
        "--prefix {} must be an absolute path",
        prefix.display()
    );
    ensure!(
        prefix
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "--prefix {} must not contain `.` or `..`",
        prefix.display()
    );
    let text = prefix.to_str().context("--prefix must be valid UTF-8")?;
    ensure!(
        !text.chars().any(|c| c.is_whitespace() || c == '%' || c == '$'),
        "--prefix {text:?} must not contain spaces, `%` or `$` (it goes into the unit's ExecStart=)"
    );
    Ok(())
}

/// The files and directories of an install with `prefix`, read from the
/// workspace at `repo`; `binary` is the daemon to install, `generated` the
/// directory of its man pages and completions ([`generated::write`]).
pub fn layout(repo: &Path, prefix: &Path, binary: &Path, generated: &Path) -> Result<Layout> {
    check_prefix(prefix)?;
    let share = prefix.join("share/bulkhead");
    let unit_path = repo.join(UNIT_SOURCE);
    let unit = fs::read_to_string(&unit_path)
        .with_context(|| format!("cannot read {}", unit_path.display()))?;
    let installed_binary = prefix.join("bin/bulkhead");
    let unit = render_unit(&unit, &installed_binary)?;

    let mut files = vec![
        Item {
            source: Source::File(binary.to_path_buf()),
            dest: installed_binary,
            mode: 0o755,
            keep_existing: false,
        },
        Item {
            source: Source::Text(unit),
            dest: prefix.join("lib/systemd/system/bulkhead.service"),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            source: Source::File(repo.join(SOCKET_UNIT_SOURCE)),
            dest: prefix.join("lib/systemd/system/bulkhead-dns.socket"),
            mode: 0o644,
            keep_existing: false,
        },
        Item {
            source: Source::File(repo.join(CONFIG_SOURCE)),
            dest: Path::new(CONFIG_DIR).join("bulkhead.toml"),
            mode: 0o644,
            keep_existing: true,
        },
        Item {
            source: Source::File(repo.join(CONFIG_SOURCE)),
            dest: share.join("bulkhead.toml"),
            mode: 0o644,
            keep_existing: false,
        },
    ];
    files.push(Item {
        source: Source::File(repo.join(LOGROTATE_SOURCE)),
        dest: PathBuf::from(LOGROTATE_DEST),
        mode: 0o644,
        keep_existing: true,
    });
    for page in files_in(&generated.join("man"), "gz")? {
        let name = page.file_name().context("a man page has no file name")?;
        files.push(Item {
            dest: prefix.join(generated::MAN_DIR).join(name),
            source: Source::File(page),
            mode: 0o644,
            keep_existing: false,
        });
    }
    for (name, dest) in generated::COMPLETIONS {
        files.push(Item {
            source: Source::File(generated.join("completions").join(name)),
            dest: prefix.join(dest),
            mode: 0o644,
            keep_existing: false,
        });
    }
    for dir in EXAMPLES_SOURCES {
        for example in files_in(&repo.join(dir), "toml")? {
            let name = example
                .file_name()
                .context("an example policy has no file name")?;
            let dest = share.join("examples/policies").join(name);
            ensure!(
                !files.iter().any(|f| f.dest == dest),
                "two example policies are named {}",
                name.to_string_lossy()
            );
            files.push(Item {
                dest,
                source: Source::File(example),
                mode: 0o644,
                keep_existing: false,
            });
        }
    }
    for (source, dest) in MONITORING {
        files.push(Item {
            source: Source::File(repo.join(source)),
            dest: share.join(dest),
            mode: 0o644,
            keep_existing: false,
        });
    }
    Ok(Layout {
        dirs: vec![
            (PathBuf::from(CONFIG_DIR), 0o755),
            (Path::new(CONFIG_DIR).join("policies"), 0o755),
        ],
        files,
    })
}

/// The `*.EXT` files directly in `dir`, sorted; at least one.
fn files_in(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == ext) {
            found.push(path);
        }
    }
    found.sort();
    ensure!(!found.is_empty(), "no *.{ext} files in {}", dir.display());
    Ok(found)
}

/// The unit with its `ExecStart=` and `ExecReload=` pointing at `binary`.
/// Fails unless the template runs [`UNIT_BINARY`] in exactly one
/// `ExecStart=`, so a changed unit cannot be installed with the wrong path.
pub fn render_unit(unit: &str, binary: &Path) -> Result<String> {
    let exec_start: Vec<&str> = unit
        .lines()
        .filter(|l| l.trim_start().starts_with("ExecStart="))
        .collect();
    ensure!(
        exec_start.len() == 1,
        "{UNIT_SOURCE} must have exactly one ExecStart= line, found {}",
        exec_start.len()
    );
    ensure!(
        exec_start[0]
            .trim_start()
            .starts_with(&format!("ExecStart={UNIT_BINARY} ")),
        "{UNIT_SOURCE}: ExecStart= must run {UNIT_BINARY} (the install rewrites that path), found {:?}",
        exec_start[0]
    );
    let binary = binary.to_str().context("the binary path must be UTF-8")?;
    let mut out = String::with_capacity(unit.len());
    for line in unit.split_inclusive('\n') {
        let rewritten = ["ExecStart=", "ExecReload="].into_iter().find_map(|key| {
            let rest = line
                .trim_start()
                .strip_prefix(key)?
                .strip_prefix(UNIT_BINARY)?
                .strip_prefix(' ')?;
            Some(format!("{key}{binary} {rest}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
    }
    Ok(out)
}

/// Lays `layout` down under `root`; returns one line per thing done.
pub fn install(layout: &Layout, root: &Path) -> Result<Vec<String>> {
    let mut report = Vec::new();
    for (dir, mode) in &layout.dirs {
        let at = under(root, dir);
        if make_dir(&at, *mode)? {
            report.push(format!("created {} (mode {mode:04o})", at.display()));
        }
    }
    for item in &layout.files {
        let at = under(root, &item.dest);
        if item.keep_existing && fs::symlink_metadata(&at).is_ok() {
            report.push(format!("kept the existing {} unchanged", at.display()));
            continue;
        }
        let parent = at
            .parent()
            .with_context(|| format!("{} has no parent directory", at.display()))?;
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let contents = match &item.source {
            Source::File(path) => {
                fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            }
            Source::Text(text) => text.clone().into_bytes(),
        };
        write_atomically(&at, &contents, item.mode)
            .with_context(|| format!("cannot install {}", at.display()))?;
        report.push(format!(
            "installed {} (mode {:04o})",
            at.display(),
            item.mode
        ));
    }
    Ok(report)
}

/// `path` (absolute) inside `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes `dir` (and its parents) if missing; `dir` itself gets `mode`.
/// Returns whether it was made. An existing directory keeps its mode.
fn make_dir(dir: &Path, mode: u32) -> Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // The umask may have taken bits away.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    Ok(true)
}

/// Writes `contents` to a temporary file beside `path`, gives it `mode`,
/// and renames it over `path`.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// On a live system: tell systemd, and say what comes next.
fn after_install(prefix: &Path) -> Result<()> {
    if Path::new("/run/systemd/system").is_dir() && find_in_path("systemctl").is_some() {
        run_cmd(Command::new("systemctl").arg("daemon-reload"))?;
    } else {
        eprintln!("xtask: systemd is not running here; the unit is installed but not loaded");
    }
    let share = prefix.join("share/bulkhead/examples/policies");
    eprintln!(
        "xtask: installed. bulkhead is not started: it starts once a policy exists.\n\
         xtask:   1. write a policy in {CONFIG_DIR}/policies/ (examples: {}), mode = \"audit\" first\n\
         xtask:   2. bulkhead check --policy-dir {CONFIG_DIR}/policies\n\
         xtask:   3. systemctl enable --now bulkhead\n\
         xtask: see docs/operations.md",
        share.display()
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .mode()
            & 0o7777
    }

    #[test]
    fn unit_exec_start_follows_the_prefix() {
        let unit = "[Service]\nType=notify\nExecStart=/usr/bin/bulkhead run --config /etc/bulkhead/bulkhead.toml\nExecReload=/usr/bin/bulkhead reload --config /etc/bulkhead/bulkhead.toml\n";
        let out = render_unit(unit, Path::new("/opt/bh/bin/bulkhead")).expect("renders");
        assert_eq!(
            out,
            "[Service]\nType=notify\nExecStart=/opt/bh/bin/bulkhead run --config /etc/bulkhead/bulkhead.toml\nExecReload=/opt/bh/bin/bulkhead reload --config /etc/bulkhead/bulkhead.toml\n"
        );
        // /usr stays /usr: the package's unit is the repository's.
        assert_eq!(
            render_unit(unit, Path::new(UNIT_BINARY)).expect("renders"),
            unit
        );
    }

    #[test]
    fn unit_without_the_expected_exec_start_is_refused() {
        for unit in [
            "[Service]\n",
            "ExecStart=/usr/sbin/bulkhead run\n",
            "ExecStart=/usr/bin/bulkhead run\nExecStart=/usr/bin/bulkhead run\n",
        ] {
            let err = render_unit(unit, Path::new("/usr/local/bin/bulkhead"))
                .expect_err(unit)
                .to_string();
            assert!(err.contains("ExecStart="), "{err}");
        }
    }

    #[test]
    fn prefix_must_be_plain_and_absolute() {
        for bad in [
            "usr/local",
            "/usr/../etc",
            "/opt/my tools",
            "/opt/%h",
            "/opt/$X",
        ] {
            assert!(check_prefix(Path::new(bad)).is_err(), "{bad} accepted");
        }
        for good in ["/usr", "/usr/local", "/opt/bulkhead"] {
            check_prefix(Path::new(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    /// A generated directory as `generated::write` makes it: two pages,
    /// the three completions.
    pub(crate) fn fake_generated(dir: &Path) -> PathBuf {
        let gen = dir.join("generated");
        fs::create_dir_all(gen.join("man")).expect("man dir");
        fs::create_dir_all(gen.join("completions")).expect("completions dir");
        for page in ["bulkhead.1.gz", "bulkhead-run.1.gz"] {
            fs::write(gen.join("man").join(page), "gzipped page").expect("page");
        }
        for (name, _) in generated::COMPLETIONS {
            fs::write(gen.join("completions").join(name), "# completion\n").expect("completion");
        }
        gen
    }

    #[test]
    fn repository_unit_renders() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = layout(
            &workspace_root(),
            Path::new("/usr/local"),
            Path::new("/bin/true"),
            &fake_generated(tmp.path()),
        )
        .expect("the repository's files make a layout");
        let unit = layout
            .files
            .iter()
            .find(|i| i.dest.ends_with("bulkhead.service"))
            .expect("the unit is installed");
        let Source::Text(text) = &unit.source else {
            panic!("the unit is generated");
        };
        assert!(
            text.contains("\nExecStart=/usr/local/bin/bulkhead run")
                && text.contains("\nExecReload=/usr/local/bin/bulkhead reload"),
            "{text}"
        );
        assert!(!text.contains(UNIT_BINARY), "{text}");
    }

    #[test]
    fn installs_the_layout_with_modes_and_keeps_an_existing_config() {
        let root = tempfile::tempdir().expect("tempdir");
        let bin = root.path().join("built-bulkhead");
        fs::write(&bin, "#!/bin/sh\n").expect("write the fake binary");
        let layout = layout(
            &workspace_root(),
            Path::new("/usr"),
            &bin,
            &fake_generated(root.path()),
        )
        .expect("layout");
        let dest = root.path().join("dest");
        install(&layout, &dest).expect("install");

        let expect = [
            ("usr/bin/bulkhead", 0o755),
            ("usr/lib/systemd/system/bulkhead.service", 0o644),
            ("usr/lib/systemd/system/bulkhead-dns.socket", 0o644),
            ("etc/bulkhead", 0o755),
            ("etc/bulkhead/bulkhead.toml", 0o644),
            ("etc/bulkhead/policies", 0o755),
            ("usr/share/bulkhead/bulkhead.toml", 0o644),
            ("usr/share/bulkhead/examples/policies/billing.toml", 0o644),
            ("usr/share/bulkhead/examples/policies/nginx.toml", 0o644),
            ("usr/share/bulkhead/prometheus/bulkhead.rules.yml", 0o644),
            (
                "usr/share/bulkhead/prometheus/bulkhead.rules.test.yml",
                0o644,
            ),
            ("usr/share/bulkhead/grafana/bulkhead.json", 0o644),
            ("etc/logrotate.d/bulkhead", 0o644),
            ("usr/share/man/man1/bulkhead.1.gz", 0o644),
            ("usr/share/man/man1/bulkhead-run.1.gz", 0o644),
            ("usr/share/bash-completion/completions/bulkhead", 0o644),
            ("usr/share/zsh/vendor-completions/_bulkhead", 0o644),
            ("usr/share/fish/vendor_completions.d/bulkhead.fish", 0o644),
        ];
        for (path, want) in expect {
            assert_eq!(mode(&dest.join(path)), want, "mode of {path}");
        }
        let policies: Vec<_> = fs::read_dir(dest.join("etc/bulkhead/policies"))
            .expect("policy dir")
            .collect();
        assert!(policies.is_empty(), "no policy is installed by default");
        let unit =
            fs::read_to_string(dest.join("usr/lib/systemd/system/bulkhead.service")).expect("unit");
        let repo_unit = fs::read_to_string(workspace_root().join(UNIT_SOURCE)).expect("unit");
        assert_eq!(unit, repo_unit, "with --prefix /usr the unit is unchanged");

        // A second install keeps the operator's config, replaces the rest.
        let config = dest.join("etc/bulkhead/bulkhead.toml");
        fs::write(&config, "# mine\n").expect("edit the config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&bin, "#!/bin/sh\n# new\n").expect("rebuild");
        let report = install(&layout, &dest).expect("reinstall");
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            "# mine\n",
            "an existing config must never be overwritten"
        );
        assert_eq!(mode(&config), 0o600, "nor its mode changed");
        assert!(
            report.iter().any(|l| l.starts_with("kept the existing")),
            "{report:?}"
        );
        assert_eq!(
            fs::read_to_string(dest.join("usr/bin/bulkhead")).expect("binary"),
            "#!/bin/sh\n# new\n"
        );
        let leftovers: Vec<_> = fs::read_dir(dest.join("usr/bin"))
            .expect("bin dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}
