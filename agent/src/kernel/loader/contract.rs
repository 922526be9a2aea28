//! The kernel/user contract, checked on the object this binary embeds,
//! without root: the object is parsed (aya-obj, what aya's loader parses it
//! with), never loaded. Everything the loader asks for by name must be in
//! it, with the layout agent-common gives it, and everything in it must be
//! something the loader knows:
//!
//! - every map of `agent_common::maps::ALL` exists, with its map type and
//!   its key and value sizes those of the agent-common types the daemon
//!   reads and writes it as; the object has no other map (but aya-log's and
//!   the data sections');
//! - every map the loader sizes (`map_sizes`) exists (aya ignores a name it
//!   does not find);
//! - every program of `PROGRAMS` exists with the program type its `Hook`
//!   loads it as (and, for cgroup_skb, the direction it attaches to); the
//!   object has no program the loader would leave unattached;
//! - every global the loader sets (`global_values`, the names and sizes of
//!   `agent_common::globals`) exists with that size: aya's own patching of
//!   `.rodata` is run on the parsed object, with `must_exist` as `load`
//!   passes it.

use std::collections::{BTreeSet, HashMap};

use agent_common::{
    globals, maps as names, Event, FlowKey, FlowValue, LpmV4Key, LpmV6Key, RateState, RuleSet,
    ServiceEntry, SockInfo, UdpPeer, UdpPeerKey, UnitKey, CGROUP_PATH_MAX,
};
use aya::maps::lpm_trie::Key;
use aya_obj::{
    generated::bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_SK_STORAGE,
    },
    programs::CgroupSkbAttachType,
    Object, ProgramSection,
};

use super::{global_values, map_sizes, Hook, LoadOptions, EBPF_OBJECT, PROGRAMS};
use crate::kernel::layout::Capacity;

fn object() -> Object {
    Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses")
}

/// (name, map type, key size, value size) of every map, from the types
/// the daemon uses for it. `None`: not checked (UNIT_SCAN's value is a
/// kernel-only Rust struct whose layout the host does not share).
fn expected_maps() -> Vec<(&'static str, u32, usize, Option<usize>)> {
    use std::mem::size_of;
    let hash = BPF_MAP_TYPE_HASH as u32;
    let array = BPF_MAP_TYPE_ARRAY as u32;
    let percpu = BPF_MAP_TYPE_PERCPU_ARRAY as u32;
    let lpm = BPF_MAP_TYPE_LPM_TRIE as u32;
    vec![
        (names::SERVICES, hash, 8, Some(size_of::<ServiceEntry>())),
        (names::EGRESS_V4, lpm, size_of::<Key<LpmV4Key>>(), Some(4)),
        (names::EGRESS_V6, lpm, size_of::<Key<LpmV6Key>>(), Some(4)),
        (names::INGRESS_V4, lpm, size_of::<Key<LpmV4Key>>(), Some(4)),
        (names::INGRESS_V6, lpm, size_of::<Key<LpmV6Key>>(), Some(4)),
        (names::EGRESS_HOSTS_V4, hash, size_of::<LpmV4Key>(), Some(4)),
        (names::EGRESS_HOSTS_V6, hash, size_of::<LpmV6Key>(), Some(4)),
        (
            names::INGRESS_HOSTS_V4,
            hash,
            size_of::<LpmV4Key>(),
            Some(4),
        ),
        (
            names::INGRESS_HOSTS_V6,
            hash,
            size_of::<LpmV6Key>(),
            Some(4),
        ),
        (
            names::UDP_PEERS,
            hash,
            size_of::<UdpPeerKey>(),
            Some(size_of::<UdpPeer>()),
        ),
        (names::UDP_PEER_COUNT, array, 4, Some(8)),
        (names::UDP_PEER_RELEASED, array, 4, Some(8)),
        (names::DENY_RATE, percpu, 4, Some(size_of::<RateState>())),
        (
            names::SERVICE_PATHS,
            hash,
            CGROUP_PATH_MAX,
            Some(size_of::<ServiceEntry>()),
        ),
        (
            names::UNIT_NAMES,
            hash,
            size_of::<UnitKey>(),
            Some(size_of::<ServiceEntry>()),
        ),
        (names::PATH_SCRATCH, percpu, 4, Some(CGROUP_PATH_MAX)),
        (names::UNIT_SCAN, percpu, 4, None),
        (names::HELD_SOCKETS, hash, 8, Some(8)),
        (names::ACTIVE_FLAGS, array, 4, Some(4)),
        (names::RULESETS, array, 4, Some(size_of::<RuleSet>())),
        // A ring buffer has neither key nor value; records are `Event`s.
        (names::EVENTS, BPF_MAP_TYPE_RINGBUF as u32, 0, Some(0)),
        (names::LOST, percpu, 4, Some(8)),
        (names::COUNTERS, percpu, 4, Some(8)),
        (
            names::FLOWS,
            hash,
            size_of::<FlowKey>(),
            Some(size_of::<FlowValue>()),
        ),
        (names::FLOW_EPOCH, array, 4, Some(4)),
        (names::FLOW_STATS, percpu, 4, Some(8)),
        (
            names::SOCK_INFO,
            BPF_MAP_TYPE_SK_STORAGE as u32,
            4,
            Some(size_of::<SockInfo>()),
        ),
        (names::SOCK_OWNERS, hash, 8, Some(size_of::<SockInfo>())),
        (
            agent_common::LEARNT,
            hash,
            size_of::<agent_common::LearntKey>(),
            Some(size_of::<agent_common::LearntValue>()),
        ),
        (
            agent_common::LEARNT_V4,
            hash,
            size_of::<agent_common::LearntV4Key>(),
            Some(size_of::<agent_common::LearntV4Value>()),
        ),
        (
            names::PROCESSES,
            BPF_MAP_TYPE_LRU_HASH as u32,
            4,
            Some(size_of::<agent_common::ExeId>()),
        ),
        (
            names::EXE_NAMES,
            BPF_MAP_TYPE_LRU_HASH as u32,
            size_of::<agent_common::ExeId>(),
            Some(agent_common::EXE_NAME_MAX),
        ),
        (
            names::EXE_SCRATCH,
            percpu,
            4,
            Some(agent_common::EXE_NAME_MAX),
        ),
        (
            names::EXE_RULES,
            hash,
            size_of::<agent_common::ExeRuleKey>(),
            Some(size_of::<agent_common::ExeRule>()),
        ),
        (
            names::UID_RULES,
            hash,
            size_of::<agent_common::UidRuleKey>(),
            Some(4),
        ),
        (
            agent_common::DNS_ORIGINS,
            BPF_MAP_TYPE_LRU_HASH as u32,
            8,
            Some(size_of::<agent_common::DnsOrigin>()),
        ),
        (
            agent_common::DNS_CLIENTS,
            BPF_MAP_TYPE_LRU_HASH as u32,
            size_of::<agent_common::DnsClientKey>(),
            Some(size_of::<agent_common::DnsOrigin>()),
        ),
        (
            agent_common::DNS_PROXY,
            array,
            4,
            Some(size_of::<agent_common::DnsProxy>()),
        ),
    ]
}

