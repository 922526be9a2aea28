//! What the exporter runs with: the `[export]` section merged with the
//! `OTEL_EXPORTER_OTLP_*` environment of the OpenTelemetry specification.
//! A key the file sets wins; the signal-specific variable
//! (`OTEL_EXPORTER_OTLP_LOGS_*`) wins over the general one. Checked at
//! start, so that a bad value refuses the start with the variable named.

use std::{path::PathBuf, time::Duration};

use hyper::{
    header::{HeaderName, HeaderValue},
    Uri,
};
use rustls::pki_types::CertificateDer;

use super::config::{Compression, ExportConfig, Protocol, DEFAULT_TIMEOUT_MS};

/// The path of the logs signal, added to a base endpoint.
const LOGS_PATH: &str = "/v1/logs";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub endpoint: Uri,
    pub protocol: Protocol,
    pub compression: Compression,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The CA file's certificates (`ca_file`, or the environment's), read
    /// once here: a bad file refuses the start before READY.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    pub timeout: Duration,
}

/// The settings, `None` when export is off (no endpoint anywhere), or
/// every problem found as "where = value: why" lines. `env` looks up an
/// environment variable (`std::env::var(..).ok()` in the daemon).
///
/// # Errors
/// A value of the file or the environment that is not usable.
pub fn resolve(
    cfg: &ExportConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, Vec<String>> {
    let mut problems = Vec::new();
    // Signal-specific first, then the general variable.
    let var = |suffix: &str| {
        let logs = format!("OTEL_EXPORTER_OTLP_LOGS_{suffix}");
        let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
        env(&logs)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (logs, v))
            .or_else(|| {
                env(&general)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (general, v))
            })
    };
    let endpoint = if cfg.otlp_endpoint.is_empty() {
        match var("ENDPOINT") {
            // The general variable is a base URL (the spec appends the
            // signal's path to whatever path it has); the logs one is used
            // as it is.
            Some((name, value)) => {
                let base = name == "OTEL_EXPORTER_OTLP_ENDPOINT";
                let mode = if base {
                    LogsPath::Always
                } else {
                    LogsPath::Exact
                };
                endpoint(value.trim(), mode).map_err(|why| format!("{name}: {why}"))
            }
            None => return Ok(None),
        }
    } else {
        endpoint(&cfg.otlp_endpoint, LogsPath::IfNone)
            .map_err(|why| format!("export.otlp_endpoint: {why}"))
    };
    let endpoint = endpoint.map_err(|p| problems.push(p)).ok();

    let protocol = setting(
        cfg.protocol,
        var("PROTOCOL"),
        Protocol::HttpJson,
        |v| {
            match v {
            "http/json" => Ok(Protocol::HttpJson),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            _ => Err("must be http/json or http/protobuf (gRPC is not supported: use http/protobuf, port 4318)"),
        }
        },
        &mut problems,
    );
    let compression = setting(
        cfg.compression,
        var("COMPRESSION"),
        Compression::None,
        |v| match v {
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            _ => Err("must be gzip or none"),
        },
        &mut problems,
    );
    let timeout_ms = setting(
        cfg.timeout_ms,
        var("TIMEOUT"),
        DEFAULT_TIMEOUT_MS,
        |v| match v.parse::<u64>() {
            Ok(t) if t >= 1 => Ok(t),
            _ => Err("must be a whole number of milliseconds, at least 1"),
        },
        &mut problems,
    );
    let ca = match &cfg.ca_file {
        Some(path) => Some(("export.ca_file".to_string(), path.clone())),
        None => var("CERTIFICATE").map(|(name, v)| (name, PathBuf::from(v.trim()))),
    };
    let ca = ca.and_then(|(from, path)| {
        super::client::read_ca(&path)
            .map_err(|why| problems.push(format!("{from}: {why}")))
            .ok()
    });

    let mut headers = Vec::new();
    for (name, value) in &cfg.headers {
        match header(name, value) {
            Ok(h) => headers.push(h),
            Err(why) => problems.push(format!("export.headers: {why}")),
        }
    }
    if let Some((var_name, list)) = var("HEADERS") {
        for (n, item) in list.split(',').enumerate() {
            if item.trim().is_empty() {
                continue;
            }
            let Some((name, value)) = item.split_once('=') else {
                // Not shown: it may hold the secret.
                problems.push(format!(
                    "{var_name}: item {} is not name=value (the list is name=value,name=value)",
                    n + 1
                ));
                continue;
            };
            let value = percent_encoding::percent_decode_str(value.trim()).decode_utf8_lossy();
            match header(name.trim(), &value) {
                // The file's header of the same name wins.
                Ok((n, v)) => {
                    if !headers.iter().any(|(have, _)| *have == n) {
                        headers.push((n, v));
                    }
                }
                Err(why) => problems.push(format!("{var_name}: {why}")),
            }
        }
    }
    match (endpoint, protocol, compression, timeout_ms) {
        (Some(endpoint), Some(protocol), Some(compression), Some(timeout_ms))
            if problems.is_empty() =>
        {
            Ok(Some(Settings {
                endpoint,
                protocol,
                compression,
                headers,
                ca,
                timeout: Duration::from_millis(timeout_ms),
            }))
        }
        _ => Err(problems),
    }
}

