//! Egress by DNS name (docs/dns-names.md): what the kernel and the agent's
//! DNS proxy share.
//!
//! A service with name rules ([`crate::FLAG_NAMES`]) has its port-53
//! connects and datagrams sent to the agent's proxy instead of the resolver
//! it asked for (once its own rules allow that resolver); the proxy forwards
//! the query there and, before the answer goes back, writes the addresses
//! of allowed names into [`LEARNT_V4`] or [`LEARNT`]. The judge allows an
//! address its address rules deny while that map holds it for the service.

/// Hash of [`LearntKey`] -> [`LearntValue`]: the IPv6 addresses each
/// service learnt from its own lookups (IPv4 ones are in [`LEARNT_V4`];
/// an agent before that split kept both here, which a restart still
/// reads). Allocated as used; pinned, so a restart changes nothing the
/// kernel enforces.
pub const LEARNT: &str = "LEARNT";
/// Hash of [`LearntV4Key`] -> [`LearntV4Value`]: the IPv4 addresses each
/// service learnt. A map of its own so that its key is 8 bytes, as an
/// address rule's (`EGRESS_HOSTS_V4`): the judge asks it on every call of a
/// service with name rules, and the kernel hashes and compares the whole
/// key (docs/dns-names.md, "Added latency and connect cost"). An agent
/// before that kept a 12-byte key (see [`LEARNT_V4_KEY_BEFORE`]), which a
/// restart still reads.
pub const LEARNT_V4: &str = "LEARNT_V4";
/// Default entries of LEARNT and of LEARNT_V4 each (`[dns] max_learnt`,
/// which the agent's cache holds in all).
pub const DEFAULT_MAX_LEARNT: u32 = 65_536;
/// LRU hash of a socket cookie (u64) -> [`DnsOrigin`]: the resolver a
/// redirected socket asked for (what recvmsg/getpeername show it, and what
/// the proxy forwards to).
pub const DNS_ORIGINS: &str = "DNS_ORIGINS";
/// LRU hash of [`DnsClientKey`] -> [`DnsOrigin`]: who sent a packet to the
/// proxy, written by the egress packet program before the packet gets
/// there (the proxy sees only the client's address and port).
pub const DNS_CLIENTS: &str = "DNS_CLIENTS";
/// Entries of DNS_ORIGINS and DNS_CLIENTS: lookups in flight, not sockets
/// alive; an LRU, so the oldest go first.
pub const DNS_TRACKED: u32 = 16_384;
/// Array of one [`DnsProxy`]: where the proxy listens, and its heartbeat.
pub const DNS_PROXY: &str = "DNS_PROXY";

/// How many `[[egress]]` rules with names one service may have: a learnt
/// address carries a bitmap of the ones whose names it answered, and the
/// service's [`crate::ServiceEntry::names_ruleset`] is the first of
/// `1 << MAX_NAME_RULES` rulesets, one per bitmap, each the union of those
/// rules' ports.
pub const MAX_NAME_RULES: usize = 4;
/// Rulesets a service with name rules takes (index 0, no rule, is empty).
pub const NAME_RULESETS: u32 = 1 << MAX_NAME_RULES;

/// The proxy is gone when its heartbeat is older than this: the hooks stop
/// redirecting (lookups go to the resolver itself, nothing is learnt, so
/// new names fail closed) and learnt addresses stop expiring (nothing could
/// refresh them): what was allowed stays allowed.
pub const DNS_HEARTBEAT_GRACE_NS: u64 = 30_000_000_000;

/// The mark the ingress program puts on a UDP query as it reaches the
/// proxy's socket (`skb->mark`, which the proxy reads with each datagram
/// through `SO_RCVMARK`): a digest of the `name_key` of the service its
/// client's `DNS_CLIENTS` entry names then, never 0 (0 is "no mark"). `DNS_CLIENTS` is keyed by the
/// client's address and port; if a query waits in the proxy's socket
/// while its client's port passes to another service's socket, whose
/// query rewrites the entry, the mark says the waiting query is not that
/// service's (docs/dns-names.md, "Who asked").
#[must_use]
pub const fn dns_mark(name_key: u64) -> u32 {
    let folded = fold(name_key);
    if folded == 0 {
        1
    } else {
        folded
    }
}

/// `name_key` in 32 bits (its two halves xor-ed): what [`LearntV4Key`]
/// and [`dns_mark`] carry of it.
#[must_use]
#[inline(always)]
pub const fn fold(name_key: u64) -> u32 {
    (name_key ^ (name_key >> 32)) as u32
}

