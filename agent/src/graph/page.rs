//! The read-only service map served on the metrics listener: `/graph` (one
//! self-contained HTML page, no external assets) and `/graph.json`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::OnceLock,
};

use serde_json::{json, Value};

use super::{blast, view, Shared};

const PAGE: &str = include_str!("page.html");
const PLACEHOLDER: &str = "/*GRAPH_DATA*/null";
/// Cytoscape.js (vendor/README.md), inlined into the page's first script.
const LIBRARY: &str = include_str!("vendor/cytoscape.min.js");
const LIBRARY_PLACEHOLDER: &str = "/*CYTOSCAPE*/";

/// The page with the library in it, made once.
fn template() -> &'static str {
    static TEMPLATE: OnceLock<String> = OnceLock::new();
    TEMPLATE.get_or_init(|| PAGE.replacen(LIBRARY_PLACEHOLDER, LIBRARY, 1))
}

/// The view plus, for each service, its blast radius for the page: the
/// node ids to highlight (reached and reachable), the lateral paths and the
/// unused allowances.
pub fn data(shared: &Shared) -> Value {
    let policy = shared.policy();
    let graph = shared.graph().clone();
    let v = view::build(&graph, &policy);
    let node_ids: BTreeSet<&str> = v.nodes.iter().map(|n| n.id.as_str()).collect();
    let mut radius: BTreeMap<String, Value> = BTreeMap::new();
    for s in &policy.services {
        let Ok(b) = blast::compute(&graph, &policy, &s.name, None) else {
            continue;
        };
        let reached = b.reached.iter().map(|r| (r.to.as_str(), r.dest.as_str()));
        let unused = b
            .unused
            .iter()
            .map(|a| format!("{} ports {} {} ({})", a.to, a.ports, a.protocol, a.rule));
        radius.insert(
            format!("service:{}", s.name),
            highlight(reached, &b.lateral, unused, &node_ids),
        );
    }
    json!({ "graph": v, "blast": radius, "generated": super::now() })
}

/// What the page highlights when a service is selected: the node ids it
/// reached (`(to, dest)`: `to` is the service, or the destination itself)
/// or can reach that the view draws, its lateral paths, and its unused
/// allowances (as text).
pub fn highlight<'a>(
    reached: impl Iterator<Item = (&'a str, &'a str)>,
    lateral: &blast::Lateral,
    unused: impl Iterator<Item = String>,
    node_ids: &BTreeSet<&str>,
) -> Value {
    let mut ids: BTreeSet<String> = BTreeSet::new();
    // A destination is drawn as an address or, reached by a DNS name, as
    // that name's node: both ids are tried, the view keeps the one it has
    // (a name never reads as an address: its last label is not numeric).
    for (to, dest) in reached {
        if to == dest {
            ids.insert(format!("endpoint:{dest}"));
            ids.insert(format!("name:{dest}"));
        } else {
            ids.insert(format!("service:{to}"));
        }
    }
    for h in &lateral.services {
        ids.insert(format!("service:{}", h.target));
    }
    for h in &lateral.destinations {
        ids.insert(format!("endpoint:{}", h.target));
        ids.insert(format!("name:{}", h.target));
    }
    let nodes: Vec<String> = ids
        .into_iter()
        .filter(|i| node_ids.contains(i.as_str()))
        .collect();
    let paths: Vec<&str> = lateral
        .services
        .iter()
        .chain(&lateral.destinations)
        .map(|h| h.path.as_str())
        .collect();
    let unused: Vec<String> = unused.collect();
    json!({ "nodes": nodes, "paths": paths, "unused": unused })
}

/// The page with the data inlined, so that it renders without a second
/// request (and without script fetches a headless browser may not wait for).
pub fn html(shared: &Shared) -> String {
    html_of(&data(shared).to_string())
}

/// The page around `data`, the text of [`data`]'s value (the metrics
/// listener renders that once for both `/graph` and `/graph.json`).
pub fn html_of(data: &str) -> String {
    // `<` only occurs inside JSON strings, where `\u003c` means the same:
    // nothing in the data (a process may name itself `</script>`) can end
    // the script element or open a comment.
    template().replacen(PLACEHOLDER, &data.replace('<', "\\u003c"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Verdict,
        graph::tests::{accepted, connect},
    };

    #[test]
    fn the_page_carries_the_graph_and_no_external_asset() {
        let shared = Shared::default();
        {
            let mut g = shared.graph();
            g.observe(&connect("a", ("127.0.0.1", 8080), Verdict::Allow));
            g.observe(&accepted("b", ("127.0.0.1", 8080)));
            g.observe(&connect("a", ("192.0.2.9", 22), Verdict::Deny));
        }
        // An unmanaged process may call itself anything.
        let mut hostile = connect("a", ("192.0.2.10", 80), Verdict::Allow);
        hostile.service = None;
        hostile.comm = "</script><b>x".to_string();
        shared.graph().observe(&hostile);
        let page = html(&shared);
        assert!(
            !page.contains("</script><b>"),
            "the data can end the script"
        );
        assert!(page.contains("\\u003c/script>\\u003cb>x"));
        assert!(!page.contains(PLACEHOLDER));
        assert!(page.contains("\"service:b\""), "the data is inlined");
        // The page's own markup and script, around the vendored library
        // (whose one `src=` is an image loader for style URLs the page
        // never sets).
        let own = page.replacen(LIBRARY, "", 1);
        assert_eq!(
            own.len(),
            page.len() - LIBRARY.len(),
            "the library is inlined"
        );
        for external in [
            "src=",
            "href=",
            "url(",
            "<link",
            "import",
            "fetch(",
            "XMLHttpRequest",
        ] {
            assert!(
                !own.contains(external),
                "external asset {external:?} in the page"
            );
        }
        for external in ["fetch(", "XMLHttpRequest", "import(", "<script"] {
            assert!(!LIBRARY.contains(external), "{external:?} in the library");
        }
    }

    #[test]
    fn a_destination_reached_by_name_highlights_its_name_node() {
        let node_ids: BTreeSet<&str> = ["service:a", "name:api.example.test:443/tcp"]
            .into_iter()
            .collect();
        let lateral = blast::Lateral {
            services: Vec::new(),
            destinations: vec![blast::Hop {
                target: "api.example.test:443/tcp".to_string(),
                kind: "destination".to_string(),
                hops: 1,
                path: "a → api.example.test:443".to_string(),
            }],
            size: 0,
        };
        let reached = [("api.example.test:443/tcp", "api.example.test:443/tcp")];
        let h = highlight(reached.into_iter(), &lateral, std::iter::empty(), &node_ids);
        assert_eq!(h["nodes"], json!(["name:api.example.test:443/tcp"]));
    }

    #[test]
    fn the_vendored_library_is_the_one_vendor_readme_names() {
        use sha2::{Digest as _, Sha256};
        let digest = Sha256::digest(LIBRARY.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "71fa9ebec21a7ca2c40cff6aacc30d1f6464e363662ad4b2c197e1adc770cd94"
        );
        assert!(include_str!("vendor/README.md").contains(&hex));
    }
}
