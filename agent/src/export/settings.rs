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

use super::config::{Compression, ExportConfig, Protocol, DEFAULT_TIMEOUT_MS};

/// The path of the logs signal, added to a base endpoint.
const LOGS_PATH: &str = "/v1/logs";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub endpoint: Uri,
    pub protocol: Protocol,
    pub compression: Compression,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub ca_file: Option<PathBuf>,
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
                let url = if base {
                    format!("{}{LOGS_PATH}", value.trim_end_matches('/'))
                } else {
                    value.clone()
                };
                endpoint(&url, false).map_err(|why| format!("{name} = {value:?}: {why}"))
            }
            None => return Ok(None),
        }
    } else {
        endpoint(&cfg.otlp_endpoint, true)
            .map_err(|why| format!("export.otlp_endpoint = {:?}: {why}", cfg.otlp_endpoint))
    };
    let endpoint = endpoint.map_err(|p| problems.push(p)).ok();

    let protocol = match cfg.protocol {
        Some(p) => Some(p),
        None => match var("PROTOCOL") {
            None => Some(Protocol::HttpJson),
            Some((name, value)) => match value.trim() {
                "http/json" => Some(Protocol::HttpJson),
                "http/protobuf" => Some(Protocol::HttpProtobuf),
                other => {
                    problems.push(format!(
                        "{name} = {other:?}: must be http/json or http/protobuf (gRPC is not supported: use http/protobuf, port 4318)"
                    ));
                    None
                }
            },
        },
    };
    let compression = match cfg.compression {
        Some(c) => Some(c),
        None => match var("COMPRESSION") {
            None => Some(Compression::None),
            Some((name, value)) => match value.trim() {
                "gzip" => Some(Compression::Gzip),
                "none" => Some(Compression::None),
                other => {
                    problems.push(format!("{name} = {other:?}: must be gzip or none"));
                    None
                }
            },
        },
    };
    let timeout_ms = match cfg.timeout_ms {
        Some(t) => Some(t),
        None => match var("TIMEOUT") {
            None => Some(DEFAULT_TIMEOUT_MS),
            Some((name, value)) => match value.trim().parse::<u64>() {
                Ok(t) if t >= 1 => Some(t),
                _ => {
                    problems.push(format!(
                        "{name} = {value:?}: must be a whole number of milliseconds, at least 1"
                    ));
                    None
                }
            },
        },
    };
    let ca_file = cfg
        .ca_file
        .clone()
        .or_else(|| var("CERTIFICATE").map(|(_, v)| PathBuf::from(v.trim())));

    let mut headers = Vec::new();
    for (name, value) in &cfg.headers {
        match header(name, value) {
            Ok(h) => headers.push(h),
            Err(why) => problems.push(format!("export.headers: {why}")),
        }
    }
    if let Some((var_name, list)) = var("HEADERS") {
        for item in list.split(',').filter(|i| !i.trim().is_empty()) {
            let Some((name, value)) = item.split_once('=') else {
                problems.push(format!(
                    "{var_name}: {item:?} is not name=value (the list is name=value,name=value)"
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
                ca_file,
                timeout: Duration::from_millis(timeout_ms),
            }))
        }
        _ => Err(problems),
    }
}

/// An `http://` or `https://` URL with a host. `add_logs_path`: a URL
/// without a path (or `/`) is a base, and `/v1/logs` is added to it.
///
/// # Errors
/// Why the URL is not usable.
pub fn endpoint(url: &str, add_logs_path: bool) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err("must be an http:// or https:// URL with a host".to_string());
    }
    if add_logs_path && matches!(uri.path(), "" | "/") && uri.query().is_none() {
        let full = format!("{}{LOGS_PATH}", url.trim_end_matches('/'));
        return full.parse().map_err(|e| format!("{e}"));
    }
    Ok(uri)
}

/// A request header from a name and value.
///
/// # Errors
/// A name or value HTTP does not allow.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
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
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
        ]);
        let s = resolve(&ExportConfig::default(), &vars)
            .expect("valid")
            .expect("the environment turns it on");
        assert_eq!(s.endpoint.to_string(), "http://collector:4318/base/v1/logs");
        assert_eq!(s.compression, Compression::Gzip);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.ca_file, Some(PathBuf::from("/etc/ca.pem")));
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
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue,bad name=1"),
        ]);
        let problems = resolve(&ExportConfig::default(), &bad).expect_err("refused");
        let all = problems.join("\n");
        for want in [
            "OTEL_EXPORTER_OTLP_COMPRESSION = \"zstd\": must be gzip or none",
            "OTEL_EXPORTER_OTLP_PROTOCOL = \"grpc\"",
            "OTEL_EXPORTER_OTLP_TIMEOUT = \"soon\"",
            "OTEL_EXPORTER_OTLP_HEADERS: \"novalue\" is not name=value",
            "OTEL_EXPORTER_OTLP_HEADERS: \"bad name\" is not a header name",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        assert_eq!(problems.len(), 5, "{all}");
    }
}
