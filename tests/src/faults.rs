//! The agent's test-only fault seam (`BULKHEAD_TEST_FAULTS_FILE`): a file
//! listing the steps (`stage`, `switch`, `retire`) the daemon must fail.

use std::{ffi::OsStr, fs, path::PathBuf};

use crate::{daemon::Daemon, policy::PolicyDir};

/// The faults file of one daemon, in a temporary directory; nothing fails
/// until [`Faults::fail`].
#[derive(Debug)]
pub struct Faults {
    dir: tempfile::TempDir,
}

impl Faults {
    #[must_use]
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a tempdir: {e}")),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("faults")
    }

    /// [`Daemon::start_with_config`], with the seam pointed at this file.
    #[must_use]
    pub fn start(&self, policies: &PolicyDir, config: &str) -> Daemon {
        let path = self.path();
        Daemon::start_with_env(
            policies,
            config,
            &[("BULKHEAD_TEST_FAULTS_FILE", OsStr::new(&path))],
        )
    }

    /// From now on the daemon fails `step` every time.
    pub fn fail(&self, step: &str) {
        let path = self.path();
        fs::write(&path, format!("{step}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// From now on nothing fails.
    pub fn clear(&self) {
        let _ = fs::remove_file(self.path());
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}
