//! Map names, and what the daemon sizes them by.
//!
//! The daemon opens maps by these names. The kernel side cannot use them:
//! aya-ebpf's `#[map(name = ...)]` takes a string literal only (it becomes
//! the symbol's `export_name`), so each name is spelled once more there.
//! What keeps the two from drifting apart is a test of the daemon
//! (`kernel::loader::contract`), which parses the object the daemon embeds
//! and checks that every name in [`ALL`] is a map in it, with the key and
//! value sizes of the types documented here.

/// cgroup id (u64) -> [`crate::ServiceEntry`]: which cgroups are managed.
pub const SERVICES: &str = "SERVICES";
/// Default entries of SERVICES (`[services] max_cgroups`).
pub const DEFAULT_MAX_CGROUPS: u32 = 8192;
/// LPM trie of [`crate::LpmV4Key`] -> ruleset index (u32), egress IPv4.
pub const EGRESS_V4: &str = "EGRESS_V4";
/// LPM trie of [`crate::LpmV6Key`] -> ruleset index (u32), egress IPv6.
pub const EGRESS_V6: &str = "EGRESS_V6";
/// LPM trie of [`crate::LpmV4Key`] (service, source) -> ruleset index,
/// ingress IPv4.
pub const INGRESS_V4: &str = "INGRESS_V4";
/// LPM trie of [`crate::LpmV6Key`] -> ruleset index, ingress IPv6.
pub const INGRESS_V6: &str = "INGRESS_V6";
/// Hashes of the same keys -> ruleset index, beside each trie above: the
/// entries for one whole address (/32, /128) live here, not in the trie.
/// A whole address is the longest prefix there is, so a lookup that finds
/// it here is the trie's answer, in one hash lookup whatever the number of
/// rules (a trie walk grows with the trie's depth); the trie holds only
/// networks. Allocated as used.
pub const EGRESS_HOSTS_V4: &str = "EGRESS_HOSTS_V4";
pub const EGRESS_HOSTS_V6: &str = "EGRESS_HOSTS_V6";
pub const INGRESS_HOSTS_V4: &str = "INGRESS_HOSTS_V4";
pub const INGRESS_HOSTS_V6: &str = "INGRESS_HOSTS_V6";
/// Hash of [`crate::UdpPeerKey`] -> [`crate::UdpPeer`]: the UDP pinholes of
/// ingress-restricted services, i.e. the peers an unconnected socket sent
/// to (whose replies come in) and the peers a rule let in (which the
/// service may answer). Not an LRU: a flood of one service must not evict
/// another's. Each service holds at most `UDP_PEERS_PER_SERVICE`
/// (`UDP_PEER_COUNT` minus `UDP_PEER_RELEASED`); a pinhole unused for the
/// idle timeout no longer counts, and the agent removes it.
pub const UDP_PEERS: &str = "UDP_PEERS";
/// Array of u64 by service id: how many pinholes the kernel opened for the
/// service. Written by the kernel only (atomic adds).
pub const UDP_PEER_COUNT: &str = "UDP_PEER_COUNT";
/// Array of u64 by service id: how many of those the agent released
/// (removed, or moved to the service's new id after a reload: then the new
/// id's entry goes down, wrapping). Written by the agent only, so neither
/// side's write can overwrite the other's: a service holds
/// `UDP_PEER_COUNT - UDP_PEER_RELEASED` (wrapping) pinholes.
pub const UDP_PEER_RELEASED: &str = "UDP_PEER_RELEASED";
/// Default bound of pinholes per service (`[udp_replies] per_service`).
pub const UDP_PEERS_PER_SERVICE: u32 = 1024;
/// Per-CPU array of [`crate::RateState`] at `service_id * 2 + direction`:
/// rate limit of denial events (see `DENY_EVENTS_PER_SEC`).
pub const DENY_RATE: &str = "DENY_RATE";
/// Entries of UDP_PEERS (allocated as used): room for every service's
/// bound up to this many in all.
pub const DEFAULT_UDP_PEERS: u32 = 65536;

