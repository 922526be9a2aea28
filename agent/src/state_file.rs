//! Files in the state directory (names, quarantines, graph, baselines) are
//! written the same way: whole or not at all, so that a crash mid-write
//! never leaves a torn file for the next agent to read.

use std::{fs, io, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

/// Writes `dir/name` atomically: a temporary file beside it (created with
/// `mode`), flushed to disk, then renamed over the old one. Creates `dir`.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, dir.join(name))
}
