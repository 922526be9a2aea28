//! The fleet exporter's metrics (crate::fleet::export).

use std::fmt;

use prometheus_client::{encoding::DescriptorEncoder, metrics::gauge::ConstGauge};

use super::{counters, one};
use crate::fleet::export::FleetStats;

pub fn encode(enc: &mut DescriptorEncoder, stats: &FleetStats) -> fmt::Result {
    let mut series: Vec<(String, String, u64)> = stats.rows();
    let spool = stats.spool().map(|s| s.snapshot());
    if let Some(s) = &spool {
        for (table, t) in &s.tables {
            for (reason, n) in &t.dropped_rows {
                series.push((table.clone(), format!("dropped_{}", reason.as_str()), *n));
            }
        }
    }
    series.sort();
    counters(
        enc,
        "bulkhead_fleet_rows",
        "Rows for the fleet's ClickHouse, by table and result: sent (stored), refused (the server refused the batch's content three times: dropped, logged), lost (events the exporter fell behind on, under flows), dropped_full (past the memory and spool bounds), dropped_disk_error, dropped_corrupt, dropped_invalid.",
        series
            .iter()
            .map(|(t, r, n)| ([("table", t.as_str()), ("result", r.as_str())], *n)),
    )?;
    let (files, bytes, memory_rows) =
        spool.map_or((0, 0, 0), |s| (s.disk_files, s.disk_bytes, s.memory_rows));
    one(
        enc,
        "bulkhead_fleet_spool_bytes",
        "Bytes of batches waiting in the on-disk spool ([fleet] spool_bytes at most).",
        None,
        &ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX)),
    )?;
    one(
        enc,
        "bulkhead_fleet_spool_files",
        "Batches waiting in the on-disk spool.",
        None,
        &ConstGauge::new(i64::try_from(files).unwrap_or(i64::MAX)),
    )?;
    one(
        enc,
        "bulkhead_fleet_queue_rows",
        "Rows waiting in memory ([fleet] queue_rows at most; past it they go to the spool).",
        None,
        &ConstGauge::new(i64::try_from(memory_rows).unwrap_or(i64::MAX)),
    )
}
