//! Records the kernel programs send to userspace through the `EVENTS` ring
//! buffer, and the per-socket state they keep.

/// A connect()/sendmsg() decision for a managed (or, when observed, an
/// unmanaged) task.
pub const KIND_VERDICT: u8 = 1;
/// A TCP connection reached ESTABLISHED (active or passive open).
pub const KIND_TCP_ESTABLISHED: u8 = 2;
/// A TCP connection that was established is closed.
pub const KIND_TCP_CLOSED: u8 = 3;

pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;
/// Would have been denied; let through because the service is in audit mode.
pub const VERDICT_AUDIT: u8 = 2;
/// Not a decision (lifecycle events).
pub const VERDICT_NONE: u8 = 255;

pub const HOOK_CONNECT: u8 = 1;
pub const HOOK_SENDMSG: u8 = 2;
pub const HOOK_SOCK_OPS: u8 = 3;
pub const HOOK_BIND: u8 = 4;
/// cgroup/sock_create: socket() of an inet socket.
pub const HOOK_SOCK_CREATE: u8 = 5;
/// lsm/socket_create: socket() of any family (packet sockets).
pub const HOOK_LSM_SOCKET: u8 = 6;
/// cgroup_skb/ingress: an inbound packet for a service's socket.
pub const HOOK_INGRESS: u8 = 7;
/// cgroup_skb/egress: an outbound packet judged on its way out (a ping
/// socket's datagram, a source-routed packet).
pub const HOOK_EGRESS_PACKET: u8 = 8;
/// cgroup/setsockopt: an option that would send packets around the policy
/// (source routing).
pub const HOOK_SETSOCKOPT: u8 = 9;

pub const DIRECTION_EGRESS: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;

/// `Event::family`, `UdpPeerKey::family`: bulkhead's own codes for the
/// address family (not `AF_*`); an IPv4 address fills the first 4 bytes of
/// a 16-byte address field.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `service_id` of a task that belongs to no managed service.
pub const SERVICE_NONE: u32 = u32::MAX;

/// Indexes of the per-CPU `LOST` counters: where a record was dropped
/// because the ring buffer was full.
pub const LOST_VERDICT: u32 = 0;
pub const LOST_TCP: u32 = 1;
pub const LOST_INGRESS: u32 = 2;
pub const LOST_SLOTS: u32 = 3;

/// At most this many denial events per service, direction and second (per
/// CPU). The verdict counters still count every decision, and the next
/// event sent says how many were suppressed before it (`Event::suppressed`),
/// so a flood of denials cannot flood the log and nothing goes uncounted.
pub const DENY_EVENTS_PER_SEC: u32 = 100;

/// Key of the `UDP_PEERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPeerKey {
    pub socket_cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Padding, zero: two fields, not a `[u8; 5]`, which the kernel
    /// programs zeroed with a call to the linker's byte-at-a-time memset.
    pub _pad: u8,
    pub _pad4: u32,
}

/// Value of `UDP_PEERS`: when the pinhole was last used to let a datagram
/// through or refreshed by a send, whose it is and why it exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPeer {
    /// bpf_ktime_get_ns() of the last send to the peer (or of the datagram
    /// a rule let in).
    pub seen_ns: u64,
    /// The service's id when it was made (the agent rewrites it when a
    /// reload moves the service to new ids).
    pub service_id: u32,
    /// For `PEER_LET_IN`: the local port the peer sent to.
    pub local_port: u16,
    /// `PEER_SENT` or `PEER_LET_IN`.
    pub origin: u8,
    pub _pad: u8,
}

/// `UdpPeer::origin`: the service sent to the peer (an egress rule allowed
/// it), so the peer's answers come in.
pub const PEER_SENT: u8 = 0;
/// An ingress rule let the peer in, so the service may answer it.
pub const PEER_LET_IN: u8 = 1;

/// Value of `DENY_RATE`: a one-second window, how many denial events it
/// has sent, and how many it suppressed since the last one sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateState {
    pub window_start_ns: u64,
    pub events: u32,
    pub suppressed: u32,
}

/// One record of the ring buffer. A single layout for every kind keeps the
/// kernel side simple; fields that do not apply are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u8,
    pub verdict: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// An IP protocol number: `crate::PROTO_TCP`, `crate::PROTO_UDP`, ...
    pub protocol: u8,
    pub hook: u8,
    pub direction: u8,
    /// The service's mode when the decision was made.
    pub mode: u8,
    /// 1 when this TCP socket was opened by a peer (passive open).
    pub passive: u8,
    pub service_id: u32,
    pub rule_id: u32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub socket_cookie: u64,
    pub comm: [u8; 16],
    /// Local end (for verdicts: zero; the kernel has not picked it yet).
    pub src_addr: [u8; 16],
    /// Remote end (for verdicts: the destination asked for).
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// Denial events of this service and direction that the rate limit
    /// suppressed on this CPU since the previous one sent.
    pub suppressed: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ns: u64,
    /// The calling (for lifecycle records: the owning) process's
    /// executable; unknown when zero (`crate::process`).
    pub exe: crate::ExeId,
}

/// Per-socket state (sk_storage, cloned to accepted sockets): who owns the
/// socket, kept from the process context where it was connected or bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockInfo {
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    /// When the connection was established (0 before).
    pub established_ns: u64,
    /// bytes_acked / bytes_received at establishment (the SYNs), so that
    /// the closed record counts payload only.
    pub acked_base: u64,
    pub received_base: u64,
    pub comm: [u8; 16],
    pub service_id: u32,
    pub mode: u8,
    /// 1 once established by a peer's connect (accepted socket).
    pub passive: u8,
    /// 1 once a segment carrying the peer's FIN reached the socket (while
    /// established or closing), whose FIN then ends at `peer_fin_end` in
    /// the peer's sequence space.
    pub peer_fin: u8,
    /// 1 once the socket asked for its state changes (at `tcp_connect()`
    /// or at establishment): its close removes a `SOCK_OWNERS` entry.
    pub armed: u8,
    pub exe: crate::ExeId,
    pub peer_fin_end: u32,
    pub _pad2: [u8; 4],
}

/// Verdict counters, per service: `COUNTERS[service_id * COUNTER_SLOTS + slot]`.
/// slot = direction * 6 + protocol_index * 3 + verdict (allow, deny, audit),
/// protocol_index 0 = TCP, 1 = UDP and everything else.
pub const COUNTER_SLOTS: u32 = 12;

#[inline(always)]
#[must_use]
pub const fn counter_slot(direction: u8, protocol: u8, verdict: u8) -> u32 {
    let proto_index = if protocol == crate::PROTO_TCP { 0 } else { 1 };
    direction as u32 * 6 + proto_index * 3 + verdict as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers and integer arrays only, explicit padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::UdpPeerKey {}
    unsafe impl aya::Pod for super::UdpPeer {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for crate::FlowKey {}
    unsafe impl aya::Pod for crate::FlowValue {}
}
