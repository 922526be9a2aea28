//! A managed service's cgroup is managed from the moment it exists: a unit
//! that (re)starts gets a new cgroup (same path, new id), and the
//! cgroup_mkdir tracepoint adds the new id to SERVICES inside mkdir(),
//! before any process can be moved into it, even while no agent runs. The
//! cgroup_rmdir tracepoint removes the id when the cgroup goes, so SERVICES
//! holds live cgroups only, however often units restart.

use agent_common::{UnitKey, UnitPathScan, CGROUP_PATH_MAX, UNIT_EXACT, UNIT_TEMPLATE};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint, programs::TracePointContext,
    EbpfContext,
};

use crate::maps::{PATH_SCRATCH, SERVICES, SERVICE_PATHS, UNIT_NAMES};

// Offsets in the cgroup:cgroup_mkdir and cgroup_rmdir records (their
// format files): int root @8, int level @12, u64 id @16,
// __data_loc char[] path @24.
const ROOT_OFFSET: usize = 8;
const ID_OFFSET: usize = 16;
const PATH_LOC_OFFSET: usize = 24;

#[tracepoint]
pub fn bulkhead_cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let _ = try_cgroup_mkdir(&ctx);
    0
}

#[tracepoint]
pub fn bulkhead_cgroup_rmdir(ctx: TracePointContext) -> u32 {
    let _ = try_cgroup_rmdir(&ctx);
    0
}

/// The new cgroup's id, if it is in the cgroup2 hierarchy.
#[inline(always)]
fn cgroup2_id(ctx: &TracePointContext) -> Result<Option<u64>, i64> {
    // SAFETY: reads of the tracepoint record at the offsets of its format.
    let root: i32 = unsafe { ctx.read_at(ROOT_OFFSET)? };
    if root != 0 {
        return Ok(None); // a cgroup v1 hierarchy: not ours
    }
    Ok(Some(unsafe { ctx.read_at(ID_OFFSET)? }))
}

#[inline(always)]
fn try_cgroup_rmdir(ctx: &TracePointContext) -> Result<(), i64> {
    if let Some(id) = cgroup2_id(ctx)? {
        // Absent for every cgroup that was not managed: nothing to do then.
        let _ = SERVICES.remove(id);
    }
    Ok(())
}

#[inline(always)]
fn try_cgroup_mkdir(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(id) = cgroup2_id(ctx)? else {
        return Ok(());
    };
    let loc: u32 = unsafe { ctx.read_at(PATH_LOC_OFFSET)? };
    let buf = PATH_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: our per-CPU scratch buffer.
    let buf = unsafe { &mut *buf };
    // The key is the path padded with zeros: clear what a longer path left.
    let mut i = 0;
    while i < buf.len() {
        buf[i] = 0;
        i += 1;
    }
    let src = unsafe { ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize) };
    // SAFETY: the string lives in the tracepoint record. A path longer
    // than the buffer is cut; `bulkhead check` refuses such `cgroup =`
    // paths, and the daemon's rescan finds such units.
    unsafe { bpf_probe_read_kernel_str_bytes(src, buf)? };
    // A `cgroup = "/path"` service: by its exact path. By reference: a
    // copy of the 256-byte key would take half the stack.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the BPF stack is 512 bytes"
    )]
    if let Some(entry) = unsafe { SERVICE_PATHS.get(&*buf) } {
        let entry = *entry;
        SERVICES.insert(id, entry, 0)?;
        return Ok(());
    }
    // A `unit = "..."` service: by the unit's name, wherever its slices
    // put it (agent_common::unit, the rule the daemon applies too).
    let mut scan = UnitPathScan::new();
    let mut i = 0;
    while i < CGROUP_PATH_MAX {
        scan.push(buf[i]);
        i += 1;
    }
    let Some(unit) = scan.finish() else {
        return Ok(());
    };
    let mut key = UnitKey {
        manager: unit.manager,
        kind: UNIT_EXACT,
        hash: unit.exact,
    };
    let mut entry = unsafe { UNIT_NAMES.get(key) }.copied();
    if entry.is_none() {
        if let Some(template) = unit.template {
            key.kind = UNIT_TEMPLATE;
            key.hash = template;
            entry = unsafe { UNIT_NAMES.get(key) }.copied();
        }
    }
    if let Some(entry) = entry {
        SERVICES.insert(id, entry, 0)?;
    }
    Ok(())
}
