//! The maps, named from `agent_common::maps` so the daemon finds them.
//! Their sizes here are placeholders: the daemon sets `max_entries` from the
//! policy before loading.

use agent_common::{
    DnsClientKey, DnsOrigin, DnsProxy, ExeId, ExeRule, ExeRuleKey, FlowKey, FlowValue, LearntKey,
    LearntV4Key, LearntV4Value, LearntValue, LpmV4Key, LpmV6Key, RateState, RuleSet, ServiceEntry,
    SockInfo, UdpPeer, UdpPeerKey, UidRuleKey, UnitKey, UnitPathScan, CGROUP_PATH_MAX,
    COUNTER_SLOTS, DEFAULT_EVENTS_BYTES, DEFAULT_FLOW_TABLE, DEFAULT_MAX_LEARNT,
    DEFAULT_MAX_PREFIXES, DEFAULT_MAX_RULESETS, DEFAULT_MAX_SERVICES, DEFAULT_SOCK_OWNERS,
    DEFAULT_UDP_PEERS, DNS_TRACKED, EXE_NAMES_TABLE, EXE_NAME_MAX, FLOW_STAT_SLOTS, LOST_SLOTS,
    MAX_HELD_SOCKETS, PROCESS_TABLE, QUALIFIER_TABLE, UDP_PEERS_PER_SERVICE, WAKE_FRACTION,
};
use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_CLONE, BPF_F_NO_PREALLOC},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<u64, ServiceEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "EGRESS_V4")]
pub static EGRESS_V4: LpmTrie<LpmV4Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

#[map(name = "EGRESS_V6")]
pub static EGRESS_V6: LpmTrie<LpmV6Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

#[map(name = "INGRESS_V4")]
pub static INGRESS_V4: LpmTrie<LpmV4Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

#[map(name = "INGRESS_V6")]
pub static INGRESS_V6: LpmTrie<LpmV6Key, u32> = LpmTrie::with_max_entries(DEFAULT_MAX_PREFIXES, 0);

/// The whole addresses of each trie above (see agent_common::maps).
#[map(name = "EGRESS_HOSTS_V4")]
pub static EGRESS_HOSTS_V4: HashMap<LpmV4Key, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_PREFIXES, BPF_F_NO_PREALLOC);

#[map(name = "EGRESS_HOSTS_V6")]
pub static EGRESS_HOSTS_V6: HashMap<LpmV6Key, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_PREFIXES, BPF_F_NO_PREALLOC);

#[map(name = "INGRESS_HOSTS_V4")]
pub static INGRESS_HOSTS_V4: HashMap<LpmV4Key, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_PREFIXES, BPF_F_NO_PREALLOC);

#[map(name = "INGRESS_HOSTS_V6")]
pub static INGRESS_HOSTS_V6: HashMap<LpmV6Key, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_PREFIXES, BPF_F_NO_PREALLOC);

#[map(name = "UDP_PEERS")]
pub static UDP_PEERS: HashMap<UdpPeerKey, UdpPeer> =
    HashMap::with_max_entries(DEFAULT_UDP_PEERS, BPF_F_NO_PREALLOC);

#[map(name = "UDP_PEER_COUNT")]
pub static UDP_PEER_COUNT: Array<u64> = Array::with_max_entries(DEFAULT_MAX_SERVICES * 2, 0);

#[map(name = "UDP_PEER_RELEASED")]
pub static UDP_PEER_RELEASED: Array<u64> = Array::with_max_entries(DEFAULT_MAX_SERVICES * 2, 0);

/// Set by the daemon at load time (`[udp_replies]`): a pinhole unused this
/// long is closed, and how many one service may hold.
#[unsafe(no_mangle)]
pub static UDP_REPLY_IDLE_NS: u64 = 120_000_000_000;
#[unsafe(no_mangle)]
pub static UDP_PEERS_MAX: u32 = UDP_PEERS_PER_SERVICE;

#[inline(always)]
pub fn udp_reply_idle_ns() -> u64 {
    // SAFETY: as for BPF_LOG.
    unsafe { core::ptr::read_volatile(&UDP_REPLY_IDLE_NS) }
}

#[inline(always)]
pub fn udp_peers_max() -> u32 {
    // SAFETY: as for BPF_LOG.
    unsafe { core::ptr::read_volatile(&UDP_PEERS_MAX) }
}

#[map(name = "DENY_RATE")]
pub static DENY_RATE: PerCpuArray<RateState> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES * 2, 0);

#[map(name = "HELD_SOCKETS")]
pub static HELD_SOCKETS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_HELD_SOCKETS, 0);

#[map(name = "SERVICE_PATHS")]
pub static SERVICE_PATHS: HashMap<[u8; CGROUP_PATH_MAX], ServiceEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "UNIT_NAMES")]
pub static UNIT_NAMES: HashMap<UnitKey, ServiceEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// The cgroup_mkdir watcher's scan of a path (see cgroups.rs).
#[map(name = "UNIT_SCAN")]
pub static UNIT_SCAN: PerCpuArray<UnitPathScan> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "PATH_SCRATCH")]
pub static PATH_SCRATCH: PerCpuArray<[u8; CGROUP_PATH_MAX]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "ACTIVE_FLAGS")]
pub static ACTIVE_FLAGS: Array<u32> = Array::with_max_entries(1, 0);

/// Whether any managed service has one of `flags`.
#[inline(always)]
pub fn any_service_has(flags: u8) -> bool {
    active_flags() & u32::from(flags) != 0
}

