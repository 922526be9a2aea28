//! The policy file as written: serde structs that keep the position of
//! every value so that validation can point at it.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub unit: Option<Spanned<String>>,
    pub cgroup: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub egress: Vec<Spanned<RawEgress>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEgress {
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    pub protocol: Option<Spanned<String>>,
    pub description: Option<String>,
}

/// `5432` or `"8000-8100"` (or `"5432"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawPort {
    Number(i64),
    Text(String),
}
