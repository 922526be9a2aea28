//! The two export tasks: one takes events from the hub into a bounded
//! queue (what does not fit is dropped and counted), the other sends
//! batches to the collector, retrying with exponential backoff.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{header::CONTENT_TYPE, Method, Request, StatusCode, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::{info, warn};

use super::{
    config::{ExportConfig, ExportEvents},
    otlp,
    stats::ExportStats,
};
use crate::events::{EventType, FlowEvent, Hub};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The most of a collector's answer that is read: OTLP answers are a few
/// bytes of JSON; anything longer is cut off with its connection.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The running exporter; dropping it does not stop it, [`Exporter::abort`]
/// does.
pub struct Exporter {
    feeder: tokio::task::JoinHandle<()>,
    sender: tokio::task::JoinHandle<()>,
}

impl Exporter {
    pub fn abort(&self) {
        self.feeder.abort();
        self.sender.abort();
    }
}

/// Starts exporting the hub's events (nothing when no endpoint is set).
///
/// # Errors
/// When the endpoint is not a valid URL (the config check refuses that
/// earlier).
pub fn spawn(
    cfg: ExportConfig,
    hub: &Arc<Hub>,
    stats: Arc<ExportStats>,
) -> Result<Option<Exporter>, hyper::http::uri::InvalidUri> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let uri: Uri = cfg.otlp_endpoint.parse()?;
    info!(endpoint = %uri, "exporting events as OTLP logs");
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let feeder = tokio::spawn(feed(hub.subscribe(), tx, cfg.events, Arc::clone(&stats)));
    let sender = tokio::spawn(send_batches(rx, uri, cfg, stats));
    Ok(Some(Exporter { feeder, sender }))
}

async fn feed(
    mut rx: tokio::sync::broadcast::Receiver<Arc<FlowEvent>>,
    tx: mpsc::Sender<Arc<FlowEvent>>,
    events: ExportEvents,
    stats: Arc<ExportStats>,
) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if events == ExportEvents::Anomalies && ev.kind != EventType::Anomaly {
                    continue;
                }
                match tx.try_send(ev) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        ExportStats::add(&stats.dropped_queue_full, 1);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            Err(RecvError::Lagged(n)) => {
                ExportStats::add(
                    &stats.dropped_queue_full,
                    usize::try_from(n).unwrap_or(usize::MAX),
                );
            }
            Err(RecvError::Closed) => break,
        }
    }
}

async fn send_batches(
    mut rx: mpsc::Receiver<Arc<FlowEvent>>,
    uri: Uri,
    cfg: ExportConfig,
    stats: Arc<ExportStats>,
) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let host = crate::events::host::name();
    let flush = Duration::from_millis(cfg.flush_interval_ms);
    let mut batch = Vec::with_capacity(cfg.batch_size);
    let mut failing = false;
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
        let body = Bytes::from(otlp::encode(&batch, host));
        let ok = send(&client, &uri, &body, &cfg, &stats, batch.len()).await;
        if ok == failing {
            failing = !ok;
            if ok {
                info!(endpoint = %uri, "OTLP export works again");
            } else {
                warn!(endpoint = %uri, dropped = stats.dropped(), "OTLP export failing; events are queued, then dropped and counted (bulkhead_export_dropped_total)");
            }
        }
        batch.clear();
    }
}

/// Sends one batch with retries; false if it was dropped.
async fn send(
    client: &HttpClient,
    uri: &Uri,
    body: &Bytes,
    cfg: &ExportConfig,
    stats: &ExportStats,
    records: usize,
) -> bool {
    let mut backoff = Duration::from_millis(cfg.retry_initial_ms);
    let timeout = Duration::from_millis(cfg.timeout_ms);
    for attempt in 0..=cfg.max_retries {
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let Ok(request) = request else {
            ExportStats::add(&stats.dropped_rejected, records);
            return false;
        };
        // The whole exchange is under the timeout, the answer's body too: a
        // collector that trickles it must not hold up the export.
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            // Read the body so that the connection can be reused; past the
            // cap the error drops the connection instead.
            let _ = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(status)) => {
                if status.is_success() {
                    ExportStats::add(&stats.sent, records);
                    return true;
                }
                ExportStats::add(&stats.failed_requests, 1);
                if !retryable(status) {
                    warn!(%status, records, "the OTLP collector refused a batch; dropped");
                    ExportStats::add(&stats.dropped_rejected, records);
                    return false;
                }
            }
            Ok(Err(_)) | Err(_) => ExportStats::add(&stats.failed_requests, 1),
        }
        if attempt < cfg.max_retries {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(cfg.retry_max_ms));
        }
    }
    ExportStats::add(&stats.dropped_retries, records);
    false
}

/// OTLP/HTTP: 429, 502, 503 and 504 are worth retrying; so are other 5xx
/// and 408 here. Other 4xx will fail again.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}
