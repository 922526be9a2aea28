//! Values of the policy maps.

/// The service is enforced: a connection no rule allows gets EPERM.
pub const MODE_ENFORCE: u8 = 0;
/// The service is audited: everything goes through; would-be denials are
/// recorded.
pub const MODE_AUDIT: u8 = 1;

/// Matches any protocol in a [`PortRange`].
pub const PROTO_ANY: u8 = 0;
/// IP protocol numbers (`IPPROTO_*`), as the kernel reports them in a
/// socket's `protocol` and the records carry them.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP echo from ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`). ICMPv6
/// ping sockets (`IPPROTO_ICMPV6`, 58) are judged as this protocol too, so
/// that one `protocol = "icmp"` rule covers both families.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// Protocols `[sockets] protocols` may allow (see `SOCKETS_*`). A socket's
/// protocol is a u32 in the kernel: MPTCP's number does not fit a u8, so
/// these are u32 (a refusal's record carries the number in `dst_port`).
pub const PROTO_DCCP: u32 = 33;
pub const PROTO_L2TP: u32 = 115;
pub const PROTO_SCTP: u32 = 132;
pub const PROTO_UDPLITE: u32 = 136;
pub const PROTO_MPTCP: u32 = 262;

/// How many (protocol, port range) checks one prefix can carry. The kernel
/// scans them linearly, so this bounds the verdict path.
pub const MAX_PORT_RANGES: usize = 32;

/// Rule id used when no rule matched (the service's default deny).
pub const RULE_DEFAULT_DENY: u32 = u32::MAX;
/// Rule id of a UDP datagram allowed out because it answers a peer that
/// `[[ingress]]` let in (like a TCP reply on an accepted connection).
pub const RULE_UDP_REPLY: u32 = u32::MAX - 1;
/// Rule id of a refusal by `[bind]` outside bind(): a SYN to a listener on
/// a port `[bind]` does not list (the kernel bound it at listen()).
pub const RULE_BIND: u32 = u32::MAX - 2;
/// Rule id of a packet dropped because it could not be read (fail closed).
pub const RULE_UNREADABLE: u32 = u32::MAX - 3;
/// Rule id of a refused source route (an IPv4 LSRR/SSRR option, an IPv6
/// routing header): its first hop was never judged.
pub const RULE_SOURCE_ROUTE: u32 = u32::MAX - 4;

/// `ServiceEntry::flags`: inbound connections and datagrams are judged by
/// the INGRESS tries (the policy has an `ingress` list).
pub const FLAG_INGRESS: u8 = 1;
/// bind() is judged by `bind_ruleset` (the policy has a `[bind]` table).
pub const FLAG_BIND: u8 = 2;
/// Raw inet sockets (SOCK_RAW) are allowed.
pub const FLAG_ALLOW_RAW: u8 = 4;
/// Packet sockets (AF_PACKET) are allowed.
pub const FLAG_ALLOW_PACKET: u8 = 8;
/// The service is quarantined: every packet in or out, established
/// connections included, must match its (exception-only) rules.
pub const FLAG_QUARANTINE: u8 = 16;
/// The service has `[[egress]]` rules with names (see `dns.rs`): its DNS
/// lookups go through the agent's proxy, and LEARNT widens its egress.
pub const FLAG_NAMES: u8 = 32;

/// `ServiceEntry::sockets`: socket kinds a service may create besides TCP,
/// UDP and raw sockets (`FLAG_ALLOW_RAW`). Ping sockets (the policy has a
/// `protocol = "icmp"` egress rule).
pub const SOCKETS_ICMP: u8 = 1;
/// `[sockets] protocols`: kinds whose connect/send the socket-address hooks
/// never see, allowed by name.
pub const SOCKETS_SCTP: u8 = 2;
pub const SOCKETS_MPTCP: u8 = 4;
pub const SOCKETS_DCCP: u8 = 8;
pub const SOCKETS_UDPLITE: u8 = 16;
pub const SOCKETS_L2TP: u8 = 32;

/// `ACTIVE_FLAGS` bits beyond the services' `FLAG_*` (bits 0-7): some
/// service may create ping sockets (the packet programs judge their
/// datagrams), and some service is managed at all (the packet programs
/// look for source-routed packets).
pub const ACTIVE_ICMP: u32 = 1 << 8;
pub const ACTIVE_MANAGED: u32 = 1 << 9;

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Index of the service in the daemon's model (used in LPM keys).
    pub service_id: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// `SOCKETS_*` bits.
    pub sockets: u8,
    /// `QUALIFY_*` bits: which qualifier lookups a decision needs.
    pub qualifiers: u8,
    /// Index in `RULESETS` of the ports the service may bind (with
    /// [`FLAG_BIND`]).
    pub bind_ruleset: u32,
    /// With [`FLAG_NAMES`]: index in `RULESETS` of the first of the
    /// service's `NAME_RULESETS` (see `dns.rs`).
    pub names_ruleset: u32,
    /// Stable across reloads and restarts (a hash of the service's name),
    /// unlike `service_id`: what its learnt addresses are keyed by.
    pub name_key: u64,
    /// Qualified rules that name no executable (a caller whose
    /// executable is in no `EXE_RULES` entry satisfies these).
    pub exe_free: u32,
    /// Qualified rules that name no user.
    pub uid_free: u32,
}

