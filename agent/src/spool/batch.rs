//! One batch of rows for one table: what the spool holds and hands back.

use bytes::Bytes;

/// Longest table name accepted (it is a metric label and a log field).
pub const MAX_TABLE_BYTES: usize = 128;
/// Longest batch id accepted.
pub const MAX_ID_BYTES: usize = 256;

/// Rows for one table, as the exporter will insert them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The table the rows go to (`[A-Za-z0-9_.]`, at most
    /// [`MAX_TABLE_BYTES`]).
    pub table: String,
    /// Unique per batch and stable across retries and restarts (for
    /// example host id, sequence number and start time), so that a batch
    /// delivered twice is stored once; at most [`MAX_ID_BYTES`], no control
    /// characters. [`super::Spool::ack`] names the batch by it.
    pub batch_id: String,
    /// Rows in `body`: what the memory bound and the counters count.
    pub rows: u32,
    /// The rows, one JSON object per line (`JSONEachRow`).
    pub body: Bytes,
}

impl Batch {
    /// Why this batch cannot be spooled, if it cannot.
    ///
    /// # Errors
    /// A table name or batch id that is empty, too long or holds characters
    /// outside what is allowed.
    pub fn check(&self) -> Result<(), String> {
        check_table(&self.table)?;
        let id = &self.batch_id;
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(format!(
                "batch id of {} bytes (1 to {MAX_ID_BYTES} allowed)",
                id.len()
            ));
        }
        if id.chars().any(char::is_control) {
            return Err(format!("batch id {id:?} holds control characters"));
        }
        Ok(())
    }
}

/// Whether `table` is an acceptable table name.
///
/// # Errors
/// Empty, too long, or characters outside `[A-Za-z0-9_.]`.
pub fn check_table(table: &str) -> Result<(), String> {
    if table.is_empty() || table.len() > MAX_TABLE_BYTES {
        return Err(format!(
            "table name of {} bytes (1 to {MAX_TABLE_BYTES} allowed)",
            table.len()
        ));
    }
    if !table
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(format!(
            "table name {table:?} holds characters outside [A-Za-z0-9_.]"
        ));
    }
    Ok(())
}
