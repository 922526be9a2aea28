//! Finding systemd units in the cgroup tree: every cgroup whose path names
//! a unit by `agent_common::unit`'s rule (the one the kernel's cgroup_mkdir
//! watcher applies), reached by descending only through slices and user
//! managers, the only cgroups a unit can be below.

use std::{fs, path::Path};

use agent_common::UnitPathScan;

/// How deep slices nest at most here: systemd nests a slice once per `-`
/// in its name, so real hosts stay far below this; it only bounds the walk.
const MAX_DEPTH: usize = 32;

/// The paths (relative to `mount`, no leading `/`) of every cgroup that
/// names a unit.
pub fn candidates(mount: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(mount, "", UnitPathScan::new(), 0, &mut out);
    out
}

fn walk(mount: &Path, dir: &str, scan: UnitPathScan, depth: usize, out: &mut Vec<String>) {
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(mount.join(dir)) else {
        return; // gone meanwhile, or unreadable: found at the next rescan
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue; // systemd names units in ASCII
        };
        let mut child = scan;
        child.push(b'/');
        name.bytes().for_each(|b| child.push(b));
        let path = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        let descend = child.may_hold_units();
        if child.finish().is_some() {
            out.push(path.clone());
        }
        if descend {
            walk(mount, &path, child, depth + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_units_in_slices_and_user_managers_only() {
        let root = tempfile::tempdir().expect("temporary directory");
        for dir in [
            "system.slice/foo.service/inner.service",
            "system.slice/system-t.slice/t@a.service",
            "custom.slice/custom-deep.slice/bar.service",
            "user.slice/user-7.slice/user@7.service/app.slice/baz.service",
            "user.slice/user-7.slice/session-1.scope/x.service",
            "init.scope",
            "plain/dir.service",
        ] {
            fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        }
        let mut found = candidates(root.path());
        found.sort();
        assert_eq!(
            found,
            [
                "custom.slice",
                "custom.slice/custom-deep.slice",
                "custom.slice/custom-deep.slice/bar.service",
                "init.scope",
                "plain",
                "system.slice",
                "system.slice/foo.service",
                "system.slice/system-t.slice",
                "system.slice/system-t.slice/t@a.service",
                "user.slice",
                "user.slice/user-7.slice",
                "user.slice/user-7.slice/session-1.scope",
                "user.slice/user-7.slice/user@7.service",
                "user.slice/user-7.slice/user@7.service/app.slice",
                "user.slice/user-7.slice/user@7.service/app.slice/baz.service",
            ]
        );
    }
}
