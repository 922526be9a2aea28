//! Where decoded events go: the decision log, the taps (graph, detectors),
//! live subscribers and a short history. Every event that cannot be
//! delivered somewhere is counted.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::broadcast;

use super::{
    model::{Direction, FlowEvent},
    sink::Sink,
    writer::LogWriter,
    EventType,
};

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
    /// Batches queued for the decision log writer, not yet taken.
    pub log_queued: AtomicU64,
    /// Bytes written to the decision log.
    pub log_written_bytes: AtomicU64,
    /// Events a slow live subscriber missed.
    pub subscriber_lagged: AtomicU64,
    /// Records a previous agent's programs dropped while no agent read
    /// their ring buffer (counted at take-over).
    pub lost_while_down: AtomicU64,
    /// Records left in a previous agent's ring buffer when the take-over's
    /// drain stopped at its bound (`takeover::DRAIN_TIME`/`DRAIN_RECORDS`).
    pub lost_takeover_drain: AtomicU64,
    /// False once the ring buffer consumer has stopped.
    pub consumer_alive: AtomicBool,
    /// Denial events the kernel's rate limit suppressed, by service and
    /// direction: the sum of the `suppressed` the logged events carry.
    pub suppressed: Mutex<BTreeMap<(Arc<str>, Direction), u64>>,
}

impl EventStats {
    pub fn received(&self, kind: EventType) -> u64 {
        self.received[kind as usize].load(Ordering::Relaxed)
    }

    /// Suppressed denial events so far, by service and direction.
    pub fn suppressed(&self) -> Vec<(Arc<str>, Direction, u64)> {
        lock(&self.suppressed)
            .iter()
            .map(|((service, direction), n)| (Arc::clone(service), *direction, *n))
            .collect()
    }
}

/// Something that folds in every event, called synchronously with each
/// batch the reader publishes (the service graph, the anomaly detectors).
/// Cheaper than a channel and a task wake-up per event, and a tap never
/// falls behind: it sees exactly what the decision log gets. It must not
/// block (a lock held only briefly by others is fine).
pub trait Tap: Send + Sync {
    fn observe(&self, batch: &[Arc<FlowEvent>]);
}

pub struct Hub {
    live: broadcast::Sender<Arc<FlowEvent>>,
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
            taps: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            log: LogWriter::spawn(sink, Arc::clone(&stats))?,
            stats,
        })
    }

    /// Delivers a batch: to the decision log writer's queue (which may make
    /// this wait, see [`super::writer`]), the taps, the history and the
    /// live subscribers.
    pub fn publish(&self, batch: Vec<FlowEvent>) {
        self.publish_shared(batch.into_iter().map(Arc::new).collect());
    }

    /// [`Hub::publish`] for events already shared (the reader's batches).
    pub fn publish_shared(&self, batch: Vec<Arc<FlowEvent>>) {
        if batch.is_empty() {
            return;
        }
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
