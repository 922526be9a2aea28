//! Raw file -> checked [`Service`], collecting every problem in the file.

use std::{
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnetwork::IpNetwork;

use crate::dns::name::NamePattern;
use toml::Spanned;

use super::{
    error::{PolicyError, Positions},
    file::{RawBind, RawEgress, RawIngress, RawPolicy, RawPort},
    model::{
        BindPolicy, EgressRule, Executable, IngressRule, Mode, PortRange, Protocol, Selector,
        Service, SocketProtocol, SocketsPolicy, UnitName,
    },
};

/// Collects errors against one file's text.
pub(crate) struct Checker<'a> {
    file: &'a Path,
    positions: Positions<'a>,
    pub errors: Vec<PolicyError>,
    /// Accepted, but probably not what was meant (`bulkhead check` shows them).
    pub warnings: Vec<PolicyError>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            positions: Positions::new(text),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub(crate) fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.positions.at(span.start);
        self.warnings.push(PolicyError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.positions.at(span.start);
        self.errors.push(PolicyError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        self.positions.at(span.start).0
    }
}

/// Validates one parsed file. `None` when it has errors (all pushed to `c`).
pub(crate) fn service(c: &mut Checker<'_>, raw: RawPolicy) -> Option<Service> {
    let before = c.errors.len();
    let file: PathBuf = c.file.to_path_buf();

    let name = match &raw.name {
        Some(n) => {
            check_name(c, n.get_ref(), n.span(), "name");
            n.get_ref().clone()
        }
        None => {
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            check_name(c, &stem, 0..0, "the file name (used as the service name)");
            stem
        }
    };

    if let (Some(user), None) = (&raw.user, &raw.unit) {
        c.error(
            user.span(),
            "`user` names the user manager of a `unit`; it needs `unit = \"name.service\"`",
        );
    }
    let selector = match (&raw.unit, &raw.cgroup) {
        (Some(unit), None) => check_unit(c, unit, raw.user.as_ref()),
        (None, Some(cgroup)) => check_cgroup(c, cgroup),
        (Some(_), Some(cgroup)) => {
            c.error(
                cgroup.span(),
                "set either `unit` or `cgroup`, not both: a policy names exactly one service",
            );
            None
        }
        (None, None) => {
            c.error(
                0..0,
                "missing `unit = \"name.service\"` or `cgroup = \"/path\"`: which service is this policy for?",
            );
            None
        }
    };

    let mode = match &raw.mode {
        Some(m) => match Mode::parse(m.get_ref()) {
            Some(mode) => Some(mode),
            None => {
                c.error(
                    m.span(),
                    format!(
                        "unknown mode {:?}: expected \"audit\" or \"enforce\"",
                        m.get_ref()
                    ),
                );
                None
            }
        },
        None => {
            c.error(
                0..0,
                "missing `mode`: start with mode = \"audit\" to observe, then mode = \"enforce\"",
            );
            None
        }
    };

    let egress: Vec<EgressRule> = raw
        .egress
        .iter()
        .enumerate()
        .filter_map(|(index, rule)| egress_rule(c, index, rule))
        .collect();
    // The kernel keeps, per learnt address, which name rules it answered
    // (agent_common::MAX_NAME_RULES bits).
    if let Some(rule) = egress
        .iter()
        .filter(|r| !r.names.is_empty())
        .nth(agent_common::MAX_NAME_RULES)
    {
        let span = raw.egress.get(rule.index).map_or(0..0, Spanned::span);
        c.error(
            span,
            format!(
                "egress[{}]: at most {} [[egress]] rules may list names; put names with the same ports and protocol in one rule",
                rule.index,
                agent_common::MAX_NAME_RULES
            ),
        );
    }
    let ingress: Option<Vec<IngressRule>> = raw.ingress.as_ref().map(|rules| {
        rules
            .get_ref()
            .iter()
            .enumerate()
            .filter_map(|(index, rule)| ingress_rule(c, index, rule))
            .collect()
    });
    // Each qualified rule, egress or ingress, has a bit in the kernel's
    // per-caller masks.
    let qualified: Vec<(&str, usize)> = egress
        .iter()
        .filter(|r| r.is_qualified())
        .map(|r| ("egress", r.index))
        .chain(
            ingress
                .iter()
                .flatten()
                .filter(|r| r.is_qualified())
                .map(|r| ("ingress", r.index)),
        )
        .collect();
    if let Some((list, index)) = qualified.get(agent_common::MAX_QUALIFIED_RULES) {
        let span = if *list == "egress" {
            raw.egress.get(*index).map(Spanned::span)
        } else {
            raw.ingress
                .as_ref()
                .and_then(|r| r.get_ref().get(*index))
                .map(Spanned::span)
        };
        let span = span.unwrap_or(0..0);
        c.error(
            span,
            format!(
                "{list}[{index}]: at most {} rules of a service may have `exe` or `uid`",
                agent_common::MAX_QUALIFIED_RULES
            ),
        );
    }
    let bind = raw.bind.as_ref().and_then(|b| bind_policy(c, b));
    let sockets = raw
        .sockets
        .as_ref()
        .map_or_else(SocketsPolicy::default, |s| SocketsPolicy {
            raw: s.raw,
            packet: s.packet,
            protocols: socket_protocols(c, s.protocols.as_deref().unwrap_or_default()),
        });

    if c.errors.len() > before {
        return None;
    }
    Some(Service {
        name,
        file,
        description: raw.description,
        selector: selector?,
        mode: mode?,
        egress,
        ingress,
        bind,
        sockets,
        observe_lookups: raw.observe_lookups.unwrap_or(false),
        quarantined: false,
    })
}

fn check_name(c: &mut Checker<'_>, name: &str, span: Range<usize>, what: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '@'));
    if !ok {
        c.error(
            span,
            format!(
                "{what} {name:?} is not a valid service name: use 1-64 characters from A-Z a-z 0-9 - _ . @"
            ),
        );
    }
}

fn check_unit(
    c: &mut Checker<'_>,
    unit: &Spanned<String>,
    user: Option<&Spanned<i64>>,
) -> Option<Selector> {
    let u = unit.get_ref();
    let valid_chars = u
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, ':' | '-' | '_' | '.' | '\\' | '@'));
    let suffix_ok = u.ends_with(".service") || u.ends_with(".scope");
    // systemd's UNIT_NAME_MAX is 256 with the NUL.
    if !valid_chars || !suffix_ok || u.len() > 255 || u.starts_with('.') {
        c.error(
            unit.span(),
            format!(
                "unit {u:?} is not a systemd service or scope name (like \"billing.service\"); for any other cgroup use `cgroup = \"/path\"`"
            ),
        );
        return None;
    }
    for problem in systemd_would_refuse(u) {
        c.warn(
            unit.span(),
            format!("unit {u:?}: {problem}; no unit can have this name, so the policy would wait forever"),
        );
    }
    let user = match user {
        None => None,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(uid) if uid != u32::MAX => Some(uid),
            _ => {
                c.error(
                    v.span(),
                    format!("user {} is not a uid (0 to 4294967294)", v.get_ref()),
                );
                return None;
            }
        },
    };
    Some(Selector::Unit(UnitName {
        name: u.clone(),
        user,
    }))
}

