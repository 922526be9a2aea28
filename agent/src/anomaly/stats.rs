//! Counters the metrics endpoint reads: anomalies by service, kind and
//! severity.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

/// `(service, kind, severity)`: one series of `bulkhead_anomalies_total`.
type Key = (String, &'static str, &'static str);

#[derive(Debug, Default)]
pub struct AnomalyStats {
    /// Anomaly events (starts and updates) by (service, kind, severity).
    by_service: Mutex<BTreeMap<Key, u64>>,
}

impl AnomalyStats {
    pub fn count(&self, service: &str, kind: &'static str, severity: &'static str) {
        let mut m = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *m.entry((service.to_string(), kind, severity)).or_default() += 1;
    }

    /// `(service, kind, severity, total)`, sorted.
    #[must_use]
    pub fn totals(&self) -> Vec<(String, &'static str, &'static str, u64)> {
        let m = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        m.iter()
            .map(|((s, k, sev), n)| (s.clone(), *k, *sev, *n))
            .collect()
    }
}
