//! Bad input: `bulkhead check` names every error as `PATH:LINE:COL: message`
//! in one pass (as text, JSON or GitHub Actions annotations), refuses the
//! files the agent refuses (owner, mode), `bulkhead run` refuses to start on
//! it and loads nothing, and valid policies (the repository's examples
//! included) pass.

use std::{
    ffi::OsStr,
    fs,
    os::unix::fs::{chown, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::json;

use integration_tests::{bulkhead, require_bpf, Daemon, PolicyDir, ProgSnapshot};

/// One bad policy file, and what its error must say.
struct Bad {
    file: &'static str,
    text: &'static str,
    /// A substring of the line the error must point at (`None`: any line,
    /// for errors about something missing).
    at: Option<&'static str>,
    /// Substrings the message must contain (case-insensitive).
    says: &'static [&'static str],
}

const BAD: &[Bad] = &[
    Bad {
        file: "unknown_key.toml",
        text: "cgroup = \"/bulkhead-check/unknown-key\"\nmode = \"enforce\"\n\n\
               [[egress]]\nto = [\"192.0.2.0/24\"]\nprots = [443]\n",
        at: Some("prots"),
        says: &["prots"],
    },
    Bad {
        file: "bad_cidr.toml",
        text: "cgroup = \"/bulkhead-check/bad-cidr\"\nmode = \"enforce\"\n\n\
               [[egress]]\nports = [443]\nto = [\"192.0.2.0/24\", \"198.51.100.0/33\"]\n",
        at: Some("/33"),
        says: &["198.51.100.0/33"],
    },
    Bad {
        file: "port_zero.toml",
        text: "cgroup = \"/bulkhead-check/port-zero\"\nmode = \"enforce\"\n\n\
               [[egress]]\nto = [\"192.0.2.1\"]\nports = [0]\nprotocol = \"tcp\"\n",
        at: Some("ports"),
        says: &["port"],
    },
    Bad {
        file: "port_too_big.toml",
        text: "cgroup = \"/bulkhead-check/port-too-big\"\nmode = \"enforce\"\n\n\
               [[egress]]\nto = [\"192.0.2.1\"]\nports = [443, 70000]\n",
        at: Some("70000"),
        says: &["70000"],
    },
    Bad {
        file: "inverted_range.toml",
        text: "cgroup = \"/bulkhead-check/inverted\"\nmode = \"enforce\"\n\n\
               [[egress]]\nto = [\"192.0.2.1\"]\nports = [\"9000-8000\"]\n",
        at: Some("9000-8000"),
        says: &["9000", "8000"],
    },
    Bad {
        file: "not_toml.toml",
        text: "cgroup = \"/bulkhead-check/not-toml\"\nmode = \"enforce\"\nthis is not toml\n",
        at: Some("this is not toml"),
        says: &[],
    },
    Bad {
        file: "missing_mode.toml",
        text: "cgroup = \"/bulkhead-check/missing-mode\"\n\n[[egress]]\nto = [\"192.0.2.1\"]\n",
        at: None,
        says: &["mode"],
    },
];

/// Two files claiming one service name: `name` is on line 1 of each.
const DUP_A: &str = "name = \"shared\"\ncgroup = \"/bulkhead-check/dup-a\"\nmode = \"enforce\"\n";
const DUP_B: &str = "name = \"shared\"\ncgroup = \"/bulkhead-check/dup-b\"\nmode = \"audit\"\n";

/// A valid policy using every part of the format.
const GOOD: &str = r#"# Every field of the format, valid.
name = "billing"
unit = "billing.service"
mode = "audit"

[[egress]]
to = ["192.0.2.0/24", "2001:db8::/64", "127.0.0.1", "::1"]
ports = [5432, "8000-8100"]
protocol = "tcp"

[[egress]]
to = ["198.51.100.7"]
protocol = "udp"

[[egress]]
to = ["203.0.113.0/24", "2001:db8:1::1"]
ports = [1, 65535]
protocol = "any"
"#;

const GOOD_MINIMAL: &str = "cgroup = \"/bulkhead-check/web\"\nmode = \"enforce\"\n";

/// An error line of `stderr` for `file`: `(path, line, col, message)`.
fn errors_for(stderr: &str, file: &str) -> Vec<(PathBuf, u32, u32, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let start = l.find(&format!("{file}:"))?;
            let path_end = start + file.len();
            let path = PathBuf::from(&l[..path_end]);
            let mut rest = l[path_end + 1..].splitn(3, ':');
            let line = rest.next()?.trim().parse().ok()?;
            let col = rest.next()?.trim().parse().ok()?;
            let msg = rest.next()?.trim().to_owned();
            Some((path, line, col, msg))
        })
        .collect()
}