/// Hash of a cgroup path (`/system.slice/x.service`, NUL-padded to
/// [`CGROUP_PATH_MAX`] bytes) -> [`crate::ServiceEntry`]: when a cgroup with
/// a managed service's path is created (a unit (re)starting), the kernel adds
/// it to SERVICES at once, before any process can join it.
pub const SERVICE_PATHS: &str = "SERVICE_PATHS";
pub const CGROUP_PATH_MAX: usize = 256;
/// Hash of [`crate::UnitKey`] -> [`crate::ServiceEntry`]: the systemd units
/// (and templates) managed, found by name wherever systemd puts their
/// cgroup (see `unit.rs`); the cgroup_mkdir watcher adds a matching new
/// cgroup to SERVICES at once.
pub const UNIT_NAMES: &str = "UNIT_NAMES";
/// Per-CPU scratch buffer for a cgroup path.
pub const PATH_SCRATCH: &str = "PATH_SCRATCH";
/// Per-CPU [`crate::UnitPathScan`]: the cgroup_mkdir watcher's scan of a
/// path (kernel only: the daemon never reads it).
pub const UNIT_SCAN: &str = "UNIT_SCAN";

/// Hash of a socket cookie (u64) -> the cgroup id (u64, a SERVICES key) of
/// the managed service that holds the socket though it did not create it
/// (socket activation, inheritance, SCM_RIGHTS), found by the agent's scan:
/// the packet programs judge such a socket by its holder.
pub const HELD_SOCKETS: &str = "HELD_SOCKETS";
pub const MAX_HELD_SOCKETS: u32 = 8192;

/// Array of one u32: the OR of every managed service's flags, so that the
/// per-packet programs (cgroup_skb) return at once on hosts where no
/// service restricts inbound traffic or is quarantined.
pub const ACTIVE_FLAGS: &str = "ACTIVE_FLAGS";

/// Array of [`crate::RuleSet`]: the port/protocol checks behind a prefix.
pub const RULESETS: &str = "RULESETS";

/// Ring buffer of [`crate::Event`] records.
pub const EVENTS: &str = "EVENTS";
/// Per-CPU array of u64: records dropped because `EVENTS` was full, by
/// `LOST_*` slot.
pub const LOST: &str = "LOST";
/// Per-CPU array of u64 verdict counters (see `counter_slot`).
pub const COUNTERS: &str = "COUNTERS";
/// sk_storage of [`crate::SockInfo`] (BTF-defined, cloned to children).
pub const SOCK_INFO: &str = "SOCK_INFO";
/// Hash of socket cookie (u64) -> [`crate::SockInfo`]: the owners of
/// connecting TCP sockets, kept from connect() to the close. Preallocated,
/// so that a connect() allocates nothing; when it is full, a connecting
/// socket's owner goes into `SOCK_INFO` instead.
pub const SOCK_OWNERS: &str = "SOCK_OWNERS";
/// Entries of SOCK_OWNERS: outbound TCP connections of managed services
/// open at one time before the slower socket storage takes the rest.
pub const DEFAULT_SOCK_OWNERS: u32 = 16_384;

/// Default ring buffer size: 4 MiB, about 29,000 records of [`RECORD_SPAN`]
/// (160) bytes: a 152-byte [`crate::Event`] and the ring's 8-byte header.
/// The agent's resident memory counts it twice (the kernel maps its pages
/// twice into the reader, see docs/config.md), so 8 MiB alone took 16 MiB
/// of the 20 MiB the agent may use at start.
pub const DEFAULT_EVENTS_BYTES: u32 = 4 << 20;

/// The kernel wakes the event reader only with the record that fills
/// `EVENTS` past 1/WAKE_FRACTION of its size; otherwise the reader drains
/// on its own timer (`events::reader::DRAIN_*`). Waking per record would
/// put a reader context switch on every connect() of a managed service.
pub const WAKE_FRACTION: u64 = 4;

/// Bytes one [`crate::Event`] takes in `EVENTS`: the record and the ring's
/// 8-byte header, rounded up to 8.
pub const RECORD_SPAN: u64 = ((core::mem::size_of::<crate::Event>() + 8 + 7) & !7) as u64;

/// Upper bound on how deep in the cgroup tree a service may sit. The kernel
/// walks the current task's ancestors up to this depth to find its service.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Default capacities; the daemon sizes the maps from the policy and never
/// goes below these.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
pub const DEFAULT_MAX_PREFIXES: u32 = 1024;
pub const DEFAULT_MAX_RULESETS: u32 = 256;

