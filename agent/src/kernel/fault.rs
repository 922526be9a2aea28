//! Fault injection for the real-kernel tests, where filling a map cannot
//! make a write fail: a delete never fails for lack of room, so a failed
//! retire cannot be provoked from outside.
//!
//! Test-only: it acts only when `BULKHEAD_TEST_FAULTS_FILE` names a file,
//! and then only while that file lists the step (one name per line:
//! `stage`, `switch`, `retire`). The integration tests set the variable;
//! nothing else should. Without it this is one environment lookup, made
//! once.

use std::{path::PathBuf, sync::OnceLock};

use super::KernelError;

pub const ENV: &str = "BULKHEAD_TEST_FAULTS_FILE";

fn file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
        .as_ref()
}

/// Fails `step` when the test asks for it.
pub fn inject(step: &'static str) -> Result<(), KernelError> {
    let Some(path) = file() else { return Ok(()) };
    let listed = std::fs::read_to_string(path)
        .map(|text| text.lines().any(|l| l.trim() == step))
        .unwrap_or(false);
    if listed {
        tracing::warn!(
            step,
            "{ENV}: failing this step on purpose (test fault injection)"
        );
        return Err(KernelError::Injected(step));
    }
    Ok(())
}
