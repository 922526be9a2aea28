//! `bulkhead blast-radius` as text.

use std::fmt::Write as _;

use super::blast::{BlastRadius, Lateral};
use crate::visible::visible as v;

/// The report as text. Names of services, units and processes are passed
/// through [`v`] (visible.rs): they reach a terminal.
pub fn render(b: &BlastRadius) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blast radius of {} ({}, {})",
        v(&b.service),
        v(&b.mode),
        v(&b.file)
    );
    if let Some(since) = &b.since {
        let _ = writeln!(out, "observed since {}", v(since));
    }
    let _ = writeln!(out, "\n1. its policy allows:");
    if b.allows.is_empty() {
        let _ = writeln!(out, "   nothing (no [[egress]] rule)");
    }
    for a in &b.allows {
        let svc = if a.services.is_empty() {
            String::new()
        } else {
            format!(
                "  (services listening there: {})",
                v(&a.services.join(", "))
            )
        };
        let _ = writeln!(
            out,
            "   {:<22} {} ports {} {}{svc}",
            v(&a.rule),
            v(&a.to),
            a.ports,
            a.protocol
        );
    }
    let _ = writeln!(out, "\n2. it actually reached:");
    if b.reached.is_empty() {
        let _ = writeln!(out, "   nothing observed");
    }
    for r in &b.reached {
        let denied = if r.denied > 0 {
            format!(", {} denied", r.denied)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "   {:<28} {} connections{denied}, last {} (via {})",
            destination(&r.to, &r.dest, &r.addresses),
            r.connections,
            r.last_seen,
            v(r.rule.as_deref().unwrap_or("no rule")),
        );
    }
    let _ = writeln!(out, "\n3. allowed but never used (candidates to remove):");
    if b.unused.is_empty() {
        let _ = writeln!(out, "   none");
    }
    for a in &b.unused {
        let _ = writeln!(
            out,
            "   {:<22} {} ports {} {}",
            v(&a.rule),
            v(&a.to),
            a.ports,
            a.protocol
        );
    }
    lateral_section(&mut out, &b.lateral, "service(s)");
    out
}

/// A destination reached, as a report lists it: `api (127.0.0.1:8080/tcp)`
/// for a service, `api.example.test:443/tcp (203.0.113.5, 203.0.113.6)`
/// for a name with the addresses it gave, else the address.
pub fn destination(to: &str, dest: &str, addresses: &[String]) -> String {
    if !addresses.is_empty() {
        format!(
            "{} ({})",
            v(to),
            v(&super::named::addresses_text(addresses))
        )
    } else if to == dest {
        v(dest).into_owned()
    } else {
        format!("{} ({})", v(to), v(dest))
    }
}

/// Part 4 of a blast radius in text: the reachable set's size, then every
/// path; `what` names what the set counts (`service(s)`, `service
/// instance(s)`).
pub fn lateral_section(out: &mut String, lateral: &Lateral, what: &str) {
    let _ = writeln!(
        out,
        "\n4. lateral reach: {} {what}, {} destination(s)",
        lateral.size,
        lateral.destinations.len()
    );
    for h in lateral.services.iter().chain(&lateral.destinations) {
        let _ = writeln!(out, "   {} hop(s): {}", h.hops, v(&h.path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::blast::{compute, tests::three_tier, Hop, Lateral, Reached};

    #[test]
    fn lateral_reach_shows_each_hop_of_the_path() {
        let (g, set) = three_tier();
        let b = compute(&g, &set, "a", None).expect("a is in the policy");
        let text = render(&b);
        assert!(
            text.contains("2 hop(s): a → b:8080 → 192.0.2.2:5432"),
            "{text}"
        );
    }

    #[test]
    fn names_from_outside_are_written_visibly() {
        let b = BlastRadius {
            service: "web".to_string(),
            mode: "enforce".to_string(),
            file: "web.toml".to_string(),
            since: None,
            allows: Vec::new(),
            reached: vec![Reached {
                to: "evil\n4. lateral reach: 0".to_string(),
                dest: "127.0.0.1:80/tcp".to_string(),
                addresses: Vec::new(),
                connections: 1,
                denied: 0,
                first_seen: "t".to_string(),
                last_seen: "t".to_string(),
                rule: None,
            }],
            unused: Vec::new(),
            lateral: Lateral {
                services: vec![Hop {
                    target: "x".to_string(),
                    kind: "service".to_string(),
                    hops: 1,
                    path: "web \u{1b}[2K→ x".to_string(),
                }],
                destinations: Vec::new(),
                size: 1,
            },
        };
        let text = render(&b);
        assert!(
            text.contains("evil\\u{a}4. lateral reach: 0 (127.0.0.1:80/tcp)"),
            "{text}"
        );
        assert!(text.contains("web \\u{1b}[2K→ x"), "{text}");
        assert_eq!(text.matches("lateral reach").count(), 2, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }
}
