//! The path a decision shows for an executable (`exe` in the decision
//! log): a stage of the event hub that names each record's executable
//! identity (device, inode) by a path, the way `/proc/PID/exe` does:
//!
//! 1. from the process itself while it lives (`/proc/PID/exe`, checked to
//!    be the same file);
//! 2. else from the name its exec asked for, which the exec tracepoint
//!    keeps per file (`EXE_NAMES`): symlinks resolved, checked to be the
//!    same file;
//! 3. else from the start's scan of `/proc` (a process that predates the
//!    agent: it exec'd before the tracepoint was there);
//! 4. an exec of a script asked for the script: its interpreter is the
//!    file that runs (`shebang`);
//! 5. a path whose file has since been replaced or removed (an upgrade)
//!    is shown with " (deleted)", as the kernel shows it: the old and the
//!    new binary are told apart.
//!
//! A name found is cached per identity and checked again once a second
//! (a stat), so that a replacement shows within a second.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use agent_common::{ExeId, EXE_NAME_MAX};
use aya::maps::{HashMap as BpfHashMap, MapData};

use super::ExeFile;
use crate::events::{FlowEvent, Stage};

/// The kernel's exec names, by executable.
pub type ExecNames = BpfHashMap<MapData, ExeId, [u8; EXE_NAME_MAX]>;

/// Cached names at most; past that the cache starts again (a host runs
/// far fewer distinct executables).
const CACHE_MAX: usize = 4096;
/// How long a cached name is trusted before its file is checked again.
const RECHECK: Duration = Duration::from_secs(1);

struct Cached {
    path: PathBuf,
    /// Whether `path` still names this very file (else " (deleted)").
    current: bool,
    checked: Instant,
}

pub struct ExeNames {
    exec_names: Option<ExecNames>,
    proc_root: PathBuf,
    cache: Mutex<HashMap<ExeFile, Cached>>,
    /// The start's scan: each executable then running, by the path its
    /// `/proc/PID/exe` named. Never cleared; one entry per distinct file.
    /// By device and inode: the kernel may know a generation the scan
    /// could not read (tmpfs); the path is checked to be the file anyway.
    scanned: Mutex<HashMap<(u32, u64), PathBuf>>,
}

impl ExeNames {
    #[must_use]
    pub fn new(exec_names: Option<ExecNames>) -> Self {
        Self::with_proc(exec_names, PathBuf::from("/proc"))
    }

    fn with_proc(exec_names: Option<ExecNames>, proc_root: PathBuf) -> Self {
        Self {
            exec_names,
            proc_root,
            cache: Mutex::new(HashMap::new()),
            scanned: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps the paths of the processes the start's scan found.
    pub fn remember(&self, found: Vec<super::scan::Found>) {
        let mut scanned = self.scanned.lock().unwrap_or_else(PoisonError::into_inner);
        for f in found {
            scanned.entry((f.exe.dev, f.exe.ino)).or_insert(f.path);
        }
    }

    /// The path to show for `exe`, run by process `pid`.
    pub fn name(&self, exe: ExeFile, pid: u32) -> Option<Arc<str>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(c) = cache.get_mut(&exe) {
            if now.duration_since(c.checked) >= RECHECK {
                c.current = c.current && names_file(&c.path, exe);
                c.checked = now;
            }
            return Some(shown(&c.path, c.current));
        }
        let (path, current) = self.find(exe, pid)?;
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        let name = shown(&path, current);
        cache.insert(
            exe,
            Cached {
                path,
                current,
                checked: now,
            },
        );
        Some(name)
    }

    /// (path, whether it still names this file).
    fn find(&self, exe: ExeFile, pid: u32) -> Option<(PathBuf, bool)> {
        let link = self.proc_root.join(pid.to_string()).join("exe");
        if ExeFile::of(&link).is_ok_and(|f| f.same_file(&exe)) {
            if let Ok(target) = std::fs::read_link(&link) {
                let text = target.to_string_lossy();
                return Some(match text.strip_suffix(" (deleted)") {
                    // The kernel says so of a dentry that was only dropped
                    // too (a network filesystem's revalidation): the path
                    // still naming this very file is current.
                    Some(p) => {
                        let p = PathBuf::from(p);
                        let current = names_file(&p, exe);
                        (p, current)
                    }
                    None => (target, true),
                });
            }
        }
        let asked = match self.exec_name(exe) {
            Some(asked) => asked,
            None => self.scanned_name(exe)?,
        };
        if !asked.is_absolute() {
            return None;
        }
        match std::fs::canonicalize(&asked) {
            Ok(real) => {
                if names_file(&real, exe) {
                    return Some((real, true));
                }
                // An exec of a script names the script; its interpreter runs.
                if let Some(interpreter) = super::shebang::interpreter(&real, exe) {
                    return Some((interpreter, true));
                }
                Some((real, false))
            }
            Err(_) => Some((asked, false)),
        }
    }

    /// The scan's path, without the kernel's " (deleted)" (the stat below
    /// tells whether it still names this file).
    fn scanned_name(&self, exe: ExeFile) -> Option<PathBuf> {
        let scanned = self.scanned.lock().unwrap_or_else(PoisonError::into_inner);
        let path = scanned.get(&(exe.dev, exe.ino))?;
        let text = path.to_string_lossy();
        Some(match text.strip_suffix(" (deleted)") {
            Some(p) => PathBuf::from(p),
            None => path.clone(),
        })
    }

    fn exec_name(&self, exe: ExeFile) -> Option<PathBuf> {
        let bytes = self.exec_names.as_ref()?.get(&exe.to_kernel(), 0).ok()?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end]).ok()?;
        (!text.is_empty()).then(|| PathBuf::from(text))
    }
}

