//! Random policies and the calls to judge against them. Networks are drawn
//! near a few anchors, so that they nest and overlap; calls are drawn at
//! the edges of the policy's own networks and port ranges (first and last
//! address, one past either end, a bit flipped at the prefix boundary),
//! where an off-by-one would show.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnetwork::IpNetwork;
use proptest::{prelude::*, sample::select};

use super::{Direction, Proto, Query};
use crate::policy::{
    EgressRule, IngressRule, Mode, PortRange, Protocol, Selector, Service, SocketsPolicy,
};

/// One `[[egress]]` or `[[ingress]]` table as written in the file.
#[derive(Debug, Clone)]
pub struct Rule {
    pub nets: Vec<IpNetwork>,
    /// `None`: the key is omitted (every port).
    pub ports: Option<Vec<(u16, u16)>>,
    pub protocol: Protocol,
    /// `exe = [...]`: indices in [`EXECUTABLES`] (empty: the key omitted).
    pub exe: Vec<usize>,
    /// `uid = [...]` (empty: the key omitted).
    pub uid: Vec<u32>,
}

/// Files rules may name in `exe` (distinct files on any Debian host).
pub const EXECUTABLES: [&str; 3] = ["/bin/sh", "/usr/bin/env", "/usr/bin/true"];
/// Users rules may name in `uid`, and callers may be (1000: none names it).
const USERS: [u32; 4] = [0, 33, 65534, 1000];

#[derive(Debug, Clone)]
pub struct Spec {
    pub mode: Mode,
    pub egress: Vec<Rule>,
    /// `Some(vec![])` is written `ingress = []`.
    pub ingress: Option<Vec<Rule>>,
}

/// A policy set, the half its ids are relocated into, and calls to judge.
#[derive(Debug, Clone)]
pub struct Case {
    pub specs: Vec<Spec>,
    pub half: u32,
    pub queries: Vec<Query>,
}

/// Calls judged per policy set.
const QUERIES: usize = 96;

pub fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(spec(), 1..=3).prop_flat_map(|specs| {
        let n = specs.len();
        let (nets, ports) = edges_of(&specs);
        (
            Just(specs),
            0u32..=1,
            prop::collection::vec(query(n, nets, ports), QUERIES),
        )
            .prop_map(|(specs, half, queries)| Case {
                specs,
                half,
                queries,
            })
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![3 => Just(Mode::Enforce), 1 => Just(Mode::Audit)],
        prop::collection::vec(rule(true), 0..=4),
        prop::option::weighted(0.6, prop::collection::vec(rule(false), 0..=3)),
    )
        .prop_map(|(mode, egress, ingress)| Spec {
            mode,
            egress,
            ingress,
        })
}

fn rule(egress: bool) -> impl Strategy<Value = Rule> {
    let protocols = if egress {
        vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Any]
    } else {
        vec![Protocol::Tcp, Protocol::Udp, Protocol::Any]
    };
    // A quarter of the rules name executables, a quarter users.
    let exe = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::sample::subsequence((0..EXECUTABLES.len()).collect::<Vec<_>>(), 1..=2),
    ];
    let uid = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::sample::subsequence(USERS[..3].to_vec(), 1..=2),
    ];
    (
        prop::collection::vec(net(), 1..=3),
        prop::option::weighted(0.7, prop::collection::vec(port_item(), 1..=3)),
        select(protocols),
        exe,
        uid,
    )
        .prop_map(|(nets, ports, protocol, exe, uid)| Rule {
            nets,
            // "icmp" takes no `ports`.
            ports: if protocol == Protocol::Icmp {
                None
            } else {
                ports
            },
            protocol,
            exe,
            uid,
        })
}

fn port_item() -> impl Strategy<Value = (u16, u16)> {
    let port = prop_oneof![Just(1u16), Just(65535), Just(53), Just(443), 1u16..=65535];
    prop_oneof![
        port.clone().prop_map(|p| (p, p)),
        (port, prop_oneof![1u16..=16, 1u16..=4096, Just(65535)])
            .prop_map(|(lo, span)| (lo, lo.saturating_add(span))),
    ]
}

const V4_ANCHORS: [u32; 4] = [0x0a00_0000, 0xc633_6400, 0xcb00_7100, 0x7f00_0001];
const V6_ANCHORS: [u128; 3] = [
    0x2001_0db8_0000_0000_0000_0000_0000_0000,
    0x2001_0db8_0001_0000_0000_0000_0000_0001,
    0xfd00_0000_0000_0000_0000_0000_0000_0000,
];

fn low_mask4(bits: u32) -> u32 {
    u32::MAX.checked_shr(32 - bits).unwrap_or(0)
}

fn low_mask6(bits: u32) -> u128 {
    u128::MAX.checked_shr(128 - bits).unwrap_or(0)
}

fn v4_base() -> impl Strategy<Value = u32> {
    (select(&V4_ANCHORS[..]), any::<u32>(), 0u32..=24).prop_map(|(a, r, b)| a ^ (r & low_mask4(b)))
}

