//! The event pipeline's counters, exported as metrics: the hub, the reader
//! and the decision log writer count into them.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use super::model::{Direction, EventType};

/// Counters of the pipeline, exported as metrics.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events by type: verdict, tcp_established, tcp_closed, policy_change,
    /// anomaly, flow.
    pub received: [AtomicU64; 6],
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
        self.suppressed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((service, direction), n)| (Arc::clone(service), *direction, *n))
            .collect()
    }
}