/// What systemd's own unit name check would object to in a name made of
/// valid characters with a `.service`/`.scope` suffix.
fn systemd_would_refuse(name: &str) -> Vec<&'static str> {
    let mut problems = Vec::new();
    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    let prefix = stem.split_once('@').map_or(stem, |(prefix, _)| prefix);
    if prefix.is_empty() {
        problems.push("the name before `@` is empty");
    }
    if name.ends_with(".scope") && name.contains("@.") {
        problems.push("a scope is never an instance of a template");
    }
    let mut rest = name;
    while let Some(at) = rest.find('\\') {
        let esc = &rest[at..];
        let hex = esc.len() >= 4
            && esc.as_bytes()[1] == b'x'
            && esc.as_bytes()[2..4].iter().all(u8::is_ascii_hexdigit);
        if !hex {
            problems.push("a backslash that is not a `\\xNN` escape");
            break;
        }
        rest = &esc[4..];
    }
    problems
}

fn check_cgroup(c: &mut Checker<'_>, cgroup: &Spanned<String>) -> Option<Selector> {
    let p = cgroup.get_ref();
    let Some(rel) = p.strip_prefix('/') else {
        c.error(
            cgroup.span(),
            format!(
                "cgroup {p:?} must be an absolute path below the cgroup2 mount, like \"/billing\""
            ),
        );
        return None;
    };
    let rel = rel.trim_end_matches('/');
    if rel.is_empty() {
        c.error(
            cgroup.span(),
            "cgroup \"/\" is the root of the whole host, not a service",
        );
        return None;
    }
    if rel
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        c.error(
            cgroup.span(),
            format!("cgroup {p:?} has an empty, `.` or `..` component"),
        );
        return None;
    }
    // The kernel's watcher reads `/path` and its NUL into CGROUP_PATH_MAX
    // bytes: a longer path would be managed only from the next rescan.
    if rel.len() + 2 > agent_common::CGROUP_PATH_MAX {
        c.error(
            cgroup.span(),
            format!(
                "cgroup {p:?} is {} bytes; the kernel's cgroup watcher holds paths of at most {} bytes, so a longer one could run unmanaged until the next rescan",
                rel.len() + 1,
                agent_common::CGROUP_PATH_MAX - 1
            ),
        );
        return None;
    }
    Some(Selector::Cgroup(rel.to_string()))
}

