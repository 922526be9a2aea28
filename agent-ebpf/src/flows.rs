//! Counting calls per flow (see `agent_common::flow`): the first call of a
//! flow asks for a record, every later one is an atomic add to its entry.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use agent_common::{
    recorded_when_carried, FlowKey, FlowValue, FLOW_STAT_FULL, RECORD_HELD, RECORD_SENT,
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_current_uid_gid};

use crate::{
    events::event_budget,
    helpers::{current_comm, now_ns},
    maps::{FLOWS, FLOW_EPOCH, FLOW_STATS},
    process::exe_of,
};

/// `-EEXIST` from a map insert with `BPF_NOEXIST`.
const EEXIST: i32 = -17;

/// `carried` when the previous epoch has no entry for the flow (`recorded`
/// is one of agent_common's `RECORD_*`).
const NOT_CARRIED: u8 = 0xff;

/// What the caller must do about a call just counted.
pub enum Report {
    /// Nothing to send: the flow's counters hold the call (or, for a
    /// denial the full table could not count, the rate limit's suppressed
    /// count, which the next record sent carries).
    Counted,
    /// Send a record (the first call of a flow, or a call the full table
    /// could not count); it carries `suppressed` (see `event_budget`).
    Record { suppressed: u32 },
}

/// Who made a new flow's first call, kept in its entry. The socket
/// cookie is asked for only then (a helper call the common case skips).
pub struct Caller<F: Fn() -> u64> {
    pub pid_tgid: u64,
    pub socket_cookie: F,
    pub mode: u8,
}

/// Counts one call of the flow `key` in its entry of the epoch in force,
/// if there is one (the common case: one lookup, one atomic add), and
/// sets `key.epoch` to that epoch either way. `false`: the caller goes on
/// with [`count_new`]. Kept apart so that the hit is inlined in the
/// judge: the subprogram's call and return cost on every call.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference: a copy of the 48-byte key per lookup took stack the verifier's 512 bytes lack"
)]
pub fn count_existing(key: &mut FlowKey) -> bool {
    key.epoch = FLOW_EPOCH.get(0).map_or(0, |e| (*e & 1) as u8);
    match FLOWS.get_ptr_mut(&*key) {
        Some(value) => {
            add(value, 1, 0);
            true
        }
        None => false,
    }
}

/// Counts a call of the flow `key` that [`count_existing`] found no entry
/// of this epoch for (`key.epoch` as it left it; by reference, so that no
/// copy of the key takes stack).
///
/// - The flow is new unless the previous epoch has it (carried over:
///   its first record was sent long ago). A new flow's first call is
///   reported by a record, within the denial rate limit; a call held back
///   by the limit stays unreported in the entry, and the summary counts it.
/// - The table is full: the call gets a record of its own (denials within
///   the limit, the rest counted as suppressed), and the full table is
///   counted. Nothing is lost either way.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference: a copy of the 48-byte key per lookup took stack the verifier's 512 bytes lack"
)]
pub fn count_new<F: Fn() -> u64>(key: &mut FlowKey, caller: &Caller<F>) -> Report {
    key.epoch ^= 1;
    // A plain byte, not an `Option<u8>`: LLVM reads an option's payload
    // even when it is `None`, an uninitialised stack read that verifiers
    // before 6.5 refuse (the 6.1 guest of docs/testing.md).
    // The old entry is in the epoch being swept, whose summary counts a
    // held-back flow: this one must not count it again.
    // SAFETY: a field copied out at once, under the RCU read lock.
    let carried =
        unsafe { FLOWS.get(&*key) }.map_or(NOT_CARRIED, |old| recorded_when_carried(old.recorded));
    key.epoch ^= 1;
    // Asked here only for a new flow's first record. A denial it refuses
    // is not counted as suppressed: the entry keeps the call (or, with the
    // table full, `full` asks again and counts it). A record it lets
    // through carries the denials it held back before (other hooks'
    // refusals, full-table calls), which would otherwise be lost when it
    // resets their count. `full` spends no second budget on a call this
    // one let through.
    let budget = if carried == NOT_CARRIED {
        event_budget(key.verdict, key.service_id, key.direction, false)
    } else {
        None
    };
    let record = budget.is_some();
    let mut value = FlowValue {
        calls: 1,
        reported: u64::from(record),
        first_ns: now_ns(),
        pid_tgid: caller.pid_tgid,
        uid_gid: bpf_get_current_uid_gid(),
        socket_cookie: (caller.socket_cookie)(),
        comm: [0; 16],
        idle_sweeps: 0,
        mode: caller.mode,
        recorded: match (carried, record) {
            (NOT_CARRIED, true) => RECORD_SENT,
            (NOT_CARRIED, false) => RECORD_HELD,
            (carried, _) => carried,
        },
        _pad: [0; 2],
        exe: exe_of((caller.pid_tgid >> 32) as u32),
    };
    current_comm(&mut value.comm);
    match FLOWS.insert(&*key, &value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Another CPU made the entry first: count the call in it.
        Err(EEXIST) => match FLOWS.get_ptr_mut(&*key) {
            Some(existing) => {
                add(existing, 1, u64::from(record));
                if record {
                    // SAFETY: as in `add`; a byte store, 0 to 1 only.
                    unsafe { (*existing).recorded = RECORD_SENT };
                }
            }
            None => return full(key, budget),
        },
        Err(_) => return full(key, budget),
    }
    report(budget)
}

/// A record with the held-back count when the rate limit's `budget` let
/// one through; else the call is only counted.
#[inline(always)]
fn report(budget: Option<u32>) -> Report {
    match budget {
        Some(suppressed) => Report::Record { suppressed },
        None => Report::Counted,
    }
}

/// The table had no room: the call is reported on its own, by a record
/// when `budget` (the rate limit's answer for this call, if asked
/// already) lets one through, else counted as suppressed for the next
/// record: nothing else counts it.
#[inline(always)]
fn full(key: &FlowKey, budget: Option<u32>) -> Report {
    if let Some(count) = FLOW_STATS.get_ptr_mut(FLOW_STAT_FULL) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *count += 1 };
    }
    report(budget.or_else(|| event_budget(key.verdict, key.service_id, key.direction, true)))
}

#[inline(always)]
fn add(value: *mut FlowValue, calls: u64, reported: u64) {
    // SAFETY: a value of our map, valid under the program's RCU read lock;
    // atomic adds, as other CPUs count into the same flow.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*value).calls, calls);
        if reported != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*value).reported,
                reported,
            );
        }
    }
}
