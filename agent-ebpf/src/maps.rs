//! The maps, named from `agent_common::maps` so the daemon finds them.
//! Their sizes here are placeholders: the daemon sets `max_entries` from the
//! policy before loading.

use agent_common::{
    LpmV4Key, LpmV6Key, RuleSet, ServiceEntry, DEFAULT_MAX_PREFIXES, DEFAULT_MAX_RULESETS,
    DEFAULT_MAX_SERVICES,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie},
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<u64, ServiceEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "EGRESS_V4")]
pub static EGRESS_V4: LpmTrie<LpmV4Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

#[map(name = "EGRESS_V6")]
pub static EGRESS_V6: LpmTrie<LpmV6Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

#[map(name = "RULESETS")]
pub static RULESETS: Array<RuleSet> = Array::with_max_entries(DEFAULT_MAX_RULESETS, 0);

/// Set by the daemon at load time (`bpf_log` in the config): when 0, the
/// programs never call aya-log, so diagnostics cost nothing by default.
#[unsafe(no_mangle)]
pub static BPF_LOG: u8 = 0;

#[inline(always)]
pub fn bpf_log_enabled() -> bool {
    // SAFETY: a read of a global the loader may have rewritten in .rodata.
    unsafe { core::ptr::read_volatile(&BPF_LOG) != 0 }
}
