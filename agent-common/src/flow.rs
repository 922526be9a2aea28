//! The in-kernel flow table (`FLOWS`): the first judged call of a flow is
//! a ring-buffer record, every later one only adds to the flow's counters,
//! and the agent turns the counters into flow summaries (docs/events.md).
//!
//! Exactness rests on epochs: the key carries the epoch in force
//! (`FLOW_EPOCH`) when the call was made. To read a flow, the agent flips
//! the epoch, waits until no program can still be running with the old
//! one (`membarrier(MEMBARRIER_CMD_GLOBAL)` waits an RCU grace period), and
//! only then reads and deletes the old epoch's entries: nothing writes to
//! them any more, so nothing can be added after the read.

/// A flow: who (service, cgroup, process), which way, what, and the
/// decision. For the socket-address hooks the local address is not known
/// yet (zero) and the local port is the socket's when bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub cgroup_id: u64,
    /// Remote address; an IPv4 one fills the first 4 bytes.
    pub addr: [u8; 16],
    pub service_id: u32,
    pub rule_id: u32,
    /// The calling process (thread group id).
    pub tgid: u32,
    /// Remote port (0 for ICMP).
    pub port: u16,
    /// Local port when the socket is bound, else 0.
    pub local_port: u16,
    /// `crate::FAMILY_V4` or `crate::FAMILY_V6`.
    pub family: u8,
    pub protocol: u8,
    /// `crate::HOOK_CONNECT` or `crate::HOOK_SENDMSG`.
    pub hook: u8,
    pub direction: u8,
    pub verdict: u8,
    /// 0 or 1: the epoch in force when the entry was made.
    pub epoch: u8,
    pub _pad: [u8; 2],
}

/// What a flow has counted, and who made its first call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// Calls counted in this entry (atomic adds).
    pub calls: u64,
    /// Of those, how many a ring-buffer record reported already (the first
    /// call of a new flow; 0 when the flow carried over from the previous
    /// epoch or the record was held back by the denial rate limit).
    pub reported: u64,
    /// bpf_ktime_get_ns() of the entry's first call (0: carried over by
    /// the agent before any call).
    pub first_ns: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub socket_cookie: u64,
    pub comm: [u8; 16],
    /// Sweeps in a row the flow saw no call (written by the agent when it
    /// carries the flow over to the next epoch).
    pub idle_sweeps: u32,
    /// The service's mode at the first call.
    pub mode: u8,
    /// How the flow's first call was reported: `RECORD_SENT`, or one of
    /// the two held-back states. Held-back flows are summarised together,
    /// per process, without their destinations (a scan must not flood the
    /// log), and each is counted once as a held-back flow.
    pub recorded: u8,
    pub _pad: [u8; 2],
    /// The executable of the process of the first call.
    pub exe: crate::ExeId,
}

/// `FlowValue::recorded`: the denial rate limit held the flow's first
/// call back, and the summary of this entry's epoch counts the flow among
/// the held-back ones.
pub const RECORD_HELD: u8 = 0;
/// A record reported the flow's first call.
pub const RECORD_SENT: u8 = 1;
/// Held back in an earlier epoch, whose summary counted the flow: later
/// calls are summed with the held-back group's, the flow is not counted
/// again (else a scan spanning intervals would count its flows twice).
pub const RECORD_HELD_COUNTED: u8 = 2;

/// What a carried-over entry's `recorded` becomes.
pub const fn recorded_when_carried(recorded: u8) -> u8 {
    if recorded == RECORD_HELD {
        RECORD_HELD_COUNTED
    } else {
        recorded
    }
}

/// Per-CPU `FLOW_STATS` slots.
/// A new flow found the table full: its call was reported by a record of
/// its own instead (nothing lost).
pub const FLOW_STAT_FULL: u32 = 0;
/// A connecting TCP socket found `SOCK_OWNERS` full: its owner went into
/// socket storage instead (nothing lost, the connect cost more).
pub const FLOW_STAT_OWNERS_FULL: u32 = 1;
/// ... and socket storage refused it too (no memory, or the socket's
/// option memory spent): the connection goes unreported.
pub const FLOW_STAT_OWNERS_LOST: u32 = 2;
pub const FLOW_STAT_SLOTS: u32 = 3;