/// The OR of every managed service's flags, and the `ACTIVE_*` bits.
#[inline(always)]
pub fn active_flags() -> u32 {
    ACTIVE_FLAGS.get(0).map_or(0, |active| *active)
}

#[map(name = "RULESETS")]
pub static RULESETS: Array<RuleSet> = Array::with_max_entries(DEFAULT_MAX_RULESETS, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

/// Set by the daemon at load time: `EVENTS`' size over `WAKE_FRACTION`
/// (see events::submit).
#[unsafe(no_mangle)]
pub static EVENTS_WAKE_MARK: u64 = DEFAULT_EVENTS_BYTES as u64 / WAKE_FRACTION;

#[inline(always)]
pub fn events_wake_mark() -> u64 {
    // SAFETY: as for BPF_LOG.
    unsafe { core::ptr::read_volatile(&EVENTS_WAKE_MARK) }
}

/// The flows being counted (see `flows.rs`); preallocated, so that a new
/// flow's insert never allocates.
#[map(name = "FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(DEFAULT_FLOW_TABLE, 0);

#[map(name = "FLOW_EPOCH")]
pub static FLOW_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "FLOW_STATS")]
pub static FLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLOW_STAT_SLOTS, 0);

#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES * COUNTER_SLOTS, 0);

/// Who owns a socket, kept on the socket itself. BPF_F_CLONE copies it to
/// every socket accepted from a listener, so that a passive connection
/// knows its service although it is established in softirq context.
/// aya-ebpf's own SkStorage cannot set BPF_F_CLONE, hence this definition
/// (the layout libbpf and aya read from BTF: pointers to arrays whose
/// lengths carry the numbers).
#[repr(C)]
pub struct SockInfoStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockInfo,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholders patched by the loader; never dereferenced.
unsafe impl Sync for SockInfoStorage {}

impl SockInfoStorage {
    #[inline(always)]
    pub fn as_ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

#[btf_map(name = "SOCK_INFO")]
pub static SOCK_INFO: SockInfoStorage = SockInfoStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The owners of connecting TCP sockets, by socket cookie (see
/// owners.rs); preallocated, so that a connect() allocates nothing.
#[map(name = "SOCK_OWNERS")]
pub static SOCK_OWNERS: HashMap<u64, SockInfo> = HashMap::with_max_entries(DEFAULT_SOCK_OWNERS, 0);

/// Set by the daemon at load time: also emit events (never enforce) for
/// tasks outside every managed service.
#[unsafe(no_mangle)]
pub static OBSERVE_UNMANAGED: u8 = 0;

#[inline(always)]
pub fn observe_unmanaged() -> bool {
    // SAFETY: as for BPF_LOG.
    unsafe { core::ptr::read_volatile(&OBSERVE_UNMANAGED) != 0 }
}

/// Set by the daemon at load time (`bpf_log` in the config): when 0, the
/// programs never call aya-log, so diagnostics cost nothing by default.
#[unsafe(no_mangle)]
pub static BPF_LOG: u8 = 0;

#[inline(always)]
pub fn bpf_log_enabled() -> bool {
    // SAFETY: a read of a global the loader may have rewritten in .rodata.
    unsafe { core::ptr::read_volatile(&BPF_LOG) != 0 }
}

/// The addresses services learnt from their own lookups (see names.rs):
/// IPv6 here, IPv4 in LEARNT_V4.
#[map(name = "LEARNT")]
pub static LEARNT: HashMap<LearntKey, LearntValue> =
    HashMap::with_max_entries(DEFAULT_MAX_LEARNT, BPF_F_NO_PREALLOC);

#[map(name = "LEARNT_V4")]
pub static LEARNT_V4: HashMap<LearntV4Key, LearntV4Value> =
    HashMap::with_max_entries(DEFAULT_MAX_LEARNT, BPF_F_NO_PREALLOC);

#[map(name = "DNS_ORIGINS")]
pub static DNS_ORIGINS: LruHashMap<u64, DnsOrigin> = LruHashMap::with_max_entries(DNS_TRACKED, 0);

#[map(name = "DNS_CLIENTS")]
pub static DNS_CLIENTS: LruHashMap<DnsClientKey, DnsOrigin> =
    LruHashMap::with_max_entries(DNS_TRACKED, 0);

#[map(name = "DNS_PROXY")]
pub static DNS_PROXY: Array<DnsProxy> = Array::with_max_entries(1, 0);

/// The executable of each process (see process.rs).
#[map(name = "PROCESSES")]
pub static PROCESSES: LruHashMap<u32, ExeId> = LruHashMap::with_max_entries(PROCESS_TABLE, 0);

#[map(name = "EXE_NAMES")]
pub static EXE_NAMES: LruHashMap<ExeId, [u8; EXE_NAME_MAX]> =
    LruHashMap::with_max_entries(EXE_NAMES_TABLE, 0);

#[map(name = "EXE_SCRATCH")]
pub static EXE_SCRATCH: PerCpuArray<[u8; EXE_NAME_MAX]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "EXE_RULES")]
pub static EXE_RULES: HashMap<ExeRuleKey, ExeRule> =
    HashMap::with_max_entries(QUALIFIER_TABLE, BPF_F_NO_PREALLOC);

#[map(name = "UID_RULES")]
pub static UID_RULES: HashMap<UidRuleKey, u32> =
    HashMap::with_max_entries(QUALIFIER_TABLE, BPF_F_NO_PREALLOC);
