//! Test cgroups under the cgroup2 mount: a "service" in a test is one of these.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// How long `Drop` keeps retrying `rmdir` while killed processes finish exiting.
const RMDIR_PATIENCE: Duration = Duration::from_secs(5);

/// The cgroup2 mount point, read from `/proc/self/mountinfo` (it is
/// `/sys/fs/cgroup` on a pure-v2 host and `/sys/fs/cgroup/unified` on a
/// hybrid one). Panics if there is none.
#[must_use]
pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
    parse_cgroup2_mount(&mountinfo)
        .unwrap_or_else(|| panic!("no cgroup2 file system is mounted (see /proc/self/mountinfo)"))
}

/// The mount point of the first `cgroup2` entry of a mountinfo text.
///
/// A line is `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
#[must_use]
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount
            .split_whitespace()
            .nth(4)
            .map(unescape)
            .map(PathBuf::from)
    })
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(code) = code {
            out.push(char::from(code));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// The systemd slice a policy's `unit = "x.service"` lives in.
const SYSTEM_SLICE: &str = "system.slice";

/// A uniquely named cgroup `bulkhead-test-<pid>-<n>` directly under the
/// cgroup2 mount (or `system.slice/bulkhead-test-<pid>-<n>.service`, see
/// [`Self::unit`]). On `Drop` it kills every process left in it or in any
/// descendant, moves stragglers to the root cgroup and removes the whole
/// tree. `Drop` never panics; a failure is printed to stderr.
#[derive(Debug)]
pub struct CgroupGuard {
    root: PathBuf,
    path: PathBuf,
    /// Parents this guard had to create (`system.slice`, slices of
    /// [`Self::at`]), deepest first: removed after it, if empty.
    made_parents: Vec<PathBuf>,
}

/// A name no other test (of this run or another) uses:
/// `<stem>-<pid>-<n>`.
#[must_use]
pub fn unique_name(stem: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{stem}-{}-{n}", std::process::id())
}

impl CgroupGuard {
    /// Creates a fresh cgroup; panics if it cannot.
    #[must_use]
    pub fn new() -> Self {
        Self::create("", "")
    }

    /// Creates a fresh cgroup where systemd would put a service unit:
    /// `system.slice/bulkhead-test-<pid>-<n>.service` (making `system.slice`
    /// if the host has none, as here where PID 1 is not systemd).
    /// [`Self::unit_name`] is what a policy's `unit = "..."` names.
    #[must_use]
    pub fn unit() -> Self {
        Self::create(SYSTEM_SLICE, ".service")
    }

    /// Creates the cgroup `rel` (relative to the cgroup2 mount, e.g.
    /// `"system.slice/system-x.slice/x@a.service"`), making its missing
    /// parents, as systemd does for units in other slices (`Slice=`,
    /// template instances, user managers). Panics if `rel` exists.
    #[must_use]
    pub fn at(rel: &str) -> Self {
        let root = cgroup2_mount();
        let path = root.join(rel);
        let mut made_parents = Vec::new();
        let mut dir = root.clone();
        if let Some(parent) = Path::new(rel).parent() {
            for part in parent.components() {
                dir.push(part);
                match fs::create_dir(&dir) {
                    Ok(()) => made_parents.insert(0, dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("cannot create cgroup {}: {e}", dir.display()),
                }
            }
        }
        let guard = Self {
            root,
            path,
            made_parents,
        };
        fs::create_dir(&guard.path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", guard.path.display()));
        guard
    }

    fn create(parent: &str, suffix: &str) -> Self {
        let root = cgroup2_mount();
        let dir = if parent.is_empty() {
            root.clone()
        } else {
            root.join(parent)
        };
        let made_parents = match fs::create_dir(&dir) {
            Ok(()) => vec![dir.clone()],
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Vec::new(),
            Err(e) => panic!("cannot create cgroup {}: {e}", dir.display()),
        };
        loop {
            let path = dir.join(format!("{}{suffix}", unique_name("bulkhead-test")));
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Self {
                        root,
                        path,
                        made_parents,
                    }
                }
                // Left over by an earlier run that reused our pid: take the next n.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    for made in &made_parents {
                        let _ = fs::remove_dir(made);
                    }
                    panic!("cannot create cgroup {}: {e}", path.display());
                }
            }
        }
    }

    /// The unit name of a guard made by [`Self::unit`]
    /// (`bulkhead-test-<pid>-<n>.service`).
    #[must_use]
    pub fn unit_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The cgroup's directory (absolute file-system path).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel gives the cgroup (its directory's inode number), as
    /// events carry it in `cgroup_id`.
    #[must_use]
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", self.path.display()))
            .ino()
    }

    /// The cgroup's path relative to the cgroup2 mount, as a policy's
    /// `cgroup = "..."` names it: `/bulkhead-test-<pid>-<n>`.
    #[must_use]
    pub fn policy_path(&self) -> String {
        let rel = self.path.strip_prefix(&self.root).unwrap_or(&self.path);
        format!("/{}", rel.display())
    }

    /// Creates the descendant cgroup `rel` (e.g. `"worker/inner"`, parents
    /// included) and returns its directory.
    #[must_use]
    pub fn child(&self, rel: &str) -> PathBuf {
        let path = self.path.join(rel);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        path
    }

    /// Removes the (empty) cgroup directory, as systemd does when a unit
    /// stops; [`Self::create_again`] makes it again. `Drop` copes with either.
    pub fn remove(&self) {
        fs::remove_dir(&self.path)
            .unwrap_or_else(|e| panic!("cannot remove cgroup {}: {e}", self.path.display()));
    }

    /// Makes the cgroup again at the same path after [`Self::remove`], as
    /// systemd does when a unit starts again: same path, new cgroup id.
    pub fn create_again(&self) {
        fs::create_dir(&self.path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", self.path.display()));
    }

    /// The pids currently in this cgroup and all its descendants.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        tree_deepest_first(&self.path)
            .iter()
            .flat_map(|dir| procs(dir))
            .collect()
    }

    fn cleanup(&self) -> Result<(), String> {
        // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree at once.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + RMDIR_PATIENCE;
        for dir in tree_deepest_first(&self.path) {
            loop {
                for pid in procs(&dir) {
                    // Kill, then move out so the directory can go even if
                    // the process is slow to die. Errors mean it is gone.
                    crate::process::signal(pid, libc::SIGKILL);
                    let _ = fs::write(self.root.join("cgroup.procs"), format!("{pid}\n"));
                }
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(format!("rmdir {}: {e}", dir.display()));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }
}

impl Default for CgroupGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!(
                "CLEANUP FAILED: cgroup {} is left behind: {e}",
                self.path.display()
            );
        }
        // Only if empty: another test run may have its own unit in there.
        for made in &self.made_parents {
            let _ = fs::remove_dir(made);
        }
    }
}

/// The pids listed in `dir/cgroup.procs` (none if it cannot be read).
fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `dir` and every cgroup below it, children before their parents.
fn tree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(tree_deepest_first(&entry.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// Makes `command`'s process join the cgroup `dir` between fork and exec
/// (it writes "0", itself, to `cgroup.procs`), so that everything it does
/// is the service's.
pub fn join_on_exec(command: &mut std::process::Command, dir: &Path) {
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .unwrap_or_else(|e| panic!("test bug: cgroup path {}: {e}", dir.display()));
    // SAFETY: open(2), write(2) and close(2) are async-signal-safe; the
    // path was made before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if wrote != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 33 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 33 0:39 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_pure_v2_mount_and_unescapes_spaces() {
        let pure = "30 25 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "30 25 0:26 / /mnt/my\\040cg rw - cgroup2 none rw";
        assert_eq!(
            parse_cgroup2_mount(spaced),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        let v1_only = "42 33 0:39 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu";
        assert_eq!(parse_cgroup2_mount(v1_only), None);
    }
}
