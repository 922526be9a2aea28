//! Destinations reached by DNS name (docs/dns-names.md): the addresses a
//! service's own lookups of a name gave are listed under that name, in
//! the graph, the host's blast radius and the fleet's alike.

use crate::dns::name::NamePattern;

/// `api.example.test:443/tcp`: how a name is shown as a destination (the
/// label of the graph's `name:` node, view.rs).
#[must_use]
pub fn label(name: &str, port: u16, protocol: &str) -> String {
    format!("{name}:{port}/{protocol}")
}

/// `api.example.test:443`: a name in a lateral path.
#[must_use]
pub fn short(name: &str, port: u16) -> String {
    format!("{name}:{port}")
}

/// Whether `pattern` (as a policy writes it: `api.example.com`,
/// `*.example.com`) allows `name`. A pattern that does not parse allows
/// nothing: a fleet row may come from another release.
#[must_use]
pub fn allows(pattern: &str, name: &str) -> bool {
    NamePattern::parse(pattern).is_ok_and(|p| p.matches_text(name))
}

/// At most this many addresses are written out in a text report.
const SHOWN: usize = 4;

/// `203.0.113.5, 203.0.113.6, +3 more`: a name's addresses in a report.
#[must_use]
pub fn addresses_text(addresses: &[String]) -> String {
    let mut out = addresses
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if addresses.len() > SHOWN {
        out.push_str(&format!(", +{} more", addresses.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_labelled_like_its_graph_node() {
        assert_eq!(
            label("api.example.test", 443, "tcp"),
            "api.example.test:443/tcp"
        );
        assert_eq!(short("api.example.test", 443), "api.example.test:443");
    }

    #[test]
    fn patterns_allow_as_the_policy_does() {
        assert!(allows("api.example.test", "api.example.test"));
        assert!(allows("*.example.test", "api.example.test"));
        assert!(!allows("*.example.test", "a.api.example.test"));
        assert!(allows("**.example.test", "a.api.example.test"));
        assert!(!allows("not a pattern", "api.example.test"));
    }

    #[test]
    fn long_address_lists_are_cut() {
        let addrs: Vec<String> = (1..=6).map(|i| format!("192.0.2.{i}")).collect();
        assert_eq!(addresses_text(&addrs[..2]), "192.0.2.1, 192.0.2.2");
        assert_eq!(
            addresses_text(&addrs),
            "192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4, +2 more"
        );
    }
}