fn v6_base() -> impl Strategy<Value = u128> {
    (select(&V6_ANCHORS[..]), any::<u128>(), 0u32..=100)
        .prop_map(|(a, r, b)| a ^ (r & low_mask6(b)))
}

fn net4(base: u32, len: u8) -> IpNetwork {
    let addr = base & !low_mask4(32 - u32::from(len));
    IpNetwork::new(IpAddr::V4(Ipv4Addr::from(addr)), len).unwrap_or_else(|e| panic!("{e}"))
}

fn net6(base: u128, len: u8) -> IpNetwork {
    let addr = base & !low_mask6(128 - u32::from(len));
    IpNetwork::new(IpAddr::V6(Ipv6Addr::from(addr)), len).unwrap_or_else(|e| panic!("{e}"))
}

fn net() -> impl Strategy<Value = IpNetwork> {
    let len4 = prop_oneof![select(vec![0u8, 8, 16, 24, 31, 32]), 0u8..=32];
    let len6 = prop_oneof![select(vec![0u8, 32, 48, 64, 96, 127, 128]), 0u8..=128];
    prop_oneof![
        4 => (v4_base(), len4.clone()).prop_map(|(b, l)| net4(b, l)),
        3 => (v6_base(), len6).prop_map(|(b, l)| net6(b, l)),
        // IPv4-mapped IPv6 networks, which the policy stores as IPv4.
        1 => (v4_base(), len4).prop_map(|(b, l)| net6(0xffff_0000_0000 | u128::from(b), 96 + l)),
    ]
}

/// The networks and ports of every service's rules: where calls are drawn.
fn edges_of(specs: &[Spec]) -> (Vec<IpNetwork>, Vec<u16>) {
    let rules = specs
        .iter()
        .flat_map(|s| s.egress.iter().chain(s.ingress.iter().flatten()));
    let mut nets = Vec::new();
    let mut ports = vec![0, 1, 65535];
    for r in rules {
        nets.extend(r.nets.iter().copied());
        for &(lo, hi) in r.ports.iter().flatten() {
            // Inside twice as often as just outside.
            ports.extend([lo, hi, lo, hi, lo.saturating_sub(1), hi.saturating_add(1)]);
        }
    }
    (nets, ports)
}

/// Where an address is drawn relative to a network.
#[derive(Debug, Clone, Copy)]
enum Edge {
    First,
    Last,
    Before,
    After,
    Inside,
    /// The last bit of the prefix flipped: just outside.
    FlipLastPrefixBit,
    /// The first host bit flipped: still inside.
    FlipFirstHostBit,
}

fn near(net: IpNetwork, edge: Edge, r: u128) -> IpAddr {
    let (bits, len, first) = match net {
        IpNetwork::V4(n) => (
            32,
            u32::from(n.prefix()),
            u128::from(u32::from(n.network())),
        ),
        IpNetwork::V6(n) => (128, u32::from(n.prefix()), u128::from(n.network())),
    };
    let host = u128::MAX.checked_shr(128 - (bits - len)).unwrap_or(0);
    let all = u128::MAX.checked_shr(128 - bits).unwrap_or(0);
    let a = match edge {
        Edge::First => first,
        Edge::Last => first | host,
        Edge::Before => first.wrapping_sub(1) & all,
        Edge::After => (first | host).wrapping_add(1) & all,
        Edge::Inside => first | (r & host),
        Edge::FlipLastPrefixBit if len > 0 => first ^ (1u128 << (bits - len)),
        Edge::FlipFirstHostBit if len < bits => {
            (first ^ (1u128 << (bits - len - 1))) | (r & (host >> 1))
        }
        _ => first | (r & host),
    };
    match net {
        IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(a).unwrap_or(0))),
        IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(a)),
    }
}

fn address(nets: Vec<IpNetwork>) -> BoxedStrategy<IpAddr> {
    let random = prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        v4_base().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        v6_base().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ];
    if nets.is_empty() {
        return random.boxed();
    }
    let edge = select(vec![
        Edge::First,
        Edge::Last,
        Edge::Inside,
        Edge::Before,
        Edge::After,
        Edge::Inside,
        Edge::FlipLastPrefixBit,
        Edge::FlipFirstHostBit,
    ]);
    prop_oneof![
        4 => (select(nets), edge, any::<u128>()).prop_map(|(n, e, r)| near(n, e, r)),
        1 => random,
    ]
    .boxed()
}

/// The address of a destination as a socket names it: an IPv4 address is
/// sometimes given IPv4-mapped (a dual-stack socket).
fn destination(nets: Vec<IpNetwork>) -> impl Strategy<Value = IpAddr> {
    (address(nets), any::<bool>()).prop_map(|(a, mapped)| match a {
        IpAddr::V4(v4) if mapped => IpAddr::V6(v4.to_ipv6_mapped()),
        a => a,
    })
}

