//! Bad input: `bulkhead check` names every error as `PATH:LINE:COL: message`
//! in one pass, `bulkhead run` refuses to start on it and loads nothing, and
//! valid policies (the repository's examples included) pass.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

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
    let out = bulkhead(&[
        OsStr::new("check"),
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