/// The file's value; else the environment variable's (`env`: its name and
/// value), parsed by `parse`, a problem naming the variable if it does not
/// parse; else `default`.
fn setting<T>(
    file: Option<T>,
    env: Option<(String, String)>,
    default: T,
    parse: impl Fn(&str) -> Result<T, &'static str>,
    problems: &mut Vec<String>,
) -> Option<T> {
    if file.is_some() {
        return file;
    }
    let Some((name, value)) = env else {
        return Some(default);
    };
    let value = value.trim();
    parse(value)
        .map_err(|why| problems.push(format!("{name} = {value:?}: {why}")))
        .ok()
}

/// Where the logs path goes on an endpoint URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsPath {
    /// The URL as it is (`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`).
    Exact,
    /// Added when the URL has no path (`[export] otlp_endpoint`).
    IfNone,
    /// Added to the URL's path (`OTEL_EXPORTER_OTLP_ENDPOINT`, a base).
    Always,
}

/// An `http://` or `https://` URL with a host and no credentials, with
/// `/v1/logs` added to its path as `logs_path` says (a query is kept).
///
/// # Errors
/// Why the URL is not usable.
pub fn endpoint(url: &str, logs_path: LogsPath) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err("must be an http:// or https:// URL with a host".to_string());
    }
    // hyper would not send them, and the URL is logged: a secret belongs
    // in a header.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(
            "must not hold credentials (user:password@): send them as a header (export.headers, OTEL_EXPORTER_OTLP_HEADERS)"
                .to_string(),
        );
    }
    let path = uri.path();
    let add = match logs_path {
        LogsPath::Exact => false,
        LogsPath::IfNone => matches!(path, "" | "/"),
        LogsPath::Always => true,
    };
    if !add {
        return Ok(uri);
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let full = format!("{}{LOGS_PATH}{query}", path.trim_end_matches('/'));
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(full.parse().map_err(|e| format!("{e}"))?);
    Uri::from_parts(parts).map_err(|e| format!("{e}"))
}