/// The source of an inbound packet. Never IPv4-mapped: the kernel drops an
/// IPv6 packet with such a source before any socket filter runs
/// (ip6_rcv_core, since Linux 5.14), and an IPv4 packet to a dual-stack
/// socket is parsed from its IPv4 header.
fn source(nets: Vec<IpNetwork>) -> impl Strategy<Value = IpAddr> {
    address(nets).prop_map(|a| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        a => a,
    })
}

fn query(services: usize, nets: Vec<IpNetwork>, ports: Vec<u16>) -> impl Strategy<Value = Query> {
    let port = prop_oneof![3 => select(ports), 1 => any::<u16>()];
    let caller = (
        prop::option::weighted(0.8, 0..EXECUTABLES.len()),
        select(USERS.to_vec()),
    );
    let egress = (
        0..services,
        select(vec![Proto::Tcp, Proto::Udp, Proto::Icmp]),
        destination(nets.clone()),
        port.clone(),
        caller.clone(),
    )
        .prop_map(|(service, proto, addr, port, (exe, uid))| Query {
            service,
            direction: Direction::Egress,
            proto,
            addr,
            port,
            exe,
            uid,
        });
    let ingress = (
        0..services,
        select(vec![Proto::Tcp, Proto::Udp]),
        source(nets),
        port,
        caller,
    )
        .prop_map(|(service, proto, addr, port, (exe, uid))| Query {
            service,
            direction: Direction::Ingress,
            proto,
            addr,
            port,
            exe,
            uid,
        });
    prop_oneof![2 => egress, 1 => ingress]
}

pub fn name(i: usize) -> String {
    format!("s{i}")
}

/// The policy file of service `i`.
pub fn toml(i: usize, s: &Spec) -> String {
    let mode = s.mode.as_str();
    let mut t = format!("cgroup = \"/{}\"\nmode = \"{mode}\"\n", name(i));
    if s.ingress.as_ref().is_some_and(Vec::is_empty) {
        t.push_str("ingress = []\n");
    }
    let tables = s
        .egress
        .iter()
        .map(|r| ("egress", "to", r))
        .chain(s.ingress.iter().flatten().map(|r| ("ingress", "from", r)));
    for (table, key, r) in tables {
        let nets: Vec<String> = r.nets.iter().map(|n| format!("\"{n}\"")).collect();
        t.push_str(&format!("[[{table}]]\n{key} = [{}]\n", nets.join(", ")));
        if let Some(ports) = &r.ports {
            let items: Vec<String> = ports
                .iter()
                .map(|&(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("\"{lo}-{hi}\"")
                    }
                })
                .collect();
            t.push_str(&format!("ports = [{}]\n", items.join(", ")));
        }
        t.push_str(&format!("protocol = \"{}\"\n", r.protocol));
        if !r.exe.is_empty() {
            let exe: Vec<String> = r
                .exe
                .iter()
                .map(|&i| format!("{:?}", EXECUTABLES[i]))
                .collect();
            t.push_str(&format!("exe = [{}]\n", exe.join(", ")));
        }
        if !r.uid.is_empty() {
            let uid: Vec<String> = r.uid.iter().map(ToString::to_string).collect();
            t.push_str(&format!("uid = [{}]\n", uid.join(", ")));
        }
    }
    t
}

/// The file of [`EXECUTABLES`]`[i]`, as a policy resolves it.
pub fn executable(i: usize) -> crate::policy::Executable {
    let path = PathBuf::from(EXECUTABLES[i]);
    let (real, file) =
        crate::process::exe_file::resolve(&path).unwrap_or_else(|e| panic!("test host: {e}"));
    crate::policy::Executable { path, real, file }
}

/// The model the naive matcher reads: the rules as written, in file
/// order, ports neither sorted nor merged (omitted = every port).
pub fn model(specs: &[Spec]) -> Vec<Service> {
    let ports = |r: &Rule| -> Vec<PortRange> {
        r.ports.as_ref().map_or(vec![PortRange::ALL], |p| {
            p.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect()
        })
    };
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| Service {
            name: name(i),
            file: PathBuf::from(format!("{}.toml", name(i))),
            description: None,
            selector: Selector::Cgroup(name(i)),
            mode: s.mode,
            egress: s
                .egress
                .iter()
                .enumerate()
                .map(|(index, r)| EgressRule {
                    index,
                    line: 0,
                    description: None,
                    to: r.nets.clone(),
                    names: Vec::new(),
                    ports: ports(r),
                    protocol: r.protocol,
                    exe: r.exe.iter().map(|&i| executable(i)).collect(),
                    uid: r.uid.clone(),
                })
                .collect(),
            ingress: s.ingress.as_ref().map(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .map(|(index, r)| IngressRule {
                        index,
                        line: 0,
                        description: None,
                        from: r.nets.clone(),
                        ports: ports(r),
                        protocol: r.protocol,
                        exe: r.exe.iter().map(|&i| executable(i)).collect(),
                        uid: r.uid.clone(),
                    })
                    .collect()
            }),
            bind: None,
            sockets: SocketsPolicy::default(),
            observe_lookups: false,
            quarantined: false,
        })
        .collect()
}
