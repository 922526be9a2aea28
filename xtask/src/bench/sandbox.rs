//! Where each case runs: its own cgroup (the "service") and its own network
//! namespace. The namespace keeps the peers' rules away from the host (a
//! 100,000-rule OUTPUT chain in the host namespace would slow everyone's
//! traffic, and an iptables-legacy table cannot be unregistered once
//! created) and gives every case a clean loopback. Everything is removed by
//! guards that also run on error and panic; Ctrl-C is turned into an error
//! so they run then too.

use std::{
    fs, io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::output_of;

/// Every cgroup and namespace the bench makes starts with this, so a run
/// killed with SIGKILL can be cleaned up by the next one.
pub const PREFIX: &str = "bulkhead-bench-";

/// A cgroup under the cgroup2 mount, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(mount: &Path, name: &str) -> Result<Self> {
        let path = mount.join(name);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The load generator has been reaped, but the kernel may take a
        // moment to see the cgroup empty.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!(
            "xtask bench: WARNING: could not remove cgroup {}",
            self.path.display()
        );
    }
}

/// A network namespace with loopback up, deleted on drop (with every
/// nftables and iptables rule loaded into it).
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_quiet(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("create network namespace {name}"))?;
        let ns = Self {
            name: name.to_owned(),
            path: Path::new("/run/netns").join(name),
        };
        run_quiet(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))
            .with_context(|| format!("bring up lo in {name}"))?;
        Ok(ns)
    }

    /// `cmd`, run inside this namespace. Only the network namespace changes
    /// (unlike `ip netns exec`, which also remounts /sys and so hides the
    /// cgroup tree that `nft` resolves `socket cgroupv2` paths in).
    pub fn command(&self, program: &str) -> Result<Command> {
        let file =
            fs::File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; `file` moves into the closure
        // and stays open until the command has been spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_quiet(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "xtask bench: WARNING: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Held for the whole run: two benches at once would share the machine's
/// two cores (and the stale clean-up below would take the other's cases).
pub struct RunLock(#[allow(dead_code, reason = "held for its Drop (unlock)")] fs::File);

pub fn lock() -> Result<RunLock> {
    let path = Path::new("/run/lock/bulkhead-bench.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: a valid fd; the lock goes when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `cargo xtask bench` is running (it holds {})",
            path.display()
        );
    }
    Ok(RunLock(file))
}

/// Removes namespaces and cgroups left by a bench that was killed.
pub fn remove_stale(mount: &Path) {
    let names = output_of(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with(PREFIX) {
            eprintln!("xtask bench: removing stale network namespace {name}");
            let _ = run_quiet(Command::new("ip").args(["netns", "del", name]));
        }
    }
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            eprintln!(
                "xtask bench: removing stale cgroup {}",
                entry.path().display()
            );
            if let Err(e) = fs::remove_dir(entry.path()) {
                eprintln!("xtask bench: WARNING: {}: {e}", entry.path().display());
            }
        }
    }
}

/// The cgroup2 mount point from /proc/self/mountinfo (`/sys/fs/cgroup` on a
/// pure-v2 host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            // mountinfo escapes spaces as \040; a mount point with one would
            // need unescaping, which a cgroup2 mount never does in practice.
            (fstype == "cgroup2" && !mount_point.contains('\\')).then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")
}

/// The BPF programs in effect for `cgroup` (attached there or on an
/// ancestor), as `bpftool` lists them: "ID ATTACH_TYPE NAME". Programs
/// attached at the root by someone else (another agent, a test run) would
/// run in every case and skew it, so the bench checks this around each case.
pub fn effective_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .arg("effective")
        .output()
        .context("run bpftool (cargo xtask setup installs it)")?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show {} failed: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C sets a flag that `check_interrupted` turns into an error, so the
/// guards unwind normally instead of the process dying with rules and
/// namespaces left behind.
pub fn catch_sigint() -> Result<()> {
    extern "C" fn on_sigint(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    // SAFETY: a zeroed sigaction is valid; the handler only stores an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(libc::SIGINT, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error()).context("install a SIGINT handler");
        }
    }
    Ok(())
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Runs `cmd`; on failure the error carries its stderr.
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("failed to start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
