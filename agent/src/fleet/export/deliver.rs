//! Sending the spool's batches to ClickHouse, oldest first. A batch made
//! in this run goes in whole on its first attempt; any other (a retry, or
//! one found in the spool at start, whose earlier attempt may have been
//! stored) goes through `Client::insert_once`, which stores only its rows
//! not stored yet. A batch leaves the spool only once stored, or once the
//! server refused its content three times (then it is dropped, logged and
//! counted as `refused`).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tracing::{info, warn};

use super::stats::FleetStats;
use crate::{
    fleet::{Client, ClientError, EncodedBatch, Table},
    spool::{Batch, Spool},
};

/// ClickHouse's codes for data it cannot take (a batch's content, which
/// fails again however often it is sent): CANNOT_PARSE_TEXT (6),
/// CANNOT_PARSE_QUOTED_STRING (26), CANNOT_PARSE_INPUT_ASSERTION_FAILED
/// (27), CANNOT_PARSE_DATE (38), CANNOT_PARSE_DATETIME (41), TYPE_MISMATCH
/// (53), ARGUMENT_OUT_OF_BOUND (69), CANNOT_PARSE_NUMBER (72),
/// INCORRECT_DATA (117), TOO_LARGE_STRING_SIZE (131). Any other failure
/// (the server away, out of disk, read-only, the credentials, the schema)
/// is the setup's: the batches wait in the spool until it is fixed.
const CONTENT_CODES: &[u32] = &[6, 26, 27, 38, 41, 53, 69, 72, 117, 131];
/// Attempts a batch the server refuses for its content gets before it is
/// dropped, so that one bad batch cannot hold up every later one.
const REFUSALS: u32 = 3;

/// What one pass over the spool ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// The spool is empty.
    Drained,
    /// The server could not take more now: try again later.
    Stalled,
}

/// State kept between passes.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Batches made in this run, not attempted yet.
    pub fresh: Arc<Mutex<HashSet<String>>>,
    refusals: HashMap<String, u32>,
    /// The kind of the failure being reported, so that it is logged once
    /// (and its end once).
    failing: Option<String>,
}

/// Errors about the batch itself; every other one means wait.
fn refuses_content(e: &ClientError) -> bool {
    !e.is_retryable() && e.code().is_some_and(|c| CONTENT_CODES.contains(&c))
}

impl Delivery {
    /// Sends what the spool holds, oldest first, until it is empty or the
    /// server stalls. The spool's calls may touch the disk: this runs on
    /// the exporter's own thread.
    pub async fn pass(&mut self, client: &Client, spool: &Spool, stats: &FleetStats) -> Pass {
        while let Some(batch) = spool.oldest() {
            let Some(table) = Table::from_name(&batch.table) else {
                self.drop_refused(spool, stats, &batch, "an unknown table");
                continue;
            };
            let encoded = match EncodedBatch::from_parts(table, &batch.batch_id, batch.body.clone())
            {
                Ok(e) => e,
                Err(e) => {
                    self.drop_refused(spool, stats, &batch, &e.to_string());
                    continue;
                }
            };
            let first = self
                .fresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&batch.batch_id);
            let result = if first {
                client.insert_batch(&encoded).await
            } else {
                client.insert_once(&encoded).await.map(drop)
            };
            match result {
                Ok(()) => {
                    spool.ack(&batch.batch_id);
                    self.refusals.remove(&batch.batch_id);
                    // Every row of the batch is stored now, by this attempt
                    // or by one whose answer was lost (which counted none).
                    stats.add(&batch.table, "sent", u64::from(batch.rows));
                    if self.failing.take().is_some() {
                        info!(url = %client.url(), "fleet export: ClickHouse takes rows again");
                    }
                }
                Err(e) if !refuses_content(&e) => {
                    let kind = format!("{:?}", e.code());
                    if self.failing.as_deref() != Some(kind.as_str()) {
                        warn!(error = %e, "fleet export: rows wait in the spool until ClickHouse takes them");
                        self.failing = Some(kind);
                    }
                    return Pass::Stalled;
                }
                Err(e) => {
                    let n = self.refusals.entry(batch.batch_id.clone()).or_default();
                    *n += 1;
                    if *n >= REFUSALS {
                        self.refusals.remove(&batch.batch_id);
                        self.drop_refused(spool, stats, &batch, &e.to_string());
                        continue;
                    }
                    return Pass::Stalled;
                }
            }
        }
        Pass::Drained
    }

    fn drop_refused(&mut self, spool: &Spool, stats: &FleetStats, batch: &Batch, why: &str) {
        warn!(
            table = %batch.table,
            batch = %batch.batch_id,
            rows = batch.rows,
            "fleet export: ClickHouse refused a batch's content ({why}); it is dropped, its rows counted as refused"
        );
        spool.ack(&batch.batch_id);
        stats.add(&batch.table, "refused", u64::from(batch.rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, code: Option<u32>) -> ClientError {
        ClientError::Server {
            url: "http://127.0.0.1:8123/".to_string(),
            status,
            code,
            message: String::new(),
        }
    }

    #[test]
    fn only_the_batchs_own_content_drops_it() {
        // Parse errors and bad data: the batch is at fault.
        assert!(refuses_content(&server(400, Some(27))));
        assert!(refuses_content(&server(500, Some(117))));
        // The setup's or the server's: out of disk, read-only, a missing
        // table, the credentials, a proxy's 413 or 500 without a code.
        for (status, code) in [
            (500, Some(243)),
            (500, Some(242)),
            (500, Some(164)),
            (404, Some(60)),
            (404, Some(81)),
            (401, Some(193)),
            (413, None),
            (500, None),
            (503, None),
        ] {
            assert!(!refuses_content(&server(status, code)), "{status} {code:?}");
        }
    }

    #[test]
    fn two_runs_draw_different_ids() {
        let (a, b) = (
            crate::fleet::rows::run_id().expect("getrandom"),
            crate::fleet::rows::run_id().expect("getrandom"),
        );
        assert_ne!(a, b);
    }
}
