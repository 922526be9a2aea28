//! The fleet exporter (docs/fleet.md): this agent's rows to ClickHouse.
//! It runs on a thread of its own, so that nothing it waits for (the
//! network, the spool's disk) can slow enforcement or the local decision
//! log. Every batch interval it turns what it collected into batches,
//! puts them in the spool (memory, then disk) and sends the spool's
//! batches oldest first.
//!
//! - `collect`: events into `flows` and `anomalies` rows
//! - `endpoints`: the host's addresses and listeners into `endpoints` rows
//!   (looked at every interval, sent on a change and every minute)
//! - `deliver`: the spool to ClickHouse, idempotently
//! - `stats`: rows by table and result, for the metrics

mod collect;
mod deliver;
mod endpoints;
mod stats;

use std::{path::PathBuf, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

pub use stats::FleetStats;

use self::{collect::CollectTap, deliver::Delivery, endpoints::Endpoints};
use super::{
    host::HostView,
    rows::{self, batch_id},
    time, Client, EncodedBatch, FleetConfig, HostIdentity, PolicyRow, Row,
};
use crate::{
    events::Hub,
    spool::{Batch, Pushed, Spool, SpoolLimits},
};

/// Unchanged policy snapshots are sent again this often (seconds).
const POLICIES_EVERY: u32 = 3600;

/// Rows of one table in one batch at most (the client's bound).
const BATCH_ROWS: usize = 10_000;

/// The running exporter.
pub struct FleetExporter {
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl FleetExporter {
    /// Ends the exporter: the interval's rows go to the spool, the spool's
    /// memory to disk (sent by the next run); nothing waits for the server.
    pub fn stop(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the fleet exporter's thread panicked");
            }
        }
    }
}

/// What the exporter needs from the daemon.
pub struct Inputs {
    pub hub: Arc<Hub>,
    pub host: watch::Receiver<Arc<HostView>>,
    pub cgroup_mount: PathBuf,
    pub state_dir: PathBuf,
    pub stats: Arc<FleetStats>,
}

/// Starts exporting (nothing when `[fleet] enabled` is false).
///
/// # Errors
/// The connection or identity cannot be set up (a password file that
/// cannot be read, no machine id; `prepare` checked both before READY).
/// The spool is opened on the exporter's thread (it reads every spooled
/// batch): failing there turns export off, logged.
pub fn spawn(cfg: &FleetConfig, inputs: Inputs) -> Result<Option<FleetExporter>> {
    if !cfg.enabled {
        return Ok(None);
    }
    let client = Client::new(cfg.connection(None)?).context("the fleet's ClickHouse client")?;
    let identity = cfg.identity()?;
    let dir = cfg.spool_dir(&inputs.state_dir);
    let limits = SpoolLimits {
        memory_rows: u64::try_from(cfg.queue_rows).unwrap_or(u64::MAX),
        disk_bytes: cfg.spool_bytes,
    };
    info!(
        url = %client.url(),
        host = %identity.host,
        spool = %dir.display(),
        "exporting to the fleet's ClickHouse"
    );
    let stop = Arc::new(Notify::new());
    let collected = Arc::new(CollectTap::new(identity.clone(), cfg.queue_rows));
    inputs
        .hub
        .add_tap(Arc::clone(&collected) as Arc<dyn crate::events::Tap>);
    let worker = Worker {
        client,
        identity,
        spool_at: (dir, limits),
        interval: cfg.batch_interval(),
        collected,
        host: inputs.host,
        mount: inputs.cgroup_mount,
        stats: inputs.stats,
        stop: Arc::clone(&stop),
    };
    let thread = std::thread::Builder::new()
        .name("bulkhead-fleet".to_string())
        .spawn(move || worker.run())
        .context("cannot start the fleet exporter's thread")?;
    Ok(Some(FleetExporter {
        stop,
        thread: Some(thread),
    }))
}

struct Worker {
    client: Client,
    identity: HostIdentity,
    spool_at: (PathBuf, SpoolLimits),
    interval: Duration,
    /// The interval's `flows` and `anomalies` rows, collected by a tap.
    collected: Arc<CollectTap>,
    host: watch::Receiver<Arc<HostView>>,
    mount: PathBuf,
    stats: Arc<FleetStats>,
    stop: Arc<Notify>,
}

