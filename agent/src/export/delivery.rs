//! Sending batches to the collector, as the OTLP/HTTP specification asks:
//! only 429, 502, 503 and 504 (and a connection that failed or timed out)
//! are retried, after the collector's `Retry-After` when it gives one, else
//! an exponential backoff; any other answer drops the batch at once. The
//! cause of the first failure of each kind is logged, once.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    header::{HeaderMap, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER},
    Method, Request, StatusCode,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    body::{self, Body},
    client::HttpClient,
    config::ExportConfig,
    settings::{shown, Settings},
    stats::ExportStats,
};
use crate::events::FlowEvent;

/// The most of a collector's answer that is read: OTLP answers are a few
/// bytes; anything longer is cut off with its connection.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The longest `Retry-After` honoured: a collector asking for more (or a
/// date far off) gets its retry after this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How one attempt ended.
enum Attempt {
    Accepted,
    /// Not worth retrying (a 4xx other than 429, a 5xx other than 502-504).
    Refused(StatusCode),
    /// Worth retrying; `after` is the collector's Retry-After.
    Failed {
        kind: String,
        cause: String,
        after: Option<Duration>,
    },
}

pub async fn send_batches(
    mut rx: mpsc::Receiver<Arc<FlowEvent>>,
    client: HttpClient,
    settings: Settings,
    cfg: ExportConfig,
    stats: Arc<ExportStats>,
) {
    let host = crate::events::host::name();
    let flush = Duration::from_millis(cfg.flush_interval_ms);
    let mut batch = Vec::with_capacity(cfg.batch_size);
    let mut failing = false;
    let mut seen = HashSet::new();
    loop {
        if rx.recv_many(&mut batch, cfg.batch_size).await == 0 {
            break;
        }
        // Fill the batch for at most one flush interval.
        let deadline = tokio::time::Instant::now() + flush;
        while batch.len() < cfg.batch_size {
            let room = cfg.batch_size - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let ok = match body::encode(&batch, host, settings.protocol, settings.compression) {
            Ok(body) => {
                let batch_send = Batch {
                    client: &client,
                    settings: &settings,
                    cfg: &cfg,
                    stats: &stats,
                    records: batch.len(),
                };
                batch_send.send(&body, &mut seen).await
            }
            Err(e) => {
                warn!("cannot encode a batch of events: {e}; dropped");
                ExportStats::add(&stats.dropped_rejected, batch.len());
                false
            }
        };
        if ok == failing {
            failing = !ok;
            let endpoint = shown(&settings.endpoint);
            if ok {
                info!(endpoint, "OTLP export works again");
                // The next failure's cause is logged again, whatever its kind.
                seen.clear();
            } else {
                warn!(endpoint, dropped = stats.dropped(), "OTLP export failing; events are queued, then dropped and counted (bulkhead_export_dropped_total)");
            }
        }
        batch.clear();
    }
}

struct Batch<'a> {
    client: &'a HttpClient,
    settings: &'a Settings,
    cfg: &'a ExportConfig,
    stats: &'a ExportStats,
    records: usize,
}

