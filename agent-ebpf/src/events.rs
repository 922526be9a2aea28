//! Sending records to userspace, and counting what could not be sent.

use agent_common::{
    counter_slot, Event, ExeId, ServiceEntry, SockInfo, COUNTER_SLOTS, DENY_EVENTS_PER_SEC,
    KIND_VERDICT, MODE_AUDIT, RECORD_SPAN, VERDICT_AUDIT, VERDICT_DENY,
};
use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, generated::bpf_sk_storage_get},
    maps::ring_buf::RingBufEntry,
};

use crate::{
    helpers::{current_comm, now_ns},
    maps::{events_wake_mark, COUNTERS, DENY_RATE, EVENTS, LOST, SOCK_INFO},
    process::exe_of,
};

/// An all-zero record to fill in.
#[inline(always)]
pub fn blank() -> Event {
    Event {
        kind: 0,
        verdict: 0,
        family: 0,
        protocol: 0,
        hook: 0,
        direction: 0,
        mode: 0,
        passive: 0,
        service_id: 0,
        rule_id: 0,
        ts_ns: 0,
        cgroup_id: 0,
        pid_tgid: 0,
        uid_gid: 0,
        socket_cookie: 0,
        comm: [0; 16],
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        suppressed: 0,
        bytes_sent: 0,
        bytes_received: 0,
        duration_ns: 0,
        exe: ExeId::UNKNOWN,
    }
}

/// The calling task's identity (only meaningful in process context).
#[inline(always)]
pub fn fill_task(ev: &mut Event) {
    ev.pid_tgid = bpf_get_current_pid_tgid();
    ev.uid_gid = bpf_get_current_uid_gid();
    current_comm(&mut ev.comm);
    ev.exe = exe_of((ev.pid_tgid >> 32) as u32);
}

/// Puts `ev` in the ring buffer; when it is full, counts the loss in
/// `LOST[slot]` instead (never silently).
///
/// The reader is not woken per record: it drains on a short timer, and is
/// woken early by the record that fills the ring past a quarter (see
/// `agent_common::WAKE_FRACTION`). A wake-up per record would cost the
/// calling process a reader context switch on every connect(); one for
/// every record past the mark would cost it an interrupt each (a VM exit
/// in a guest) exactly when the reader is behind.
#[inline(always)]
pub fn emit(ev: &Event, lost_slot: u32) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(*ev);
            submit(entry);
        }
        None => lost(lost_slot),
    }
}

/// Submits a record reserved in EVENTS (see `emit`), waking the reader
/// only past the mark.
#[inline(always)]
pub fn submit(entry: RingBufEntry<Event>) {
    // Pending bytes include this record. The mark is the loader's (the
    // ring's size is fixed at load): one helper call per record, not two.
    let pending = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let mark = events_wake_mark();
    let flags = if pending >= mark && pending < mark + RECORD_SPAN {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
}

/// Counts a record the full ring could not take, by `LOST_*` slot.
#[inline(always)]
pub fn lost(lost_slot: u32) {
    if let Some(count) = LOST.get_ptr_mut(lost_slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *count += 1 };
    }
}

/// The rate limit of decision events: `Some(n)` when an event with
/// `verdict` of (`service_id`, `direction`) may be sent now, `n` being how
/// many denials were suppressed on this CPU since the previous one sent
/// (the event carries it); `None` when this one is suppressed (and counted
/// for the next). Only denials are limited: allowed calls are not, nor the
/// would-be denials of an audited service (what its operator watches, and
/// what `learn` learns from). `count_refused`: whether a refused event is
/// counted as suppressed (not when something else counts the call, such
/// as a flow entry).
#[inline(always)]
pub fn event_budget(
    verdict: u8,
    service_id: u32,
    direction: u8,
    count_refused: bool,
) -> Option<u32> {
    if verdict != VERDICT_DENY {
        return Some(0);
    }
    let slot = service_id
        .wrapping_mul(2)
        .wrapping_add(u32::from(direction));
    // No slot (an id past the map: cannot happen) sends, uncounted by the limit.
    let Some(state) = DENY_RATE.get_ptr_mut(slot) else {
        return Some(0);
    };
    let now = now_ns();
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start_ns) >= 1_000_000_000 {
        state.window_start_ns = now;
        state.events = 0;
    }
    if state.events >= DENY_EVENTS_PER_SEC {
        if count_refused {
            state.suppressed = state.suppressed.wrapping_add(1);
        }
        return None;
    }
    state.events += 1;
    let suppressed = state.suppressed;
    state.suppressed = 0;
    Some(suppressed)
}

