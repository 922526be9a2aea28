//! The checked policy model. Only values of these types reach the kernel,
//! and they can only be made by `validate`.

use crate::dns::name::NamePattern;
use std::{fmt, path::PathBuf};

use agent_common::{
    name_hash, unit_of_path, UnitKey, MODE_AUDIT, MODE_ENFORCE, SYSTEM_MANAGER, UNIT_EXACT,
    UNIT_TEMPLATE,
};
use ipnetwork::IpNetwork;

/// Every managed service, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub services: Vec<Service>,
    /// Accepted, but probably not what was meant: `bulkhead check` prints
    /// them, the agent logs them.
    pub warnings: Vec<super::PolicyError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    pub description: Option<String>,
    pub selector: Selector,
    pub mode: Mode,
    /// Allowed destinations; everything else is denied.
    pub egress: Vec<EgressRule>,
    /// Allowed sources of inbound connections and datagrams; `None` when
    /// the policy does not restrict inbound traffic.
    pub ingress: Option<Vec<IngressRule>>,
    /// Ports the service may bind; `None` when binding is not restricted.
    pub bind: Option<BindPolicy>,
    pub sockets: SocketsPolicy,
    /// `observe_lookups = true`: its DNS lookups go through the agent's
    /// proxy although it has no name rules, so that its decisions name
    /// the names its addresses came from (for the graph and `learn`);
    /// nothing is learnt, nothing allowed (docs/dns-names.md).
    pub observe_lookups: bool,
    /// Set by `bulkhead quarantine` (never by a policy file).
    pub quarantined: bool,
}

impl Service {
    /// The egress rules that list names, with their position in `egress`,
    /// in order and at most `MAX_NAME_RULES` of them: the i-th is bit i of
    /// a learnt address's rule bits, for the kernel's rulesets and the DNS
    /// proxy alike.
    pub fn name_rules(&self) -> impl Iterator<Item = (usize, &EgressRule)> {
        self.egress
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.names.is_empty())
            .take(agent_common::MAX_NAME_RULES)
    }

    /// Whether its DNS lookups go through the agent's proxy: it has name
    /// rules, or asks to have its lookups observed.
    #[must_use]
    pub fn through_proxy(&self) -> bool {
        self.observe_lookups || self.name_rules().next().is_some()
    }

    /// The key its learnt addresses are held under, in the kernel and the
    /// DNS proxy: FNV-1a (64 bits) of its name and, in order, the patterns
    /// of its name rules. A learnt address's rule bits are positions in
    /// that list, so a list that changes (at a reload, or while no agent
    /// ran) makes a new key, and nothing learnt under the old list is
    /// allowed under the new one (fail closed until the next lookup).
    /// Written out rather than std's `Hash`, whose output may change
    /// between Rust releases: the pinned map keeps keys across upgrades.
    #[must_use]
    pub fn names_key(&self) -> u64 {
        let mut text = self.name.clone();
        for (_, rule) in self.name_rules() {
            text.push('\n');
            for pattern in &rule.names {
                text.push(' ');
                text.push_str(&pattern.to_string());
            }
        }
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// Which kinds of socket a service may open beyond TCP and UDP (and ping
/// sockets, allowed by `protocol = "icmp"` egress rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketsPolicy {
    /// Raw inet sockets (SOCK_RAW): they bypass the connect/sendmsg hooks.
    pub raw: bool,
    /// Packet sockets (AF_PACKET).
    pub packet: bool,
    /// Protocols whose traffic no hook judges, allowed by name.
    pub protocols: Vec<SocketProtocol>,
}

/// An inet protocol the socket-address hooks never see (or see only in
/// part), which a service may use only when `[sockets] protocols` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SocketProtocol {
    Sctp,
    Mptcp,
    Dccp,
    Udplite,
    L2tp,
}

impl SocketProtocol {
    pub const ALL: [SocketProtocol; 5] = [
        SocketProtocol::Sctp,
        SocketProtocol::Mptcp,
        SocketProtocol::Dccp,
        SocketProtocol::Udplite,
        SocketProtocol::L2tp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SocketProtocol::Sctp => "sctp",
            SocketProtocol::Mptcp => "mptcp",
            SocketProtocol::Dccp => "dccp",
            SocketProtocol::Udplite => "udplite",
            SocketProtocol::L2tp => "l2tp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindPolicy {
    pub line: usize,
    /// Sorted, non-overlapping; empty means no port may be bound.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    /// Position in the file's `[[ingress]]` list (0-based).
    pub index: usize,
    pub line: usize,
    pub description: Option<String>,
    /// Allowed source networks.
    pub from: Vec<IpNetwork>,
    /// Local ports the peer may connect or send to.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    /// `exe = [...]`: only to sockets bound by these executables.
    pub exe: Vec<Executable>,
    /// `uid = [...]`: only to sockets bound by these users.
    pub uid: Vec<u32>,
}

impl IngressRule {
    #[must_use]
    pub fn is_qualified(&self) -> bool {
        !self.exe.is_empty() || !self.uid.is_empty()
    }
}

/// How a service is found in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A systemd unit (or every instance of a template), found by name
    /// wherever systemd puts its cgroup (see `agent_common::unit`).
    Unit(UnitName),
    /// A cgroup path relative to the cgroup2 mount, without a leading `/`.
    Cgroup(String),
}

