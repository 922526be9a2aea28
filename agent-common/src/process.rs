//! Process identity: which executable file a process runs, as the kernel
//! knows it (the device, inode and generation of `mm->exe_file`), and the
//! keys of the rules that require one (`exe = [...]`, `uid = [...]` on a
//! rule).
//!
//! The identity is taken at exec by the `sched:sched_process_exec`
//! tracepoint, copied to a child at fork, and dropped when the process is
//! gone; the agent scans `/proc` at start for the processes that were
//! already there. A decision then needs one lookup by the caller's thread
//! group id (`PROCESSES`), never a walk of kernel structures.

/// The file a process executes: `s_dev` of its superblock (the kernel's
/// encoding, major << 20 | minor), its inode number and the inode's
/// generation (`i_generation`: ext4, xfs and tmpfs draw it at random for
/// each new inode, so a file that reuses a freed inode number differs
/// here). All of `ino` and `dev` zero: unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeId {
    pub ino: u64,
    pub dev: u32,
    pub gen: u32,
}

impl ExeId {
    pub const UNKNOWN: ExeId = ExeId {
        ino: 0,
        dev: 0,
        gen: 0,
    };

    #[inline(always)]
    #[must_use]
    pub const fn is_known(&self) -> bool {
        self.ino != 0 || self.dev != 0
    }
}

/// Key of `EXE_RULES`: a service and an executable.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExeRuleKey {
    pub ino: u64,
    pub dev: u32,
    pub service_id: u32,
}

/// Value of `EXE_RULES`: the qualified rules the file satisfies, for a
/// process whose executable has this generation, where the agent could
/// read it (`checks_gen` 1: ext4, xfs, btrfs answer `FS_IOC_GETVERSION`;
/// tmpfs and overlay do not, and their files match by inode alone).
/// Another generation is another file that reuses a freed inode number
/// (an upgrade freed the old binary's): it satisfies nothing here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExeRule {
    pub mask: u32,
    pub gen: u32,
    pub checks_gen: u32,
}

impl ExeRule {
    /// The rules a process of executable `exe` gets from this entry.
    #[inline(always)]
    #[must_use]
    pub const fn mask_for(&self, exe: &ExeId) -> Option<u32> {
        if self.checks_gen != 0 && self.gen != exe.gen {
            None
        } else {
            Some(self.mask)
        }
    }
}

/// Key of `UID_RULES`: a service and a user.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UidRuleKey {
    pub service_id: u32,
    pub uid: u32,
}

/// `ServiceEntry::qualifiers`: some rule of the service names executables.
pub const QUALIFY_EXE: u8 = 1;
/// Some rule of the service names users.
pub const QUALIFY_UID: u8 = 2;

/// Qualified rules one service may have: each has a bit in the masks
/// (`PortRange::qualifier` is its bit + 1).
pub const MAX_QUALIFIED_RULES: usize = 32;

/// Longest exec file name kept in `EXE_NAMES` (with its NUL).
pub const EXE_NAME_MAX: usize = 256;

/// Indexes of the `PROCESS_OFFSETS` global: byte offsets in kernel
/// structures, read from the kernel's BTF by the agent at load, and the
/// offsets of three tracepoint fields, read from their format files. All
/// zero: process identity is off (the programs then know no executable).
pub const OFF_TASK_MM: usize = 0;
pub const OFF_TASK_SIGNAL: usize = 1;
pub const OFF_MM_EXE_FILE: usize = 2;
pub const OFF_FILE_INODE: usize = 3;
pub const OFF_INODE_INO: usize = 4;
pub const OFF_INODE_SB: usize = 5;
pub const OFF_SB_DEV: usize = 6;
pub const OFF_SIGNAL_LIVE: usize = 7;
/// sched_process_exec: `__data_loc char[] filename`.
pub const OFF_EXEC_FILENAME: usize = 8;
/// task_newtask: `pid_t pid` (the new task's).
pub const OFF_NEWTASK_PID: usize = 9;
/// `inode.i_generation`.
pub const OFF_INODE_GEN: usize = 10;
/// task_newtask: `u64 clone_flags`.
pub const OFF_NEWTASK_CLONE_FLAGS: usize = 11;
pub const PROCESS_OFFSETS_LEN: usize = 12;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for super::ExeId {}
    unsafe impl aya::Pod for super::ExeRuleKey {}
    unsafe impl aya::Pod for super::ExeRule {}
    unsafe impl aya::Pod for super::UidRuleKey {}
}
