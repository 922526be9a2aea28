//! The service graph against a real kernel (docs/graph.md): known traffic
//! from two test services — `web` calls `api`'s loopback listener, `api`
//! calls a "database" in a network namespace — shows up as nodes, edges and
//! counts; the blast radius of `web` names the two-hop path to the database
//! and its unused allowance; the policies `bulkhead learn` writes, applied in
//! enforce mode, let the same traffic through with no denial and refuse a new
//! destination with EPERM; the graph survives a restart; the page renders
//! in headless Chromium, and a map of 500 nodes from a sweep folds, narrows
//! to a search and renders there too.

use std::{
    ffi::{OsStr, OsString},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use integration_tests::{
    addr,
    browser::{body_attribute, readable, Headless},
    bulkhead, eventually,
    http::{http_get, metrics_addr},
    probe, require_bpf, service_policy, CgroupGuard, Daemon, Egress, Listener, NetnsGuard,
    PolicyDir, Proto,
};
use serde_json::Value;

/// How long the graph may take to show what the kernel reported.
const CATCH_UP: Duration = Duration::from_secs(15);

/// Runs `bulkhead ARGS --socket <daemon's>` and returns stdout; panics on failure.
fn cli(daemon: &Daemon, args: &[&str]) -> String {
    let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
    all.extend(["--socket".into(), daemon.control_socket().into()]);
    let out = bulkhead(&all);
    assert!(
        out.status.success(),
        "bulkhead {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let text = cli(daemon, args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bulkhead {args:?}: not JSON ({e}): {text}"))
}

/// The edge `from` -> `to` of a `bulkhead graph` answer.
fn edge<'a>(graph: &'a Value, from: &str, to: &str) -> Option<&'a Value> {
    graph["edges"]
        .as_array()?
        .iter()
        .find(|e| e["from"] == from && e["to"] == to)
}

fn count(edge: Option<&Value>, field: &str) -> u64 {
    edge.and_then(|e| e[field].as_u64()).unwrap_or(0)
}

/// Polls `bulkhead graph` until `done` accepts it; panics with the last one.
fn wait_graph(daemon: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually(CATCH_UP, Duration::from_millis(200), || {
        let g = json(daemon, &["graph", "--format", "json"]);
        if done(&g) {
            Ok(g)
        } else {
            Err(g)
        }
    })
    .unwrap_or_else(|g| panic!("the graph did not show {what} within {CATCH_UP:?}: {g:#}"))
}

fn denied_total(graph: &Value) -> u64 {
    graph["edges"].as_array().map_or(0, |edges| {
        edges.iter().filter_map(|e| e["denied"].as_u64()).sum()
    })
}

/// `web` and `api` (cgroups), `api`'s loopback listener, and a "database"
/// listener in a namespace. Fields drop in order: listeners and the
/// namespace after the daemon that watches them, cgroups last.
struct World {
    api_listener: Listener,
    db: Listener,
    db_other: Listener,
    netns: NetnsGuard,
    web: CgroupGuard,
    api: CgroupGuard,
}

impl World {
    fn new() -> Self {
        let web = CgroupGuard::new();
        let api = CgroupGuard::new();
        let netns = NetnsGuard::new();
        let db_ip = netns.v4(2);
        let db = probe!()
            .in_netns(netns.name())
            .listen(Proto::Tcp, addr(&format!("{db_ip}:0")));
        let db_other = probe!()
            .in_netns(netns.name())
            .listen(Proto::Tcp, addr(&format!("{db_ip}:0")));
        let api_listener = probe!()
            .in_cgroup(api.path())
            .listen(Proto::Tcp, addr("127.0.0.1:0"));
        Self {
            api_listener,
            db,
            db_other,
            netns,
            web,
            api,
        }
    }

    fn policies(&self) -> PolicyDir {
        let web = service_policy(
            &self.web,
            "enforce",
            &[
                Egress::to(["127.0.0.1"])
                    .ports([self.api_listener.port()])
                    .protocol("tcp"),
                // Allowed, never used: what the blast radius must point out.
                Egress::to(["203.0.113.0/24"]).ports([443]).protocol("tcp"),
            ],
        );
        let api = service_policy(
            &self.api,
            "enforce",
            &[Egress::to([self.db.addr().ip()])
                .ports([self.db.port()])
                .protocol("tcp")],
        );
        PolicyDir::with(&[("web.toml", &web), ("api.toml", &api)])
    }

