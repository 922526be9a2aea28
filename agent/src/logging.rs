//! Log set-up: to stderr by default (plain lines without timestamps under
//! systemd, whose journal stamps them), or appended to a file (`log_file`,
//! `--log-file`); RUST_LOG or `--log-level` choose the level.

use std::{fs::OpenOptions, os::unix::fs::OpenOptionsExt, path::Path, sync::Mutex};

use tracing_subscriber::{fmt, EnvFilter};

/// Sets up logging; with `file`, log lines go there (created 0640 with its
/// directory) instead of stderr.
///
/// # Errors
/// The log file cannot be opened.
pub fn init(level: &str, file: Option<&Path>) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt().with_env_filter(filter).with_target(false);
    // try_init: a second init (in tests) is not an error worth dying for.
    if let Some(path) = file {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        let _ = builder
            .with_ansi(false)
            .with_writer(Mutex::new(out))
            .try_init();
        return Ok(());
    }
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colour only for a person at a terminal, never in files or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = builder.with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if under_journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}
