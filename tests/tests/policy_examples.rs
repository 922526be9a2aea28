//! The example policies shipped in the package (policies/*.toml and the
//! real services' ones in policies/examples/) stay valid and explained:
//! `bulkhead check` accepts each, and all of them at once (as they would
//! sit together in one policy directory), without a warning; and every rule
//! of the real services' examples says what it allows.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
};

use integration_tests::bulkhead;

/// The `*.toml` files directly in `dir` (relative to the workspace), sorted.
fn policies_in(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    found.sort();
    found
}

/// `bulkhead check FILES`, asserted to exit 0 without a warning.
fn assert_valid(files: &[PathBuf]) {
    let mut args = vec![OsStr::new("check")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let out = bulkhead(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("warning"),
        "bulkhead check {files:?}: {}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_example_policy_passes_check_alone_and_together() {
    let services = policies_in("policies/examples");
    let names: Vec<_> = services
        .iter()
        .filter_map(|p| p.file_stem()?.to_str())
        .collect();
    for expected in ["nginx", "nightly-backup", "postgresql", "sshd", "unbound"] {
        assert!(
            names.contains(&expected),
            "no policies/examples/{expected}.toml: {names:?}"
        );
    }
    let mut all = policies_in("policies");
    all.extend(services);
    for file in &all {
        assert_valid(std::slice::from_ref(file));
    }
    assert_valid(&all);
}

#[test]
fn every_rule_of_the_service_examples_says_what_it_allows() {
    for file in policies_in("policies/examples") {
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.first().is_some_and(|l| l.starts_with('#')),
            "{} does not start with a comment saying what the service is",
            file.display()
        );
        for (i, line) in lines.iter().enumerate() {
            let table = line.trim();
            if !table.starts_with('[') {
                continue;
            }
            let body: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| !l.trim_start().starts_with('['))
                .copied()
                .collect();
            let described = body
                .iter()
                .any(|l| l.trim_start().starts_with("description"));
            let commented = i > 0 && lines[i - 1].starts_with('#');
            assert!(
                described || commented,
                "{}:{}: {table} has neither a description nor a comment above it",
                file.display(),
                i + 1
            );
        }
    }
}
