//! Distinct executables for the process-identity tests: copies of one
//! binary under other paths (each its own file, so its own identity to the
//! kernel), symlinks to them, and a copy replaced on disk as an upgrade
//! does it; and client probes started ahead of what they are to do
//! ([`Waiting`]).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    probe::{Outcome, Probe},
    process::{kill, wait_deadline},
};

/// How long a started probe may take to say it is waiting, and a waiting
/// probe to finish once let go.
const STEP: Duration = Duration::from_secs(15);

/// A root-owned directory (mode 0755, under `/tmp`) of executables;
/// removed on `Drop`.
#[derive(Debug)]
pub struct Executables {
    dir: TempDir,
    /// [`Executables::on_own_ext4`]: the image the directory is mounted
    /// from (unmounted on `Drop`, before the directory goes).
    image: Option<TempDir>,
}

impl Executables {
    /// An empty directory.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-test-exe-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for executables: {e}"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.path().display()));
        Self { dir, image: None }
    }

    /// An empty directory that is the root of a new ext4 filesystem of its
    /// own (a loop device over an image file): a filesystem that reuses a
    /// freed inode number for its next new file, whatever `/tmp` is.
    #[must_use]
    pub fn on_own_ext4() -> Self {
        let image_dir = tempfile::Builder::new()
            .prefix("bulkhead-test-ext4-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for an image: {e}"));
        let image = image_dir.path().join("fs.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));
        let out = crate::process::output_with_timeout(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&image),
            crate::process::scaled(STEP),
        );
        assert!(
            out.status.success(),
            "mkfs.ext4 {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // A kernel that has loop as a module and no device node made ahead
        // (a test guest) loads it only when asked.
        if !Path::new("/dev/loop-control").exists() {
            let out = crate::process::output_with_timeout(
                std::process::Command::new("modprobe").arg("loop"),
                crate::process::scaled(STEP),
            );
            assert!(
                out.status.success(),
                "modprobe loop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut exes = Self::new();
        let image_path = image.to_string_lossy().into_owned();
        mount(&["-t", "ext4", "-o", "loop", &image_path], exes.dir.path());
        exes.image = Some(image_dir);
        fs::set_permissions(exes.dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", exes.dir.path().display()));
        exes
    }

    /// A new empty file `name` here: its path and inode number.
    fn empty_file(&self, name: &str) -> (PathBuf, u64) {
        let file = self.dir.path().join(name);
        fs::write(&file, b"").unwrap_or_else(|e| panic!("cannot create {}: {e}", file.display()));
        let ino = fs::metadata(&file)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", file.display()))
            .ino();
        (file, ino)
    }

    /// Makes 64 new (empty) files here, and panics if one gets inode
    /// number `ino`: the file that had it is still allocated.
    pub fn files_not_reusing(&self, ino: u64) {
        for i in 0..64 {
            let (copy, got) = self.empty_file(&format!("avoids-{ino}-{i}"));
            assert_ne!(
                got,
                ino,
                "{} got the inode of a file still held",
                copy.display()
            );
        }
    }

    /// Makes new files here until one gets inode number `ino` (freed by
    /// an upgrade: the filesystem hands the lowest free number out next),
    /// writes `bin` into it and returns its path; panics if none does
    /// within 64 files, as then the test would prove nothing.
    #[must_use]
    pub fn reusing_inode(&self, ino: u64, bin: &Path) -> PathBuf {
        for i in 0..64 {
            let (_, got) = self.empty_file(&format!("reuses-{ino}-{i}"));
            if got == ino {
                // Into the same inode (fs::copy truncates, not replaces).
                let copy = self.copy(bin, &format!("reuses-{ino}-{i}"));
                let now = fs::metadata(&copy).map(|m| m.ino()).ok();
                assert_eq!(
                    now,
                    Some(ino),
                    "{} was replaced, not written",
                    copy.display()
                );
                return copy;
            }
        }
        panic!(
            "no new file in {} got the freed inode {ino}",
            self.dir.path().display()
        );
    }

    /// Copies `bin` to `name` here (mode 0755) and returns the copy's path.
    #[expect(
        clippy::must_use_candidate,
        reason = "called for its effect; the path is a convenience"
    )]
    pub fn copy(&self, bin: &Path, name: &str) -> PathBuf {
        let to = self.dir.path().join(name);
        fs::copy(bin, &to)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", bin.display(), to.display()));
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", to.display()));
        to
    }

    /// A symlink `name` here pointing at `target`; returns its path.
    #[must_use]
    pub fn symlink(&self, target: &Path, name: &str) -> PathBuf {
        let link = self.dir.path().join(name);
        std::os::unix::fs::symlink(target, &link).unwrap_or_else(|e| {
            panic!(
                "cannot link {} to {}: {e}",
                link.display(),
                target.display()
            )
        });
        link
    }

    /// Replaces `path` with a fresh copy of `bin` as a package upgrade
    /// does: written beside it, then renamed over it (the old file lives on
    /// only in the processes running it).
    pub fn replace(&self, path: &Path, bin: &Path) {
        let name = path
            .file_name()
            .unwrap_or_else(|| panic!("test bug: {} has no file name", path.display()));
        let staged = self.copy(bin, &format!("{}.new", name.to_string_lossy()));
        fs::rename(&staged, path).unwrap_or_else(|e| {
            panic!(
                "cannot rename {} over {}: {e}",
                staged.display(),
                path.display()
            )
        });
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Executables {
    fn drop(&mut self) {
        if self.image.is_some() {
            // Lazily: a process of a test may still hold a file of it.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

impl Default for Executables {
    fn default() -> Self {
        Self::new()
    }
}

/// A client probe started ahead of its step: it has joined its cgroup and
/// printed `waiting`, and holds until [`Waiting::go`]. Killed on `Drop`.
#[derive(Debug)]
pub struct Waiting {
    child: Child,
    gate: TempDir,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Probe {
    /// Starts `what ADDRS` (e.g. `tcp-connect-each`) and returns once the
    /// probe is running and waiting to be let go.
    #[must_use]
    pub fn waiting(&self, what: &str, addrs: &[SocketAddr]) -> Waiting {
        let gate = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a tempdir: {e}"));
        let mut cmd = self.command();
        cmd.arg("--wait-for")
            .arg(gate.path().join("go"))
            .arg(what)
            .args(addrs.iter().map(ToString::to_string))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let waiting = Waiting {
            child,
            gate,
            lines,
            what: format!("{what} (started ahead)"),
        };
        match waiting.lines.recv_timeout(STEP) {
            Ok(line) if line == "waiting" => waiting,
            other => panic!("{cmd:?} did not start waiting: {other:?}"),
        }
    }
}

impl Waiting {
    /// The probe's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it go, waits for it to finish and returns what it reported.
    #[must_use]
    pub fn go(mut self) -> Outcome {
        let go = self.gate.path().join("go");
        fs::write(&go, b"").unwrap_or_else(|e| panic!("cannot write {}: {e}", go.display()));
        let status = wait_deadline(&mut self.child, STEP)
            .unwrap_or_else(|| panic!("{} still running {STEP:?} after being let go", self.what));
        assert!(status.success(), "{} could not run: {status}", self.what);
        let last = self.lines.iter().last().unwrap_or_default();
        Outcome::parse(self.what.clone(), &last)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// An overlay mounted over a directory of executables, its upper layer on
/// a tmpfs of its own: the layers on two filesystems, as a container's
/// image and its writable layer can be. Unmounted on `Drop`.
#[derive(Debug)]
pub struct Overlay {
    dir: TempDir,
}

impl Overlay {
    /// `lower` seen through an overlay at [`Overlay::path`].
    #[must_use]
    pub fn over(lower: &Executables) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-test-overlay-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a directory for an overlay: {e}"));
        let (layer, merged) = (dir.path().join("layer"), dir.path().join("merged"));
        for d in [&layer, &merged] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let overlay = Self { dir };
        mount(&["-t", "tmpfs", "tmpfs"], &layer);
        for d in ["upper", "work"] {
            fs::create_dir(layer.join(d)).unwrap_or_else(|e| panic!("cannot create {d}: {e}"));
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.path().display(),
            layer.join("upper").display(),
            layer.join("work").display()
        );
        mount(&["-t", "overlay", "overlay", "-o", &options], &merged);
        overlay
    }

    /// Where the overlay is mounted.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("merged")
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for d in ["merged", "layer"] {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path().join(d))
                .status();
        }
    }
}

fn mount(args: &[&str], at: &Path) {
    let out = crate::process::output_with_timeout(
        std::process::Command::new("mount").args(args).arg(at),
        STEP,
    );
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process of a service that forged its executable
/// (`tests/fixtures/forge_exe.c`, built with `cc`): as uid 65534, in a user
/// namespace of its own, it made `mm->exe_file` (and so `/proc/PID/exe`)
/// name `exe`. Killed on `Drop`.
#[derive(Debug)]
pub struct Forger {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdin: std::process::ChildStdin,
    _built: TempDir,
    /// Its pid.
    pub pid: u32,
    /// What `/proc/PID/exe` said once it forged.
    pub proc_exe: String,
}

impl Forger {
    /// Starts it in cgroup `service`, to connect to `addr` when asked;
    /// panics unless the forgery succeeded.
    #[must_use]
    pub fn start(service: &Path, exe: &Path, addr: SocketAddr) -> Self {
        Self::start_as(service, exe, addr, None)
    }

    /// The same, forged by a child that shares its memory map
    /// (`CLONE_VM | CLONE_VFORK`) from a user namespace of the child's
    /// own: the forger itself stays in the initial user namespace.
    #[must_use]
    pub fn start_sharing_mm(service: &Path, exe: &Path, addr: SocketAddr) -> Self {
        Self::start_as(service, exe, addr, Some("sharedmm"))
    }

    fn start_as(service: &Path, exe: &Path, addr: SocketAddr, mode: Option<&str>) -> Self {
        let built = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a tempdir: {e}"));
        let bin = built.path().join("forge");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/forge_exe.c");
        let out = crate::process::output_with_timeout(
            std::process::Command::new("cc")
                .arg("-O2")
                .arg("-o")
                .arg(&bin)
                .arg(&source),
            // A compiler under emulation (a guest kernel) is slow.
            crate::process::scaled(Duration::from_mins(1)),
        );
        assert!(
            out.status.success(),
            "cc {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        fs::set_permissions(built.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", built.path().display()));
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .arg(exe)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        crate::cgroup::join_on_exec(&mut cmd, service);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child
            .stdin
            .take()
            .unwrap_or_else(|| panic!("no stdin pipe"));
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let next = || {
            lines
                .recv_timeout(STEP)
                .unwrap_or_else(|e| panic!("the forger said nothing ({e})"))
        };
        let forged = next();
        assert_eq!(
            forged, "prctl(PR_SET_MM_MAP exe_fd) = 0",
            "the forgery itself"
        );
        let shown = next();
        let pid = shown
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {shown:?}"));
        let proc_exe = shown.rsplit("-> ").next().unwrap_or_default().to_owned();
        Self {
            child,
            lines,
            stdin,
            _built: built,
            pid,
            proc_exe,
        }
    }

    /// A forked child connects, then the forger itself: (the child's
    /// errno, 0 when connected; the forger's `connect()` result, 0 or `-errno`).
    #[must_use]
    pub fn connect(&mut self) -> (i64, i64) {
        use std::io::Write as _;
        self.stdin
            .write_all(b"g\n")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("cannot ask the forger: {e}"));
        let line = self
            .lines
            .recv_timeout(STEP)
            .unwrap_or_else(|e| panic!("the forger did not answer ({e})"));
        // "child connect: connected (errno 0); forger's own connect: 0"
        let number = |after: &str| -> i64 {
            line.split(after)
                .nth(1)
                .and_then(|rest| {
                    rest.trim_start()
                        .split(|c: char| c != '-' && !c.is_ascii_digit())
                        .next()
                })
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
        };
        (number("(errno"), number("own connect:"))
    }
}

impl Drop for Forger {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
