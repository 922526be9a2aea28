//! Install and package.

use std::{
    collections::BTreeMap, fs, path::Path, path::PathBuf, process::Command, process::Output,
    time::Duration,
};

use integration_tests::{bulkhead_bin, process::output_with_timeout, require_bpf};

use super::{mode, repo, text, tool};

/// How long a `cargo xtask` step may take (`package` builds the release
/// binary, and the first time installs cargo-deb).
const XTASK_TIMEOUT: Duration = Duration::from_mins(30);

fn xtask(args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo()).arg("xtask").args(args);
    let out = output_with_timeout(&mut cmd, XTASK_TIMEOUT);
    assert!(
        out.status.success(),
        "cargo xtask {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    out
}

/// Installed files and their modes, relative to the root.
const LAYOUT: &[(&str, u32)] = &[
    ("PREFIX/bin/bulkhead", 0o755),
    ("PREFIX/lib/systemd/system/bulkhead.service", 0o644),
    ("PREFIX/lib/systemd/system/bulkhead-dns.socket", 0o644),
    ("etc/bulkhead/bulkhead.toml", 0o644),
    ("etc/bulkhead/policies", 0o755),
    ("PREFIX/share/bulkhead/bulkhead.toml", 0o644),
    ("PREFIX/share/bulkhead/examples/policies/batch.toml", 0o644),
    (
        "PREFIX/share/bulkhead/examples/policies/billing.toml",
        0o644,
    ),
    (
        "PREFIX/share/bulkhead/examples/policies/frontend.toml",
        0o644,
    ),
    ("etc/logrotate.d/bulkhead", 0o644),
    ("PREFIX/share/man/man1/bulkhead.1.gz", 0o644),
    ("PREFIX/share/man/man1/bulkhead-run.1.gz", 0o644),
    ("PREFIX/share/bash-completion/completions/bulkhead", 0o644),
    ("PREFIX/share/zsh/vendor-completions/_bulkhead", 0o644),
    (
        "PREFIX/share/fish/vendor_completions.d/bulkhead.fish",
        0o644,
    ),
];

/// The subcommands `bulkhead --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let out = output_with_timeout(
        Command::new(bulkhead_bin()).arg("--help"),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "bulkhead --help: {}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let list: Vec<String> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        list.len() > 5,
        "no command list in bulkhead --help:\n{help}"
    );
    list
}

/// The installed man page renders (`man -l`, no warnings from groff) and
/// names every subcommand, each of which has its own page.
fn check_man_pages(man1: &Path) {
    let Some(man) = tool("man", "man-db") else {
        return;
    };
    let page = man1.join("bulkhead.1.gz");
    let mut cmd = Command::new(man);
    cmd.arg("-l")
        .arg(&page)
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_STDERR", "1")
        .env("MANROFFSEQ", "")
        .env("PAGER", "cat");
    let out = output_with_timeout(&mut cmd, Duration::from_mins(1));
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "man -l {}: {}",
        page.display(),
        text(&out)
    );
    assert!(
        rendered.contains("NAME") && rendered.contains("SUBCOMMANDS"),
        "{rendered}"
    );
    for sub in subcommands() {
        assert!(
            rendered.contains(&format!("bulkhead-{sub}(1)")),
            "the man page does not name `{sub}`:\n{rendered}"
        );
        let own = man1.join(format!("bulkhead-{sub}.1.gz"));
        assert!(own.is_file(), "no page {}", own.display());
    }
}

/// Sourced in bash, the completion offers every subcommand after
/// `bulkhead ` and only `status` after `bulkhead stat`.
fn check_bash_completion(script: &Path) {
    let complete = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source {:?} || exit 9; COMP_LINE=\"$1\"; COMP_POINT=${{#1}}; \
             read -ra COMP_WORDS <<< \"$1\"; [ \"${{1: -1}}\" = ' ' ] && COMP_WORDS+=(''); \
             COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); \
             _bulkhead bulkhead \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = output_with_timeout(
            Command::new("bash").args(["-c", &program, "complete", line]),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "completing {line:?} ({words:?}): {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let all = complete("bulkhead ");
    for sub in subcommands() {
        assert!(all.contains(&sub), "`bulkhead <TAB>` lacks {sub}: {all:?}");
    }
    assert_eq!(complete("bulkhead stat"), ["status"]);
}