fn egress_rule(c: &mut Checker<'_>, index: usize, rule: &Spanned<RawEgress>) -> Option<EgressRule> {
    let before = c.errors.len();
    let raw = rule.get_ref();
    let at = format!("egress[{index}]");
    let (to, names) = destinations(c, &at, rule.span(), raw.to.as_ref());
    let ports = ports(
        c,
        &at,
        raw.ports.as_ref(),
        "omit `ports` to allow every port",
    );
    let protocol = protocol(c, &at, raw.protocol.as_ref(), true);
    if protocol == Protocol::Icmp {
        if let Some(list) = &raw.ports {
            c.error(
                list.span(),
                format!("{at}: `ports` with protocol \"icmp\": ICMP has no ports; omit `ports`"),
            );
        }
    }
    let exe = executables(c, &at, raw.exe.as_ref());
    let uid = users(c, &at, raw.uid.as_ref());
    (c.errors.len() == before).then(|| EgressRule {
        index,
        line: c.line_of(&rule.span()),
        description: raw.description.clone(),
        to,
        names,
        ports,
        protocol,
        exe,
        uid,
    })
}

fn ingress_rule(
    c: &mut Checker<'_>,
    index: usize,
    rule: &Spanned<RawIngress>,
) -> Option<IngressRule> {
    let before = c.errors.len();
    let raw = rule.get_ref();
    let at = format!("ingress[{index}]");
    let from = networks(c, &at, rule.span(), "from", "source", raw.from.as_ref());
    let ports = ports(
        c,
        &at,
        raw.ports.as_ref(),
        "omit `ports` to allow every port",
    );
    let protocol = protocol(c, &at, raw.protocol.as_ref(), false);
    let exe = executables(c, &at, raw.exe.as_ref());
    let uid = users(c, &at, raw.uid.as_ref());
    (c.errors.len() == before).then(|| IngressRule {
        index,
        line: c.line_of(&rule.span()),
        description: raw.description.clone(),
        from,
        ports,
        protocol,
        exe,
        uid,
    })
}

fn bind_policy(c: &mut Checker<'_>, bind: &Spanned<RawBind>) -> Option<BindPolicy> {
    let before = c.errors.len();
    let raw = bind.get_ref();
    let ports = match &raw.ports {
        None => {
            c.error(
                bind.span(),
                "[bind]: missing `ports`: list the ports the service may listen on (`ports = []` for none)",
            );
            Vec::new()
        }
        // Here an empty list is meaningful: the service may bind no port.
        Some(list) if list.get_ref().is_empty() => Vec::new(),
        Some(_) => ports(c, "[bind]", raw.ports.as_ref(), ""),
    };
    let protocol = protocol(c, "[bind]", raw.protocol.as_ref(), false);
    (c.errors.len() == before).then(|| BindPolicy {
        line: c.line_of(&bind.span()),
        ports,
        protocol,
    })
}

/// An egress rule's `to`: required, non-empty, every entry a network or a
/// DNS name pattern. An entry is read as a name when it is not an address
/// and has no `:` or `/` (which only addresses and CIDRs have).
fn destinations(
    c: &mut Checker<'_>,
    at: &str,
    rule_span: Range<usize>,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
) -> (Vec<IpNetwork>, Vec<NamePattern>) {
    let (mut nets, mut names) = (Vec::new(), Vec::new());
    let Some(list) = list.filter(|l| !l.get_ref().is_empty()) else {
        // The messages for a missing or empty list.
        networks(c, at, rule_span, "to", "destination", list);
        return (nets, names);
    };
    for entry in list.get_ref() {
        let raw = entry.get_ref();
        let text = raw.trim();
        let name_like = IpNetwork::from_str(text).is_err()
            && !text.contains([':', '/'])
            && text.bytes().any(|b| b.is_ascii_alphabetic() || b == b'*');
        if !name_like {
            nets.extend(destination(c, at, entry));
            continue;
        }
        match NamePattern::parse(text) {
            Ok(name) => names.push(name),
            Err(e) => {
                // The entry's opening quote, the whitespace trimmed, then
                // the offset in the name (see NameError).
                let lead = raw.len() - raw.trim_start().len();
                let start = entry.span().start + 1 + lead + e.offset;
                c.error(
                    start..start + 1,
                    format!("{at}: not an IP address or CIDR; as a DNS name: {e}"),
                );
            }
        }
    }
    names.sort_by_key(ToString::to_string);
    names.dedup();
    (nets, names)
}