/// Bits of the service id at the front of every LPM key.
pub const LPM_SERVICE_BITS: u32 = 32;

/// Key of the IPv4 LPM tries (EGRESS_V4, INGRESS_V4): the service id and
/// the address, both big-endian (the trie compares bits from the first
/// byte), so that an entry for a network has the prefix length
/// [`LpmV4Key::prefix_len`] and a lookup of one address uses
/// [`LpmV4Key::FULL_PREFIX`]. Build keys with [`LpmV4Key::new`] only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmV4Key {
    pub service_id: [u8; 4],
    pub addr: [u8; 4],
}

impl LpmV4Key {
    /// The prefix length of a lookup: every bit of the key.
    pub const FULL_PREFIX: u32 = LPM_SERVICE_BITS + 32;

    /// The key of `addr` (network order, as the packet or `sockaddr` has
    /// it) for the service `service_id`.
    #[inline(always)]
    #[must_use]
    pub const fn new(service_id: u32, addr: [u8; 4]) -> Self {
        Self {
            service_id: service_id.to_be_bytes(),
            addr,
        }
    }

    /// The prefix length of an entry for a network of `cidr_len` bits.
    #[inline(always)]
    #[must_use]
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        LPM_SERVICE_BITS + cidr_len as u32
    }

    /// The service id the key belongs to.
    #[inline(always)]
    #[must_use]
    pub const fn service(&self) -> u32 {
        u32::from_be_bytes(self.service_id)
    }
}

/// Key of the IPv6 LPM tries (EGRESS_V6, INGRESS_V6), laid out as
/// [`LpmV4Key`]. Build keys with [`LpmV6Key::new`] only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmV6Key {
    pub service_id: [u8; 4],
    pub addr: [u8; 16],
}

impl LpmV6Key {
    /// The prefix length of a lookup: every bit of the key.
    pub const FULL_PREFIX: u32 = LPM_SERVICE_BITS + 128;

    /// The key of `addr` (network order) for the service `service_id`.
    #[inline(always)]
    #[must_use]
    pub const fn new(service_id: u32, addr: [u8; 16]) -> Self {
        Self {
            service_id: service_id.to_be_bytes(),
            addr,
        }
    }

    /// The prefix length of an entry for a network of `cidr_len` bits.
    #[inline(always)]
    #[must_use]
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        LPM_SERVICE_BITS + cidr_len as u32
    }

    /// The service id the key belongs to.
    #[inline(always)]
    #[must_use]
    pub const fn service(&self) -> u32 {
        u32::from_be_bytes(self.service_id)
    }
}

/// One allowed (protocol, port range) behind a prefix, and the rule that
/// allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First allowed port, host byte order.
    pub lo: u16,
    /// Last allowed port, inclusive.
    pub hi: u16,
    /// [`PROTO_ANY`], [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// 0: any caller; else the rule's bit + 1 in the service's qualifier
    /// masks (`EXE_RULES`, `UID_RULES`): only a caller that satisfies the
    /// rule's `exe`/`uid` matches.
    pub qualifier: u8,
    pub _pad: [u8; 2],
    /// Global rule id (the daemon maps it back to `file#egress[i]`).
    pub rule_id: u32,
}

impl PortRange {
    pub const EMPTY: PortRange = PortRange {
        lo: 1,
        hi: 0,
        proto: PROTO_ANY,
        qualifier: 0,
        _pad: [0; 2],
        rule_id: RULE_DEFAULT_DENY,
    };
}

/// Everything a prefix allows: the first `len` entries of `ranges` are valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub len: u32,
    pub _pad: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

impl RuleSet {
    pub const EMPTY: RuleSet = RuleSet {
        len: 0,
        _pad: 0,
        ranges: [PortRange::EMPTY; MAX_PORT_RANGES],
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and
    // arrays of integers, with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::LpmV4Key {}
    unsafe impl aya::Pod for super::LpmV6Key {}
    unsafe impl aya::Pod for super::PortRange {}
    unsafe impl aya::Pod for super::RuleSet {}
}