#[test]
fn xtask_install_lays_out_the_files_into_a_destdir() {
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("root");
    let bin = bulkhead_bin();
    let args = [
        "install",
        "--destdir",
        dest.to_str().expect("UTF-8 temp path"),
        "--binary",
        bin.to_str().expect("UTF-8 binary path"),
    ];
    xtask(&args);
    for (path, want) in LAYOUT {
        let path = path.replace("PREFIX", "usr/local");
        assert_eq!(mode(&dest.join(&path)), *want, "mode of /{path}");
    }
    assert_eq!(
        fs::read(dest.join("usr/local/bin/bulkhead")).expect("binary"),
        fs::read(&bin).expect("binary under test"),
        "the installed binary is the one given"
    );
    assert!(
        fs::read_dir(dest.join("etc/bulkhead/policies"))
            .expect("policy dir")
            .next()
            .is_none(),
        "no policy may be installed: the service would enforce it at once"
    );
    check_man_pages(&dest.join("usr/local/share/man/man1"));
    check_bash_completion(&dest.join("usr/local/share/bash-completion/completions/bulkhead"));
    let unit = fs::read_to_string(dest.join("usr/local/lib/systemd/system/bulkhead.service"))
        .expect("unit");
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/bulkhead run ")
            && unit.contains("\nExecReload=/usr/local/bin/bulkhead reload "),
        "the unit must run the binary under the prefix:\n{unit}"
    );

    // The installed unit verifies too, with its binary where it was put.
    if let Some(analyze) = tool("systemd-analyze", "systemd") {
        let staged = root.path().join("bulkhead.service");
        fs::write(
            &staged,
            // ExecStart= and ExecReload= both run it.
            unit.replace(
                "=/usr/local/bin/bulkhead ",
                &format!("={} ", dest.join("usr/local/bin/bulkhead").display()),
            ),
        )
        .expect("write");
        let out = output_with_timeout(
            Command::new(analyze).arg("verify").arg(&staged),
            Duration::from_mins(1),
        );
        assert!(
            out.status.success() && text(&out).trim().is_empty(),
            "the installed unit does not verify cleanly:\n{}",
            text(&out)
        );
    }

    // Again, over an edited config: the config stays as it is.
    let config = dest.join("etc/bulkhead/bulkhead.toml");
    fs::write(&config, "# edited by the operator\n").expect("edit");
    let out = xtask(&args);
    assert_eq!(
        fs::read_to_string(&config).expect("config"),
        "# edited by the operator\n",
        "cargo xtask install overwrote an existing config"
    );
    assert!(
        text(&out).contains("kept the existing"),
        "the install should say it kept the config:\n{}",
        text(&out)
    );
}

/// `dpkg-deb --contents`: path -> `MODE OWNER` (owner as `0/0`).
fn deb_listing(dpkg_deb: &Path, deb: &Path) -> (BTreeMap<String, String>, String) {
    // Lines are `-rwxr-xr-x 0/0 SIZE DATE TIME ./path`.
    let contents = output_with_timeout(
        Command::new(dpkg_deb).arg("--contents").arg(deb),
        Duration::from_mins(1),
    );
    assert!(contents.status.success(), "{}", text(&contents));
    let listing = String::from_utf8_lossy(&contents.stdout).into_owned();
    let entries = listing
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let path = fields.last()?.strip_prefix('.')?.trim_end_matches('/');
            let owner = match *fields.get(1)? {
                "root/root" => "0/0",
                other => other,
            };
            Some((path.to_owned(), format!("{} {owner}", fields[0])))
        })
        .collect();
    (entries, listing)
}

/// The package's control files: the config is a conffile, the maintainer
/// scripts are executable.
fn check_control(dpkg_deb: &Path, deb: &Path, into: &Path) {
    let extracted = output_with_timeout(
        Command::new(dpkg_deb).arg("-e").arg(deb).arg(into),
        Duration::from_mins(1),
    );
    assert!(extracted.status.success(), "{}", text(&extracted));
    let conffiles = fs::read_to_string(into.join("conffiles")).unwrap_or_default();
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/bulkhead/bulkhead.toml"),
        "the config must be a conffile: {conffiles:?}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(mode(&into.join(script)), 0o755, "{script}");
    }
}