/// A refusal of `service` (`rule` says why), in `direction` over
/// `protocol`: counts it, and returns its verdict (deny; audit in audit
/// mode) with its record when the rate limit lets one through. The record
/// carries everything common to refusals; the caller adds the addresses
/// and the task, then emits it.
#[inline(always)]
pub fn refusal(
    service: &ServiceEntry,
    direction: u8,
    protocol: u8,
    hook: u8,
    rule: u32,
) -> (u8, Option<Event>) {
    let verdict = if service.mode == MODE_AUDIT {
        VERDICT_AUDIT
    } else {
        VERDICT_DENY
    };
    count(
        service.service_id,
        counter_slot(direction, protocol, verdict),
    );
    let Some(suppressed) = event_budget(verdict, service.service_id, direction, true) else {
        return (verdict, None);
    };
    let mut ev = verdict_record(&Decision {
        verdict,
        service_id: service.service_id,
        mode: service.mode,
        rule,
        protocol,
        hook,
        direction,
    });
    ev.suppressed = suppressed;
    (verdict, Some(ev))
}

/// A decision, as its record states it.
pub struct Decision {
    pub verdict: u8,
    pub service_id: u32,
    pub mode: u8,
    pub rule: u32,
    pub protocol: u8,
    pub hook: u8,
    pub direction: u8,
}

/// The record of `d`, stamped now; the caller adds the ends, the task and
/// the socket.
#[inline(always)]
pub fn verdict_record(d: &Decision) -> Event {
    let mut ev = blank();
    ev.kind = KIND_VERDICT;
    ev.verdict = d.verdict;
    ev.service_id = d.service_id;
    ev.mode = d.mode;
    ev.rule_id = d.rule;
    ev.protocol = d.protocol;
    ev.hook = d.hook;
    ev.direction = d.direction;
    ev.ts_ns = now_ns();
    ev
}

/// Adds one to a service's verdict counter.
#[inline(always)]
pub fn count(service_id: u32, slot: u32) {
    let index = service_id.wrapping_mul(COUNTER_SLOTS).wrapping_add(slot);
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *count += 1 };
    }
}

/// Records who owns `sk` (from the current task), creating its storage.
#[inline(always)]
pub fn remember_owner<C: aya_ebpf::EbpfContext>(ctx: &C, sk: *mut bpf_sock, ev: &Event) {
    remember_caller(ctx, sk, ev.cgroup_id, ev.service_id, ev.mode, ev.pid_tgid);
}

/// [`remember_owner`] from the parts of a record, the task's uid and
/// name asked for here.
#[inline(always)]
pub fn remember_caller<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    sk: *mut bpf_sock,
    cgroup_id: u64,
    service_id: u32,
    mode: u8,
    pid_tgid: u64,
) {
    if sk.is_null() {
        return;
    }
    // SAFETY: sk is the context's socket; the map is an sk_storage map.
    let info = unsafe {
        bpf_sk_storage_get(
            SOCK_INFO.as_ptr(),
            sk.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SockInfo>();
    if crate::maps::bpf_log_enabled() {
        aya_log_ebpf::debug!(ctx, "remember_owner record {}", u8::from(!info.is_null()));
    }
    if info.is_null() {
        return; // no memory for the storage: the socket goes unobserved
    }
    // SAFETY: non-null storage of our value type.
    unsafe {
        (*info).cgroup_id = cgroup_id;
        (*info).pid_tgid = pid_tgid;
        (*info).uid_gid = bpf_get_current_uid_gid();
        current_comm(&mut (*info).comm);
        (*info).exe = exe_of((pid_tgid >> 32) as u32);
        (*info).service_id = service_id;
        (*info).mode = mode;
    }
}
