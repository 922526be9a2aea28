//! The shipped monitoring (contrib/prometheus, contrib/grafana) against a
//! real Prometheus (`tests/src/prometheus_server.rs`) scraping a real agent
//! with traffic: every dashboard query parses and returns data, the alerting
//! rules load, stay silent on a healthy agent and fire on a quarantine, and
//! the rules pass their own promtool tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    addr, allowing, control::quarantine, eventually, http::metrics_addr, probe, prometheus::Scrape,
    require_bpf, CgroupGuard, Daemon, Listener, PolicyDir, PrometheusServer, Proto,
};
use serde_json::Value;

/// How long Prometheus may take to scrape the agent and have two samples
/// of every series (it scrapes every second).
const DATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Panels whose queries may return nothing on a healthy agent, and why: the
/// metric has no series until the event it counts happens. The test checks
/// that the agent indeed serves no such series, so the list cannot hide a
/// broken query.
const MAY_BE_EMPTY: &[(&str, &str, &str)] = &[(
    "Anomalies by severity",
    "bulkhead_anomalies_total",
    "a series appears with a service's first anomaly (the detector needs a learned baseline)",
)];

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

/// Every panel's title and its queries, with the dashboard's `$instance`
/// variable set to "All" (its `allValue`, `.*`).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = contrib("grafana/bulkhead.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let panels = dashboard["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no panels", path.display()));
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"))
                .replace("$instance", ".*");
            assert!(
                !expr.contains('$'),
                "panel {title:?} uses a variable the test does not set: {expr}"
            );
            queries.push((title.clone(), expr));
        }
    }
    queries
}

/// An enforcing service `web` allowed to `allowed` only, run by a daemon,
/// with `n` allowed and `n` denied connections made, so every connection
/// series has moved.
struct Agent {
    _web: CgroupGuard,
    _allowed: Listener,
    _denied: Listener,
    _policies: PolicyDir,
    daemon: Daemon,
}

fn agent_with_traffic(n: usize) -> Agent {
    let web = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies =
        PolicyDir::with(&[("web.toml", &allowing(&web, "127.0.0.1", &[allowed.port()]))]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(web.path());
    for _ in 0..n {
        client
            .tcp_connect(allowed.addr())
            .assert_ok("web's allowed port");
        client
            .tcp_connect(denied.addr())
            .assert_eperm("web's unlisted port");
    }
    Agent {
        _web: web,
        _allowed: allowed,
        _denied: denied,
        _policies: policies,
        daemon,
    }
}

#[test]
fn every_dashboard_query_parses_and_returns_data_from_a_real_prometheus() {
    if !require_bpf() {
        return;
    }
    let queries = dashboard_queries();
    let agent = agent_with_traffic(5);
    let metrics = metrics_addr(&agent.daemon);
    let prometheus = PrometheusServer::start(metrics, &[]);

    let may_be_empty = |title: &str| MAY_BE_EMPTY.iter().any(|(t, _, _)| *t == title);
    let answers = eventually(DATA_TIMEOUT, Duration::from_millis(500), || {
        let mut answers = BTreeMap::new();
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            // A query Prometheus refuses fails at once: waiting cannot fix it.
            let series = prometheus.query(expr).unwrap_or_else(|e| {
                panic!("panel {title:?}: Prometheus refused {expr}: {e}")
            });
            if series.is_empty() && !may_be_empty(title) {
                empty.push(format!("{title:?}: {expr}"));
            }
            answers.insert((title.clone(), expr.clone()), series);
        }
        if empty.is_empty() {
            Ok(answers)
        } else {
            Err(empty)
        }
    })
    .unwrap_or_else(|empty| {
        panic!(
            "within {DATA_TIMEOUT:?} these panels returned no data: {empty:#?}\nPrometheus log:\n{}",
            prometheus.log()
        )
    });
    assert_eq!(answers.len(), queries.len(), "one answer per query");

    // The exempt panels are empty only because their metric has no series.
    let scrape = Scrape::get(metrics);
    for (title, metric, why) in MAY_BE_EMPTY {
        assert!(
            queries
                .iter()
                .any(|(t, e)| t == title && e.contains(metric)),
            "test bug: no panel {title:?} querying {metric}"
        );
        assert!(
            !scrape.series().keys().any(|(name, _)| name == metric),
            "{metric} has series, so panel {title:?} must return data ({why})"
        );
    }

    // The traffic shows: the denied panel names the service.
    let denied = answers
        .iter()
        .find_map(|((title, _), series)| (title == "Denied by service").then_some(series))
        .unwrap_or_else(|| panic!("no \"Denied by service\" panel"));
    assert!(
        denied.iter().any(|s| s["metric"]["service"] == "web"),
        "the denied panel lacks service web: {denied:?}"
    );
}