/// `lintian` finds no error in the package (warnings are printed).
fn check_lintian(deb: &Path) {
    let Some(lintian) = tool("lintian", "lintian") else {
        return;
    };
    let out = output_with_timeout(
        Command::new(lintian).arg("--no-tag-display-limit").arg(deb),
        Duration::from_mins(5),
    );
    let said = text(&out);
    eprintln!("lintian {}:\n{said}", deb.display());
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    // Exit 2: lintian itself failed (1 is "tags found", errors among them
    // or not; the lines above decide).
    assert_ne!(out.status.code(), Some(2), "lintian failed to run: {said}");
}

/// Installs `deb` into the empty root `root` (the maintainer scripts run
/// with `DPKG_ROOT`, off the live system), reinstalls it over an edited
/// config, then purges it, checking each step.
fn install_and_purge(dpkg: &Path, deb: &Path, root: &Path) {
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(dir)).expect("dpkg admin dir");
    }
    fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    let deb = deb.to_str().expect("UTF-8 package path");
    let dpkg_in = |args: &[&str]| {
        let mut cmd = Command::new(dpkg);
        cmd.arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args);
        let out = output_with_timeout(&mut cmd, Duration::from_mins(2));
        assert!(
            out.status.success(),
            "dpkg {args:?} failed ({}):\n{}",
            out.status,
            text(&out)
        );
        text(&out)
    };
    let said = dpkg_in(&["--install", deb]);
    assert!(
        said.contains("not started"),
        "a fresh install must say it did not start bulkhead:\n{said}"
    );
    assert_eq!(
        mode(&root.join("etc/bulkhead/policies")),
        0o755,
        "policies dir"
    );
    assert_eq!(mode(&root.join("usr/bin/bulkhead")), 0o755, "binary");
    // A symlink to /usr/lib/... of the root: look at the link itself.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/bulkhead.service");
    assert!(
        fs::symlink_metadata(&wants).is_ok(),
        "postinst should enable the unit (it starts once a policy exists)"
    );
    // An upgrade (here: the same version again) keeps an edited config.
    fs::write(root.join("etc/bulkhead/bulkhead.toml"), "# mine\n").expect("edit config");
    dpkg_in(&["--force-confold", "--install", deb]);
    assert_eq!(
        fs::read_to_string(root.join("etc/bulkhead/bulkhead.toml")).expect("config"),
        "# mine\n"
    );
    dpkg_in(&["--purge", "bulkhead"]);
    for gone in ["usr/bin/bulkhead", "etc/bulkhead", "usr/share/bulkhead"] {
        assert!(
            !root.join(gone).exists(),
            "/{gone} is still there after purge"
        );
    }
    assert!(
        fs::symlink_metadata(&wants).is_err(),
        "purge should remove the enablement link"
    );
}

#[test]
fn xtask_package_builds_a_deb_that_installs_and_purges() {
    if !require_bpf() {
        return;
    }
    let (Some(dpkg_deb), Some(dpkg)) = (tool("dpkg-deb", "dpkg"), tool("dpkg", "dpkg")) else {
        return;
    };
    let out_dir = tempfile::tempdir().expect("tempdir");
    // The binary under test: a release build here would take minutes, and
    // what this checks is the package, not the compiler's profile.
    let bin = bulkhead_bin();
    let out = xtask(&[
        "package",
        "--output",
        out_dir.path().to_str().expect("UTF-8 temp path"),
        "--binary",
        bin.to_str().expect("UTF-8 binary path"),
    ]);
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(PathBuf::from)
        .find(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("deb")))
        .unwrap_or_else(|| panic!("cargo xtask package printed no .deb path:\n{}", text(&out)));
    assert!(
        deb.starts_with(out_dir.path()),
        "{} is not in --output",
        deb.display()
    );

    let (entries, listing) = deb_listing(&dpkg_deb, &deb);
    for (path, mode) in LAYOUT {
        if *path == "etc/bulkhead/policies" {
            continue; // made by postinst (dpkg does not ship empty directories)
        }
        let path = format!("/{}", path.replace("PREFIX", "usr"));
        let bits = if *mode == 0o755 {
            "rwxr-xr-x"
        } else {
            "rw-r--r--"
        };
        assert_eq!(
            entries.get(&path),
            Some(&format!("-{bits} 0/0")),
            "{path} in the package:\n{listing}"
        );
    }
    check_control(&dpkg_deb, &deb, &out_dir.path().join("control"));
    check_lintian(&deb);
    install_and_purge(&dpkg, &deb, &out_dir.path().join("root"));
}
