//! The layout of every value that crosses the boundary, checked when this
//! crate compiles (for the bpf target and for the daemon alike).
//!
//! For each `#[repr(C)]` type: its size, and that its fields, all listed,
//! add up to that size, i.e. there is no implicit padding (every byte is a
//! field the programs initialise, so no uninitialised kernel memory reaches
//! a map or the ring buffer, and a field added without its padding fails
//! here). Offsets are pinned where a layout is part of the contract beyond
//! "the same struct on both sides" (the LPM keys: the trie compares bits
//! from the first byte).

use core::mem::{align_of, offset_of, size_of};

use crate::{
    counter_slot, DnsClientKey, DnsOrigin, DnsProxy, Event, ExeId, ExeRule, ExeRuleKey, FlowKey,
    FlowValue, LearntKey, LearntV4Key, LearntV4Value, LearntValue, LpmV4Key, LpmV6Key, PortRange,
    RateState, RuleSet, ServiceEntry, SockInfo, UdpPeer, UdpPeerKey, UidRuleKey, UnitKey,
    CGROUP_PATH_MAX, COUNTER_SLOTS, DEFAULT_EVENTS_BYTES, DIRECTION_INGRESS, LOST_INGRESS,
    LOST_SLOTS, LOST_TCP, LOST_VERDICT, LPM_SERVICE_BITS, MAX_PORT_RANGES, PROTO_UDP, RECORD_SPAN,
    VERDICT_AUDIT,
};

/// The size of the field `access` reads (never called).
const fn field_size<T, F>(_access: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `$ty` is `$size` bytes, and `$field`s (every field) fill it exactly.
macro_rules! assert_layout {
    ($ty:ty, $size:expr, [$($field:ident),+ $(,)?]) => {
        const _: () = {
            assert!(
                size_of::<$ty>() == $size,
                concat!("size of ", stringify!($ty), " changed: the other side reads it too")
            );
            let fields = 0 $(+ field_size(|v: &$ty| &v.$field))+;
            assert!(
                fields == size_of::<$ty>(),
                concat!(
                    stringify!($ty),
                    " has implicit padding or a field missing from this list"
                )
            );
        };
    };
}

assert_layout!(
    ServiceEntry,
    32,
    [
        service_id,
        mode,
        flags,
        sockets,
        qualifiers,
        bind_ruleset,
        names_ruleset,
        name_key,
        exe_free,
        uid_free
    ]
);
assert_layout!(LearntKey, 32, [name_key, family, _pad, _pad2, _pad4, addr]);
assert_layout!(LearntV4Key, 8, [name_fold, addr]);
const _: () = assert!(
    align_of::<LearntV4Key>() == 1,
    "LearntV4Key is packed bytes"
);
assert_layout!(LearntValue, 16, [expires_ns, rules, _pad]);
assert_layout!(LearntV4Value, 24, [expires_ns, name_key, rules, _pad]);
assert_layout!(
    DnsOrigin,
    32,
    [name_key, service_id, port, family, _pad, addr]
);
assert_layout!(DnsClientKey, 20, [protocol, family, port, addr]);
assert_layout!(DnsProxy, 32, [heartbeat_ns, addr4, port4, port6, addr6]);
assert_layout!(LpmV4Key, 8, [service_id, addr]);
assert_layout!(LpmV6Key, 20, [service_id, addr]);
assert_layout!(PortRange, 12, [lo, hi, proto, qualifier, _pad, rule_id]);
assert_layout!(ExeId, 16, [ino, dev, gen]);
assert_layout!(ExeRule, 12, [mask, gen, checks_gen]);
assert_layout!(ExeRuleKey, 16, [ino, dev, service_id]);
assert_layout!(UidRuleKey, 8, [service_id, uid]);
assert_layout!(RuleSet, 8 + MAX_PORT_RANGES * 12, [len, _pad, ranges]);
assert_layout!(
    UdpPeerKey,
    32,
    [socket_cookie, addr, port, family, _pad, _pad4]
);
assert_layout!(UdpPeer, 16, [seen_ns, service_id, local_port, origin, _pad]);
assert_layout!(RateState, 16, [window_start_ns, events, suppressed]);
assert_layout!(UnitKey, 16, [manager, kind, hash]);
assert_layout!(
    Event,
    152,
    [
        kind,
        verdict,
        family,
        protocol,
        hook,
        direction,
        mode,
        passive,
        service_id,
        rule_id,
        ts_ns,
        cgroup_id,
        pid_tgid,
        uid_gid,
        socket_cookie,
        comm,
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        suppressed,
        bytes_sent,
        bytes_received,
        duration_ns,
        exe,
    ]
);
assert_layout!(
    SockInfo,
    96,
    [
        cgroup_id,
        pid_tgid,
        uid_gid,
        established_ns,
        acked_base,
        received_base,
        comm,
        service_id,
        mode,
        passive,
        peer_fin,
        armed,
        exe,
        peer_fin_end,
        _pad2,
    ]
);

assert_layout!(
    FlowKey,
    48,
    [
        cgroup_id, addr, service_id, rule_id, tgid, port, local_port, family, protocol, hook,
        direction, verdict, epoch, _pad,
    ]
);
assert_layout!(
    FlowValue,
    88,
    [
        calls,
        reported,
        first_ns,
        pid_tgid,
        uid_gid,
        socket_cookie,
        comm,
        idle_sweeps,
        mode,
        recorded,
        _pad,
        exe,
    ]
);

// The LPM keys: the service id, big-endian, then the address, so that a
// prefix of LPM_SERVICE_BITS + n bits is "this service, this /n network".
const _: () = {
    assert!(offset_of!(LpmV4Key, service_id) == 0 && offset_of!(LpmV4Key, addr) == 4);
    assert!(offset_of!(LpmV6Key, service_id) == 0 && offset_of!(LpmV6Key, addr) == 4);
    assert!(LPM_SERVICE_BITS as usize == 8 * size_of::<[u8; 4]>());
    assert!(LpmV4Key::FULL_PREFIX as usize == 8 * size_of::<LpmV4Key>());
    assert!(LpmV6Key::FULL_PREFIX as usize == 8 * size_of::<LpmV6Key>());
    assert!(LpmV4Key::prefix_len(32) == LpmV4Key::FULL_PREFIX);
    assert!(LpmV6Key::prefix_len(128) == LpmV6Key::FULL_PREFIX);
    let key = LpmV4Key::new(0x0102_0304, [10, 0, 0, 1]);
    assert!(key.service_id[0] == 1 && key.service_id[3] == 4 && key.service() == 0x0102_0304);
};

// Records in the ring buffer: 8-byte aligned values, and the span the
// wake-up mark is computed with (agent-ebpf events.rs).
const _: () = {
    assert!(align_of::<Event>() == 8);
    assert!(RECORD_SPAN == 160);
    // A BPF ring buffer is a power-of-two number of pages.
    assert!(DEFAULT_EVENTS_BYTES.is_power_of_two() && DEFAULT_EVENTS_BYTES >= 4096);
};

// Indexes the programs compute into fixed-size maps stay in range.
const _: () = {
    // The highest verdict counter slot (ingress, "other" protocols, audit).
    assert!(counter_slot(DIRECTION_INGRESS, PROTO_UDP, VERDICT_AUDIT) == COUNTER_SLOTS - 1);
    assert!(LOST_VERDICT < LOST_SLOTS && LOST_TCP < LOST_SLOTS && LOST_INGRESS < LOST_SLOTS);
    // The cgroup_mkdir watcher masks a path index with CGROUP_PATH_MAX - 1.
    assert!(CGROUP_PATH_MAX.is_power_of_two());
};
