//! `bulkhead learn`: a policy allowing exactly what a service was observed
//! doing, from the agent's service graph (kept in the state directory, so
//! it covers restarts), collapsed into one rule per destination group and
//! protocol, with comments saying what each rule was learned from.

use std::{collections::BTreeMap, fmt::Write as _};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::{
    dns::name::NamePattern,
    graph::{at_or_after, Dest, EdgeStats, Graph, Source},
    policy::{Mode, PolicySet, Selector},
};

/// Past this many port ranges toward one destination group, a rule allows
/// the span from the lowest to the highest port instead (the kernel checks
/// at most 32 ranges per prefix; see docs/policy.md, Limits).
const MAX_RANGES: usize = 16;
/// Provenance lines written above a rule; the rest are counted.
const MAX_COMMENTS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// The policy file's text.
    pub policy: String,
    /// `[[egress]]` rules written.
    pub rules: usize,
    /// Destinations (edges) learned from.
    pub destinations: usize,
    /// Destinations only ever denied: not learned (listed in comments).
    pub denied_not_learned: usize,
}

/// How `learn` writes the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `mode = "enforce"` instead of `"audit"`.
    pub enforce: bool,
    /// `exe = [...]` on each rule: the executables seen.
    pub exe: bool,
}

struct Seen<'a> {
    dest: &'a Dest,
    stats: &'a EdgeStats,
    service: Option<&'a str>,
    /// The DNS name the service looked up that gave this address, when it
    /// is one address, not a local service, and a valid name pattern.
    name: Option<&'a str>,
}

/// What a rule's `to` lists: an address or network, or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Net(IpNetwork),
    Name(String),
}

/// A learned rule: its destinations with the edges each was learned
/// from, and a note to write above it.
#[derive(Default)]
struct Body<'a, 'g> {
    to: Vec<(Target, Vec<&'a Seen<'g>>)>,
    note: Option<String>,
}

/// `"tcp"`, `"udp"`, `"icmp"` (ping sockets, which only an `icmp` rule
/// lets a service open), or `"any"` for other protocols.
fn rule_protocol(p: &str) -> &'static str {
    match p {
        "tcp" => "tcp",
        "udp" => "udp",
        "icmp" | "icmpv6" => "icmp",
        _ => "any",
    }
}

/// Sorted ports as TOML: `[5432, "8000-8002"]`; ranges where consecutive.
fn ports_toml(ports: &[u16]) -> (String, Option<String>) {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match ranges.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(p) => *hi = p,
            _ => ranges.push((p, p)),
        }
    }
    let mut note = None;
    if ranges.len() > MAX_RANGES {
        let (lo, hi) = (ranges[0].0, ranges[ranges.len() - 1].1);
        note = Some(format!(
            "{} separate ports seen; allowing the span {lo}-{hi} (review it)",
            ports.len()
        ));
        ranges = vec![(lo, hi)];
    }
    let items: Vec<String> = ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("\"{lo}-{hi}\"")
            }
        })
        .collect();
    (format!("[{}]", items.join(", ")), note)
}

fn provenance(s: &Seen<'_>) -> String {
    let what = match (s.service, s.name) {
        (Some(name), _) => format!("service {name} at {}", s.dest.label()),
        (None, Some(name)) => format!("{name} at {}", s.dest.label()),
        (None, None) => s.dest.label(),
    };
    let folded = if s.stats.addresses > 1 {
        format!(" ({} addresses)", s.stats.addresses)
    } else {
        String::new()
    };
    let audited = if s.stats.audited > 0 {
        format!(", {} audited", s.stats.audited)
    } else {
        String::new()
    };
    format!(
        "{} connection(s) to {what}{folded}{audited}, {} .. {}",
        s.stats.connections, s.stats.first_seen, s.stats.last_seen
    )
}

