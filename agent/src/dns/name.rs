//! Name patterns of egress rules: `api.example.com` (exactly that name),
//! `*.example.com` (exactly one label more) and `**.example.com` (one or
//! more labels more). Neither wildcard matches `example.com` itself.
//!
//! Patterns are ASCII host names (letters, digits, hyphens), compared
//! without regard to case; a trailing dot is accepted. What is refused, and
//! why (docs/dns-names.md, "Name patterns"):
//! - non-ASCII text: internationalised names are written in their ASCII
//!   (`xn--`) form, which is what DNS answers carry;
//! - a single label (`db`, `*.com`, `**.com`): answers carry fully
//!   qualified names, so `db` would never match, and a wildcard directly
//!   under a top-level domain would allow a whole TLD. Without a public
//!   suffix list `*.co.uk` cannot be told from `*.example.com`; it is
//!   accepted;
//! - a last label of digits only (`10.0.0.300`): no top-level domain is
//!   numeric, so this is a mistyped address, not a name.

use std::fmt;

/// Longest name in presentation form, without the trailing dot (RFC 1035
/// 2.3.4: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A checked name pattern, its labels lower-cased, leftmost first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamePattern {
    kind: PatternKind,
    /// The fixed labels: the whole name for [`PatternKind::Exact`], the
    /// labels under the wildcard otherwise.
    labels: Vec<String>,
}

/// What a pattern allows beyond its fixed labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatternKind {
    /// `api.example.com`: that name only.
    Exact,
    /// `*.example.com`: exactly one more label.
    OneLabel,
    /// `**.example.com`: one or more labels.
    AnyDepth,
}

/// Why a pattern was refused: the byte offset in the text given to
/// [`NamePattern::parse`] where the problem is, and the problem (which
/// quotes the text). The policy loader reports FILE:LINE:COL at the
/// entry's span start + 1 (its opening quote) + the whitespace it trimmed +
/// `offset`: exact for TOML basic strings without escapes, which is what
/// names are written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    pub offset: usize,
    pub problem: String,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem)
    }
}

impl std::error::Error for NameError {}

fn refuse<T>(offset: usize, problem: impl Into<String>) -> Result<T, NameError> {
    Err(NameError {
        offset,
        problem: problem.into(),
    })
}