#[test]
fn every_map_is_in_the_object_with_the_layout_both_sides_use() {
    let obj = object();
    let expected = expected_maps();
    assert_eq!(
        expected.iter().map(|m| m.0).collect::<BTreeSet<_>>(),
        names::ALL.into_iter().collect::<BTreeSet<_>>(),
        "this test's table and agent_common::maps::ALL list the same maps"
    );
    for (name, map_type, key, value) in expected {
        let map = obj
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("no map {name} in the kernel object"));
        assert_eq!(map.map_type(), map_type, "{name}: map type");
        assert_eq!(map.key_size() as usize, key, "{name}: key size");
        if let Some(value) = value {
            assert_eq!(map.value_size() as usize, value, "{name}: value size");
        }
    }
    // The records the ring buffer carries are what the reader decodes.
    assert_eq!(std::mem::size_of::<Event>(), 152);
    let unknown: Vec<&String> = obj
        .maps
        .keys()
        .filter(|name| {
            !names::ALL.contains(&name.as_str())
                && name.as_str() != names::AYA_LOGS
                && !name.starts_with('.')
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "maps in the kernel object that agent_common::maps does not name: {unknown:?}"
    );
}

#[test]
fn every_map_the_loader_sizes_exists() {
    let obj = object();
    let policy = crate::kernel::CompiledPolicy::default();
    for (name, _) in map_sizes(Capacity::for_policy(&policy), &LoadOptions::default()) {
        assert!(
            obj.maps.contains_key(name),
            "the loader sizes {name}, which the kernel object does not have"
        );
    }
}

/// Whether `section` is what `hook` loads and attaches.
fn section_fits(hook: Hook, section: &ProgramSection) -> bool {
    matches!(
        (hook, section),
        (Hook::SockAddr, ProgramSection::CgroupSockAddr { .. })
            | (Hook::SockOps, ProgramSection::SockOps)
            | (Hook::CgroupSock, ProgramSection::CgroupSock { .. })
            | (Hook::Sockopt, ProgramSection::CgroupSockopt { .. })
            | (Hook::TracePoint(..), ProgramSection::TracePoint)
            | (Hook::Lsm(_), ProgramSection::Lsm { sleepable: false })
            | (
                Hook::SkbIngress,
                ProgramSection::CgroupSkb {
                    attach_type: Some(CgroupSkbAttachType::Ingress),
                },
            )
            | (
                Hook::SkbEgress,
                ProgramSection::CgroupSkb {
                    attach_type: Some(CgroupSkbAttachType::Egress),
                },
            )
    )
}

#[test]
fn every_program_is_in_the_object_with_the_type_the_loader_loads() {
    let obj = object();
    for (name, hook) in PROGRAMS {
        let program = obj
            .programs
            .get(name)
            .unwrap_or_else(|| panic!("no program {name} in the kernel object"));
        assert!(
            section_fits(hook, &program.section),
            "{name}: the object has it as {:?}, the loader loads it as {hook:?}",
            program.section
        );
    }
    let known: BTreeSet<&str> = PROGRAMS.iter().map(|(name, _)| *name).collect();
    let unattached: Vec<&String> = obj
        .programs
        .keys()
        .filter(|name| !known.contains(name.as_str()))
        .collect();
    assert!(
        unattached.is_empty(),
        "programs in the kernel object that the loader never attaches: {unattached:?}"
    );
}

#[test]
fn every_global_the_loader_sets_exists_with_its_size() {
    let values = global_values(
        &LoadOptions::default(),
        [0; agent_common::PROCESS_OFFSETS_LEN],
    );
    assert_eq!(
        values
            .iter()
            .map(|(name, bytes)| (*name, bytes.len()))
            .collect::<Vec<_>>(),
        globals::ALL.to_vec(),
        "the loader sets every global of agent_common::globals, with its size"
    );
    let mut obj = object();
    let patch: HashMap<&str, (&[u8], bool)> = values
        .iter()
        .map(|(name, bytes)| (*name, (bytes.as_slice(), true)))
        .collect();
    obj.patch_map_data(patch)
        .expect("every global exists in the object's data with the size the loader writes");
    // And a missing one would be caught the same way.
    let mut obj = object();
    let missing = HashMap::from([("NO_SUCH_GLOBAL", (&[0u8][..], true))]);
    assert!(obj.patch_map_data(missing).is_err());
}
