//! The decision log: one JSON object per line, to a file or stdout.
//! Events are encoded into one buffer and written with one write per batch.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
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
    File {
        path: PathBuf,
        file: File,
        group: Option<u32>,
    },
}

/// The decision log's mode: the owner writes, the group (a log shipper's)
/// reads, others nothing. Set explicitly on every open, so the unit's
/// `UMask=` (0077) does not decide it.
pub const LOG_FILE_MODE: u32 = 0o640;

impl Sink {
    /// "-" is stdout; anything else a file, appended to, created with its
    /// directory, and kept at [`LOG_FILE_MODE`] with the agent's group.
    pub fn open(target: &str) -> io::Result<Self> {
        Self::open_for_group(target, None)
    }

    /// Like [`Sink::open`], a file also handed to group id `group` (on
    /// every open: a rotated log's new file too).
    pub fn open_for_group(target: &str, group: Option<u32>) -> io::Result<Self> {
        let target = if target == "-" {
            Target::Stdout
        } else {
            let path = PathBuf::from(target);
            let file = open_file(&path, group)?;
            Target::File { path, file, group }
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
        if let Target::File { path, file, group } = &mut self.target {
            *file = open_file(path, *group)?;
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

fn open_file(path: &std::path::Path, group: Option<u32>) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_FILE_MODE)
        .open(path)?;
    // Mode and group for regular files only: never for /dev/null or a
    // FIFO a test or a shipper passes as the sink.
    if file.metadata()?.file_type().is_file() {
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give {} to group id {gid} ({e}): the agent must be a member \
                         (the unit's SupplementaryGroups=)",
                        path.display()
                    ),
                )
            })?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(LOG_FILE_MODE))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::{Sink, LOG_FILE_MODE};

    /// A group other than ours that we may give files to: nogroup as root,
    /// our own group otherwise.
    fn some_group() -> u32 {
        // SAFETY: getters without arguments.
        if unsafe { libc::geteuid() } == 0 {
            65_534
        } else {
            unsafe { libc::getegid() }
        }
    }

    #[test]
    fn the_log_is_0640_with_its_group_on_open_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        // A file left at 0600 (as the unit's UMask=0077 made it before).
        std::fs::write(&path, "").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let gid = some_group();
        let mut sink =
            Sink::open_for_group(path.to_str().expect("utf-8"), Some(gid)).expect("opens");
        let meta = std::fs::metadata(&path).expect("exists");
        assert_eq!(meta.mode() & 0o7777, LOG_FILE_MODE);
        assert_eq!(meta.gid(), gid);

        // Rotated away: the new file gets the same.
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).expect("rename");
        sink.reopen().expect("re-opens");
        let meta = std::fs::metadata(&path).expect("re-created");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.gid(), gid);
    }

    #[test]
    fn a_device_sink_keeps_its_mode() {
        let before = std::fs::metadata("/dev/null").expect("/dev/null").mode();
        let _sink = Sink::open_for_group("/dev/null", Some(some_group())).expect("opens");
        assert_eq!(
            std::fs::metadata("/dev/null").expect("/dev/null").mode(),
            before
        );
    }
}