impl NamePattern {
    /// Parses one pattern as written in a policy.
    ///
    /// # Errors
    /// The first problem found, with its byte offset in `text`.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        if let Some((at, ch)) = text.char_indices().find(|(_, c)| !c.is_ascii()) {
            return refuse(
                at,
                format!(
                    "{text:?}: non-ASCII character {ch:?}; write an internationalised name in its ASCII form (\"xn--...\")"
                ),
            );
        }
        let body = text.strip_suffix('.').unwrap_or(text);
        if body.is_empty() {
            return refuse(
                0,
                format!("{text:?} is not a name: it is empty or the root"),
            );
        }
        let mut spans = Vec::new();
        let mut start = 0;
        for part in body.split('.') {
            spans.push((start, part));
            start += part.len() + 1;
        }
        let (kind, fixed) = match spans[0].1 {
            "*" => (PatternKind::OneLabel, &spans[1..]),
            "**" => (PatternKind::AnyDepth, &spans[1..]),
            _ => (PatternKind::Exact, &spans[..]),
        };
        let mut labels = Vec::with_capacity(fixed.len());
        for &(at, label) in fixed {
            check_label(text, at, label, kind != PatternKind::Exact)?;
            labels.push(label.to_ascii_lowercase());
        }
        // The shortest name a wildcard can match has a one-letter label in
        // its place.
        let shortest = match kind {
            PatternKind::Exact => body.len(),
            PatternKind::OneLabel | PatternKind::AnyDepth => body.len() - spans[0].1.len() + 1,
        };
        if shortest > MAX_NAME_LEN {
            return refuse(
                0,
                format!(
                    "{text:?} is {shortest} characters long{}; a name has at most {MAX_NAME_LEN}",
                    if kind == PatternKind::Exact {
                        ""
                    } else {
                        " at the shortest"
                    }
                ),
            );
        }
        if labels.len() < 2 {
            let problem = match kind {
                PatternKind::Exact => format!(
                    "{text:?} is a single label; DNS answers carry fully qualified names, so write the whole name (like \"db.example.com\")"
                ),
                PatternKind::OneLabel | PatternKind::AnyDepth => format!(
                    "{text:?} would allow every name under a top-level domain; put the wildcard under a domain of its own (like \"*.example.com\")"
                ),
            };
            return refuse(0, problem);
        }
        let (last_at, last) = spans[spans.len() - 1];
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return refuse(
                last_at,
                format!(
                    "{text:?} is not an IP address, and as a name its last label {last:?} is all digits, which no top-level domain is"
                ),
            );
        }
        Ok(Self { kind, labels })
    }

    #[must_use]
    pub fn kind(&self) -> PatternKind {
        self.kind
    }

    /// Whether `name` (labels leftmost first, without the root; any case)
    /// is one this pattern allows.
    #[must_use]
    pub fn matches<L: AsRef<[u8]>>(&self, name: &[L]) -> bool {
        let extra = match name.len().checked_sub(self.labels.len()) {
            Some(extra) => extra,
            None => return false,
        };
        let depth_ok = match self.kind {
            PatternKind::Exact => extra == 0,
            PatternKind::OneLabel => extra == 1,
            PatternKind::AnyDepth => extra >= 1,
        };
        depth_ok
            && name[extra..]
                .iter()
                .zip(&self.labels)
                .all(|(got, want)| got.as_ref().eq_ignore_ascii_case(want.as_bytes()))
    }

    /// Like [`Self::matches`], for a name in presentation form
    /// (`"API.example.com."`). A name with an escaped dot inside a label
    /// cannot match any pattern, so splitting on dots is exact here.
    #[must_use]
    pub fn matches_text(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        let labels: Vec<&str> = name.split('.').collect();
        self.matches(&labels)
    }
}

/// Checks one fixed label; `under_wildcard` only changes the wording.
fn check_label(text: &str, at: usize, label: &str, under_wildcard: bool) -> Result<(), NameError> {
    if label.is_empty() {
        return refuse(
            at,
            format!("{text:?} has an empty label (two dots in a row, or a leading dot)"),
        );
    }
    if label.contains('*') {
        let problem = if label == "*" || label == "**" {
            if under_wildcard {
                format!("{text:?}: only one wildcard is allowed, as the leftmost label")
            } else {
                format!("{text:?}: a wildcard may only be the leftmost label")
            }
        } else {
            format!(
                "{text:?}: a wildcard must be a whole label, \"*\" (one label) or \"**\" (one or more labels)"
            )
        };
        return refuse(at, problem);
    }
    if label.len() > MAX_LABEL_LEN {
        return refuse(
            at,
            format!(
                "{text:?}: label {label:?} is {} characters long; a label has at most {MAX_LABEL_LEN}",
                label.len()
            ),
        );
    }
    if let Some(bad) = label
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return refuse(
            at + bad.0,
            format!(
                "{text:?}: {:?} is not allowed in a name (letters, digits and '-' only)",
                bad.1
            ),
        );
    }
    if label.starts_with('-') || label.ends_with('-') {
        return refuse(
            at,
            format!("{text:?}: label {label:?} starts or ends with '-'"),
        );
    }
    Ok(())
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PatternKind::Exact => {}
            PatternKind::OneLabel => f.write_str("*.")?,
            PatternKind::AnyDepth => f.write_str("**.")?,
        }
        f.write_str(&self.labels.join("."))
    }
}

#[cfg(test)]
#[path = "name_tests.rs"]
mod tests;