/// The learned policy of `name`: what went through (allowed, or audited in
/// audit mode) since `since` (RFC 3339; None: everything the graph holds).
///
/// # Errors
/// No such service in the policy, or nothing observed for it.
pub fn learn(
    graph: &Graph,
    policy: &PolicySet,
    name: &str,
    since: Option<&str>,
    options: Options,
) -> Result<Learned, String> {
    let enforce = options.enforce;
    let service = policy
        .services
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("no service named {name:?} in the policy"))?;
    let mut seen: Vec<Seen<'_>> = Vec::new();
    let mut denied: Vec<String> = Vec::new();
    for ((source, dest), stats) in &graph.edges {
        if !matches!(source, Source::Service { name: n } if n == name) {
            continue;
        }
        if since.is_some_and(|t| !at_or_after(&stats.last_seen, t)) {
            continue;
        }
        if stats.connections == 0 {
            if stats.denied > 0 {
                denied.push(format!("{} (denied ×{})", dest.label(), stats.denied));
            }
            continue;
        }
        let service = graph.service_at(dest);
        let name = stats
            .dst_name
            .as_deref()
            .filter(|n| service.is_none() && dest.is_host() && NamePattern::parse(n).is_ok());
        seen.push(Seen {
            dest,
            stats,
            service,
            name,
        });
    }
    if seen.is_empty() {
        return Err(format!(
            "nothing observed for {name}{}: no connection went through, so there is nothing to learn \
             (run it in mode = \"audit\" first, with its usual traffic)",
            since.map(|t| format!(" since {t}")).unwrap_or_default()
        ));
    }
    seen.sort_by(|a, b| a.dest.cmp(b.dest));
    denied.sort();
    let rules = collapse(&seen);
    let mut out = String::new();
    let selector = match &service.selector {
        Selector::Unit(u) => match u.user {
            None => format!("unit = {:?}", u.name),
            Some(uid) => format!("unit = {:?}\nuser = {uid}", u.name),
        },
        Selector::Cgroup(p) => format!("cgroup = \"/{p}\""),
    };
    let _ = writeln!(
        out,
        "# Learned by `bulkhead learn {name}` at {} from the agent's service graph,\n\
         # {} destination(s) observed{}.\n\
         # Review every rule before enforcing: it allows what the service did, not\n\
         # what it should do. [[ingress]], [bind] and [sockets] are not learned:\n\
         # copy them from {} if it has any.",
        crate::graph::now(),
        seen.len(),
        since.map(|t| format!(" since {t}")).unwrap_or_default(),
        service.file.display(),
    );
    for d in &denied {
        let _ = writeln!(out, "# not learned, only ever denied: {d}");
    }
    let _ = writeln!(out, "name = {name:?}\n{selector}");
    let _ = writeln!(
        out,
        "mode = {:?}{}",
        if enforce { Mode::Enforce } else { Mode::Audit }.as_str(),
        if enforce {
            ""
        } else {
            "    # switch to \"enforce\" once the audit log shows nothing unexpected"
        }
    );
    let rule_count = rules.len();
    for ((proto, ports), body) in rules {
        out.push('\n');
        let nets = body.to;
        let from: Vec<&Seen<'_>> = nets.iter().flat_map(|(_, f)| f.iter().copied()).collect();
        if let Some(note) = body.note {
            let _ = writeln!(out, "# {note}");
        }
        for s in from.iter().take(MAX_COMMENTS) {
            let _ = writeln!(out, "# learned from {}", provenance(s));
        }
        if from.len() > MAX_COMMENTS {
            let _ = writeln!(out, "# ... and {} more", from.len() - MAX_COMMENTS);
        }
        let executables = executables_of(&from);
        if !executables.is_empty() {
            let calls: Vec<String> = executables
                .iter()
                .map(|(exe, n)| format!("{exe} ×{n}"))
                .collect();
            let _ = writeln!(out, "# executables: {}", calls.join(", "));
        }
        let services: Vec<&str> = from.iter().filter_map(|s| s.service).collect();
        let _ = writeln!(out, "[[egress]]");
        if !services.is_empty() {
            let mut services = services;
            services.dedup();
            let _ = writeln!(
                out,
                "description = \"learned: service {}\"",
                services.join(", ")
            );
        }
        let to: Vec<String> = nets
            .iter()
            .map(|(t, _)| match t {
                Target::Net(n) => format!("{:?}", host_or_net(n)),
                Target::Name(n) => format!("{n:?}"),
            })
            .collect();
        let _ = writeln!(out, "to = [{}]", to.join(", "));
        if !ports.is_empty() {
            let (text, note) = ports_toml(&ports);
            if let Some(note) = note {
                let _ = writeln!(out, "# {note}");
            }
            let _ = writeln!(out, "ports = {text}");
        }
        let _ = writeln!(out, "protocol = {proto:?}");
        let executables = executables_of(&from);
        if options.exe {
            out.push_str(&exe_line(&executables));
        }
    }
    Ok(Learned {
        policy: out,
        rules: rule_count,
        destinations: seen.len(),
        denied_not_learned: denied.len(),
    })
}

