//! Process identity (see `agent_common::process`): the executable file of
//! every process, kept by thread group id in `PROCESSES` so that a
//! decision finds it in one lookup.
//!
//! - exec (`sched:sched_process_exec`): the new image's file, read from
//!   `current->mm->exe_file` (the file the kernel maps, symlinks resolved;
//!   `comm` and `argv` play no part): device, inode and its generation. Its name as exec'd is kept once per
//!   file in `EXE_NAMES`, for the agent to name it after the process left.
//! - fork (`task:task_newtask`, which says the clone's flags): a child
//!   process gets its parent's entry; a new thread gets none of its own (a
//!   decision looks a caller up by its thread group id, so a thread is its
//!   process's entry, and the table holds one entry per process). A
//!   parent with no entry gives a child with none (the start's scan, which
//!   runs after these are attached, covers processes that predate the
//!   agent); a process's live `mm` is never read at fork, as a process can
//!   change its `exe_file` after its exec.
//! - exit (`sched:sched_process_exit`): the process's entry goes when its
//!   last thread leaves (`signal->live` is 0 then).
//!
//! The offsets of the kernel structures come from the kernel's BTF,
//! written by the agent into `PROCESS_OFFSETS` at load (this crate cannot
//! use CO-RE relocations); all zeros, and the programs do nothing.

use agent_common::{
    ExeId, ExeRuleKey, ServiceEntry, UidRuleKey, EXE_NAME_MAX, OFF_EXEC_FILENAME, OFF_FILE_INODE,
    OFF_INODE_GEN, OFF_INODE_INO, OFF_INODE_SB, OFF_MM_EXE_FILE, OFF_NEWTASK_CLONE_FLAGS,
    OFF_NEWTASK_PID, OFF_SB_DEV, OFF_SIGNAL_LIVE, OFF_TASK_MM, OFF_TASK_SIGNAL,
    PROCESS_OFFSETS_LEN, QUALIFY_EXE, QUALIFY_UID,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_get_current_task,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

/// `clone(2)`'s flag for a thread of the caller's thread group.
const CLONE_THREAD: u64 = 0x0001_0000;

use crate::maps::{EXE_NAMES, EXE_RULES, EXE_SCRATCH, PROCESSES, UID_RULES};

/// Set by the daemon at load (`agent_common::globals::PROCESS_OFFSETS`).
#[unsafe(no_mangle)]
pub static PROCESS_OFFSETS: [u32; PROCESS_OFFSETS_LEN] = [0; PROCESS_OFFSETS_LEN];

#[inline(always)]
fn offset(index: usize) -> usize {
    // SAFETY: a read of a global the loader may have rewritten in .rodata;
    // the index is one of the constants below PROCESS_OFFSETS_LEN.
    unsafe { core::ptr::read_volatile(&PROCESS_OFFSETS[index]) as usize }
}

/// The executable of the process `tgid`, or `ExeId::UNKNOWN`.
#[inline(always)]
pub fn exe_of(tgid: u32) -> ExeId {
    // SAFETY: copied out at once, under the program's RCU read lock.
    match unsafe { PROCESSES.get(tgid) } {
        Some(exe) => *exe,
        None => ExeId::UNKNOWN,
    }
}

/// The qualified rules of service `s` that the calling task (of thread
/// group `tgid`) satisfies, as a mask of their bits (see
/// `agent_common::PortRange`). Its executable and user are asked for only
/// when some rule names one. Call only for a service with qualified rules
/// (`s.qualifiers != 0`).
#[inline(always)]
pub fn caller_mask(s: &ServiceEntry, tgid: u32) -> u32 {
    let exe = if s.qualifiers & QUALIFY_EXE != 0 {
        exe_of(tgid)
    } else {
        ExeId::UNKNOWN
    };
    let uid = if s.qualifiers & QUALIFY_UID != 0 {
        bpf_get_current_uid_gid() as u32
    } else {
        0 // not read by mask_of without QUALIFY_UID
    };
    mask_of(s, exe, uid)
}

/// The same for a known executable and user (a socket's owner).
#[inline(always)]
pub fn mask_of(s: &ServiceEntry, exe: ExeId, uid: u32) -> u32 {
    let mut mask = u32::MAX;
    if s.qualifiers & QUALIFY_EXE != 0 {
        let key = ExeRuleKey {
            ino: exe.ino,
            dev: exe.dev,
            service_id: s.service_id,
        };
        // SAFETY: copied out at once. An unknown executable (all zeros) is
        // in no entry: only rules that name no executable are satisfied;
        // so is a file of another generation (a reused inode number).
        mask = match unsafe { EXE_RULES.get(key) } {
            Some(rule) => rule.mask_for(&exe).unwrap_or(s.exe_free),
            None => s.exe_free,
        };
    }
    if s.qualifiers & QUALIFY_UID != 0 {
        let key = UidRuleKey {
            service_id: s.service_id,
            uid,
        };
        // SAFETY: as above.
        mask &= match unsafe { UID_RULES.get(key) } {
            Some(m) => *m,
            None => s.uid_free,
        };
    }
    mask
}

/// The current task's executable, read through its `mm` (None for a
/// kernel thread, or when identity is off or a read fails).
#[inline(always)]
fn current_exe() -> Option<ExeId> {
    let mm_off = offset(OFF_TASK_MM);
    if mm_off == 0 {
        return None;
    }
    // SAFETY: bpf_get_current_task takes no argument; the pointers below
    // are only read through bpf_probe_read_kernel, which checks them.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let mm: *const u8 = bpf_probe_read_kernel(task.add(mm_off).cast()).ok()?;
        if mm.is_null() {
            return None;
        }
        let file: *const u8 = bpf_probe_read_kernel(mm.add(offset(OFF_MM_EXE_FILE)).cast()).ok()?;
        if file.is_null() {
            return None;
        }
        let inode: *const u8 =
            bpf_probe_read_kernel(file.add(offset(OFF_FILE_INODE)).cast()).ok()?;
        if inode.is_null() {
            return None;
        }
        let ino: u64 = bpf_probe_read_kernel(inode.add(offset(OFF_INODE_INO)).cast()).ok()?;
        let gen: u32 = bpf_probe_read_kernel(inode.add(offset(OFF_INODE_GEN)).cast()).ok()?;
        let sb: *const u8 = bpf_probe_read_kernel(inode.add(offset(OFF_INODE_SB)).cast()).ok()?;
        if sb.is_null() {
            return None;
        }
        let dev: u32 = bpf_probe_read_kernel(sb.add(offset(OFF_SB_DEV)).cast()).ok()?;
        Some(ExeId { ino, dev, gen })
    }
}

