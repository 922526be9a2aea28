//! An executable file's identity: the device and inode the kernel reads
//! from `mm->exe_file` (`agent_common::ExeId`), found here from a path.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use agent_common::ExeId;

/// A file's identity, device in the kernel's encoding (`s_dev`: major <<
/// 20 | minor), not `stat`'s (`st_dev`, glibc's encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeFile {
    pub dev: u32,
    pub ino: u64,
}

impl ExeFile {
    /// From `stat` results.
    #[must_use]
    pub fn from_metadata(meta: &std::fs::Metadata) -> Self {
        let st_dev = meta.dev();
        let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
        Self {
            dev: (major << 20) | (minor & 0xf_ffff),
            ino: meta.ino(),
        }
    }

    /// The identity of the file `path` names (symlinks followed).
    pub fn of(path: &Path) -> io::Result<Self> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    #[must_use]
    pub fn from_kernel(id: ExeId) -> Option<Self> {
        id.is_known().then_some(Self {
            dev: id.dev,
            ino: id.ino,
        })
    }

    #[must_use]
    pub fn to_kernel(self) -> ExeId {
        ExeId {
            ino: self.ino,
            dev: self.dev,
            _pad: 0,
        }
    }
}

impl std::fmt::Display for ExeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.dev >> 20, self.dev & 0xf_ffff, self.ino)
    }
}

/// What `exe = ["..."]` names: the real path (symlinks resolved) of a
/// regular file, and its identity.
pub fn resolve(path: &Path) -> Result<(PathBuf, ExeFile), String> {
    if !path.is_absolute() {
        return Err(format!(
            "{} is not an absolute path: name the executable by its full path",
            path.display()
        ));
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", real.display()));
    }
    Ok((real, ExeFile::from_metadata(&meta)))
}

/// Who other than root could change what `path` (resolved: `real`)
/// names: the file or a directory on the way owned by another user or
/// writable by group or others. None when only root can.
#[must_use]
pub fn writable_by_others(path: &Path, real: &Path) -> Option<String> {
    let mut checked: Vec<PathBuf> = vec![real.to_path_buf()];
    for p in [path, real] {
        checked.extend(p.ancestors().skip(1).map(Path::to_path_buf));
    }
    checked.sort();
    checked.dedup();
    checked.into_iter().find_map(|p| {
        let meta = std::fs::symlink_metadata(&p).ok()?;
        let mode = meta.mode();
        // A sticky directory (/tmp) still lets anyone add a file, but
        // not replace another user's: only the owner matters there.
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
        if meta.uid() != 0 {
            Some(format!("{} is owned by uid {}", p.display(), meta.uid()))
        } else if mode & 0o022 != 0 && !sticky_dir {
            Some(format!(
                "{} is writable by its group or others",
                p.display()
            ))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_resolves_to_its_target() {
        let dir = std::env::temp_dir().join(format!("bulkhead-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let target = dir.join("real-bin");
        std::fs::write(&target, b"#!/bin/sh\n").expect("write");
        let link = dir.join("link-bin");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let (real, id) = resolve(&link).expect("resolves");
        assert_eq!(real, std::fs::canonicalize(&target).expect("canon"));
        assert_eq!(id, ExeFile::of(&target).expect("stat"));
        assert!(resolve(Path::new("relative/bin"))
            .unwrap_err()
            .contains("not an absolute path"));
        assert!(resolve(&dir.join("missing"))
            .unwrap_err()
            .contains("No such file"));
        assert!(resolve(&dir).unwrap_err().contains("not a regular file"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_device_is_in_the_kernels_encoding() {
        // /proc/self/exe's st_dev as the kernel's s_dev: major 8, minor 1
        // is 0x800001 there and 0x801 in glibc's st_dev.
        let dev = libc::makedev(8, 1);
        assert_eq!(libc::major(dev), 8);
        let f = ExeFile {
            dev: (8 << 20) | 1,
            ino: 5,
        };
        assert_eq!(f.to_string(), "8:1:5");
        assert_eq!(ExeFile::from_kernel(f.to_kernel()), Some(f));
        assert_eq!(ExeFile::from_kernel(ExeId::UNKNOWN), None);
    }
}