/// A rule's `to`/`from` list: required, non-empty, every entry a network.
fn networks(
    c: &mut Checker<'_>,
    at: &str,
    rule_span: Range<usize>,
    key: &str,
    what: &str,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Vec<IpNetwork> {
    let mut out = Vec::new();
    match list {
        None => c.error(
            rule_span,
            format!("{at}: missing `{key}`: list the {what} addresses or CIDRs"),
        ),
        Some(list) if list.get_ref().is_empty() => c.error(
            list.span(),
            format!("{at}: `{key}` is empty; a rule must allow at least one {what}"),
        ),
        Some(list) => {
            for entry in list.get_ref() {
                if let Some(net) = destination(c, at, entry) {
                    out.push(net);
                }
            }
        }
    }
    out
}

/// A rule's `ports`: omitted means every port; empty is refused with `hint`.
fn ports(
    c: &mut Checker<'_>,
    at: &str,
    list: Option<&Spanned<Vec<Spanned<RawPort>>>>,
    hint: &str,
) -> Vec<PortRange> {
    match list {
        None => vec![PortRange::ALL],
        Some(list) if list.get_ref().is_empty() => {
            c.error(list.span(), format!("{at}: `ports` is empty; {hint}"));
            Vec::new()
        }
        Some(list) => {
            let ranges: Vec<PortRange> = list
                .get_ref()
                .iter()
                .filter_map(|p| port_range(c, at, p))
                .collect();
            merge_ranges(ranges)
        }
    }
}

/// A rule's `protocol`; `icmp` only where `icmp_ok` (egress rules: ping
/// sockets send, nothing listens for ICMP).
fn protocol(c: &mut Checker<'_>, at: &str, p: Option<&Spanned<String>>, icmp_ok: bool) -> Protocol {
    let Some(p) = p else {
        return Protocol::Any;
    };
    let expected = if icmp_ok {
        "expected \"tcp\", \"udp\", \"icmp\" or \"any\""
    } else {
        "expected \"tcp\", \"udp\" or \"any\""
    };
    match p.get_ref().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "any" => Protocol::Any,
        "icmp" if icmp_ok => Protocol::Icmp,
        "icmp" => {
            c.error(
                p.span(),
                format!("{at}: protocol \"icmp\" is for egress rules only (ping sockets send; nothing listens for ICMP): {expected}"),
            );
            Protocol::Any
        }
        other => {
            c.error(
                p.span(),
                format!("{at}: unknown protocol {other:?}: {expected}"),
            );
            Protocol::Any
        }
    }
}

