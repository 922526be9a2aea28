//! The processes that were running before the agent: their executables,
//! read once at a cold start from `/proc/PID/exe` (the same file the
//! kernel's `mm->exe_file` is; a restart carries the previous agent's table
//! over instead, see `kernel::process_table`). The tracepoints, attached
//! first, keep every later exec and fork; entries they wrote win over the
//! scan's (the agent writes with BPF_NOEXIST), so a process that exec'd
//! meanwhile keeps its new identity. The path each link names is kept too
//! (`EXE_NAMES`, as an exec would have): the process may be gone when its
//! decisions are named.

use std::path::{Path, PathBuf};

use super::ExeFile;

/// A process found by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub tgid: u32,
    pub exe: ExeFile,
    /// What `/proc/PID/exe` names (" (deleted)" when the file is gone).
    pub path: PathBuf,
}

/// Every process readable now; kernel threads (no executable), processes
/// gone meanwhile and processes in a user namespace other than init's are
/// left out. The last because a process can set its own `exe` link there
/// (prctl PR_SET_MM needs CAP_SYS_ADMIN only in its own user namespace):
/// they stay unknown, so rules with `exe` deny them, until they exec.
#[must_use]
pub fn processes(proc_root: &Path) -> Vec<Found> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    // The agent's own: the initial one (CAP_BPF is of the initial user
    // namespace). Not PID 1's, which a sandbox may keep unreadable.
    let Ok(init_userns) = std::fs::read_link(proc_root.join("self/ns/user")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let tgid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let link = entry.path().join("exe");
            let exe = ExeFile::of(&link).ok()?;
            let path = std::fs::read_link(&link).ok()?;
            // After the link: a process that forged it had entered its
            // own user namespace before, and cannot leave it.
            if std::fs::read_link(entry.path().join("ns/user")).ok()? != init_userns {
                return None;
            }
            Some(Found { tgid, exe, path })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_with_its_executable() {
        let found = processes(Path::new("/proc"));
        let me = Found {
            tgid: std::process::id(),
            exe: ExeFile::of(Path::new("/proc/self/exe")).expect("own exe"),
            path: std::fs::read_link("/proc/self/exe").expect("own exe link"),
        };
        assert!(found.contains(&me), "{me:?} in {} processes", found.len());
    }
}
