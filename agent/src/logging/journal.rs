//! Log lines for the journal: each line prefixed with its syslog priority.

use std::{
    io::{self, Write},
    os::unix::fs::MetadataExt as _,
};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The syslog priority of a tracing level: ERROR 3 (err), WARN 4
/// (warning), INFO 6 (info), DEBUG and TRACE 7 (debug).
#[must_use]
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the stream systemd connected to the journal: it sets
/// `JOURNAL_STREAM=DEVICE:INODE` of that stream, which stays in the
/// environment of children whose stderr goes elsewhere, so the device and
/// inode are compared (as sd-daemon(3) says to).
#[must_use]
pub fn stderr_is_journal() -> bool {
    // /proc/self/fd/2 follows to the stream itself (a socket there).
    std::env::var_os("JOURNAL_STREAM")
        .is_some_and(|s| names(&s, std::path::Path::new("/proc/self/fd/2")))
}

/// Whether `journal_stream` (`DEVICE:INODE`) names the file at `path`.
fn names(journal_stream: &std::ffi::OsStr, path: &std::path::Path) -> bool {
    let Some((dev, ino)) = journal_stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Writes each line of what it is given to `out` with `<N>` before it.
pub struct PrefixedLines<W: Write> {
    prefix: [u8; 3],
    at_line_start: bool,
    out: W,
}

impl<W: Write> PrefixedLines<W> {
    pub fn new(priority: u8, out: W) -> Self {
        Self {
            prefix: [b'<', b'0' + priority.min(7), b'>'],
            at_line_start: true,
            out,
        }
    }
}

impl<W: Write> Write for PrefixedLines<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One write of the whole prefixed text: an event's lines stay
        // together on the stream.
        let mut lines = Vec::with_capacity(buf.len() + 16);
        for piece in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                lines.extend_from_slice(&self.prefix);
            }
            lines.extend_from_slice(piece);
            self.at_line_start = piece.ends_with(b"\n");
        }
        self.out.write_all(&lines)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// stderr, each event's lines prefixed with its level's priority.
pub(super) struct JournalStderr;

impl<'a> MakeWriter<'a> for JournalStderr {
    type Writer = PrefixedLines<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        PrefixedLines::new(priority(Level::INFO), io::stderr())
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        PrefixedLines::new(priority(*meta.level()), io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tracing::Level;

    use super::{priority, PrefixedLines};

    #[test]
    fn levels_map_to_the_journals_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    #[test]
    fn every_line_gets_the_prefix_also_across_writes() {
        let mut out = Vec::new();
        let mut w = PrefixedLines::new(4, &mut out);
        w.write_all(b"first\nsecond ").expect("write");
        w.write_all(b"half\n").expect("write");
        w.write_all(b"third\n").expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "<4>first\n<4>second half\n<4>third\n"
        );
    }

    #[test]
    fn journal_stream_must_name_the_stream_itself() {
        use std::os::unix::fs::MetadataExt as _;
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let meta = file.as_file().metadata().expect("metadata");
        let it = format!("{}:{}", meta.dev(), meta.ino());
        assert!(super::names(it.as_ref(), file.path()));
        let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
        assert!(!super::names(other.as_ref(), file.path()));
        assert!(!super::names("8:4242x".as_ref(), file.path()));
    }
}
