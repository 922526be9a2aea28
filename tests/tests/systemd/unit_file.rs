//! The unit file, read like systemd reads it (the subset it uses).

use std::{fs, process::Command, time::Duration};

use integration_tests::{bulkhead_bin, process::output_with_timeout};

use super::{service_setting, text, tool, unit_path, unit_text};

/// The goal of issue 8: `systemd-analyze security` at most this (lower is
/// better).
const MAX_EXPOSURE: f64 = 2.5;

#[test]
fn unit_is_verified_clean_by_systemd_analyze() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    // verify checks that ExecStart= and ExecReload= are executable: point
    // them at the binary under test, in a copy named like the real unit.
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_text();
    let bin = bulkhead_bin();
    let rewritten = unit.replace("=/usr/bin/bulkhead ", &format!("={} ", bin.display()));
    for key in ["ExecStart", "ExecReload"] {
        assert!(
            rewritten.contains(&format!("\n{key}={} ", bin.display())),
            "the unit's {key}= does not run /usr/bin/bulkhead"
        );
    }
    let path = dir.path().join("bulkhead.service");
    fs::write(&path, rewritten).expect("write the unit copy");
    let out = output_with_timeout(
        Command::new(analyze).arg("verify").arg(&path),
        Duration::from_mins(1),
    );
    let said = text(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {} is not clean ({}):\n{said}",
        unit_path().display(),
        out.status
    );
}

/// The unit raises the open-file limit above systemd's default soft 1024
/// (issue 15: the agent's descriptors must not run out under load).
#[test]
fn unit_raises_the_open_file_limit() {
    let limit = service_setting(&unit_text(), "LimitNOFILE");
    let n: u64 = limit
        .parse()
        .unwrap_or_else(|e| panic!("LimitNOFILE={limit:?} is not one number: {e}"));
    assert!(n >= 65536, "LimitNOFILE={n}");
}

/// The overall exposure from `systemd-analyze security` output.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.split_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn unit_security_exposure_is_within_the_goal() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let out = output_with_timeout(
        Command::new(analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit_path()),
        Duration::from_mins(1),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let score = exposure(&report).unwrap_or_else(|| {
        panic!(
            "no overall exposure in systemd-analyze security's output ({}):\n{}",
            out.status,
            text(&out)
        )
    });
    assert!(
        score <= MAX_EXPOSURE,
        "systemd-analyze security rates {} at {score}, above the goal of {MAX_EXPOSURE}; \
         what it counts against the unit:\n{}",
        unit_path().display(),
        report
            .lines()
            .filter(|l| l.starts_with('✗'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn exposure_is_read_from_the_report() {
    let report = "  NAME   DESCRIPTION   EXPOSURE\n✗ PrivateNetwork=  ...  0.5\n\n\
                  → Overall exposure level for bulkhead.service: 1.8 OK 🙂\n";
    assert_eq!(exposure(report), Some(1.8));
    assert_eq!(exposure("nothing"), None);
}
