//! What the exporter sent and dropped, for the metrics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct ExportStats {
    /// Records the collector accepted.
    pub sent: AtomicU64,
    /// Dropped because the queue was full (the collector slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped after the last retry failed.
    pub dropped_retries: AtomicU64,
    /// Dropped because the collector refused them for good (4xx).
    pub dropped_rejected: AtomicU64,
    /// Requests that failed (each retry counts).
    pub failed_requests: AtomicU64,
}

impl ExportStats {
    #[must_use]
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    pub fn add(v: &AtomicU64, n: usize) {
        v.fetch_add(n as u64, Ordering::Relaxed);
    }

    #[must_use]
    pub fn dropped(&self) -> u64 {
        Self::get(&self.dropped_queue_full)
            + Self::get(&self.dropped_retries)
            + Self::get(&self.dropped_rejected)
    }
}