/// Key of LEARNT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LearntKey {
    /// [`crate::ServiceEntry::name_key`]: stable across reloads and
    /// restarts, unlike the service id.
    pub name_key: u64,
    /// `FAMILY_V6`; an agent before LEARNT_V4 also wrote `FAMILY_V4`
    /// here (address in the first 4 bytes, the rest 0).
    pub family: u8,
    /// Padding, zero: three fields, not a `[u8; 7]`, which the kernel
    /// programs zeroed with a call to the linker's byte-at-a-time memset.
    pub _pad: u8,
    pub _pad2: u16,
    pub _pad4: u32,
    pub addr: [u8; 16],
}

impl LearntKey {
    /// The key of an IPv6 address learnt under `name_key`.
    #[inline]
    pub fn v6(name_key: u64, addr: [u8; 16]) -> Self {
        Self {
            name_key,
            family: crate::FAMILY_V6,
            _pad: 0,
            _pad2: 0,
            _pad4: 0,
            addr,
        }
    }
}

/// Key of LEARNT_V4: 8 bytes, no padding and no alignment.
///
/// Two services whose `name_key`s fold to the same 32 bits share the keys
/// of their addresses: the value names whose entry it is, the programs
/// allow only that service, and an address both learnt is held for one of
/// them at a time (the other is denied it until it looks it up again). The
/// agent warns of such a pair when it loads the policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LearntV4Key {
    /// [`fold`] of [`crate::ServiceEntry::name_key`], native-order bytes.
    pub name_fold: [u8; 4],
    pub addr: [u8; 4],
}

impl LearntV4Key {
    #[must_use]
    #[inline(always)]
    pub const fn new(name_key: u64, addr: [u8; 4]) -> Self {
        Self {
            name_fold: fold(name_key).to_ne_bytes(),
            addr,
        }
    }
}

/// Value of LEARNT_V4: [`LearntValue`] and whose entry it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearntV4Value {
    /// As [`LearntValue::expires_ns`].
    pub expires_ns: u64,
    /// The [`crate::ServiceEntry::name_key`] that learnt it: the programs
    /// allow the address only to that service (see [`LearntV4Key`]).
    pub name_key: u64,
    /// As [`LearntValue::rules`].
    pub rules: u8,
    pub _pad: [u8; 7],
}

impl LearntV4Value {
    #[must_use]
    pub const fn new(name_key: u64, v: LearntValue) -> Self {
        Self {
            expires_ns: v.expires_ns,
            name_key,
            rules: v.rules,
            _pad: [0; 7],
        }
    }

    #[must_use]
    pub const fn learnt(&self) -> LearntValue {
        LearntValue {
            expires_ns: self.expires_ns,
            rules: self.rules,
            _pad: [0; 7],
        }
    }
}

/// The key size of LEARNT_V4 in an agent before [`LearntV4Key`] was 8
/// bytes: `name_key` (native order) then the address, with a
/// [`LearntValue`]. Read only from a previous agent's pins.
pub const LEARNT_V4_KEY_BEFORE: usize = 12;

/// Value of LEARNT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearntValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) after which it is no longer
    /// allowed (unless the proxy is gone, see [`DNS_HEARTBEAT_GRACE_NS`]).
    pub expires_ns: u64,
    /// Bit i: the service's i-th name rule allows a name that gave it.
    pub rules: u8,
    pub _pad: [u8; 7],
}

/// The resolver a service's socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrigin {
    /// [`crate::ServiceEntry::name_key`] of the asking service.
    pub name_key: u64,
    /// Its service id (for events; the policy in force when it asked).
    pub service_id: u32,
    /// Resolver port, host order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u8,
    /// Resolver address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// Key of DNS_CLIENTS: a client socket's local address as the proxy sees
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsClientKey {
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    pub family: u8,
    /// Client port, host order.
    pub port: u16,
    pub addr: [u8; 16],
}

/// Value of DNS_PROXY.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsProxy {
    /// CLOCK_MONOTONIC of the proxy's last beat (0: never).
    pub heartbeat_ns: u64,
    /// IPv4 listening address; port 0: none (IPv4 lookups not redirected).
    pub addr4: [u8; 4],
    /// Ports, host order.
    pub port4: u16,
    pub port6: u16,
    /// IPv6 listening address; `port6` 0: none.
    pub addr6: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data with explicit padding, every bit
    // pattern valid.
    unsafe impl aya::Pod for super::LearntKey {}
    unsafe impl aya::Pod for super::LearntV4Key {}
    unsafe impl aya::Pod for super::LearntValue {}
    unsafe impl aya::Pod for super::LearntV4Value {}
    unsafe impl aya::Pod for super::DnsOrigin {}
    unsafe impl aya::Pod for super::DnsClientKey {}
    unsafe impl aya::Pod for super::DnsProxy {}
}
