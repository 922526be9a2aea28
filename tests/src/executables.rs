//! Distinct executables for the process-identity tests: copies of one
//! binary under other paths (each its own file, so its own identity to the
//! kernel), symlinks to them, and a copy replaced on disk as an upgrade
//! does it; and client probes started ahead of what they are to do
//! ([`Waiting`]).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
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
        Self { dir }
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
