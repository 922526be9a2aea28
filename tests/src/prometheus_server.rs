//! A real Prometheus server (Debian's `prometheus` package, installed by
//! `cargo xtask setup`) for the monitoring tests: started on a free
//! loopback port with a configuration and data directory of its own in a
//! temporary directory, scraping one bulkhead agent every second and
//! evaluating the given rule files, and stopped by its pid on `Drop`.
//! Scrapes are parsed by [`crate::prometheus`]; this is the server.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    http::http_get,
    ports::free_port_block,
    process::{stop_server, wait_http_ready},
};

/// `BULKHEAD_PROMETHEUS`: the server binary to run instead of `prometheus`
/// from `PATH`.
pub const SERVER_ENV: &str = "BULKHEAD_PROMETHEUS";
/// The scrape job's name: the one contrib/prometheus/bulkhead.rules.yml and
/// the Grafana dashboard expect (docs/metrics.md, Scraping).
pub const JOB: &str = "bulkhead";
/// How long the server may take to answer `/-/ready` (about 1 s here).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `prometheus`; stopped (SIGTERM, then SIGKILL) and its files
/// removed on `Drop`, which never panics.
#[derive(Debug)]
pub struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    /// Configuration, rule files, data and its log; removed after it stops.
    dir: TempDir,
}

impl PrometheusServer {
    /// A server scraping the agent whose metrics listen on `target` every
    /// second as job [`JOB`], evaluating `rule_files` (copied into its
    /// directory) every second. Panics with the server's log if it does
    /// not become ready.
    #[must_use]
    pub fn start(target: SocketAddr, rule_files: &[&Path]) -> Self {
        let bin = server_binary();
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-prometheus-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        let mut rules = Vec::new();
        for file in rule_files {
            let name = file
                .file_name()
                .unwrap_or_else(|| panic!("test bug: rule file {} has no name", file.display()));
            let copy = dir.path().join(name);
            fs::copy(file, &copy).unwrap_or_else(|e| {
                panic!("cannot copy {} to {}: {e}", file.display(), copy.display())
            });
            rules.push(copy);
        }
        let config = dir.path().join("prometheus.yml");
        write(&config, &config_yaml(target, &rules));
        let port = free_port_block(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = dir.path().join("prometheus.log");
        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // The guard owns the child from here: a panic below stops it.
        let mut server = Self { child, addr, dir };
        server.wait_ready(&bin);
        server
    }

    /// Polls `/-/ready` until it answers 200; panics with the server's log
    /// if it exits or does not answer in time.
    fn wait_ready(&mut self, bin: &Path) {
        let Err(problem) = wait_http_ready(
            &mut self.child,
            self.addr,
            "/-/ready",
            READY_TIMEOUT,
            |status, _| status == 200,
        ) else {
            return;
        };
        panic!(
            "{} on {}: {problem}; its log:\n{}",
            bin.display(),
            self.addr,
            self.log()
        );
    }

    /// Evaluates `promql` now (`/api/v1/query`): the result's series, or
    /// the server's error (a query that does not parse is one).
    ///
    /// # Errors
    /// The server's `errorType: error` for a query it refused.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, _head, body) = http_get(self.addr, &path);
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{promql}: HTTP {status}, not JSON ({e}): {body}"));
        if answer["status"] != "success" {
            return Err(format!(
                "{}: {}",
                answer["errorType"].as_str().unwrap_or("?"),
                answer["error"].as_str().unwrap_or("?")
            ));
        }
        match &answer["data"]["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// The loaded rule groups (`/api/v1/rules`): `data.groups`.
    #[must_use]
    pub fn rule_groups(&self) -> Vec<Value> {
        let (status, _head, body) = http_get(self.addr, "/api/v1/rules");
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/rules: HTTP {status}, not JSON ({e}): {body}"));
        match &answer["data"]["groups"] {
            Value::Array(groups) => groups.clone(),
            _ => panic!("/api/v1/rules: no data.groups in {body}"),
        }
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        let path = self.dir.path().join("prometheus.log");
        fs::read_to_string(&path).unwrap_or_else(|e| format!("cannot read {}: {e}", path.display()))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        stop_server(&mut self.child, "prometheus", STOP_TIMEOUT);
    }
}

/// The server binary (see [`crate::require::server_binary`]).
fn server_binary() -> PathBuf {
    crate::require::server_binary(SERVER_ENV, "prometheus", "/usr/bin")
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Scrape `target` and evaluate the rules every second: series exist and
/// rates have two samples within seconds of the start.
fn config_yaml(target: SocketAddr, rules: &[PathBuf]) -> String {
    let mut rule_files = String::new();
    for rule in rules {
        let _ = write!(rule_files, "\n  - {:?}", rule.display().to_string());
    }
    if rule_files.is_empty() {
        rule_files.push_str(" []");
    }
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:{rule_files}\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n"
    )
}

/// `text` as a URL query value: unreserved characters kept, every other
/// byte percent-encoded.
#[must_use]
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encode_escapes_everything_but_unreserved() {
        assert_eq!(
            url_encode(r#"sum(rate(a{b=~"c.*"}[5m])) > 0"#),
            "sum%28rate%28a%7Bb%3D~%22c.%2A%22%7D%5B5m%5D%29%29%20%3E%200"
        );
    }
}