    /// web -> api three times, api -> database twice.
    fn traffic(&self) {
        let web = probe!().in_cgroup(self.web.path());
        let api = probe!().in_cgroup(self.api.path());
        for _ in 0..3 {
            web.tcp_connect(self.api_listener.addr())
                .assert_ok("web may call api");
        }
        for _ in 0..2 {
            api.tcp_connect(self.db.addr())
                .assert_ok("api may call the database");
        }
    }

    fn db_label(&self) -> String {
        format!("{}:{}", self.db.addr().ip(), self.db.port())
    }
}

#[test]
fn graph_blast_radius_and_learned_policies_from_real_traffic() {
    if !require_bpf() {
        return;
    }
    let world = World::new();
    let policies = world.policies();
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut daemon = start(&policies, state.path());

    world.traffic();
    // And one denied call: web straight to the database.
    probe!()
        .in_cgroup(world.web.path())
        .tcp_connect(world.db.addr())
        .assert_eperm("web may not reach the database directly");

    let db_node = format!("endpoint:{}/tcp", world.db_label());
    assert_graph(&daemon, &db_node);
    assert_blast_radius(&daemon, &world);
    assert_http(&daemon, &db_node);
    assert_inbound(&daemon, &world);

    learn_and_enforce(&daemon, &world, &policies, &db_node);

    // The graph survives a restart.
    let _ = daemon.stop();
    daemon.detach();
    assert!(
        state.path().join("graph.json").is_file(),
        "no graph.json in the state directory"
    );
    drop(daemon);
    // With the daemon stopped, the saved graph still answers.
    let out = bulkhead(&[
        OsStr::new("blast-radius"),
        OsStr::new("web"),
        OsStr::new("--json"),
        OsStr::new("--state-dir"),
        state.path().as_os_str(),
        OsStr::new("--policy-dir"),
        policies.path().as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "offline blast-radius: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let to_api = offline["reached"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["to"] == "api"))
        .unwrap_or_else(|| panic!("offline: web reached api: {offline:#}"));
    assert_eq!(to_api["connections"], 6, "{offline:#}");
    let daemon = start(&policies, state.path());
    let g = json(&daemon, &["graph"]);
    assert_eq!(
        count(edge(&g, "service:web", "service:api"), "connections"),
        6,
        "the restarted daemon forgot the graph: {g:#}"
    );
}

/// Nodes, edge counts, verdicts and times of the known traffic; the exports.
fn assert_graph(daemon: &Daemon, db_node: &str) {
    let graph = wait_graph(
        daemon,
        "3 web -> api and 2 api -> db connections, closed",
        |g| {
            let w = edge(g, "service:web", "service:api");
            let a = edge(g, "service:api", db_node);
            count(w, "connections") == 3
                && count(w, "established") == 3
                && count(w, "bytes_received") == 3
                && count(a, "connections") == 2
                && count(edge(g, "service:web", db_node), "denied") == 1
        },
    );
    let ids: Vec<&str> = graph["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(|n| n["id"].as_str()).collect())
        .unwrap_or_default();
    for id in ["service:web", "service:api", db_node] {
        assert!(ids.contains(&id), "node {id} missing from {ids:?}");
    }
    let w = edge(&graph, "service:web", "service:api");
    assert_eq!(
        (count(w, "allowed"), count(w, "denied")),
        (3, 0),
        "web -> api: {w:?}"
    );
    let denied = edge(&graph, "service:web", db_node);
    assert_eq!(count(denied, "connections"), 0, "{denied:?}");
    for field in ["first_seen", "last_seen"] {
        let t = w.and_then(|e| e[field].as_str()).unwrap_or_default();
        assert!(
            t.ends_with('Z') && t.contains('T'),
            "{field} is not RFC 3339: {t:?}"
        );
    }

    // Exports for other tools.
    let dot = cli(daemon, &["graph", "--format", "dot"]);
    assert!(dot.contains("\"service:web\" -> \"service:api\""), "{dot}");
    assert!(dot.contains("color=red"), "the denied edge is red: {dot}");
    let mermaid = cli(daemon, &["graph", "--format", "mermaid"]);
    assert!(
        mermaid.starts_with("flowchart LR") && mermaid.contains("[\"api\"]"),
        "{mermaid}"
    );
}

/// A peer in the namespace connects to a listener `api` opened after the
/// daemon started (so its accepted connections have lifecycle events): an
/// inbound edge from the peer to `api`.
fn assert_inbound(daemon: &Daemon, world: &World) {
    let root_side = world.netns.v4(1);
    let front = probe!()
        .in_cgroup(world.api.path())
        .listen(Proto::Tcp, addr(&format!("{root_side}:0")));
    let peer = world.netns.v4(2);
    probe!()
        .in_netns(world.netns.name())
        .source(peer)
        .tcp_connect(front.addr())
        .assert_ok("a peer may connect to api (no ingress rules)");
    let from = format!("peer:{peer}");
    let g = wait_graph(daemon, "the inbound edge from the peer", |g| {
        count(edge(g, &from, "service:api"), "established") == 1
    });
    let e = edge(&g, &from, "service:api");
    assert_eq!(count(e, "connections"), 1, "{e:?}");
    let dest = format!("{}/tcp", front.addr());
    assert_eq!(
        e.and_then(|e| e["dest"].as_str()),
        Some(dest.as_str()),
        "{e:?}"
    );
}

/// `bulkhead learn --enforce` into the policy directory; once reloaded, the
/// same traffic gets no denial and anything new gets EPERM.
fn learn_and_enforce(daemon: &Daemon, world: &World, policies: &PolicyDir, db_node: &str) {
    // Learn both services' policies, in enforce mode, straight into the
    // policy directory (over the audit ones: --force): the daemon reloads
    // them.
    for svc in ["web", "api"] {
        let file = policies.path().join(format!("{svc}.toml"));
        let said = cli(
            daemon,
            &[
                "learn",
                svc,
                "--enforce",
                "--since",
                "1h",
                "--output",
                &file.to_string_lossy(),
                "--force",
            ],
        );
        assert!(said.contains("passes `bulkhead check`"), "{said}");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("mode = \"enforce\""), "{text}");
        assert!(text.contains("# learned from"), "{text}");
        eprintln!("learned {svc}.toml:\n{text}");
    }
    let web_text = std::fs::read_to_string(policies.path().join("web.toml")).unwrap_or_default();
    assert!(
        web_text.contains(&format!(
            "to = [\"127.0.0.1\"]\nports = [{}]\nprotocol = \"tcp\"",
            world.api_listener.port()
        )),
        "{web_text}"
    );
    assert!(
        !web_text.contains("203.0.113"),
        "the unused allowance is not learned: {web_text}"
    );
    let check = bulkhead(&[
        OsStr::new("check"),
        OsStr::new("--policy-dir"),
        policies.path().as_os_str(),
    ]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Wait until the learned policies are in force.
    eventually(CATCH_UP, Duration::from_millis(200), || {
        let b = json(daemon, &["blast-radius", "web", "--json"]);
        if b["allows"].as_array().map(Vec::len) == Some(1) {
            Ok(())
        } else {
            Err(b)
        }
    })
    .unwrap_or_else(|b| panic!("the learned policy was not loaded: {b:#}\n{}", daemon.log()));

    // The same traffic again: no denial.
    let before = json(daemon, &["graph"]);
    world.traffic();
    let after = wait_graph(daemon, "the replayed traffic", |g| {
        count(edge(g, "service:web", "service:api"), "connections") == 6
            && count(edge(g, "service:api", db_node), "connections") == 4
    });
    assert_eq!(
        denied_total(&after),
        denied_total(&before),
        "replaying learned traffic was denied: {after:#}"
    );
    // Anything new: EPERM.
    let other = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    probe!()
        .in_cgroup(world.web.path())
        .tcp_connect(other.addr())
        .assert_eperm("web's learned policy allows only api");
    probe!()
        .in_cgroup(world.api.path())
        .tcp_connect(world.db_other.addr())
        .assert_eperm("api's learned policy allows only the database port it used");
}

fn start(policies: &PolicyDir, state: &Path) -> Daemon {
    let mut daemon = Daemon::spawn_run(&[
        OsStr::new("--policy-dir"),
        policies.path().as_os_str(),
        OsStr::new("--state-dir"),
        state.as_os_str(),
    ]);
    daemon.wait_ready();
    daemon
}

fn assert_blast_radius(daemon: &Daemon, world: &World) {
    let b = json(daemon, &["blast-radius", "web", "--json"]);
    let api_port = world.api_listener.port();
    let unused: Vec<&str> = b["unused"]
        .as_array()
        .map(|u| u.iter().filter_map(|a| a["to"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(unused, ["203.0.113.0/24"], "unused allowances: {b:#}");
    let reached = b["reached"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["to"] == "api"))
        .unwrap_or_else(|| panic!("web reached api: {b:#}"));
    assert_eq!(reached["connections"], 3, "{b:#}");
    assert!(
        reached["last_seen"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{b:#}"
    );
    assert_eq!(b["lateral"]["size"], 1, "{b:#}");
    assert_eq!(
        b["lateral"]["services"][0]["path"],
        format!("web → api:{api_port}"),
        "{b:#}"
    );
    let two_hops = format!("web → api:{api_port} → {}", world.db_label());
    let db = b["lateral"]["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|h| h["path"] == two_hops.as_str()))
        .unwrap_or_else(|| panic!("no two-hop path {two_hops:?} in {b:#}"));
    assert_eq!(db["hops"], 2, "{b:#}");
    let text = cli(daemon, &["blast-radius", "web"]);
    for want in [
        two_hops.as_str(),
        "never used",
        "203.0.113.0/24",
        "lateral reach: 1 service(s)",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

fn assert_http(daemon: &Daemon, db_node: &str) {
    let addr = metrics_addr(daemon);
    let (status, head, body) = http_get(addr, "/graph");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        body.contains(db_node) && body.contains("service:web"),
        "{body}"
    );
    let (status, _, body) = http_get(addr, "/graph.json");
    assert_eq!(status, 200, "{body}");
    let data: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let radius = data["blast"]["service:web"].to_string();
    assert!(
        radius.contains("service:api") && radius.contains(db_node),
        "{data:#}"
    );
    let (_, _, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.contains("bulkhead_graph_evictions_total 0"),
        "{metrics}"
    );
}

#[test]
fn the_map_renders_in_headless_chromium() {
    if !require_bpf() {
        return;
    }
    let Some(browser) = Headless::new("the_map_renders_in_headless_chromium") else {
        return;
    };
    let world = World::new();
    let policies = world.policies();
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let daemon = start(&policies, state.path());
    world.traffic();
    probe!()
        .in_cgroup(world.web.path())
        .tcp_connect(world.db.addr())
        .assert_eperm("web may not reach the database directly");
    let db_node = format!("endpoint:{}/tcp", world.db_label());
    wait_graph(&daemon, "web -> api, api -> db, web -> db denied", |g| {
        count(edge(g, "service:web", "service:api"), "connections") == 3
            && count(edge(g, "service:api", &db_node), "connections") == 2
            && count(edge(g, "service:web", &db_node), "denied") == 1
    });
    let url = format!("http://{}/graph?service=web", metrics_addr(&daemon));
    let dom = browser.dom(&url);
    let db = format!("{}/tcp", world.db_label());
    for want in [
        // The list view of what is drawn, with the blast radius marked.
        "<li class=\"node service selected\" data-id=\"service:web\">web (enforce)</li>"
            .to_string(),
        "<li class=\"node service hit\" data-id=\"service:api\">api (enforce)</li>".to_string(),
        format!("<li class=\"node endpoint hit\" data-id=\"endpoint:{db}\">{db}</li>"),
        format!(
            "<li class=\"edge denied\">web (enforce) → {db}: tcp {} denied ×1</li>",
            world.db.port()
        ),
        "Blast radius of web".to_string(),
        format!(
            "web → api:{} → {}",
            world.api_listener.port(),
            world.db_label()
        ),
        "203.0.113.0/24 ports 443 tcp".to_string(),
    ] {
        assert!(
            dom.contains(&want),
            "{want:?} not in the rendered page:\n{}",
            readable(&dom)
        );
    }
    assert_eq!(
        body_attribute(&dom, "data-drawn-nodes").as_deref(),
        Some("3")
    );
    let _ = browser.screenshot(&url, "graph.png");
}

/// A map of 500 endpoints and 2,000 edges from real traffic: four
/// `scanner` services each sweep 400 closed ports of one address and port
/// 80 of 100 addresses of one network (each refused at once by the
/// kernel: nothing listens).
#[test]
fn a_500_node_map_folds_searches_and_renders_in_headless_chromium() {
    if !require_bpf() {
        return;
    }
    let Some(browser) =
        Headless::new("a_500_node_map_folds_searches_and_renders_in_headless_chromium")
    else {
        return;
    };
    let scanners: Vec<CgroupGuard> = (0..4).map(|_| CgroupGuard::new()).collect();
    let files: Vec<(String, String)> = scanners
        .iter()
        .enumerate()
        .map(|(i, cg)| {
            (
                format!("scanner{i}.toml"),
                service_policy(
                    cg,
                    "enforce",
                    &[Egress::to(["127.0.0.0/16"]).protocol("tcp")],
                ),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, p)| (f.as_str(), p.as_str()))
        .collect();
    let policies = PolicyDir::with(&refs);
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let daemon = start(&policies, state.path());
    let ports: Vec<SocketAddr> = (20_000..20_400)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let hosts: Vec<SocketAddr> = (1..=100)
        .map(|h| SocketAddr::from(([127, 0, 1, h], 80)))
        .collect();
    for cg in &scanners {
        let sweep = probe!().in_cgroup(cg.path());
        let _ = sweep.tcp_connect_each(&ports);
        let _ = sweep.tcp_connect_each(&hosts);
    }
    let graph = wait_graph(&daemon, "the 2,000 edges of the sweeps", |g| {
        g["edges"].as_array().is_some_and(|e| e.len() >= 2000)
    });
    assert_eq!(graph["edges"].as_array().map_or(0, Vec::len), 2000);
    let nodes = graph["nodes"].as_array().map_or(0, Vec::len);
    let metrics = metrics_addr(&daemon);

    // Folded by default: one node for the scanned host, one for the network.
    let folded_url = format!("http://{metrics}/graph");
    let dom = browser.dom(&folded_url);
    for want in [
        "<li class=\"node folded\" data-id=\"fold:host:127.0.0.1\">127.0.0.1 (400 ports)</li>",
        "<li class=\"node folded\" data-id=\"fold:net:127.0.1.0/24\">127.0.1.0/24 (100 endpoints)</li>",
        "<li class=\"edge\">scanner0 (enforce) → 127.0.0.1 (400 ports): tcp 400 ports ×400</li>",
    ] {
        assert!(
            dom.contains(want),
            "{want:?} not in the folded page:\n{}",
            readable(&dom)
        );
    }
    let drawn = |dom: &str| -> usize {
        body_attribute(dom, "data-drawn-nodes")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no data-drawn-nodes in\n{}", readable(dom)))
    };
    let folded = drawn(&dom);
    assert_eq!(
        folded, 6,
        "the four scanners and the two folded nodes of {nodes}"
    );
    let folded_ms = body_attribute(&dom, "data-render-ms").unwrap_or_default();

    // A search narrows the view to what matches and its neighbours.
    let dom = browser.dom(&format!("http://{metrics}/graph?q=127.0.1.7"));
    assert_eq!(
        drawn(&dom),
        5,
        "the network holding 127.0.1.7, and the scanners"
    );
    assert!(dom.contains("data-id=\"fold:net:127.0.1.0/24\""));
    assert!(!dom.contains("data-id=\"fold:host:127.0.0.1\""));

    // Unfolded: every node laid out.
    let unfolded_url = format!("http://{metrics}/graph?unfold=1");
    let dom = browser.dom(&unfolded_url);
    assert_eq!(drawn(&dom), nodes, "every node of the graph");
    let unfolded_ms = body_attribute(&dom, "data-render-ms").unwrap_or_default();
    let line = format!("render time in headless Chromium: folded ({folded} nodes) {folded_ms} ms, unfolded ({nodes} nodes, 2,000 edges) {unfolded_ms} ms");
    println!("{line}");
    eprintln!("{line}");
    let _ = browser.screenshot(&folded_url, "graph-500-folded.png");
    let _ = browser.screenshot(&unfolded_url, "graph-500-unfolded.png");
}