/// Whether `path` names the file `exe` now: by `stat`, or as the kernel
/// sees it where the two devices differ (btrfs, some overlays).
fn names_file(path: &Path, exe: ExeFile) -> bool {
    ExeFile::of(path).is_ok_and(|f| f.same_file(&exe))
        || super::exe_file::kernel_view(path).is_some_and(|f| f.same_file(&exe))
}

fn shown(path: &Path, current: bool) -> Arc<str> {
    if current {
        Arc::from(path.to_string_lossy().as_ref())
    } else {
        Arc::from(format!("{} (deleted)", path.display()))
    }
}

impl Stage for ExeNames {
    fn amend(&self, batch: &mut [FlowEvent]) {
        for ev in batch.iter_mut() {
            if ev.exe.is_none() {
                if let Some(exe) = ev.exe_file.and_then(ExeFile::from_kernel) {
                    ev.exe = self.name(exe, ev.pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_gone_is_named_by_the_start_scan() {
        let names = ExeNames::with_proc(None, PathBuf::from("/nonexistent"));
        let me = ExeFile::of(Path::new("/proc/self/exe")).expect("own exe");
        assert_eq!(names.name(me, 1), None, "nothing knows it yet");
        let real = std::fs::canonicalize("/proc/self/exe").expect("canonical");
        names.remember(vec![super::super::scan::Found {
            tgid: 1,
            exe: me,
            path: real.clone(),
        }]);
        assert_eq!(
            names.name(me, 1).as_deref(),
            Some(real.to_string_lossy().as_ref())
        );
    }

    #[test]
    fn a_live_process_is_named_by_its_exe_link() {
        let names = ExeNames::new(None);
        let me = ExeFile::of(Path::new("/proc/self/exe")).expect("own exe");
        let real = std::fs::canonicalize("/proc/self/exe").expect("canonical");
        let got = names.name(me, std::process::id()).expect("named");
        assert_eq!(&*got, real.to_string_lossy().as_ref());
        // Cached: a pid that no longer fits still gets the name.
        assert_eq!(names.name(me, u32::MAX).as_deref(), Some(&*got));
    }

    #[test]
    fn a_replaced_file_is_shown_deleted() {
        let dir = std::env::temp_dir().join(format!("bulkhead-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tool");
        std::fs::write(&path, b"one").expect("write");
        let old = ExeFile::of(&path).expect("stat");
        let names = ExeNames::new(None);
        // Seed the cache as the exe link would (no such pid here).
        names.cache.lock().expect("lock").insert(
            old,
            Cached {
                path: path.clone(),
                current: true,
                checked: Instant::now() - RECHECK,
            },
        );
        let next = dir.join("tool.new");
        std::fs::write(&next, b"two").expect("write");
        std::fs::rename(&next, &path).expect("rename over");
        let shown = names.name(old, u32::MAX).expect("named");
        assert_eq!(&*shown, format!("{} (deleted)", path.display()));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
