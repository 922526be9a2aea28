//! `bulkhead blast-radius` as text.

use super::blast::BlastRadius;

/// The report as text.
pub fn render(b: &BlastRadius) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blast radius of {} ({}, {})",
        b.service, b.mode, b.file
    );
    if let Some(since) = &b.since {
        let _ = writeln!(out, "observed since {since}");
    }
    let _ = writeln!(out, "\n1. its policy allows:");
    if b.allows.is_empty() {
        let _ = writeln!(out, "   nothing (no [[egress]] rule)");
    }
    for a in &b.allows {
        let svc = if a.services.is_empty() {
            String::new()
        } else {
            format!("  (services listening there: {})", a.services.join(", "))
        };
        let _ = writeln!(
            out,
            "   {:<22} {} ports {} {}{svc}",
            a.rule, a.to, a.ports, a.protocol
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
            if r.to == r.dest {
                r.dest.clone()
            } else {
                format!("{} ({})", r.to, r.dest)
            },
            r.connections,
            r.last_seen,
            r.rule.as_deref().unwrap_or("no rule"),
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
            a.rule, a.to, a.ports, a.protocol
        );
    }
    let _ = writeln!(
        out,
        "\n4. lateral reach: {} service(s), {} destination(s)",
        b.lateral.size,
        b.lateral.destinations.len()
    );
    for h in b.lateral.services.iter().chain(&b.lateral.destinations) {
        let _ = writeln!(out, "   {} hop(s): {}", h.hops, h.path);
    }
    out
}
