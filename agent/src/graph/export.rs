//! `bulkhead graph --format dot|mermaid`: the exported view for other tools.

use std::fmt::Write as _;

use super::view::View;
use crate::visible::visible;

fn edge_label(e: &super::view::Edge) -> String {
    let mut label = format!("{} {}", e.protocol, e.port);
    if e.stats.connections > 0 {
        let _ = write!(label, " ×{}", e.stats.connections);
    }
    if e.stats.denied > 0 {
        let _ = write!(label, " denied ×{}", e.stats.denied);
    }
    // A name's node gathers its addresses: say which one this edge went to.
    if e.stats.dst_name.is_some() {
        if let Some((addr, _)) = e.dest.rsplit_once(':') {
            let _ = write!(label, " at {addr}");
        }
    }
    label
}

/// Graphviz: services as boxes, endpoints as ellipses, denied edges red.
pub fn dot(v: &View) -> String {
    let q = |s: &str| {
        let s = visible(s);
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    };
    let mut out = String::from("digraph bulkhead {\n  rankdir=LR;\n");
    for n in &v.nodes {
        let shape = match n.kind.as_str() {
            "service" => "box",
            "process" => "component",
            _ => "ellipse",
        };
        let _ = writeln!(
            out,
            "  {} [label={}, shape={shape}];",
            q(&n.id),
            q(&n.label)
        );
    }
    for e in &v.edges {
        let color = if e.stats.denied > 0 && e.stats.connections == 0 {
            ", color=red, fontcolor=red"
        } else if e.stats.denied > 0 {
            ", color=orange"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}{color}];",
            q(&e.from),
            q(&e.to),
            q(&edge_label(e))
        );
    }
    out.push_str("}\n");
    out
}

/// Mermaid `flowchart LR`; node ids are numbered (Mermaid ids cannot hold
/// addresses), labels quoted; denied edges styled red.
pub fn mermaid(v: &View) -> String {
    // A newline would end the statement; `"` the label.
    let clean = |s: &str| visible(s).replace('"', "'");
    let mut out = String::from("flowchart LR\n");
    let index = |id: &str| {
        v.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or(usize::MAX)
    };
    for (i, n) in v.nodes.iter().enumerate() {
        let (open, close) = match n.kind.as_str() {
            "service" => ("[", "]"),
            "process" => ("[[", "]]"),
            _ => ("((", "))"),
        };
        let _ = writeln!(out, "  n{i}{open}\"{}\"{close}", clean(&n.label));
    }
    for (i, e) in v.edges.iter().enumerate() {
        let _ = writeln!(
            out,
            "  n{} -->|\"{}\"| n{}",
            index(&e.from),
            clean(&edge_label(e)),
            index(&e.to)
        );
        if e.stats.denied > 0 && e.stats.connections == 0 {
            let _ = writeln!(out, "  linkStyle {i} stroke:red,color:red");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Verdict,
        graph::{
            tests::{accepted, connect},
            view, Graph,
        },
        policy::PolicySet,
    };

    fn sample() -> View {
        let mut g = Graph::default();
        g.observe(&connect("a", ("127.0.0.1", 8080), Verdict::Allow));
        g.observe(&accepted("b", ("127.0.0.1", 8080)));
        g.observe(&connect("a", ("192.0.2.9", 22), Verdict::Deny));
        view::build(&g, &PolicySet::default())
    }

    #[test]
    fn dot_has_services_endpoints_and_red_denials() {
        let text = dot(&sample());
        assert!(
            text.contains("\"service:a\" -> \"service:b\" [label=\"tcp 8080 ×1\"];"),
            "{text}"
        );
        assert!(text.contains("\"service:a\" -> \"endpoint:192.0.2.9:22/tcp\" [label=\"tcp 22 denied ×1\", color=red"), "{text}");
        assert!(text.starts_with("digraph bulkhead {") && text.ends_with("}\n"));
    }

    /// A view with a process node named by the process itself.
    fn hostile() -> View {
        let mut g = Graph::default();
        let mut ev = connect("a", ("192.0.2.10", 80), Verdict::Allow);
        ev.service = None;
        ev.comm = "x\"]\n  n0 --> n1\x1b[31m".to_string();
        g.observe(&ev);
        view::build(&g, &PolicySet::default())
    }

    #[test]
    fn labels_cannot_add_lines_or_controls() {
        for text in [mermaid(&hostile()), dot(&hostile())] {
            assert!(!text.contains('\x1b'), "{text}");
            // DOT also doubles the backslash (its own escape).
            assert!(
                text.contains("u{a}  n0 --> n1\\u{1b}[31m")
                    || text.contains("u{a}  n0 --> n1\\\\u{1b}[31m"),
                "{text}"
            );
            assert!(
                !text
                    .lines()
                    .any(|l| l.trim_start().starts_with("n0 --> n1")),
                "a label started a line of its own:\n{text}"
            );
        }
    }

    #[test]
    fn mermaid_numbers_nodes_and_styles_denials() {
        let text = mermaid(&sample());
        assert!(text.starts_with("flowchart LR\n"), "{text}");
        assert!(
            text.contains("[\"a\"]") && text.contains("((\"192.0.2.9:22/tcp\"))"),
            "{text}"
        );
        assert!(text.contains("linkStyle 1 stroke:red"), "{text}");
    }
}