/// `uri` as it may be logged: without its query (which may hold a key).
#[must_use]
pub fn shown(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or_default(),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

/// A header name as an error may show it: up to the first space or colon
/// (a mistyped `Authorization: Bearer ...` must not reach the log whole).
fn shown_name(name: &str) -> &str {
    name.split([' ', ':']).next().unwrap_or_default()
}

/// A request header from a name and value.
///
/// # Errors
/// A name or value HTTP does not allow.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{:?}... is not a header name", shown_name(name)))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header {name:?} has a character HTTP does not allow"))?;
    Ok((n, v))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn cfg(endpoint: &str) -> ExportConfig {
        ExportConfig {
            otlp_endpoint: endpoint.to_string(),
            ..ExportConfig::default()
        }
    }

    #[test]
    fn a_base_endpoint_gets_the_logs_path_and_a_full_one_is_kept() {
        for (given, want) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/logs"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/logs"),
            (
                "https://otlp.example:443",
                "https://otlp.example:443/v1/logs",
            ),
            ("http://c:4318/v1/logs", "http://c:4318/v1/logs"),
            ("http://c:4318/custom/path", "http://c:4318/custom/path"),
        ] {
            let s = resolve(&cfg(given), &env(&[])).expect("valid").expect("on");
            assert_eq!(s.endpoint.to_string(), want, "{given}");
        }
        assert!(resolve(&cfg("ftp://c/v1/logs"), &env(&[])).is_err());
        assert!(resolve(&cfg("c:4318"), &env(&[])).is_err());
        let creds = resolve(&cfg("https://user:token@c"), &env(&[])).expect_err("refused");
        assert!(!creds.join("").contains("token"), "{creds:?}");
        // A query is kept, after the added path.
        let s = resolve(&cfg("http://c:4318/?tenant=a"), &env(&[]))
            .expect("valid")
            .expect("on");
        assert_eq!(s.endpoint.to_string(), "http://c:4318/v1/logs?tenant=a");
        assert_eq!(shown(&s.endpoint), "http://c:4318/v1/logs");
        let base = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318?tenant=a")]);
        let s = resolve(&ExportConfig::default(), &base)
            .expect("valid")
            .expect("on");
        assert_eq!(s.endpoint.to_string(), "http://c:4318/v1/logs?tenant=a");
    }

    #[test]
    fn the_environment_fills_in_what_the_file_leaves_unset() {
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/base/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=s%20ecret, x-tenant=blue",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]);
        let s = resolve(&ExportConfig::default(), &vars)
            .expect("valid")
            .expect("the environment turns it on");
        assert_eq!(s.endpoint.to_string(), "http://collector:4318/base/v1/logs");
        assert_eq!(s.compression, Compression::Gzip);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.ca, None);
        let headers: Vec<(String, String)> = s
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_string()))
            .collect();
        assert_eq!(
            headers,
            [
                ("api-key".to_string(), "s ecret".to_string()),
                ("x-tenant".to_string(), "blue".to_string())
            ]
        );
        // The file wins, key by key; the logs variable wins over the
        // general one and is used as it is.
        let mut file = cfg("http://file:4318");
        file.compression = Some(Compression::None);
        file.headers.insert("api-key".into(), "from-file".into());
        let s = resolve(&file, &vars).expect("valid").expect("on");
        assert_eq!(s.endpoint.to_string(), "http://file:4318/v1/logs");
        assert_eq!(s.compression, Compression::None);
        assert_eq!(s.headers[0].1, "from-file");
        assert_eq!(s.headers.len(), 2);
        let logs = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs:4318/exact"),
        ]);
        let s = resolve(&ExportConfig::default(), &logs)
            .expect("valid")
            .expect("on");
        assert_eq!(s.endpoint.to_string(), "http://logs:4318/exact");
    }

    #[test]
    fn nothing_set_is_off_and_bad_values_name_their_variable() {
        assert_eq!(resolve(&ExportConfig::default(), &env(&[])), Ok(None));
        let bad = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "novalue,Authorization: Bearer s3cret=1",
            ),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
        ]);
        let problems = resolve(&ExportConfig::default(), &bad).expect_err("refused");
        let all = problems.join("\n");
        for want in [
            "OTEL_EXPORTER_OTLP_COMPRESSION = \"zstd\": must be gzip or none",
            "OTEL_EXPORTER_OTLP_PROTOCOL = \"grpc\"",
            "OTEL_EXPORTER_OTLP_TIMEOUT = \"soon\"",
            "OTEL_EXPORTER_OTLP_HEADERS: item 1 is not name=value",
            "OTEL_EXPORTER_OTLP_HEADERS: \"Authorization\"... is not a header name",
            "OTEL_EXPORTER_OTLP_CERTIFICATE: ",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        assert!(!all.contains("s3cret"), "a secret in the error: {all}");
        assert_eq!(problems.len(), 6, "{all}");
    }
}
