//! A managed service's cgroup is managed from the moment it exists: a unit
//! that (re)starts gets a new cgroup (same path, new id), and the
//! cgroup_mkdir tracepoint adds the new id to SERVICES inside mkdir(),
//! before any process can be moved into it, even while no agent runs. The
//! cgroup_rmdir tracepoint removes the id when the cgroup goes, so SERVICES
//! holds live cgroups only, however often units restart.

use agent_common::{UnitKey, UnitPathScan, CGROUP_PATH_MAX, UNIT_EXACT, UNIT_TEMPLATE};
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_loop},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

use core::ptr::{read_volatile, write_volatile};

use crate::maps::{PATH_SCRATCH, SERVICES, SERVICE_PATHS, UNIT_NAMES, UNIT_SCAN};

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
    // SAFETY: as above; the helper behind read_at checks the bounds.
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

/// bpf_loop's callback: feeds byte `index` of the path to the scan.
#[inline(never)]
extern "C" fn scan_byte(index: u64, _ctx: *mut c_void) -> i64 {
    let (Some(buf), Some(state)) = (PATH_SCRATCH.get_ptr(0), UNIT_SCAN.get_ptr_mut(0)) else {
        return 1; // stop
    };
    // SAFETY: our per-CPU scratch values; the index is masked into range.
    unsafe {
        let byte = (*buf)[(index as usize) & (CGROUP_PATH_MAX - 1)];
        (*state).push(byte);
    }
    0
}

#[inline(always)]
fn try_cgroup_mkdir(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(id) = cgroup2_id(ctx)? else {
        return Ok(());
    };
    // SAFETY: a read of the record at the offset of its format.
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
    // SAFETY: pointer arithmetic only (never dereferenced here): the
    // __data_loc's low 16 bits are the string's offset in the record; the
    // read below goes through a helper that checks the address.
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
    // SAFETY: the value is copied out at once (the agent may replace it).
    if let Some(entry) = unsafe { SERVICE_PATHS.get(&*buf) } {
        let entry = *entry;
        SERVICES.insert(id, entry, 0)?;
        return Ok(());
    }
    // A `unit = "..."` service: by the unit's name, wherever its slices
    // put it (agent_common::unit, the rule the daemon applies too).
    // One byte per bpf_loop() callback, the scan's state in map memory:
    // the verifier checks the callback once, not 256 unrolled iterations
    // (whose small constants, lengths and flags, made every iteration's
    // states distinct: over a million instructions).
    let state = UNIT_SCAN.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: our per-CPU scratch value.
    unsafe { write_volatile(state, UnitPathScan::new()) };
    // SAFETY: a static callback of the signature bpf_loop expects, no context.
    unsafe {
        bpf_loop(
            CGROUP_PATH_MAX as u32,
            scan_byte as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: our per-CPU scratch value, written above and by the loop.
    let scan = unsafe { read_volatile(state) };
    let Some(unit) = scan.finish() else {
        return Ok(());
    };
    let mut key = UnitKey {
        manager: unit.manager,
        kind: UNIT_EXACT,
        hash: unit.exact,
    };
    // SAFETY: the value is copied out at once (the agent may replace it).
    let mut entry = unsafe { UNIT_NAMES.get(key) }.copied();
    if entry.is_none() {
        if let Some(template) = unit.template {
            key.kind = UNIT_TEMPLATE;
            key.hash = template;
            // SAFETY: as above.
            entry = unsafe { UNIT_NAMES.get(key) }.copied();
        }
    }
    if let Some(entry) = entry {
        SERVICES.insert(id, entry, 0)?;
    }
    Ok(())
}
