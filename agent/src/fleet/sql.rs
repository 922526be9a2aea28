//! Putting names and values into SQL text. Identifiers (the database) are
//! checked, never quoted: one that needs quoting is refused by the config.
//! Values from outside (batch ids, dates) go in as string literals.

/// Names ClickHouse keeps for itself.
const RESERVED: &[&str] = &["system", "information_schema", "default"];

/// A plain identifier: a letter or '_', then letters, digits and '_', at
/// most 64 characters, not one of ClickHouse's own databases.
///
/// # Errors
/// Why it is not one.
pub fn check_identifier(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || name.len() > 64 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("must be a letter or '_' followed by letters, digits and '_' (at most 64)");
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err("is reserved by ClickHouse");
    }
    Ok(())
}

/// `value` as a single-quoted string literal, with `\` and `'` escaped
/// (control characters too, so that the literal stays on one line).
#[must_use]
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Percent-encodes `value` for a URL's query (everything but RFC 3986's
/// unreserved characters).
#[must_use]
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_names() {
        assert_eq!(check_identifier("bulkhead"), Ok(()));
        assert_eq!(check_identifier("_fleet_2"), Ok(()));
        for bad in ["", "2fleet", "a-b", "a b", "a`b", "é", "System", "default"] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
        assert!(check_identifier(&"a".repeat(65)).is_err());
    }

    #[test]
    fn literals_escape_what_would_end_them() {
        assert_eq!(literal("abc"), "'abc'");
        assert_eq!(literal("a'b\\c\nd"), "'a\\'b\\\\c\\nd'");
    }

    #[test]
    fn urls_encode_everything_but_unreserved() {
        assert_eq!(
            url_encode("INSERT INTO b.flows FORMAT JSONEachRow"),
            "INSERT%20INTO%20b.flows%20FORMAT%20JSONEachRow"
        );
        assert_eq!(url_encode("a=b&c'é"), "a%3Db%26c%27%C3%A9");
    }
}