impl Batch<'_> {
    /// Sends the batch with retries; false if it was dropped.
    async fn send(&self, body: &Body, seen: &mut HashSet<String>) -> bool {
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        for attempt in 0..=self.cfg.max_retries {
            let wait = match self.attempt(body).await {
                Attempt::Accepted => {
                    ExportStats::add(&self.stats.sent, self.records);
                    return true;
                }
                Attempt::Refused(status) => {
                    ExportStats::add(&self.stats.failed_requests, 1);
                    first_of_kind(
                        seen,
                        &format!("HTTP {status}"),
                        "the collector refused a batch; it is dropped, not retried",
                    );
                    ExportStats::add(&self.stats.dropped_rejected, self.records);
                    return false;
                }
                Attempt::Failed { kind, cause, after } => {
                    ExportStats::add(&self.stats.failed_requests, 1);
                    first_of_kind(seen, &kind, &cause);
                    after.unwrap_or(backoff)
                }
            };
            if attempt < self.cfg.max_retries {
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
            }
        }
        ExportStats::add(&self.stats.dropped_retries, self.records);
        false
    }

    async fn attempt(&self, body: &Body) -> Attempt {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.settings.endpoint.clone())
            .header(CONTENT_TYPE, body.content_type);
        if body.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        for (name, value) in &self.settings.headers {
            request = request.header(name, value);
        }
        let request = match request.body(Full::new(body.bytes.clone())) {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    kind: "request".to_string(),
                    cause: e.to_string(),
                    after: None,
                }
            }
        };
        // The whole exchange is under the timeout, the answer's body too: a
        // collector that trickles it must not hold up the export.
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let after = retry_after(response.headers(), SystemTime::now());
            // Read the body so that the connection can be reused; past the
            // cap the error drops the connection instead.
            let _ = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>((status, after))
        };
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(Ok((status, _))) if status.is_success() => Attempt::Accepted,
            Ok(Ok((status, after))) if retryable(status) => Attempt::Failed {
                kind: format!("HTTP {status}"),
                cause: format!("the collector answered {status}; retried"),
                after,
            },
            Ok(Ok((status, _))) => Attempt::Refused(status),
            Ok(Err(e)) => Attempt::Failed {
                kind: "connection".to_string(),
                cause: chain(&e),
                after: None,
            },
            Err(_) => Attempt::Failed {
                kind: "timeout".to_string(),
                cause: format!(
                    "no complete answer within {} ms",
                    self.settings.timeout.as_millis()
                ),
                after: None,
            },
        }
    }
}

/// Logs `cause` the first time a failure of `kind` happens (since export
/// last worked).
fn first_of_kind(seen: &mut HashSet<String>, kind: &str, cause: &str) {
    if seen.insert(kind.to_string()) {
        warn!(kind, "OTLP export: first failure of this kind: {cause}");
    }
}

/// An error and its causes, outermost first ("client error (Connect):
/// tcp connect error: Connection refused (os error 111)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// OTLP/HTTP: only these answers are worth retrying.
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// The collector's `Retry-After` (seconds, or an HTTP date), at most
/// [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_a_connection_failure_with_its_cause() {
        // Nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let cfg = ExportConfig {
            otlp_endpoint: format!("http://{port}"),
            ..ExportConfig::default()
        };
        let settings = crate::export::settings::resolve(&cfg, &|_| None)
            .expect("valid")
            .expect("on");
        let client = crate::export::client::build(None).expect("client");
        let stats = ExportStats::default();
        let batch = Batch {
            client: &client,
            settings: &settings,
            cfg: &cfg,
            stats: &stats,
            records: 1,
        };
        let body = Body {
            bytes: bytes::Bytes::from_static(b"{}"),
            content_type: "application/json",
            gzip: false,
        };
        let Attempt::Failed { kind, cause, after } = batch.attempt(&body).await else {
            panic!("a refused connection is a failure to retry");
        };
        assert_eq!((kind.as_str(), after), ("connection", None));
        assert!(cause.contains("Connection refused"), "the cause: {cause}");
        // Logged once per kind until export works again (the caller
        // clears `seen` then).
        let mut seen = HashSet::new();
        first_of_kind(&mut seen, &kind, &cause);
        assert!(!seen.insert(kind.clone()), "remembered");
    }

    #[test]
    fn only_429_502_503_504_are_retried() {
        let retried: Vec<u16> = (100..600)
            .filter(|c| StatusCode::from_u16(*c).is_ok_and(retryable))
            .collect();
        assert_eq!(retried, [429, 502, 503, 504]);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, "7".parse().expect("value"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        h.insert(RETRY_AFTER, date.parse().expect("value"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(42)));
        h.insert(RETRY_AFTER, "86400".parse().expect("value"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&h, now), None);
    }
}