/// Calls per executable over the edges a rule was learned from.
fn executables_of(from: &[&Seen<'_>]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in from {
        for (exe, n) in &s.stats.executables {
            *out.entry(exe.clone()).or_insert(0) += n;
        }
    }
    out
}

/// `exe = [...]` naming every executable seen (a replaced file by its path,
/// which now names its successor), or a comment saying why there is none:
/// a call of an unknown executable, or more executables than an edge
/// keeps, would be denied by the list.
fn exe_line(executables: &BTreeMap<String, u64>) -> String {
    use crate::graph::model::{OTHER_EXE, UNKNOWN_EXE};
    if executables.is_empty() {
        return "# no exe: no call recorded its executable\n".to_owned();
    }
    if executables.contains_key(UNKNOWN_EXE) || executables.contains_key(OTHER_EXE) {
        return "# no exe: some calls came from executables not recorded (unknown, or past \
                three per destination)\n"
            .to_owned();
    }
    let mut paths: Vec<&str> = executables
        .keys()
        .map(|p| p.strip_suffix(" (deleted)").unwrap_or(p))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let quoted: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    format!("exe = [{}]\n", quoted.join(", "))
}

/// Rules keyed by protocol and ports, each with its destinations and the
/// edges they were learned from.
type Rules<'a, 'g> = BTreeMap<(&'static str, Vec<u16>), Body<'a, 'g>>;
/// Ports and edges of one destination and protocol.
type Group<'a, 'g> = (Vec<u16>, Vec<&'a Seen<'g>>);

/// One group per destination (network, or name looked up) and protocol,
/// with its ports; then groups with the same protocol and ports share one
/// rule. Past `MAX_NAME_RULES` rules with names (what a service may have),
/// the names of the later rules go back to their addresses, with a note.
fn collapse<'a, 'g>(seen: &'a [Seen<'g>]) -> Rules<'a, 'g> {
    let mut groups: BTreeMap<(&'static str, Target), Group<'a, 'g>> = BTreeMap::new();
    for s in seen {
        let target = match s.name {
            Some(name) => Target::Name(name.to_string()),
            None => Target::Net(s.dest.network()),
        };
        let g = groups
            .entry((rule_protocol(&s.dest.protocol), target))
            .or_default();
        if !g.0.contains(&s.dest.port) {
            g.0.push(s.dest.port);
        }
        g.1.push(s);
    }
    let mut rules: Rules<'a, 'g> = BTreeMap::new();
    for ((proto, target), (mut ports, from)) in groups {
        ports.sort_unstable();
        // Port 0 (no port) and "any" protocol rules cover every port; ICMP
        // has none.
        if proto == "any" || proto == "icmp" || ports.contains(&0) {
            ports.clear();
        }
        rules
            .entry((proto, ports))
            .or_default()
            .to
            .push((target, from));
    }
    let mut with_names = 0;
    for body in rules.values_mut() {
        if !body.to.iter().any(|(t, _)| matches!(t, Target::Name(_))) {
            continue;
        }
        with_names += 1;
        if with_names <= agent_common::MAX_NAME_RULES {
            continue;
        }
        let mut to: BTreeMap<Target, Vec<&'a Seen<'g>>> = BTreeMap::new();
        let mut names = Vec::new();
        for (target, from) in body.to.drain(..) {
            match target {
                Target::Name(n) => {
                    names.push(n);
                    for s in from {
                        to.entry(Target::Net(s.dest.network())).or_default().push(s);
                    }
                }
                net @ Target::Net(_) => to.entry(net).or_default().extend(from),
            }
        }
        body.to = to.into_iter().collect();
        body.note = Some(format!(
            "by address, not by the name(s) looked up ({}): a service has at most {} rules with names",
            names.join(", "),
            agent_common::MAX_NAME_RULES
        ));
    }
    rules
}

/// `192.0.2.7` for a single address, `198.51.100.0/24` for a network.
fn host_or_net(n: &IpNetwork) -> String {
    let host = if n.is_ipv4() { 32 } else { 128 };
    if n.prefix() == host {
        n.ip().to_string()
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Verdict,
        graph::tests::{accepted, connect, connect_named},
    };

    const ENFORCE: Options = Options {
        enforce: true,
        exe: false,
    };

    fn set() -> PolicySet {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("a.toml"),
            "cgroup = \"/a\"\nmode = \"audit\"\n",
        )
        .expect("write");
        crate::policy::load_dir(dir.path()).expect("valid")
    }

    fn learned_checks(text: &str) -> PolicySet {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.toml"), text).expect("write");
        let set = crate::policy::load_dir(dir.path())
            .unwrap_or_else(|e| panic!("learned policy does not check: {e:?}\n{text}"));
        crate::kernel::compile(&set).unwrap_or_else(|e| panic!("does not compile: {e:?}\n{text}"));
        set
    }

    /// A service that pinged learns an `icmp` rule (only such a rule lets
    /// it open a ping socket), with no ports, and the policy checks.
    #[test]
    fn echoes_are_learned_as_icmp_rules() {
        let mut g = Graph::default();
        for (dst, proto) in [("198.51.100.9", "icmp"), ("2001:db8::9", "icmpv6")] {
            let mut echo = connect("a", (dst, 0), Verdict::Audit);
            echo.protocol = Some(proto.into());
            g.observe(&echo);
        }
        let l = learn(&g, &set(), "a", None, Options::default()).expect("learned");
        let text = &l.policy;
        assert!(
            text.contains("to = [\"198.51.100.9\", \"2001:db8::9\"]\nprotocol = \"icmp\""),
            "{text}"
        );
        let set = learned_checks(text);
        assert_eq!(
            set.services[0].egress[0].protocol,
            crate::policy::Protocol::Icmp
        );
    }

    #[test]
    fn one_rule_per_group_and_protocol_with_ports_collapsed() {
        let mut g = Graph::default();
        for port in [8000, 8001, 8002, 5432] {
            g.observe(&connect("a", ("192.0.2.7", port), Verdict::Audit));
        }
        g.observe(&connect("a", ("127.0.0.1", 8080), Verdict::Allow));
        g.observe(&accepted("b", ("127.0.0.1", 8080)));
        for i in 1..=crate::graph::model::GROUP_AT {
            g.observe(&connect(
                "a",
                (&format!("198.51.100.{i}"), 443),
                Verdict::Allow,
            ));
        }
        g.observe(&connect("a", ("203.0.113.1", 22), Verdict::Deny));
        let l = learn(&g, &set(), "a", None, Options::default()).expect("learned");
        let text = &l.policy;
        assert!(text.contains("mode = \"audit\""), "{text}");
        assert!(
            text.contains(
                "to = [\"192.0.2.7\"]\nports = [5432, \"8000-8002\"]\nprotocol = \"tcp\""
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "description = \"learned: service b\"\nto = [\"127.0.0.1\"]\nports = [8080]"
            ),
            "{text}"
        );
        assert!(
            text.contains("to = [\"198.51.100.0/24\"]\nports = [443]"),
            "{text}"
        );
        assert!(
            text.contains("# learned from 1 connection(s) to service b at 127.0.0.1:8080/tcp"),
            "{text}"
        );
        assert!(
            text.contains("# not learned, only ever denied: 203.0.113.1:22/tcp"),
            "{text}"
        );
        assert_eq!((l.rules, l.denied_not_learned), (3, 1));
        let set = learned_checks(text);
        assert_eq!(set.services[0].egress.len(), 3);
    }

    #[test]
    fn enforce_flag_and_nothing_to_learn() {
        let mut g = Graph::default();
        assert!(learn(&g, &set(), "a", None, Options::default()).is_err());
        g.observe(&connect("a", ("192.0.2.7", 53), Verdict::Allow));
        let l = learn(&g, &set(), "a", None, ENFORCE).expect("learned");
        assert!(l.policy.contains("mode = \"enforce\"\n"), "{}", l.policy);
        learned_checks(&l.policy);
        assert!(learn(
            &g,
            &set(),
            "a",
            Some("2999-01-01T00:00:00Z"),
            Options::default()
        )
        .is_err());
    }

    /// Addresses the service's own lookups gave are learned as the name
    /// looked up, one name for all its addresses, beside address rules;
    /// the policy checks and its rule has the name.
    #[test]
    fn looked_up_addresses_are_learned_as_their_name() {
        let mut g = Graph::default();
        g.observe(&connect_named(
            "a",
            ("203.0.113.5", 443),
            "api.example.test",
        ));
        g.observe(&connect_named(
            "a",
            ("203.0.113.6", 443),
            "api.example.test",
        ));
        g.observe(&connect("a", ("127.0.53.1", 53), Verdict::Allow));
        let l = learn(&g, &set(), "a", None, Options::default()).expect("learned");
        let text = &l.policy;
        assert!(
            text.contains("to = [\"api.example.test\"]\nports = [443]\nprotocol = \"tcp\""),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("to = ") && l.contains("203.0.113.")),
            "no rule lists an address of the name: {text}"
        );
        assert!(
            text.contains(
                "# learned from 1 connection(s) to api.example.test at 203.0.113.5:443/tcp"
            ),
            "{text}"
        );
        assert!(
            text.contains("to = [\"127.0.53.1\"]\nports = [53]"),
            "{text}"
        );
        let set = learned_checks(text);
        let names: Vec<String> = set.services[0]
            .egress
            .iter()
            .flat_map(|r| r.names.iter().map(ToString::to_string))
            .collect();
        assert_eq!(names, ["api.example.test"]);
    }

    /// A service has at most four rules with names: a fifth port set's
    /// names are learned as their addresses, said in a note, and the
    /// policy still checks.
    #[test]
    fn past_four_rules_with_names_the_rest_are_learned_by_address() {
        let mut g = Graph::default();
        for (i, port) in [441, 442, 443, 444, 445].into_iter().enumerate() {
            g.observe(&connect_named(
                "a",
                (&format!("203.0.113.{}", i + 1), port),
                &format!("n{i}.example.test"),
            ));
        }
        let l = learn(&g, &set(), "a", None, Options::default()).expect("learned");
        let text = &l.policy;
        assert!(
            text.contains("to = [\"n3.example.test\"]\nports = [444]"),
            "{text}"
        );
        assert!(
            text.contains("# by address, not by the name(s) looked up (n4.example.test): a service has at most 4 rules with names"),
            "{text}"
        );
        assert!(
            text.contains("to = [\"203.0.113.5\"]\nports = [445]"),
            "{text}"
        );
        learned_checks(text);
    }

    /// With `--exe`, a rule names the executables its calls came from (a
    /// replaced file by its path), and the policy checks; a rule with a
    /// call of an unknown executable gets no list, and says why.
    #[test]
    fn executables_seen_are_learned_with_exe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (app, tool) = (dir.path().join("app"), dir.path().join("tool"));
        for f in [&app, &tool] {
            std::fs::write(f, b"").expect("write");
        }
        let (app, tool) = (app.display().to_string(), tool.display().to_string());
        let mut g = Graph::default();
        let by = |exe: Option<String>, dst: (&str, u16)| {
            let mut ev = connect("a", dst, Verdict::Audit);
            ev.exe = exe.map(Into::into);
            ev
        };
        g.observe(&by(Some(app.clone()), ("192.0.2.7", 5432)));
        g.observe(&by(Some(format!("{app} (deleted)")), ("192.0.2.7", 5432)));
        g.observe(&by(Some(tool.clone()), ("192.0.2.8", 5432)));
        g.observe(&by(None, ("198.51.100.1", 443)));
        let options = Options {
            enforce: false,
            exe: true,
        };
        let text = learn(&g, &set(), "a", None, options)
            .expect("learned")
            .policy;
        assert!(
            text.contains(&format!(
                "# executables: {app} ×1, {app} (deleted) ×1, {tool} ×1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "ports = [5432]\nprotocol = \"tcp\"\nexe = [{app:?}, {tool:?}]\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("ports = [443]\nprotocol = \"tcp\"\n# no exe: some calls came"),
            "{text}"
        );
        learned_checks(&text);
        let plain = learn(&g, &set(), "a", None, Options::default()).expect("learned");
        assert!(!plain.policy.contains("exe = "), "{}", plain.policy);
    }

    #[test]
    fn many_scattered_ports_become_one_span() {
        let ports: Vec<u16> = (0..40).map(|i| 1000 + i * 2).collect();
        let (text, note) = ports_toml(&ports);
        assert_eq!(text, "[\"1000-1078\"]");
        assert!(note.is_some());
    }
}
