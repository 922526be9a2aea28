//! What the ingested flow rows take on disk (`system.parts`, active parts
//! of `bulkhead.flows`), as written by the inserts and after ClickHouse
//! merged them into one part (`OPTIMIZE ... FINAL`, which background merges
//! approach over time), and the sizing that follows from it.

use anyhow::{ensure, Result};

use super::server::Server;

pub struct Storage {
    pub rows: u64,
    /// Bytes on disk as inserted, and after the final merge.
    pub inserted_bytes: u64,
    pub inserted_parts: u64,
    pub merged_bytes: u64,
}

impl Storage {
    pub fn bytes_per_row(&self) -> f64 {
        self.merged_bytes as f64 / self.rows.max(1) as f64
    }
    pub fn inserted_bytes_per_row(&self) -> f64 {
        self.inserted_bytes as f64 / self.rows.max(1) as f64
    }
}

const PARTS: &str = "FROM system.parts WHERE database = 'bulkhead' AND table = 'flows' AND active";

pub fn measure(server: &Server) -> Result<Storage> {
    let rows = server.number(&format!("SELECT sum(rows) {PARTS}"))?;
    ensure!(rows > 0, "bulkhead.flows has no rows to measure");
    let inserted_bytes = server.number(&format!("SELECT sum(bytes_on_disk) {PARTS}"))?;
    let inserted_parts = server.number(&format!("SELECT count() {PARTS}"))?;
    server.query("OPTIMIZE TABLE bulkhead.flows FINAL")?;
    let merged_rows = server.number(&format!("SELECT sum(rows) {PARTS}"))?;
    ensure!(
        merged_rows == rows,
        "bulkhead.flows had {rows} rows before the merge and {merged_rows} after"
    );
    let merged_bytes = server.number(&format!("SELECT sum(bytes_on_disk) {PARTS}"))?;
    Ok(Storage {
        rows,
        inserted_bytes,
        inserted_parts,
        merged_bytes,
    })
}

/// A line of the sizing table: `hosts` hosts sending `rows_per_host` flow
/// rows per second each.
pub struct Size {
    pub hosts: u64,
    pub rows_per_s: f64,
    pub rows_per_day: f64,
    pub bytes_per_day: f64,
    /// The share of the measured ingest rate of one server like this one.
    pub ingest_share: f64,
}

pub const SECONDS_PER_DAY: f64 = 86_400.0;
/// Flow rows per second a host sends in the fleet sizes below.
pub const ROWS_PER_HOST: f64 = 10.0;
pub const FLEETS: [u64; 4] = [10, 100, 1_000, 10_000];

pub fn sizes(bytes_per_row: f64, ingest_rows_per_s: f64) -> Vec<Size> {
    FLEETS
        .iter()
        .map(|&hosts| {
            let rows_per_s = hosts as f64 * ROWS_PER_HOST;
            Size {
                hosts,
                rows_per_s,
                rows_per_day: rows_per_s * SECONDS_PER_DAY,
                bytes_per_day: rows_per_s * SECONDS_PER_DAY * bytes_per_row,
                ingest_share: rows_per_s / ingest_rows_per_s.max(1e-9),
            }
        })
        .collect()
}