/// Every map of the kernel programs, by name. Besides these, the object
/// holds aya-log's [`AYA_LOGS`] and the maps of its data sections
/// (`.rodata`, `.bss`: their names start with a dot).
pub const ALL: [&str; 38] = [
    SERVICES,
    EGRESS_V4,
    EGRESS_V6,
    INGRESS_V4,
    INGRESS_V6,
    EGRESS_HOSTS_V4,
    EGRESS_HOSTS_V6,
    INGRESS_HOSTS_V4,
    INGRESS_HOSTS_V6,
    UDP_PEERS,
    UDP_PEER_COUNT,
    UDP_PEER_RELEASED,
    DENY_RATE,
    SERVICE_PATHS,
    UNIT_NAMES,
    PATH_SCRATCH,
    UNIT_SCAN,
    HELD_SOCKETS,
    ACTIVE_FLAGS,
    RULESETS,
    EVENTS,
    LOST,
    COUNTERS,
    SOCK_INFO,
    SOCK_OWNERS,
    FLOWS,
    FLOW_EPOCH,
    FLOW_STATS,
    crate::LEARNT,
    crate::LEARNT_V4,
    crate::DNS_ORIGINS,
    crate::DNS_CLIENTS,
    crate::DNS_PROXY,
    PROCESSES,
    EXE_NAMES,
    EXE_SCRATCH,
    EXE_RULES,
    UID_RULES,
];

/// LRU hash of a thread group id (u32) -> [`crate::ExeId`]: the executable
/// each process runs (see `process.rs`). Written by the exec and fork
/// tracepoints and the agent's start-up scan; an entry goes when its
/// process does. An LRU so that a host with more processes than entries
/// loses the least used ones (their next decision knows no executable and
/// an `exe`-qualified rule does not allow it: fail closed), not new ones.
pub const PROCESSES: &str = "PROCESSES";
/// Entries of PROCESSES.
pub const PROCESS_TABLE: u32 = 65_536;
/// LRU hash of [`crate::ExeId`] -> the file name an exec of it was asked
/// for ([u8; `crate::EXE_NAME_MAX`], NUL-padded): how the agent names an
/// executable whose process is already gone when its record is read.
pub const EXE_NAMES: &str = "EXE_NAMES";
pub const EXE_NAMES_TABLE: u32 = 4096;
/// Per-CPU scratch ([u8; `crate::EXE_NAME_MAX`]) for the exec tracepoint.
pub const EXE_SCRATCH: &str = "EXE_SCRATCH";
/// Hash of [`crate::ExeRuleKey`] -> [`crate::ExeRule`]: the qualified
/// rules of the service that this executable satisfies (bit i: the rule
/// whose `PortRange::qualifier` is i + 1), with the rules that name no
/// executable (`ServiceEntry::exe_free`) included, and the file's inode
/// generation. Allocated as used.
pub const EXE_RULES: &str = "EXE_RULES";
/// Hash of [`crate::UidRuleKey`] -> u32: the same for users
/// (`ServiceEntry::uid_free` when absent).
pub const UID_RULES: &str = "UID_RULES";
/// Entries of EXE_RULES and UID_RULES (both halves).
pub const QUALIFIER_TABLE: u32 = 16_384;

/// Hash of [`crate::FlowKey`] -> [`crate::FlowValue`]: the flows being
/// counted (see `flow.rs`). Preallocated, so a new flow costs no
/// allocation; when it is full a new flow's calls are reported one record
/// each (counted in `FLOW_STATS`), and the agent keeps it below full by
/// ending the flows idle longest.
pub const FLOWS: &str = "FLOWS";
/// Default entries of FLOWS (`[flows] table_size`).
pub const DEFAULT_FLOW_TABLE: u32 = 32768;
/// Array of one u32: the epoch (0 or 1) new flow entries are made in.
pub const FLOW_EPOCH: &str = "FLOW_EPOCH";
/// Per-CPU array of u64 by `FLOW_STAT_*`.
pub const FLOW_STATS: &str = "FLOW_STATS";

/// aya-log's ring buffer (written only when the `BPF_LOG` global is set).
pub const AYA_LOGS: &str = "AYA_LOGS";