/// `unit = "..."`, with `user = UID` for a unit of that user's manager.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnitName {
    pub name: String,
    pub user: Option<u32>,
}

/// How closely a selector names a cgroup: when several do, the closest
/// owns it (the kernel's cgroup_mkdir watcher looks in this order too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Closeness {
    Template,
    Unit,
    Path,
}

impl UnitName {
    /// `foo@.service`: names every instance.
    pub fn is_template(&self) -> bool {
        self.name
            .split_once('@')
            .is_some_and(|(_, rest)| rest.starts_with('.'))
    }

    /// Its key in the kernel's UNIT_NAMES map.
    pub fn key(&self) -> UnitKey {
        UnitKey {
            manager: self.user.unwrap_or(SYSTEM_MANAGER),
            kind: if self.is_template() {
                UNIT_TEMPLATE
            } else {
                UNIT_EXACT
            },
            hash: name_hash(self.name.as_bytes()),
        }
    }
}

impl Selector {
    /// Whether the cgroup at `path` (relative to the mount, no leading `/`)
    /// is this service's own cgroup, and how closely it is named.
    pub fn names(&self, path: &str) -> Option<Closeness> {
        match self {
            Selector::Cgroup(p) => (p == path).then_some(Closeness::Path),
            Selector::Unit(u) => {
                let found = unit_of_path(format!("/{path}").as_bytes())?;
                let key = u.key();
                if found.manager != key.manager {
                    return None;
                }
                match key.kind {
                    UNIT_TEMPLATE => {
                        (found.template == Some(key.hash)).then_some(Closeness::Template)
                    }
                    _ => (found.exact == key.hash).then_some(Closeness::Unit),
                }
            }
        }
    }

    /// What names one cgroup: two services may not share it.
    pub fn identity(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Unit(UnitName { name, user: None }) => write!(f, "unit {name}"),
            Selector::Unit(UnitName {
                name,
                user: Some(uid),
            }) => write!(f, "unit {name} of user {uid}"),
            Selector::Cgroup(path) => write!(f, "cgroup /{path}"),
        }
    }
}

/// A service's mode: the one type for it everywhere in the agent. Its
/// spellings are fixed: `"enforce"`/`"audit"` in policy files, status,
/// events and metric labels ([`Mode::as_str`]), [`MODE_ENFORCE`] /
/// [`MODE_AUDIT`] in the kernel maps and records ([`Mode::to_kernel`],
/// [`Mode::from_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Denied connections get EPERM.
    Enforce,
    /// Everything goes through; would-be denials are recorded.
    Audit,
}

impl Mode {
    /// As policy files, status, events and metric labels spell it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }

    /// The policy file spelling; None for anything else.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            _ => None,
        }
    }

    /// The value of `ServiceEntry::mode` and `Event::mode`.
    #[must_use]
    pub fn to_kernel(self) -> u8 {
        match self {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        }
    }

    /// Read back from the kernel: [`MODE_AUDIT`] is audit, anything else
    /// enforce (as the kernel programs decide).
    #[must_use]
    pub fn from_kernel(mode: u8) -> Self {
        if mode == MODE_AUDIT {
            Mode::Audit
        } else {
            Mode::Enforce
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP echo from ping sockets (egress only, no ports).
    Icmp,
    Any,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Any => "any",
        })
    }
}

/// An inclusive port range; `0-65535` when the rule names no ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// Position in the file's `[[egress]]` list (0-based), for `file#egress[i]`.
    pub index: usize,
    /// 1-based line of the rule in its file.
    pub line: usize,
    pub description: Option<String>,
    /// Destination networks (a single address is a /32 or /128).
    pub to: Vec<IpNetwork>,
    /// Destination names (`api.example.com`, `*.example.com`,
    /// `**.example.com`): addresses the service learnt from its own lookups
    /// of them (docs/dns-names.md).
    pub names: Vec<NamePattern>,
    /// Sorted, non-overlapping port ranges.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    /// `exe = [...]`: the rule allows only calls from these executables
    /// (empty: from any).
    pub exe: Vec<Executable>,
    /// `uid = [...]`: only calls from these users (empty: from any).
    pub uid: Vec<u32>,
}

impl EgressRule {
    /// Whether the rule names executables or users.
    #[must_use]
    pub fn is_qualified(&self) -> bool {
        !self.exe.is_empty() || !self.uid.is_empty()
    }
}

/// An executable an `exe` qualifier names: as written, the real file it
/// resolved to at load, and that file's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executable {
    pub path: std::path::PathBuf,
    pub real: std::path::PathBuf,
    pub file: crate::process::ExeFile,
}

/// Which part of a policy a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Section {
    Egress,
    Ingress,
    Bind,
}

/// Where a rule lives, as shown in logs and events: `billing.toml#egress[2]`,
/// `billing.toml#ingress[0]`, `billing.toml#bind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub service: String,
    pub file: PathBuf,
    pub section: Section,
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.file.file_name().map_or_else(
            || self.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match self.section {
            Section::Egress => write!(f, "{name}#egress[{}]", self.index),
            Section::Ingress => write!(f, "{name}#ingress[{}]", self.index),
            Section::Bind => write!(f, "{name}#bind"),
        }
    }
}
