//! The agent's state directory as the tests see it: damaged files set
//! aside, logged and counted (docs/operations.md, "State files").

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{
    http::metrics_addr,
    prometheus::{sample_count, scrape},
    Daemon,
};

/// The files `name.corrupt-*` in `dir`.
#[must_use]
pub fn set_aside(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}.corrupt-");
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// `bulkhead_state_file_errors_total{file}` now.
#[must_use]
pub fn errors_counted(daemon: &Daemon, file: &str) -> Option<u64> {
    sample_count(
        &scrape(metrics_addr(daemon)),
        "bulkhead_state_file_errors_total",
        &[("file", file)],
    )
}

/// The damage is set aside byte for byte, the ERROR names the file, the
/// counter says one.
pub fn assert_handled(daemon: &Daemon, state: &Path, name: &str, garbage: &[u8]) {
    let aside = set_aside(state, name);
    assert_eq!(aside.len(), 1, "{name} set aside once: {aside:?}");
    assert_eq!(
        fs::read(&aside[0]).expect("the damaged file is kept"),
        garbage
    );
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("damaged state file set aside")
            && l.contains(name)),
        "no ERROR naming {name}:\n{log}"
    );
    assert_eq!(errors_counted(daemon, name), Some(1), "{name} counted");
}
