//! Log set-up: to stderr; plain lines without timestamps under systemd (the
//! journal stamps them), RUST_LOG or `--log-level` to choose the level.

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colour only for a person at a terminal, never in files or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    // try_init: a second init (in tests) is not an error worth dying for.
    let _ = if under_journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}
