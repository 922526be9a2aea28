//! The decision log: one JSON object per line, to a file or stdout.
//! Events are encoded into one buffer and written with one write per batch.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
};

use super::model::FlowEvent;

pub struct Sink {
    target: Target,
    buf: Vec<u8>,
    /// Events encoded in `buf`.
    pending: u64,
}

enum Target {
    Stdout,
    File { path: PathBuf, file: File },
}

impl Sink {
    /// "-" is stdout; anything else a file, appended to, created 0640 with
    /// its directory.
    pub fn open(target: &str) -> io::Result<Self> {
        let target = if target == "-" {
            Target::Stdout
        } else {
            let path = PathBuf::from(target);
            let file = open_file(&path)?;
            Target::File { path, file }
        };
        Ok(Self {
            target,
            buf: Vec::with_capacity(64 << 10),
            pending: 0,
        })
    }

    /// Encodes `ev` as one line, written by the next [`Sink::flush`].
    pub fn write(&mut self, ev: &FlowEvent) -> io::Result<()> {
        encode_line(ev, &mut self.buf)?;
        self.pending += 1;
        Ok(())
    }

    /// Adds lines encoded elsewhere (`events` of them), written by the
    /// next [`Sink::flush`].
    pub fn append_encoded(&mut self, lines: Vec<u8>, events: u64) {
        if self.buf.is_empty() && lines.capacity() >= self.buf.capacity() {
            self.buf = lines;
        } else {
            self.buf.extend_from_slice(&lines);
        }
        self.pending += events;
    }

    /// Bytes encoded but not yet written.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Events encoded but not yet written.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Writes what is encoded. On failure those events are dropped (the
    /// caller counts [`Sink::pending`] as lost), so a full disk does not
    /// grow memory.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = match &mut self.target {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&self.buf).and_then(|()| out.flush())
            }
            Target::File { file, .. } => file.write_all(&self.buf),
        };
        self.buf.clear();
        self.pending = 0;
        written
    }

    /// Flushes and re-opens the file at the same path (logrotate's move
    /// then SIGHUP). Stdout needs nothing.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.flush()?;
        if let Target::File { path, file } = &mut self.target {
            *file = open_file(path)?;
        }
        Ok(())
    }
}

/// Appends `ev` to `buf` as one JSON line; on failure `buf` is as it was.
pub fn encode_line(ev: &FlowEvent, buf: &mut Vec<u8>) -> io::Result<()> {
    let start = buf.len();
    if let Err(e) = super::json::encode(ev, buf) {
        buf.truncate(start);
        return Err(io::Error::other(e));
    }
    buf.push(b'\n');
    Ok(())
}

fn open_file(path: &std::path::Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}
