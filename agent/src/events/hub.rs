//! Where decoded events go: the decision log, live subscribers and a short
//! history. Every event that cannot be delivered somewhere is counted.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::broadcast;
use tracing::warn;

use super::{model::FlowEvent, sink::Sink, EventType};

/// How many recent events `bulkhead flows` (without --follow) can show.
const RECENT: usize = 1024;
/// Live subscribers that fall further behind than this lose events
/// (counted in `subscriber_lagged`), never the decision log.
const LIVE_CAPACITY: usize = 8192;

/// Counters of the pipeline, exported as metrics.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events by type: verdict, tcp_established, tcp_closed, policy_change,
    /// anomaly.
    pub received: [AtomicU64; 5],
    /// Records the kernel sent that could not be decoded.
    pub decode_errors: AtomicU64,
    /// Events that could not be written to the decision log.
    pub sink_errors: AtomicU64,
    /// Events a slow live subscriber missed.
    pub subscriber_lagged: AtomicU64,
    /// Records a previous agent's programs dropped while no agent read
    /// their ring buffer (counted at take-over).
    pub lost_while_down: AtomicU64,
    /// False once the ring buffer consumer has stopped.
    pub consumer_alive: AtomicBool,
}

impl EventStats {
    pub fn received(&self, kind: EventType) -> u64 {
        self.received[kind as usize].load(Ordering::Relaxed)
    }
}

pub struct Hub {
    live: broadcast::Sender<Arc<FlowEvent>>,
    recent: Mutex<VecDeque<Arc<FlowEvent>>>,
    sink: Mutex<Sink>,
    pub stats: Arc<EventStats>,
}

impl Hub {
    pub fn new(sink: Sink) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Self {
            live,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            sink: Mutex::new(sink),
            stats: Arc::new(EventStats::default()),
        }
    }

    /// Delivers a batch: one lock of the sink and one flush per batch.
    pub fn publish(&self, batch: Vec<FlowEvent>) {
        if batch.is_empty() {
            return;
        }
        let batch: Vec<Arc<FlowEvent>> = batch.into_iter().map(Arc::new).collect();
        {
            let mut sink = lock(&self.sink);
            for ev in &batch {
                self.stats.received[ev.kind as usize].fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sink.write(ev) {
                    self.sink_failed(&e);
                }
            }
            if let Err(e) = sink.flush() {
                self.sink_failed(&e);
            }
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

    fn sink_failed(&self, e: &std::io::Error) {
        let n = self.stats.sink_errors.fetch_add(1, Ordering::Relaxed);
        if n == 0 || n.is_power_of_two() {
            warn!(
                "cannot write the decision log ({} failures so far): {e}",
                n + 1
            );
        }
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowEvent>> {
        self.live.subscribe()
    }

    /// The most recent events, oldest first.
    pub fn recent(&self) -> Vec<Arc<FlowEvent>> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Re-opens the decision log file (after logrotate moved it).
    pub fn reopen_sink(&self) -> std::io::Result<()> {
        lock(&self.sink).reopen()
    }
}

/// A poisoned lock only means another thread panicked while holding it;
/// the data (a queue, a file handle) is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