/// `[sockets] protocols`: names of protocols the hooks cannot judge.
fn socket_protocols(c: &mut Checker<'_>, names: &[Spanned<String>]) -> Vec<SocketProtocol> {
    let mut out = Vec::new();
    for name in names {
        match SocketProtocol::ALL
            .into_iter()
            .find(|p| p.name() == name.get_ref())
        {
            Some(p) => out.push(p),
            None => {
                let known: Vec<&str> = SocketProtocol::ALL.iter().map(|p| p.name()).collect();
                c.error(
                    name.span(),
                    format!(
                        "[sockets] protocols: unknown protocol {:?}: expected one of {} (TCP, UDP and ping sockets need no entry here; raw sockets are `raw = true`)",
                        name.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn destination(c: &mut Checker<'_>, at: &str, entry: &Spanned<String>) -> Option<IpNetwork> {
    let text = entry.get_ref().trim();
    let net = match IpNetwork::from_str(text) {
        Ok(net) => net,
        Err(_) => {
            c.error(
                entry.span(),
                format!("{at}: {text:?} is not an IP address or CIDR (like \"192.0.2.0/24\" or \"2001:db8::/64\")"),
            );
            return None;
        }
    };
    if net.network() != net.ip() {
        c.error(
            entry.span(),
            format!(
                "{at}: {text:?} has host bits set; did you mean \"{}/{}\"?",
                net.network(),
                net.prefix()
            ),
        );
        return None;
    }
    // An IPv4-mapped IPv6 network is judged as IPv4 by the kernel; store it
    // as IPv4 so that the rule means what it says.
    if let IpNetwork::V6(v6) = net {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            if v6.prefix() >= 96 {
                return IpNetwork::new(IpAddr::V4(v4), v6.prefix() - 96).ok();
            }
        }
    }
    Some(net)
}

fn port_range(c: &mut Checker<'_>, at: &str, port: &Spanned<RawPort>) -> Option<PortRange> {
    let bad = |c: &mut Checker<'_>, what: String| {
        c.error(port.span(), format!("{at}: {what}"));
        None
    };
    let (lo, hi) = match port.get_ref() {
        RawPort::Number(n) => (*n, *n),
        RawPort::Text(t) => {
            let t = t.trim();
            let parsed = match t.split_once('-') {
                Some((a, b)) => a
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .zip(b.trim().parse::<i64>().ok()),
                None => t.parse::<i64>().ok().map(|p| (p, p)),
            };
            match parsed {
                Some(pair) => pair,
                None => {
                    return bad(
                        c,
                        format!("port {t:?} is not a port or a range like \"8000-8100\""),
                    )
                }
            }
        }
    };
    for p in [lo, hi] {
        if !(1..=65535).contains(&p) {
            return bad(c, format!("port {p} is out of range 1-65535"));
        }
    }
    if lo > hi {
        return bad(
            c,
            format!("port range {lo}-{hi} is inverted; write \"{hi}-{lo}\""),
        );
    }
    // Both are within 1..=65535, so they fit in u16.
    Some(PortRange {
        lo: u16::try_from(lo).ok()?,
        hi: u16::try_from(hi).ok()?,
    })
}

/// Sorts ranges and merges overlapping or adjacent ones.
pub(crate) fn merge_ranges(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                last.hi = last.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    out
}

/// A rule's `exe` list: absolute paths of regular files, each resolved now
/// (symlinks followed) to the file whose identity the kernel compares.
fn executables(
    c: &mut Checker<'_>,
    at: &str,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Vec<Executable> {
    let Some(list) = list else {
        return Vec::new();
    };
    if list.get_ref().is_empty() {
        c.error(
            list.span(),
            format!(
                "{at}: `exe = []` allows no caller at all; omit `exe` to allow every executable"
            ),
        );
        return Vec::new();
    }
    let mut out: Vec<Executable> = Vec::new();
    for entry in list.get_ref() {
        let path = PathBuf::from(entry.get_ref());
        match crate::process::exe_file::resolve(&path) {
            Ok((real, file)) => {
                if let Some(fs) = crate::process::exe_file::device_differs(&real) {
                    c.warn(
                        entry.span(),
                        format!("{at}: exe {}: on {fs}, whose `stat` reports another device than the kernel records for a running program: this rule never matches, and denies", path.display()),
                    );
                }
                if file.gen.is_none() {
                    let fs = crate::process::exe_file::filesystem_type(&real)
                        .unwrap_or_else(|| "a filesystem".to_owned());
                    c.warn(
                        entry.span(),
                        format!("{at}: exe {}: on {fs}, which does not report inode generations: while no agent runs, a new file given this file's inode number once an upgrade frees it passes as this one", path.display()),
                    );
                }
                if let Some(who) = crate::process::exe_file::writable_by_others(&path, &real) {
                    c.warn(
                        entry.span(),
                        format!("{at}: exe {}: {who}; whoever can write it can make another program pass as this one (the agent follows a path to the file renamed over it)", path.display()),
                    );
                }
                if !out.iter().any(|e| e.file == file) {
                    out.push(Executable { path, real, file });
                }
            }
            Err(e) => c.error(entry.span(), format!("{at}: exe: {e}")),
        }
    }
    out
}

/// A rule's `uid` list: user ids (numbers; a name would change meaning
/// with /etc/passwd).
fn users(c: &mut Checker<'_>, at: &str, list: Option<&Spanned<Vec<Spanned<i64>>>>) -> Vec<u32> {
    let Some(list) = list else {
        return Vec::new();
    };
    if list.get_ref().is_empty() {
        c.error(
            list.span(),
            format!("{at}: `uid = []` allows no caller at all; omit `uid` to allow every user"),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for entry in list.get_ref() {
        match u32::try_from(*entry.get_ref()) {
            Ok(uid) if uid != u32::MAX => {
                if !out.contains(&uid) {
                    out.push(uid);
                }
            }
            _ => c.error(
                entry.span(),
                format!(
                    "{at}: uid {} is not a user id (0 to 4294967294)",
                    entry.get_ref()
                ),
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_and_overlapping_ports() {
        let r = |lo, hi| PortRange { lo, hi };
        assert_eq!(
            merge_ranges(vec![
                r(8000, 8100),
                r(5432, 5432),
                r(8101, 8200),
                r(8050, 8060)
            ]),
            vec![r(5432, 5432), r(8000, 8200)]
        );
    }
}
