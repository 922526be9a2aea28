//! Files the agent reads and writes in its state directory (names,
//! quarantines, graph, baselines), and the opening of policy files.
//!
//! The agent runs as root and these files decide what it enforces, so:
//! - they are opened without following symbolic links (`O_NOFOLLOW`) and
//!   what is checked is the opened file (`fstat` of the descriptor), never
//!   the path, which could be swapped between the check and the read;
//! - they are written whole or not at all (temporary file, then rename), so
//!   that a crash mid-write never leaves a torn file for the next agent;
//! - a damaged one never stops the agent: it is set aside as
//!   `NAME.corrupt-<unix seconds>`, an ERROR names the file and the problem,
//!   and `bulkhead_state_file_errors_total{file}` counts it.

use std::{
    collections::BTreeMap,
    fs::{self, File, Metadata},
    io::{self, Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use tracing::error;

/// The state files counted in the metric, each shown even at zero.
pub const FILES: [&str; 6] = [
    "quarantine.json",
    "anomaly.json",
    "graph.json",
    "names.json",
    "dns-learnt.json",
    "open-connections.json",
];

/// State files are small; anything larger is damage (or an attack on memory).
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// This boot of the kernel: state that names kernel things by numbers a
/// reboot starts again (`CLOCK_MONOTONIC` times, socket cookies) holds only
/// in the boot that saved it. Empty if unreadable.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Errors per state file since the agent started.
static ERRORS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Opens `path` for reading without following a symbolic link, without
/// blocking on a FIFO, closed on exec; returns it with its `fstat`.
///
/// # Errors
/// Cannot open; a symbolic link (said so plainly); not a regular file.
pub fn open_nofollow(path: &Path) -> io::Result<(File, Metadata)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            // O_NOFOLLOW on a link fails with ELOOP, whose text ("too many
            // levels of symbolic links") would mislead.
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a symbolic link: refused (links are not followed; put the file itself here)",
                )
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file: refused",
        ));
    }
    Ok((file, meta))
}

/// Only the agent's own user (root) may have written a file it trusts.
///
/// # Errors
/// Owned by another user, or group- or world-writable.
pub fn check_trusted(meta: &Metadata) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("owned by uid {}, not uid {euid}: refused", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "mode {:04o} is group- or world-writable: refused",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Reads the whole of an opened file, at most [`MAX_BYTES`].
///
/// # Errors
/// A read error, or a file larger than the bound.
pub fn read_all(mut file: File, meta: &Metadata) -> io::Result<Vec<u8>> {
    if meta.len() > MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {MAX_BYTES} allowed", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    io::Read::by_ref(&mut file)
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than the {MAX_BYTES} bytes allowed"),
        ));
    }
    Ok(bytes)
}

