//! The policy file as written: serde structs that keep the position of
//! every value so that validation can point at it.

use serde::Deserialize;
use toml::Spanned;

/// Keys a policy file may have at the top level and in each `[[egress]]`.
/// Unknown keys are found by `unknown_keys` before deserializing, so that
/// one typo does not hide every other problem in the file.
pub(crate) const POLICY_KEYS: &[&str] = &[
    "name",
    "description",
    "unit",
    "user",
    "cgroup",
    "mode",
    "egress",
    "ingress",
    "bind",
    "sockets",
    "observe_lookups",
];
pub(crate) const EGRESS_KEYS: &[&str] = &["to", "ports", "protocol", "description", "exe", "uid"];
pub(crate) const INGRESS_KEYS: &[&str] =
    &["from", "ports", "protocol", "description", "exe", "uid"];
pub(crate) const BIND_KEYS: &[&str] = &["ports", "protocol"];
pub(crate) const SOCKETS_KEYS: &[&str] = &["raw", "packet", "protocols"];

#[derive(Debug, Deserialize)]
pub(crate) struct RawPolicy {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub unit: Option<Spanned<String>>,
    /// The uid whose user manager runs `unit`.
    pub user: Option<Spanned<i64>>,
    pub cgroup: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub egress: Vec<Spanned<RawEgress>>,
    /// Absent: inbound is not restricted. Present (even empty): default-deny.
    pub ingress: Option<Spanned<Vec<Spanned<RawIngress>>>>,
    pub bind: Option<Spanned<RawBind>>,
    pub sockets: Option<RawSockets>,
    /// Send the service's DNS lookups through the agent's proxy to see
    /// which names its addresses came from, learning nothing.
    pub observe_lookups: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawIngress {
    pub from: Option<Spanned<Vec<Spanned<String>>>>,
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    pub protocol: Option<Spanned<String>>,
    pub description: Option<String>,
    pub exe: Option<Spanned<Vec<Spanned<String>>>>,
    pub uid: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawBind {
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    pub protocol: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct RawSockets {
    #[serde(default)]
    pub raw: bool,
    #[serde(default)]
    pub packet: bool,
    pub protocols: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawEgress {
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    pub protocol: Option<Spanned<String>>,
    pub description: Option<String>,
    pub exe: Option<Spanned<Vec<Spanned<String>>>>,
    pub uid: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// `5432` or `"8000-8100"` (or `"5432"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawPort {
    Number(i64),
    Text(String),
}

/// Every key of the document that the policy format does not know, with its
/// span and the keys allowed where it stands.
pub(crate) fn unknown_keys(text: &str) -> Vec<(std::ops::Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new(); // syntax errors are reported by the deserializer
    };
    let mut out = Vec::new();
    let mut check = |table: &DeTable<'_>, allowed: &[&str], at: &str| {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                out.push((
                    key.span(),
                    format!(
                        "unknown key `{}`{at}; expected one of: {}",
                        key.get_ref(),
                        allowed.join(", ")
                    ),
                ));
            }
        }
    };
    let top = doc.get_ref();
    check(top, POLICY_KEYS, "");
    for (list, keys) in [("egress", EGRESS_KEYS), ("ingress", INGRESS_KEYS)] {
        if let Some(DeValue::Array(rules)) = top.get(list).map(|v| v.get_ref()) {
            for (i, rule) in rules.iter().enumerate() {
                if let DeValue::Table(t) = rule.get_ref() {
                    check(t, keys, &format!(" in {list}[{i}]"));
                }
            }
        }
    }
    for (table, keys) in [("bind", BIND_KEYS), ("sockets", SOCKETS_KEYS)] {
        if let Some(DeValue::Table(t)) = top.get(table).map(|v| v.get_ref()) {
            check(t, keys, &format!(" in [{table}]"));
        }
    }
    out
}
