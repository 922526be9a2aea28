//! The processes that were running before the agent: their executables,
//! read once at start from `/proc/PID/exe` (the same file the kernel's
//! `mm->exe_file` is). The tracepoints, attached first, keep every later
//! exec and fork; entries they wrote win over the scan's (the agent writes
//! with BPF_NOEXIST), so a process that exec'd meanwhile keeps its new
//! identity.

use std::path::Path;

use super::ExeFile;

/// (thread group id, executable) of every process readable now; kernel
/// threads (no executable) and processes gone meanwhile are left out.
#[must_use]
pub fn processes(proc_root: &Path) -> Vec<(u32, ExeFile)> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let tgid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let exe = ExeFile::of(&entry.path().join("exe")).ok()?;
            Some((tgid, exe))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_with_its_executable() {
        let found = processes(Path::new("/proc"));
        let me = std::process::id();
        let exe = ExeFile::of(Path::new("/proc/self/exe")).expect("own exe");
        assert!(
            found.contains(&(me, exe)),
            "{me} with {exe} in {} processes",
            found.len()
        );
    }
}