impl Worker {
    fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                warn!("the fleet exporter cannot start its runtime: {e}");
                return;
            }
        };
        let spool = match Spool::open(&self.spool_at.0, self.spool_at.1) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!("fleet export is off: {e}");
                return;
            }
        };
        self.stats.set_spool(spool.stats());
        runtime.block_on(self.serve(&spool));
    }

    async fn serve(mut self, spool: &Arc<Spool>) {
        let wake = Arc::new(Notify::new());
        let mut delivery = Delivery::default();
        let fresh = Arc::clone(&delivery.fresh);
        let sender = {
            let (client, spool, stats, wake) = (
                self.client.clone(),
                Arc::clone(spool),
                Arc::clone(&self.stats),
                Arc::clone(&wake),
            );
            let retry = self.interval;
            tokio::spawn(async move {
                loop {
                    if delivery.pass(&client, &spool, &stats).await == deliver::Pass::Stalled {
                        // Try again after an interval (or when woken).
                        let _ = tokio::time::timeout(retry, wake.notified()).await;
                    } else {
                        wake.notified().await;
                    }
                }
            })
        };
        let mut endpoints = Endpoints::default();
        let mut sent_policies: Option<(Arc<HostView>, u32)> = None;
        let run = match rows::run_id() {
            Ok(r) => r,
            Err(e) => {
                warn!("fleet export stopped: no run id from the kernel's random source: {e}");
                return;
            }
        };
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // At the stop, what was published before it (the last sweep's
            // summaries) is in the tap's rows: this run's to send.
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = self.stop.notified() => true,
            };
            let now = time::now();
            let (flows, anomalies) = self.collected.take();
            let mut out = Batches {
                spool,
                identity: &self.identity,
                run,
                seq: &mut seq,
                fresh: &fresh,
            };
            out.push(flows);
            out.push(anomalies);
            let view = Arc::clone(&self.host.borrow_and_update());
            out.push(endpoints.rows(&self.identity, &view, &self.mount, now));
            // On a change, and every hour: `fleet prune` drops old days,
            // and a policy that never changes must not drop out with them.
            let due = match &sent_policies {
                Some((sent, at)) => *sent != view || now >= at.saturating_add(POLICIES_EVERY),
                None => true,
            };
            if due {
                out.push(policy_rows(&self.identity, &view, now));
                sent_policies = Some((view, now));
            }
            if stopping {
                sender.abort();
                let p = spool.persist();
                info!(
                    written = p.written,
                    dropped = p.dropped,
                    "fleet export stopped; waiting rows are in the spool for the next run"
                );
                return;
            }
            wake.notify_one();
        }
    }
}

/// Turns rows into batches in the spool.
struct Batches<'a> {
    spool: &'a Spool,
    identity: &'a HostIdentity,
    run: u64,
    seq: &'a mut u64,
    fresh: &'a std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Batches<'_> {
    fn push<R: Row>(&mut self, mut rows: Vec<R>) {
        for chunk in rows.chunks_mut(BATCH_ROWS) {
            *self.seq += 1;
            let id = batch_id(&self.identity.host_id, self.run, *self.seq);
            let encoded = match EncodedBatch::encode(&id, chunk) {
                Ok(b) => b,
                Err(e) => {
                    warn!("fleet export: cannot encode a batch of {}: {e}", R::TABLE);
                    continue;
                }
            };
            // Marked fresh before the push: the sender may take it at once.
            let mut fresh = self
                .fresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            fresh.insert(id.clone());
            drop(fresh);
            let pushed = self.spool.push(Batch {
                table: R::TABLE.name().to_string(),
                batch_id: id.clone(),
                rows: encoded.rows(),
                body: encoded.body().clone(),
            });
            if let Pushed::Dropped(reason) = pushed {
                self.fresh
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                warn!(table = %R::TABLE, reason = reason.as_str(), "fleet export: a batch was dropped");
            }
        }
    }
}

/// One row per service of the policy in force.
fn policy_rows(id: &HostIdentity, view: &HostView, now: u32) -> Vec<PolicyRow> {
    view.services
        .iter()
        .map(|s| PolicyRow {
            host: id.host.clone(),
            host_id: id.host_id.clone(),
            service: s.name.clone(),
            mode: s.mode.clone(),
            file: s.file.clone(),
            file_sha256: s.file_sha256.clone(),
            rules: serde_json::to_string(&s.rules).unwrap_or_else(|_| "[]".to_string()),
            applied_at: now,
            ..PolicyRow::default()
        })
        .collect()
}
