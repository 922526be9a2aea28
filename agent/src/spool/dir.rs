//! The spool directory on disk: its files' names, writing one whole or not
//! at all, reading one back, setting a damaged one aside, and the lock that
//! keeps a second agent out.
//!
//! The directory is the agent's alone (mode 0700, owned by its user) and
//! each file is 0600: the rows name services, addresses and policies.

use std::{
    fs::{self, DirBuilder, File},
    io::{self, Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        },
    },
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::state_file;

/// The subdirectory damaged files are moved to.
pub const SET_ASIDE: &str = "set-aside";
/// The lock file (held with `flock` while a spool is open).
pub const LOCK: &str = "lock";
const SUFFIX: &str = ".batch";
const TMP_SUFFIX: &str = ".batch.tmp";

/// A name found in the spool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A complete batch file, by its sequence number.
    Batch(u64),
    /// A batch file whose writing never finished (it was never renamed).
    Unfinished(u64),
    /// Anything else (left alone).
    Other,
}

/// The file name of the batch with sequence number `seq`: zero-padded, so
/// that names sort in sequence order.
#[must_use]
pub fn file_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

fn tmp_name(seq: u64) -> String {
    format!("{seq:020}{TMP_SUFFIX}")
}

/// What a directory entry's name is.
#[must_use]
pub fn parse_name(name: &str) -> Listed {
    let seq = |digits: &str| {
        if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse::<u64>().ok()
        } else {
            None
        }
    };
    if let Some(s) = name.strip_suffix(TMP_SUFFIX).and_then(seq) {
        return Listed::Unfinished(s);
    }
    if let Some(s) = name.strip_suffix(SUFFIX).and_then(seq) {
        return Listed::Batch(s);
    }
    Listed::Other
}

fn refused(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what)
}

/// Creates `dir` (and its parents) with mode 0700 if it is missing; checks
/// that it is a directory (not a symbolic link) owned by the agent's user,
/// and makes its mode 0700.
///
/// # Errors
/// It cannot be created or read, is a link or not a directory, or belongs
/// to another user.
pub fn ensure(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(refused(
            "is a symbolic link: refused (links are not followed)".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refused("not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(refused(format!(
            "owned by uid {}, not uid {euid}: refused",
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Takes the directory's lock, so that no two agents share one spool (each
/// would deliver the other's batches and set aside its unfinished files).
/// The lock lasts as long as the returned file is open; the kernel drops
/// it when the process dies.
///
/// # Errors
/// The lock file cannot be opened, or another process holds the lock.
pub fn lock(dir: &Path) -> io::Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(LOCK))?;
    // SAFETY: a valid descriptor, owned by `file` for the whole call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in use by another process (another agent holds its lock)",
            ));
        }
        return Err(e);
    }
    Ok(file)
}

/// The names in `dir`, as found (unsorted).
///
/// # Errors
/// The directory cannot be read.
pub fn list(dir: &Path) -> io::Result<Vec<(String, Listed)>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let listed = parse_name(&name);
        names.push((name, listed));
    }
    Ok(names)
}

/// Writes batch file `seq` whole or not at all: a new temporary file (mode
/// 0600, never through a link), flushed to disk, renamed to its name, and
/// the directory flushed so the rename survives a crash too.
///
/// # Errors
/// Any step failed (the temporary file is then removed).
pub fn write(dir: &Path, seq: u64, header: &[u8], body: &[u8]) -> io::Result<()> {
    let tmp = dir.join(tmp_name(seq));
    let written = write_then_rename(&tmp, &dir.join(file_name(seq)), header, body)
        .and_then(|()| sync_dir(dir));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_then_rename(tmp: &Path, path: &Path, header: &[u8], body: &[u8]) -> io::Result<()> {
    // A leftover of that name (planted, or a crash) goes first: O_EXCL then
    // refuses to write through whatever is in its place.
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    f.write_all(header)?;
    f.write_all(body)?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Reads a whole batch file: not through a link, a regular file, the
/// agent's own and writable by no one else.
///
/// # Errors
/// It cannot be opened or read, or fails those checks.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let (mut file, meta) = state_file::open_nofollow(path)?;
    state_file::check_trusted(&meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Removes a delivered batch file (already gone is fine). The directory is
/// not flushed: should the removal be lost in a crash, the batch is
/// delivered again, and its batch id makes that harmless.
///
/// # Errors
/// It exists and cannot be removed.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves the damaged file `name` into `dir/set-aside/` (created 0700 when
/// missing), with the time appended so that nothing there is overwritten.
/// Returns where it went.
///
/// # Errors
/// The subdirectory cannot be made, or the file cannot be moved.
pub fn set_aside(dir: &Path, name: &str) -> io::Result<PathBuf> {
    let aside_dir = dir.join(SET_ASIDE);
    ensure(&aside_dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let to = aside_dir.join(format!("{name}.{nanos}"));
    fs::rename(dir.join(name), &to)?;
    sync_dir(dir)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_sequence_order_and_parse_back() {
        assert_eq!(file_name(42), "00000000000000000042.batch");
        assert!(file_name(9) < file_name(10));
        assert_eq!(parse_name(&file_name(42)), Listed::Batch(42));
        assert_eq!(parse_name(&tmp_name(7)), Listed::Unfinished(7));
        for other in [
            "lock",
            "set-aside",
            "42.batch",
            "x0000000000000000042.batch",
            "",
        ] {
            assert_eq!(parse_name(other), Listed::Other, "{other}");
        }
    }
}
