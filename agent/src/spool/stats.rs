//! What the spool holds and what it dropped, for the metrics.
//!
//! The spool keeps its counts as plain data ([`SpoolCounts`]) and publishes
//! a copy into [`SpoolStats`] after every change, so a scrape reads the
//! copy under a lock of its own and never waits on the spool's disk I/O.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

/// Why a batch (or what was left of it) was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Memory and disk were both at their bound: the new batch is refused.
    Full,
    /// Its file could not be written (a full file system, an I/O error).
    DiskError,
    /// Its table name or batch id is not acceptable ([`super::Batch::check`]).
    Invalid,
    /// Its file was found damaged or unreadable and set aside (counted only
    /// when the file's header could be trusted to name table and rows).
    Corrupt,
}

impl DropReason {
    pub const ALL: [Self; 4] = [Self::Full, Self::DiskError, Self::Invalid, Self::Corrupt];

    /// The metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::DiskError => "disk_error",
            Self::Invalid => "invalid",
            Self::Corrupt => "corrupt",
        }
    }
}

/// Rows of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Gauge: rows waiting in memory.
    pub queued_rows: u64,
    /// Gauge: rows waiting on disk.
    pub spooled_rows: u64,
    /// Counter: rows acknowledged as delivered.
    pub delivered_rows: u64,
    /// Counters: rows dropped, by reason (a reason never seen is absent).
    pub dropped_rows: BTreeMap<DropReason, u64>,
}

impl TableCounts {
    /// Rows dropped for `reason` (0 when none).
    #[must_use]
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped_rows.get(&reason).copied().unwrap_or(0)
    }
}

/// The spool's state and history since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolCounts {
    /// Gauge: batches waiting in memory.
    pub memory_batches: u64,
    /// Gauge: rows waiting in memory (what the memory bound counts).
    pub memory_rows: u64,
    /// Gauge: batch files waiting on disk.
    pub disk_files: u64,
    /// Gauge: their bytes (what the disk bound counts).
    pub disk_bytes: u64,
    /// Counter: damaged or unreadable batch files given up on (moved to
    /// `set-aside/` when they could be moved; counted whether or not their
    /// rows could be).
    pub set_aside_files: u64,
    /// Per table, by name.
    pub tables: BTreeMap<String, TableCounts>,
}

impl SpoolCounts {
    /// The counts of `table`, created at zero.
    pub fn table(&mut self, table: &str) -> &mut TableCounts {
        self.tables.entry(table.to_string()).or_default()
    }

    pub fn drop_rows(&mut self, table: &str, rows: u32, reason: DropReason) {
        *self.table(table).dropped_rows.entry(reason).or_default() += u64::from(rows);
    }
}

/// The published copy: what the metrics module reads.
#[derive(Debug, Default)]
pub struct SpoolStats {
    latest: Mutex<SpoolCounts>,
}

impl SpoolStats {
    /// A copy of the counts as of the spool's last change.
    #[must_use]
    pub fn snapshot(&self) -> SpoolCounts {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn publish(&self, counts: &SpoolCounts) {
        counts.clone_into(&mut self.latest.lock().unwrap_or_else(PoisonError::into_inner));
    }
}