/// 1-based number of the line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> u32 {
    let index = text
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("test bug: {needle:?} is in no line"));
    u32::try_from(index + 1).expect("test policies are short")
}

/// Asserts `stderr` reports `bad` correctly, with the path of a real file.
fn assert_reported(stderr: &str, bad: &Bad) {
    let found = errors_for(stderr, bad.file);
    let want_line = bad.at.map(|at| line_of(bad.text, at));
    let good = found.iter().find(|(path, line, col, msg)| {
        let msg = msg.to_lowercase();
        path.is_file()
            && want_line.is_none_or(|want| *line == want)
            && *col >= 1
            && bad.says.iter().all(|s| msg.contains(&s.to_lowercase()))
    });
    assert!(
        good.is_some(),
        "no `PATH:LINE:COL: message` error for {} (expected line {want_line:?}, \
         message mentioning {:?}); found {found:?}; stderr:\n{stderr}",
        bad.file,
        bad.says
    );
}

fn bad_dir() -> PolicyDir {
    let dir = PolicyDir::new();
    for bad in BAD {
        dir.write(bad.file, bad.text);
    }
    dir.write("dup_a.toml", DUP_A);
    dir.write("dup_b.toml", DUP_B);
    dir.write("good.toml", GOOD);
    dir
}

#[test]
fn check_reports_every_error_with_file_and_line() {
    let dir = bad_dir();
    let out = bulkhead(&[
        OsStr::new("check"),
        OsStr::new("--policy-dir"),
        dir.path().as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check of a bad policy dir should exit 1, got {}; stderr:\n{stderr}",
        out.status
    );
    for bad in BAD {
        assert_reported(&stderr, bad);
    }
    let dup: Vec<_> = errors_for(&stderr, "dup_a.toml")
        .into_iter()
        .chain(errors_for(&stderr, "dup_b.toml"))
        .filter(|(_, line, _, msg)| *line == 1 && msg.contains("shared"))
        .collect();
    assert!(
        !dup.is_empty(),
        "the service named \"shared\" in dup_a.toml and dup_b.toml is not reported at \
         line 1 of either; stderr:\n{stderr}"
    );
    assert!(
        errors_for(&stderr, "good.toml").is_empty(),
        "good.toml is valid but was blamed; stderr:\n{stderr}"
    );
}

#[test]
fn check_takes_files_too() {
    let dir = bad_dir();
    let good = dir.path().join("good.toml");
    let out = bulkhead(&[OsStr::new("check"), good.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check of one valid file should exit 0; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cidr = dir.path().join("bad_cidr.toml");
    let big = dir.path().join("port_too_big.toml");
    let out = bulkhead(&[
        OsStr::new("check"),
        good.as_os_str(),
        cidr.as_os_str(),
        big.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check with two bad files should exit 1; stderr:\n{stderr}"
    );
    for bad in BAD
        .iter()
        .filter(|b| matches!(b.file, "bad_cidr.toml" | "port_too_big.toml"))
    {
        assert_reported(&stderr, bad);
    }
    for bad in BAD
        .iter()
        .filter(|b| !matches!(b.file, "bad_cidr.toml" | "port_too_big.toml"))
    {
        assert!(
            errors_for(&stderr, bad.file).is_empty(),
            "{} was not given to check but is reported; stderr:\n{stderr}",
            bad.file
        );
    }
}

#[test]
fn check_accepts_a_valid_policy_dir() {
    let dir = PolicyDir::with(&[
        ("billing.toml", GOOD),
        ("web.toml", GOOD_MINIMAL),
        // Not policies: only `*.toml` directly in the directory count.
        ("README.md", "this is not toml [[["),
    ]);
    std::fs::create_dir(dir.path().join("sub")).expect("create a subdirectory");
    dir.write("sub/broken.toml", "this is not toml [[[");
    let out = bulkhead(&[
        OsStr::new("check"),
        OsStr::new("--policy-dir"),
        dir.path().as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check of a valid policy dir (with a README.md and a sub/ to ignore) should exit 0; \
         stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_accepts_the_example_policies() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let count = std::fs::read_dir(&examples).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension() == Some(OsStr::new("toml")))
            .count()
    });
    assert!(
        count > 0,
        "{} holds no example policy (*.toml) yet",
        examples.display()
    );
    // Their content is what is judged here: the checkout belongs to
    // whoever cloned it, which the agent would refuse (tested below).
    let out = bulkhead(&[
        OsStr::new("check"),
        OsStr::new("--allow-insecure-policy-files"),
        OsStr::new("--policy-dir"),
        examples.as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the example policies in {} should pass check; stderr:\n{}",
        examples.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_a_bad_policy_dir_and_loads_nothing() {
    if !require_bpf() {
        return;
    }
    let dir = bad_dir();
    let before = ProgSnapshot::take();
    let mut daemon = Daemon::spawn_run(&[OsStr::new("--policy-dir"), dir.path().as_os_str()]);
    let status = daemon.wait_exit(Duration::from_secs(20));
    let log = daemon.log();
    assert_eq!(
        status.code(),
        Some(1),
        "run on a bad policy dir should exit 1, got {status} (its log follows)"
    );
    let ready: Vec<_> = daemon
        .notifications()
        .into_iter()
        .filter(|n| n.lines().any(|l| l == "READY=1"))
        .collect();
    assert!(
        ready.is_empty(),
        "bulkhead sent READY=1 on a bad policy: {ready:?}"
    );
    for bad in BAD {
        assert!(
            !errors_for(&log, bad.file).is_empty(),
            "run's stderr does not report {} (its log follows)",
            bad.file
        );
    }
    let left = before.orphans_since(Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "run on a bad policy dir left programs loaded: {left:?}"
    );
}

/// `bulkhead check ARGS` as (exit code, stdout, stderr).
fn check(args: &[&OsStr]) -> (Option<i32>, String, String) {
    let mut all = vec![OsStr::new("check")];
    all.extend_from_slice(args);
    let out: Output = bulkhead(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const UNKNOWN_KEY: &str = "cgroup = \"/bulkhead-check/formats\"\nmode = \"enforce\"\nbogus = 1\n";
const UNKNOWN_KEY_MESSAGE: &str = "unknown key `bogus`; expected one of: name, description, unit, \
                                   user, cgroup, mode, egress, ingress, bind, sockets, observe_lookups";

/// The same error in each format: text on stderr, one JSON object, and a
/// GitHub Actions `::error` annotation at the file, line and column.
#[test]
fn check_formats_text_json_and_github() {
    let dir = PolicyDir::with(&[("svc.toml", UNKNOWN_KEY)]);
    let file = dir.path().join("svc.toml");
    let at = format!("{}:3:1", file.display());
    let args = |format: &'static str| {
        vec![
            OsStr::new("--format"),
            OsStr::new(format),
            OsStr::new("--policy-dir"),
            dir.path().as_os_str(),
        ]
    };

    let text = (
        Some(1),
        String::new(),
        format!("{at}: {UNKNOWN_KEY_MESSAGE}\n1 error(s); nothing was loaded\n"),
    );
    assert_eq!(check(&args("text")), text, "--format text");
    assert_eq!(
        check(&[OsStr::new("--policy-dir"), dir.path().as_os_str()]),
        text,
        "text is the default"
    );

    assert_eq!(
        check(&args("github")),
        (
            Some(1),
            format!(
                "::error file={},line=3,col=1::{UNKNOWN_KEY_MESSAGE}\n1 error(s); nothing was loaded\n",
                file.display()
            ),
            String::new()
        ),
        "--format github"
    );

    let (code, stdout, stderr) = check(&args("json"));
    assert_eq!((code, stderr.as_str()), (Some(1), ""), "--format json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout).expect("--format json prints JSON"),
        json!({
            "valid": false,
            "errors": [{"file": file.display().to_string(), "line": 3, "column": 1,
                        "message": UNKNOWN_KEY_MESSAGE}],
            "warnings": [],
            "services": [],
            "totals": null,
        }),
        "--format json"
    );
}

/// A valid set: its summary counts every kind of rule, in text and JSON.
#[test]
fn check_counts_ingress_bind_and_socket_rules() {
    let policy = "cgroup = \"/bulkhead-check/counted\"\nmode = \"enforce\"\n\n\
                  [[egress]]\nto = [\"198.51.100.0/24\"]\nports = [443]\n\n\
                  [[ingress]]\nfrom = [\"203.0.113.0/24\", \"2001:db8::/32\"]\nports = [8080]\n\n\
                  [[ingress]]\nfrom = [\"198.51.100.7\"]\n\n\
                  [bind]\nports = [8080]\n\n\
                  [sockets]\nraw = true\nprotocols = [\"sctp\"]\n";
    let dir = PolicyDir::with(&[("counted.toml", policy)]);
    let file = dir.path().join("counted.toml");
    assert_eq!(
        check(&[OsStr::new("--policy-dir"), dir.path().as_os_str()]),
        (
            Some(0),
            format!(
                "ok: counted (cgroup /bulkhead-check/counted, enforce): 1 egress, 2 ingress, 1 bind and 2 socket rules, from {}\n\
                 1 services, 6 rules (1 egress, 2 ingress, 1 bind, 2 socket), 3 IPv4 and 1 IPv6 prefixes: valid\n",
                file.display()
            ),
            String::new()
        )
    );
    let (code, stdout, _) = check(&[OsStr::new("--format"), OsStr::new("json"), file.as_os_str()]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (&v["valid"], &v["services"][0]["rules"], &v["totals"]),
        (
            &json!(true),
            &json!({"egress": 1, "ingress": 2, "bind": 1, "sockets": 2}),
            &json!({"services": 1, "rules": {"egress": 1, "ingress": 2, "bind": 1, "sockets": 2},
                    "ipv4_prefixes": 3, "ipv6_prefixes": 1})
        ),
        "{stdout}"
    );
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {mode:o} {}: {e}", path.display()));
}

/// `check` refuses the files `run` refuses (the same function judges
/// them): group- or world-writable, not root's, in a directory or named
/// one by one; `--allow-insecure-policy-files` makes them warnings, as
/// for `run`.
#[test]
fn check_refuses_the_files_the_agent_refuses() {
    if !require_bpf() {
        return; // chown needs root
    }
    let dir = PolicyDir::with(&[("web.toml", GOOD_MINIMAL)]);
    let file = dir.path().join("web.toml");
    let mode = format!(
        "{}:0:0: mode 0666 is group- or world-writable: refused (chmod go-w)",
        file.display()
    );
    chmod(&file, 0o666);
    for args in [
        vec![OsStr::new("--policy-dir"), dir.path().as_os_str()],
        vec![file.as_os_str()],
    ] {
        assert_eq!(
            check(&args),
            (
                Some(1),
                String::new(),
                format!("{mode}\n1 error(s); nothing was loaded\n")
            ),
            "check {args:?} of a 0666 file"
        );
    }
    let (code, stdout, stderr) = check(&[
        OsStr::new("--allow-insecure-policy-files"),
        OsStr::new("--format"),
        OsStr::new("github"),
        file.as_os_str(),
    ]);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(0), ""),
        "allowed with the override: {stdout}"
    );
    assert_eq!(
        stdout.lines().next(),
        Some(
            format!(
                "::warning file={}::mode 0666 is group- or world-writable: refused (chmod go-w)",
                file.display()
            )
            .as_str()
        ),
        "{stdout}"
    );
    chmod(&file, 0o644);

    chown(&file, Some(65534), Some(65534))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", file.display()));
    let (code, _, stderr) = check(&[OsStr::new("--policy-dir"), dir.path().as_os_str()]);
    assert_eq!(code, Some(1), "a file owned by uid 65534: {stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{}:0:0: owned by uid 65534, not root: refused",
            file.display()
        )),
        "{stderr}"
    );
    chown(&file, Some(0), Some(0))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", file.display()));

    chmod(dir.path(), 0o777);
    let (code, _, stderr) = check(&[OsStr::new("--policy-dir"), dir.path().as_os_str()]);
    assert_eq!(
        (code, stderr),
        (
            Some(1),
            format!(
                "{}:0:0: mode 0777 is group- or world-writable: refused (chmod go-w)\n\
                 1 error(s); nothing was loaded\n",
                dir.path().display()
            )
        ),
        "a world-writable policy directory"
    );
    chmod(dir.path(), 0o700);
}
