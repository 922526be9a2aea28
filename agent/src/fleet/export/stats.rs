//! What the fleet exporter did, for the metrics: rows by table and result
//! (`bulkhead_fleet_rows_total{table,result}`), and the spool it fills.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
};

use crate::spool::SpoolStats;

/// What became of rows: `sent` (stored in ClickHouse), `refused` (the
/// server refused the batch's content three times: dropped, logged),
/// `dropped_full`, `dropped_disk_error`, ... (the spool's reasons).
#[derive(Debug, Default)]
pub struct FleetStats {
    rows: Mutex<BTreeMap<(String, String), u64>>,
    spool: OnceLock<Arc<SpoolStats>>,
}

impl FleetStats {
    pub fn add(&self, table: &str, result: &str, rows: u64) {
        if rows == 0 {
            return;
        }
        let mut m = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((table.to_string(), result.to_string()))
            .or_default() += rows;
    }

    /// (table, result, rows), sorted.
    pub fn rows(&self) -> Vec<(String, String, u64)> {
        let m = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter()
            .map(|((t, r), n)| (t.clone(), r.clone(), *n))
            .collect()
    }

    pub fn set_spool(&self, spool: Arc<SpoolStats>) {
        let _ = self.spool.set(spool);
    }

    pub fn spool(&self) -> Option<&Arc<SpoolStats>> {
        self.spool.get()
    }
}
