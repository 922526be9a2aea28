//! The two export tasks: one takes events from the hub into a bounded
//! queue (what does not fit is dropped and counted), the other sends
//! batches to the collector (`delivery`).

use std::sync::Arc;

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::info;

use super::{
    client,
    config::{ExportConfig, ExportEvents},
    delivery,
    settings::Settings,
    stats::ExportStats,
};
use crate::events::{EventType, FlowEvent, Hub};

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

/// Starts exporting the hub's events to `settings` (resolved from `cfg`
/// and the environment, `settings::resolve`); nothing when `None`.
///
/// # Errors
/// When the HTTP client cannot be made (the CA file).
pub fn spawn(
    cfg: &ExportConfig,
    settings: Option<Settings>,
    hub: &Arc<Hub>,
    stats: Arc<ExportStats>,
) -> Result<Option<Exporter>, String> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let client = client::build(settings.ca.as_deref())?;
    info!(endpoint = super::settings::shown(&settings.endpoint), protocol = ?settings.protocol, compression = ?settings.compression, "exporting events as OTLP logs");
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let feeder = tokio::spawn(feed(hub.subscribe(), tx, cfg.events, Arc::clone(&stats)));
    let sender = tokio::spawn(delivery::send_batches(
        rx,
        client,
        settings,
        cfg.clone(),
        stats,
    ));
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
