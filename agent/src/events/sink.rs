//! The decision log: one JSON object per line, to a file or stdout.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
};

use super::model::FlowEvent;

pub enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    /// "-" is stdout; anything else a file, appended to, created 0640 with
    /// its directory.
    pub fn open(target: &str) -> io::Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout(BufWriter::new(io::stdout())));
        }
        let path = PathBuf::from(target);
        let out = BufWriter::new(open_file(&path)?);
        Ok(Sink::File { path, out })
    }

    pub fn write(&mut self, ev: &FlowEvent) -> io::Result<()> {
        let out: &mut dyn Write = match self {
            Sink::Stdout(w) => w,
            Sink::File { out, .. } => out,
        };
        serde_json::to_writer(&mut *out, ev).map_err(io::Error::other)?;
        out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File { out, .. } => out.flush(),
        }
    }

    /// Flushes and re-opens the file at the same path (logrotate's move
    /// then SIGHUP). Stdout needs nothing.
    pub fn reopen(&mut self) -> io::Result<()> {
        if let Sink::File { path, out } = self {
            out.flush()?;
            *out = BufWriter::new(open_file(path)?);
        }
        Ok(())
    }
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
