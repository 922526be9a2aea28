//! Where decoded events go: the decision log, the taps (graph, detectors),
//! live subscribers and a short history. Every event that cannot be
//! delivered somewhere is counted.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc, Mutex},
};

use tokio::sync::broadcast;

use super::{model::FlowEvent, sink::Sink, stats::EventStats, writer::LogWriter};

/// How many recent events `bulkhead flows` (without --follow) can show.
const RECENT: usize = 1024;
/// Live subscribers that fall further behind than this lose events
/// (counted in `subscriber_lagged`), never the decision log.
const LIVE_CAPACITY: usize = 8192;

/// Something that folds in every event, called synchronously with each
/// batch the reader publishes (the service graph, the anomaly detectors).
/// Cheaper than a channel and a task wake-up per event, and a tap never
/// falls behind: it sees exactly what the decision log gets. It must not
/// block (a lock held only briefly by others is fine).
pub trait Tap: Send + Sync {
    fn observe(&self, batch: &[Arc<FlowEvent>]);
}

/// Something that completes events before anyone sees them (the byte
/// summaries of open TCP connections mark what a close adds). Called
/// synchronously with each batch, before the log and the taps; it must
/// not block.
pub trait Stage: Send + Sync {
    fn amend(&self, batch: &mut [FlowEvent]);
}

pub struct Hub {
    live: broadcast::Sender<Arc<FlowEvent>>,
    stages: Mutex<Vec<Arc<dyn Stage>>>,
    taps: Mutex<Vec<Arc<dyn Tap>>>,
    recent: Mutex<VecDeque<Arc<FlowEvent>>>,
    log: LogWriter,
    pub stats: Arc<EventStats>,
}

impl Hub {
    /// A hub writing its decision log to `sink` (from a thread of its own).
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn new(sink: Sink) -> std::io::Result<Self> {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        let stats = Arc::new(EventStats::default());
        Ok(Self {
            live,
            stages: Mutex::new(Vec::new()),
            taps: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            log: LogWriter::spawn(sink, Arc::clone(&stats))?,
            stats,
        })
    }

    /// Delivers a batch, once the stages completed it: to the decision log
    /// writer's queue (which may make this wait, see [`super::writer`]),
    /// the taps, the history and the live subscribers.
    pub fn publish(&self, mut batch: Vec<FlowEvent>) {
        if batch.is_empty() {
            return;
        }
        for stage in lock(&self.stages).iter() {
            stage.amend(&mut batch);
        }
        let batch: Vec<Arc<FlowEvent>> = batch.into_iter().map(Arc::new).collect();
        let mut suppressed = Vec::new();
        for ev in &batch {
            self.stats.received[ev.kind as usize].fetch_add(1, Ordering::Relaxed);
            if let (Some(n @ 1..), Some(service), Some(direction)) =
                (ev.suppressed, &ev.service, ev.traffic_direction)
            {
                suppressed.push((Arc::clone(service), direction, u64::from(n)));
            }
        }
        if !suppressed.is_empty() {
            let mut totals = lock(&self.stats.suppressed);
            for (service, direction, n) in suppressed {
                *totals.entry((service, direction)).or_default() += n;
            }
        }
        self.log.write(&batch);
        for tap in lock(&self.taps).iter() {
            tap.observe(&batch);
        }
        {
            let mut recent = lock(&self.recent);
            for ev in &batch {
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back(Arc::clone(ev));
            }
        }
        if self.live.receiver_count() > 0 {
            for ev in batch {
                // An error only means no subscriber is listening right now.
                let _ = self.live.send(ev);
            }
        }
    }

    /// Adds a stage: it completes every batch published from now on.
    pub fn add_stage(&self, stage: Arc<dyn Stage>) {
        lock(&self.stages).push(stage);
    }

    /// Adds a tap: it sees every batch published from now on.
    pub fn add_tap(&self, tap: Arc<dyn Tap>) {
        lock(&self.taps).push(tap);
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowEvent>> {
        self.live.subscribe()
    }

    /// The most recent events, oldest first.
    pub fn recent(&self) -> Vec<Arc<FlowEvent>> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Re-opens the decision log file (after logrotate moved it), once
    /// what was published before is written to the old one.
    pub fn reopen_sink(&self) -> std::io::Result<()> {
        self.log.reopen()
    }

    /// Returns once every event published so far is in the decision log.
    pub fn sync_log(&self) {
        self.log.sync();
    }
}

/// A poisoned lock only means another thread panicked while holding it;
/// the data (a queue, a file handle) is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;

    fn event() -> FlowEvent {
        FlowEvent::from_agent(EventType::PolicyChange, "policy")
    }

    #[test]
    fn every_event_that_cannot_be_written_is_counted() {
        // /dev/full refuses every write with ENOSPC.
        let hub = Hub::new(Sink::open("/dev/full").expect("/dev/full opens"))
            .expect("the writer thread starts");
        for _ in 0..3 {
            hub.publish(vec![event(), event()]);
        }
        hub.sync_log();
        assert_eq!(hub.stats.sink_errors.load(Ordering::Relaxed), 6);
        assert_eq!(hub.stats.log_written_bytes.load(Ordering::Relaxed), 0);
    }
}
