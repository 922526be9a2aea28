//! What the metrics listener counts about itself (docs/metrics.md,
//! "The listener").

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections being served now.
    pub open: AtomicU64,
    /// Connections closed at once because [`super::listener::MAX_CONNECTIONS`]
    /// were open.
    pub refused_busy: AtomicU64,
    /// Requests refused because their `Host` is not allowed (421).
    pub refused_host: AtomicU64,
    /// Times `/graph` or `/graph.json` computed the graph (the rest were
    /// served from the cache).
    pub graph_renders: AtomicU64,
}

impl HttpStats {
    pub fn bump(v: &AtomicU64) {
        v.fetch_add(1, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}
