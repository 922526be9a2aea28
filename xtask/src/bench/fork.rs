//! Forking a load generator: a child of a single-threaded xtask that joins
//! a cgroup, reports through a pipe and leaves with `_exit`; the parent
//! reaps it. Used by `bench` (loadgen.rs) and `bench-events` (events.rs).

use std::{
    fs, io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{ensure, Context, Result};

/// fork() copies only the calling thread; with more threads the child
/// could inherit a lock held by a thread that no longer exists.
pub fn ensure_single_threaded() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    ensure!(
        threads == Some(1),
        "the load generator forks and needs a single-threaded xtask, found {threads:?} threads"
    );
    Ok(())
}

/// Moves this process into `cgroup`.
pub fn join_cgroup(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("join {}", procs.display()))
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2()");
    }
    // SAFETY: two fresh fds nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reaps our child `pid`, retrying on EINTR; its wait status.
pub fn wait(pid: libc::pid_t) -> Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if rc == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).context("waitpid(the load generator)");
        }
    }
}
