//! The daemon's detectors: counted from every event through a hub tap,
//! scored by a task every interval (which saves the baselines) and, for the
//! threshold detectors, every second; it publishes the anomaly events.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::{
    config::AnomalyConfig,
    detector::{Anomaly, Detector},
    event::to_event,
    state,
    stats::AnomalyStats,
};
use crate::events::{FlowEvent, Hub, Sink, Tap};

/// The detectors, shared by the hub's tap (counting) and the task (scoring).
struct Shared(Mutex<Detector>);

impl Shared {
    fn detector(&self) -> MutexGuard<'_, Detector> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tap for Shared {
    fn observe(&self, batch: &[Arc<FlowEvent>]) {
        let mut d = self.detector();
        for ev in batch {
            d.observe(ev);
        }
    }
}

/// How often the threshold detectors look at the interval so far: what a
/// sweep waits at most, past the event's own way through the ring buffer
/// (a few counters per service: cheap).
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The running detector task.
pub struct AnomalyTask {
    handle: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl AnomalyTask {
    /// Stops the task after it has saved the baselines (waits up to 2 s).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut handle = self.handle;
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut handle)
            .await
            .is_err()
        {
            handle.abort();
        }
    }
}

/// Starts the detectors (nothing when disabled). Baselines come from and
/// go to `state_dir/anomaly.json`.
///
/// # Errors
/// When the optional anomaly sink cannot be opened.
pub fn spawn(
    cfg: AnomalyConfig,
    hub: &Arc<Hub>,
    state_dir: PathBuf,
    stats: Arc<AnomalyStats>,
) -> std::io::Result<Option<AnomalyTask>> {
    if !cfg.enabled {
        info!("anomaly detection is off ([anomaly] enabled = false)");
        return Ok(None);
    }
    let mut sink = if cfg.sink.is_empty() {
        None
    } else {
        Some(Sink::open(&cfg.sink)?)
    };
    let mut detector = Detector::new(cfg);
    match state::load(&state_dir) {
        Ok(Some(saved)) => {
            info!(
                services = saved.services.len(),
                "anomaly baselines restored"
            );
            detector.restore(saved);
        }
        Ok(None) => {}
        Err(problem) => {
            crate::state_file::set_aside(
                &state_dir,
                state::STATE_FILE,
                &problem,
                "anomaly baselines are learned afresh",
            );
        }
    }
    let period = std::time::Duration::from_secs(detector.config().interval_s);
    let shared = Arc::new(Shared(Mutex::new(detector)));
    hub.add_tap(Arc::clone(&shared) as Arc<dyn Tap>);
    let hub = Arc::clone(hub);
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(start + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval_at(start + CHECK_EVERY, CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // `biased`: when both are due, the interval's end comes first
            // (it scores the whole window; a check after it sees a new one).
            tokio::select! {
                biased;
                _ = stopping.changed() => {
                    // The interval in progress is not scored; what was
                    // learnt so far is kept.
                    save(&shared, &state_dir);
                    break;
                }
                _ = tick.tick() => {
                    // Scored under the lock; published after it is
                    // released (publishing runs the tap, which takes it).
                    let found = shared.detector().tick(unix_now());
                    publish(&found, &stats, sink.as_mut(), &hub);
                    save(&shared, &state_dir);
                }
                _ = check.tick() => {
                    let found = shared.detector().check(unix_now());
                    publish(&found, &stats, sink.as_mut(), &hub);
                }
            }
        }
    });
    Ok(Some(AnomalyTask { handle, stop }))
}

/// Counts, logs and publishes what the detectors reported (nothing if
/// empty).
fn publish(found: &[Anomaly], stats: &AnomalyStats, sink: Option<&mut Sink>, hub: &Hub) {
    if found.is_empty() {
        return;
    }
    let events: Vec<_> = found.iter().map(to_event).collect();
    for a in found {
        stats.count(
            &a.service,
            a.finding.kind.as_str(),
            a.finding.severity.as_str(),
        );
        warn!(service = %a.service, kind = a.finding.kind.as_str(), observed = a.finding.observed, baseline = a.finding.baseline, "anomaly");
    }
    if let Some(s) = sink {
        let written = events
            .iter()
            .try_for_each(|e| s.write(e))
            .and_then(|()| s.flush());
        if let Err(e) = written {
            warn!("cannot write the anomaly sink: {e}");
        }
    }
    hub.publish(events);
}

fn save(shared: &Shared, state_dir: &std::path::Path) {
    let saved = shared.detector().save_state();
    if let Err(e) = state::write(state_dir, &saved) {
        warn!(dir = %state_dir.display(), "cannot save the anomaly baselines: {e}");
    }
}
