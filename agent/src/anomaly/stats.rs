//! Counters the metrics endpoint reads: anomalies by service and kind.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

#[derive(Debug, Default)]
pub struct AnomalyStats {
    /// Anomaly events (starts and updates) by (service, kind).
    by_service: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl AnomalyStats {
    pub fn count(&self, service: &str, kind: &'static str) {
        let mut m = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *m.entry((service.to_string(), kind)).or_default() += 1;
    }

    /// `(service, kind, total)`, sorted.
    #[must_use]
    pub fn totals(&self) -> Vec<(String, &'static str, u64)> {
        let m = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        m.iter().map(|((s, k), n)| (s.clone(), *k, *n)).collect()
    }
}