/// Reads the state file `dir/name`: `Ok(None)` when there is none.
///
/// # Errors
/// The file exists but is a link, not a regular file, not the agent's own,
/// writable by others, too large or unreadable: it is damaged (see
/// [`set_aside`]).
pub fn read(dir: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (file, meta) = match open_nofollow(&dir.join(name)) {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    check_trusted(&meta)?;
    read_all(file, &meta).map(Some)
}

/// Reads the state file `dir/name` and `parse`s it: `None` when there is
/// none, or when it is damaged (unreadable, or `parse` refuses it with the
/// problem), then set aside with `consequence` in the ERROR.
pub fn load<T>(
    dir: &Path,
    name: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
    consequence: &str,
) -> Option<T> {
    let problem = match read(dir, name) {
        Ok(None) => return None,
        Ok(Some(bytes)) => match parse(&bytes) {
            Ok(parsed) => return Some(parsed),
            Err(problem) => problem,
        },
        Err(e) => e.to_string(),
    };
    set_aside(dir, name, &problem, consequence);
    None
}

/// `entries` as a state file's bytes (`to_bytes` of the entries kept), at
/// most `limit` of them: the oldest (first) left out if they do not fit (a
/// state file over the limit would be read as damage). Returns the bytes
/// and how many were left out.
///
/// # Errors
/// Serialisation failed.
pub fn fitting<E>(
    entries: &[E],
    limit: u64,
    to_bytes: impl Fn(&[E]) -> serde_json::Result<Vec<u8>>,
) -> serde_json::Result<(Vec<u8>, usize)> {
    let mut from = 0;
    loop {
        let bytes = to_bytes(&entries[from..])?;
        let len = bytes.len() as u64;
        let left = entries.len() - from;
        if len <= limit || left == 0 {
            return Ok((bytes, from));
        }
        // Leave out about as many as the excess takes, one at least.
        let per_entry = (len / left as u64).max(1);
        let excess = usize::try_from((len - limit) / per_entry).unwrap_or(left);
        from += (excess + 1).min(left);
    }
}

/// A damaged state file: moved aside as `NAME.corrupt-<unix seconds>` (a
/// link is moved, not what it points to), an ERROR logged naming the file,
/// the problem and `consequence`, and counted. Returns where it went.
pub fn set_aside(dir: &Path, name: &str, problem: &str, consequence: &str) -> Option<PathBuf> {
    count(name);
    let path = dir.join(name);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.join(format!("{name}.corrupt-{secs}"));
    match fs::rename(&path, &aside) {
        Ok(()) => {
            error!(file = %path.display(), moved_to = %aside.display(), "damaged state file set aside: {problem}; {consequence}");
            Some(aside)
        }
        Err(e) => {
            error!(file = %path.display(), "damaged state file (and it cannot be set aside: {e}): {problem}; {consequence}");
            None
        }
    }
}

/// Counts one error of the state file `name`.
pub fn count(name: &str) {
    *ERRORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(name.to_string())
        .or_default() += 1;
}

/// Errors per state file since start ([`FILES`] always present).
#[must_use]
pub fn error_counts() -> Vec<(String, u64)> {
    let mut all: BTreeMap<String, u64> = FILES.iter().map(|f| ((*f).to_string(), 0)).collect();
    for (name, n) in ERRORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        all.insert(name.clone(), *n);
    }
    all.into_iter().collect()
}

/// Writes `dir/name` atomically: a new temporary file beside it (created
/// with `mode`, never through a link), flushed to disk, then renamed over
/// the old one, and the directory flushed. Creates `dir`.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    // A leftover from a crash (or anything planted there) goes first:
    // O_EXCL then refuses to write through whatever is in its place.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    // The rename itself reaches the disk.
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    use super::*;

    #[test]
    fn a_written_file_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_atomic(dir.path(), "x.json", b"{}", 0o600).expect("write");
        assert_eq!(
            read(dir.path(), "x.json").expect("read"),
            Some(b"{}".to_vec())
        );
        assert!(!dir.path().join("x.json.tmp").exists());
        assert_eq!(read(dir.path(), "absent.json").expect("absent"), None);
    }

    #[test]
    fn a_symbolic_link_is_refused_and_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("target"), b"{}").expect("write");
        symlink(dir.path().join("target"), dir.path().join("x.json")).expect("symlink");
        let err = read(dir.path(), "x.json").expect_err("a link");
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
    }

    #[test]
    fn a_fifo_or_directory_is_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("x.json");
        let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: a NUL-ended path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read(dir.path(), "x.json").expect_err("a fifo");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        fs::create_dir(dir.path().join("d.json")).expect("mkdir");
        let err = read(dir.path(), "d.json").expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_world_writable_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x.json");
        fs::write(&f, b"{}").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = read(dir.path(), "x.json").expect_err("writable by others");
        assert!(err.to_string().contains("mode 0666"), "{err}");
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("unit-test.json"), b"{").expect("write");
        let before = error_counts();
        let aside =
            set_aside(dir.path(), "unit-test.json", "not JSON", "ignored").expect("moved aside");
        assert!(!dir.path().join("unit-test.json").exists());
        assert_eq!(fs::read(&aside).expect("kept"), b"{");
        assert!(aside
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("unit-test.json.corrupt-")));
        let n = |c: &[(String, u64)]| {
            c.iter()
                .find(|(f, _)| f == "unit-test.json")
                .map_or(0, |(_, n)| *n)
        };
        assert_eq!(n(&error_counts()), n(&before) + 1);
        assert!(error_counts().iter().any(|(f, _)| f == "quarantine.json"));
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").expect("write");
        symlink(&victim, dir.path().join("x.json.tmp")).expect("symlink");
        write_atomic(dir.path(), "x.json", b"new", 0o600).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"keep");
        assert_eq!(fs::read(dir.path().join("x.json")).expect("x"), b"new");
    }
}
