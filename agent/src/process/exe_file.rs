//! An executable file's identity: the device, inode and generation the
//! kernel reads from `mm->exe_file` (`agent_common::ExeId`), found here
//! from a path.

use std::{
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use agent_common::ExeId;

/// A file's identity, device in the kernel's encoding (`s_dev`: major <<
/// 20 | minor), not `stat`'s (`st_dev`, glibc's encoding), and the inode's
/// generation where the filesystem tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeFile {
    pub dev: u32,
    pub ino: u64,
    /// `i_generation` (`FS_IOC_GETVERSION`: ext4, xfs, btrfs, f2fs); None
    /// where the filesystem does not answer it (tmpfs, overlay). A freed
    /// inode number is reused for the next new file, with a new
    /// generation: the device and inode alone do not tell them apart.
    pub gen: Option<u32>,
}

impl ExeFile {
    /// From `stat` results, with no generation.
    #[must_use]
    pub fn from_metadata(meta: &std::fs::Metadata) -> Self {
        let st_dev = meta.dev();
        let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
        Self {
            dev: (major << 20) | (minor & 0xf_ffff),
            ino: meta.ino(),
            gen: None,
        }
    }

    /// The identity of the file `path` names (symlinks followed; for
    /// `/proc/PID/exe`, the file the process runs).
    pub fn of(path: &Path) -> io::Result<Self> {
        match Self::open(path) {
            Ok((file, _)) => Ok(file),
            // Not a regular file, or one that cannot be opened: by `stat`.
            Err(_) => Ok(Self::from_metadata(&std::fs::metadata(path)?)),
        }
    }

    /// The regular file `path` names, opened, and its identity read from
    /// the open file (so it is that file's, whatever is renamed over the
    /// path meanwhile), with its generation where the filesystem tells it.
    pub fn open(path: &Path) -> io::Result<(Self, std::fs::File)> {
        if !std::fs::metadata(path)?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        // A regular file (a FIFO's open could block), without delay or side
        // effect; O_NOATIME is only for the file's owner or root.
        let open = |flags| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(path)
        };
        let f = open(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOATIME)
            .or_else(|_| open(libc::O_NONBLOCK | libc::O_NOCTTY))?;
        let file = Self {
            gen: generation(&f),
            ..Self::from_metadata(&f.metadata()?)
        };
        Ok((file, f))
    }

    /// Whether `self` and `other` are the same file: device and inode, and
    /// the generation where both know it.
    #[must_use]
    pub fn same_file(&self, other: &Self) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && match (self.gen, other.gen) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// From the kernel's record (which always carries the generation).
    #[must_use]
    pub fn from_kernel(id: ExeId) -> Option<Self> {
        id.is_known().then_some(Self {
            dev: id.dev,
            ino: id.ino,
            gen: Some(id.gen),
        })
    }

    /// As the kernel records it; an unknown generation as 0 (the kernel
    /// side checks a generation only where the agent knew it).
    #[must_use]
    pub fn to_kernel(self) -> ExeId {
        ExeId {
            ino: self.ino,
            dev: self.dev,
            gen: self.gen.unwrap_or(0),
        }
    }
}

/// The inode generation of an open file, where its filesystem answers.
fn generation(file: &std::fs::File) -> Option<u32> {
    // The kernel writes an int, under an ioctl number sized for a long:
    // a long's room, of which the int is the first four bytes.
    let mut out = [0u8; 8];
    // SAFETY: FS_IOC_GETVERSION writes at most the buffer's 8 bytes into
    // memory we own; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETVERSION, out.as_mut_ptr()) };
    (rc == 0).then(|| u32::from_ne_bytes([out[0], out[1], out[2], out[3]]))
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
    // Opened, not only stat'ed: the agent holds the file open while a rule
    // names it, and reads its inode generation from it (a file it cannot
    // open could have its inode number reused unnoticed).
    let (file, _) = ExeFile::open(&real).map_err(|e| {
        format!(
            "{}: cannot open it ({e}); the agent opens each file an `exe` rule names (it has no CAP_DAC_OVERRIDE): make it readable by its owner root, or by others",
            real.display()
        )
    })?;
    Ok((real, file))
}

/// When `stat` reports another device for `real` than the one the
/// kernel's inode carries (`i_sb->s_dev`, what the tracepoints record, and
/// what `/proc/self/mountinfo` shows for its mount): the filesystem type
/// (a btrfs subvolume has a device of its own, an overlay over layers on
/// several filesystems reports its layers'). A rule naming such a file
/// never matches: it denies. None when they agree or cannot be read.
#[must_use]
pub fn device_differs(real: &Path) -> Option<String> {
    let stat_dev = ExeFile::of(real).ok()?.dev;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dev, fs_type) = mount_of(&mountinfo, real)?;
    (dev != stat_dev).then_some(fs_type)
}

/// The type of the filesystem `real` is on (`/proc/self/mountinfo`).
#[must_use]
pub fn filesystem_type(real: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_of(&mountinfo, real).map(|(_, fs_type)| fs_type)
}

/// The identity the kernel gives the file at `real`: its mount's device
/// (as `/proc/self/mountinfo` shows it) and its inode number. Where
/// [`device_differs`], this, not `stat`'s, is what a running program of
/// that file is recorded with; it names such a program, and is never used
/// to match rules (several btrfs subvolumes share one device and number
/// their inodes alike).
#[must_use]
pub fn kernel_view(real: &Path) -> Option<ExeFile> {
    let stat = ExeFile::of(real).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dev, _) = mount_of(&mountinfo, real)?;
    Some(ExeFile { dev, ..stat })
}

/// The (kernel-encoded device, filesystem type) of the mount `path` is on:
/// the longest mount point containing it, the last listed winning (a
/// mount over another).
fn mount_of(mountinfo: &str, path: &Path) -> Option<(u32, String)> {
    let mut best: Option<(usize, u32, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        if !path.starts_with(&point) {
            continue;
        }
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            continue;
        };
        let fs_type = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1))
            .map_or_else(String::new, |t| (*t).to_owned());
        let depth = point.components().count();
        if best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
            best = Some((depth, (major << 20) | minor, fs_type));
        }
    }
    best.map(|(_, dev, fs_type)| (dev, fs_type))
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn the_mount_of_a_path_is_its_longest_mount_point() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
50 22 0:41 / /var/lib/my\\040data rw - btrfs /dev/vdb rw,subvol=/data
51 22 0:42 / /usr rw - overlay overlay rw
52 51 0:43 / /usr rw - overlay overlay rw
";
        let dev = |major: u32, minor: u32| (major << 20) | minor;
        assert_eq!(
            mount_of(mountinfo, Path::new("/etc/hosts")),
            Some((dev(254, 0), "ext4".to_owned()))
        );
        assert_eq!(
            mount_of(mountinfo, Path::new("/var/lib/my data/app")),
            Some((dev(0, 41), "btrfs".to_owned()))
        );
        // Not a mount point by prefix of its text: a path component.
        assert_eq!(
            mount_of(mountinfo, Path::new("/usrlocal/app")),
            Some((dev(254, 0), "ext4".to_owned()))
        );
        // A mount over another: the last listed.
        assert_eq!(
            mount_of(mountinfo, Path::new("/usr/bin/app")),
            Some((dev(0, 43), "overlay".to_owned()))
        );
    }

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
            gen: Some(7),
        };
        assert_eq!(f.to_string(), "8:1:5");
        assert_eq!(ExeFile::from_kernel(f.to_kernel()), Some(f));
        assert_eq!(ExeFile::from_kernel(ExeId::UNKNOWN), None);
    }
}
