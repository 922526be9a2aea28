//! A managed service's cgroup is managed from the moment it exists: a unit
//! that (re)starts gets a new cgroup (same path, new id), and this
//! tracepoint adds the new id to SERVICES inside mkdir(), before any
//! process can be moved into it, even while no agent runs.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint, programs::TracePointContext,
    EbpfContext,
};

use crate::maps::{PATH_SCRATCH, SERVICES, SERVICE_PATHS};

// Offsets in the cgroup:cgroup_mkdir record (its format file):
// int root @8, int level @12, u64 id @16, __data_loc char[] path @24.
const ROOT_OFFSET: usize = 8;
const ID_OFFSET: usize = 16;
const PATH_LOC_OFFSET: usize = 24;

#[tracepoint]
pub fn bulkhead_cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let _ = try_cgroup_mkdir(&ctx);
    0
}

#[inline(always)]
fn try_cgroup_mkdir(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: reads of the tracepoint record at the offsets of its format.
    let root: i32 = unsafe { ctx.read_at(ROOT_OFFSET)? };
    if root != 0 {
        return Ok(()); // a cgroup v1 hierarchy: not ours
    }
    let id: u64 = unsafe { ctx.read_at(ID_OFFSET)? };
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
    // SAFETY: the string lives in the tracepoint record.
    unsafe { bpf_probe_read_kernel_str_bytes(src, buf)? };
    // By reference: a copy of the 256-byte key would take half the stack.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the BPF stack is 512 bytes"
    )]
    let entry = unsafe { SERVICE_PATHS.get(&*buf) };
    if let Some(entry) = entry {
        let entry = *entry;
        SERVICES.insert(id, entry, 0)?;
    }
    Ok(())
}
