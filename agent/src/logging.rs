//! Log set-up: to stderr by default (plain lines without timestamps under
//! systemd, whose journal stamps them), or appended to a file (`log_file`,
//! `--log-file`); RUST_LOG or `--log-level` choose the level.
//!
//! When stderr is the journal's stream, every line starts with its syslog
//! priority, `<3>` to `<7>` (sd-daemon(3); systemd reads it with the
//! default `SyslogLevelPrefix=yes`), so `journalctl -p warning -u bulkhead`
//! shows warnings and errors only. Why prefixes rather than a journald
//! layer sending datagrams to the journal's socket: the lines stay on the
//! one stream systemd already gave us, in order with anything else written
//! there, with no new dependency and nothing to lose when that socket is
//! absent; a drop-in that sends stderr elsewhere turns them off by itself
//! (see [`stderr_is_journal`]).

mod journal;

use std::{fs::OpenOptions, os::unix::fs::OpenOptionsExt, path::Path, sync::Mutex};

use tracing_subscriber::{fmt, EnvFilter};

pub use journal::{priority, stderr_is_journal, PrefixedLines};

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
    if stderr_is_journal() {
        let _ = builder
            .with_ansi(false)
            .without_time()
            .with_writer(journal::JournalStderr)
            .try_init();
        return Ok(());
    }
    // Colour only for a person at a terminal, never in files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = builder
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    Ok(())
}