/// Threads still running in the current task's thread group (its
/// `signal->live`, already decremented for an exiting task).
#[inline(always)]
fn current_live_threads() -> Option<i32> {
    let signal_off = offset(OFF_TASK_SIGNAL);
    if signal_off == 0 {
        return None;
    }
    // SAFETY: as in current_exe.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let signal: *const u8 = bpf_probe_read_kernel(task.add(signal_off).cast()).ok()?;
        if signal.is_null() {
            return None;
        }
        bpf_probe_read_kernel(signal.add(offset(OFF_SIGNAL_LIVE)).cast()).ok()
    }
}

#[tracepoint]
pub fn bulkhead_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_exec(&ctx);
    0
}

#[tracepoint]
pub fn bulkhead_process_fork(ctx: TracePointContext) -> u32 {
    let _ = try_fork(&ctx);
    0
}

#[tracepoint]
pub fn bulkhead_process_exit(_ctx: TracePointContext) -> u32 {
    let _ = try_exit();
    0
}

#[inline(always)]
fn try_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Fail closed: an exec whose new file cannot be read, or recorded,
    // leaves the process unknown, never with the identity it had before.
    let Some(exe) = current_exe() else {
        let _ = PROCESSES.remove(tgid);
        return Ok(());
    };
    if PROCESSES.insert(tgid, exe, 0).is_err() {
        let _ = PROCESSES.remove(tgid);
        return Ok(());
    }
    // SAFETY: a plain lookup; only presence matters.
    if unsafe { EXE_NAMES.get(exe) }.is_some() {
        return Ok(());
    }
    // SAFETY: a read of the record at the offset of its format.
    let loc: u32 = unsafe { ctx.read_at(offset(OFF_EXEC_FILENAME))? };
    let buf = EXE_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: our per-CPU scratch buffer.
    let buf = unsafe { &mut *buf };
    let mut i = 0;
    while i < EXE_NAME_MAX {
        buf[i] = 0;
        i += 1;
    }
    // SAFETY: pointer arithmetic only: the __data_loc's low 16 bits are the
    // string's offset in the record; the helper below checks the address.
    let src = unsafe { ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize) };
    // SAFETY: the string lives in the tracepoint record; a longer name is
    // cut (the agent then names the file from the process, if alive).
    unsafe { bpf_probe_read_kernel_str_bytes(src, buf)? };
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the BPF stack is 512 bytes"
    )]
    EXE_NAMES.insert(&exe, &*buf, u64::from(BPF_NOEXIST))?;
    Ok(())
}

#[inline(always)]
fn try_fork(ctx: &TracePointContext) -> Result<(), i64> {
    if offset(OFF_TASK_MM) == 0 {
        return Ok(());
    }
    // SAFETY: reads of the record at the offsets of its format.
    let flags: u64 = unsafe { ctx.read_at(offset(OFF_NEWTASK_CLONE_FLAGS))? };
    if flags & CLONE_THREAD != 0 {
        return Ok(()); // a thread is its process's entry
    }
    // SAFETY: as above.
    let child: i32 = unsafe { ctx.read_at(offset(OFF_NEWTASK_PID))? };
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let exe = exe_of(parent);
    if !exe.is_known() {
        // A parent with no entry has a child with none: its live `mm` is not
        // read, because a process may have changed `mm->exe_file` since its
        // exec (prctl PR_SET_MM in a user namespace of its own). Whatever a
        // process that had this id before left behind goes too.
        let _ = PROCESSES.remove(child as u32);
        return Ok(());
    }
    // Over whatever a process that had this id before left behind.
    PROCESSES.insert(child as u32, exe, 0)?;
    Ok(())
}

#[inline(always)]
fn try_exit() -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if current_live_threads() == Some(0) {
        let _ = PROCESSES.remove(tgid);
    }
    Ok(())
}