#[test]
fn shipped_rules_load_stay_silent_on_a_healthy_agent_and_fire_on_a_quarantine() {
    if !require_bpf() {
        return;
    }
    let rules = contrib("prometheus/bulkhead.rules.yml");
    let agent = agent_with_traffic(2);
    let prometheus = PrometheusServer::start(metrics_addr(&agent.daemon), &[&rules]);

    // Every rule loaded, evaluated without error, and none fires: wait for
    // up == 1 and a few evaluations after it (every second).
    eventually(
        DATA_TIMEOUT,
        Duration::from_millis(250),
        || match prometheus.query(r#"up{job="bulkhead"} == 1"#) {
            Ok(series) if !series.is_empty() => Ok(()),
            other => Err(other),
        },
    )
    .unwrap_or_else(|last| {
        panic!(
            "the agent was never scraped: {last:?}\n{}",
            prometheus.log()
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    let states = rule_states(&prometheus);
    let text = std::fs::read_to_string(&rules)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", rules.display()));
    let alerts = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(
        states.len(),
        alerts,
        "every rule of {}: {states:#?}",
        rules.display()
    );
    for (name, (health, state)) in &states {
        assert_eq!(
            (health.as_str(), state.as_str()),
            ("ok", "inactive"),
            "{name} on a healthy agent"
        );
    }

    let out = quarantine(&agent.daemon, "web", &[]);
    assert!(
        out.status.success(),
        "bulkhead quarantine web: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fired = eventually(DATA_TIMEOUT, Duration::from_millis(250), || {
        let states = rule_states(&prometheus);
        let firing: Vec<String> = states
            .iter()
            .filter(|(_, (_, state))| state == "firing")
            .map(|(name, _)| name.clone())
            .collect();
        if firing.is_empty() {
            Err(states)
        } else {
            Ok(firing)
        }
    })
    .unwrap_or_else(|last| panic!("nothing fired after the quarantine: {last:#?}"));
    assert_eq!(fired, ["BulkheadServiceQuarantined"], "what fired");
    let alerts = prometheus
        .query(r#"ALERTS{alertname="BulkheadServiceQuarantined",alertstate="firing"}"#)
        .unwrap_or_else(|e| panic!("ALERTS: {e}"));
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["metric"]["service"], "web", "{alerts:?}");
}

/// Each alerting rule's name -> (health, state), from `/api/v1/rules`.
fn rule_states(prometheus: &PrometheusServer) -> BTreeMap<String, (String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    prometheus
        .rule_groups()
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| (text(&r["name"]), (text(&r["health"]), text(&r["state"]))))
        .collect()
}

/// The rules' own unit tests (contrib/prometheus/bulkhead.rules.test.yml):
/// each alert firing and silent on series shaped like the agent's. Needs
/// only promtool, no BPF.
#[test]
fn shipped_rules_pass_their_promtool_tests() {
    let dir = contrib("prometheus");
    let out = Command::new("promtool")
        .args(["test", "rules", "bulkhead.rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): run `cargo xtask setup` (Debian's prometheus ships it)"
            )
        });
    assert!(
        out.status.success(),
        "promtool test rules in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
