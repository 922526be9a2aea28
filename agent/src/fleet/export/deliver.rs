//! Sending the spool's batches to ClickHouse, oldest first. A batch made
//! in this run goes in whole on its first attempt; any other (a retry, or
//! one found in the spool at start, whose earlier attempt may have been
//! stored) goes through `Client::insert_once`, which stores only its rows
//! not stored yet. A batch leaves the spool only once stored, or once the
//! server refused it for good.

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

/// ClickHouse's codes for a missing database or table: `fleet init` has
/// not run; the batches wait for it.
const UNKNOWN_TABLE: u32 = 60;
const UNKNOWN_DATABASE: u32 = 81;
/// Attempts a batch the server refuses (its data, not the connection or
/// the setup) gets before it is set aside, so that one bad batch cannot
/// hold up every later one.
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

/// Errors that say the setup is wrong or the server is away: wait.
fn must_wait(e: &ClientError) -> bool {
    e.is_retryable()
        || e.is_auth_refused()
        || matches!(e.code(), Some(UNKNOWN_TABLE | UNKNOWN_DATABASE))
}

impl Delivery {
    /// Sends what the spool holds, oldest first, until it is empty or the
    /// server stalls. The spool's calls may touch the disk: this runs on
    /// the exporter's own thread.
    pub async fn pass(&mut self, client: &Client, spool: &Spool, stats: &FleetStats) -> Pass {
        while let Some(batch) = spool.oldest() {
            let Some(table) = Table::from_name(&batch.table) else {
                self.set_aside(spool, stats, &batch, "an unknown table");
                continue;
            };
            let encoded = match EncodedBatch::from_parts(table, &batch.batch_id, batch.body.clone())
            {
                Ok(e) => e,
                Err(e) => {
                    self.set_aside(spool, stats, &batch, &e.to_string());
                    continue;
                }
            };
            let first = self
                .fresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&batch.batch_id);
            let result = if first {
                client.insert_batch(&encoded).await.map(|()| batch.rows)
            } else {
                client.insert_once(&encoded).await.map(|o| o.inserted)
            };
            match result {
                Ok(stored) => {
                    spool.ack(&batch.batch_id);
                    self.refusals.remove(&batch.batch_id);
                    stats.add(&batch.table, "sent", u64::from(stored));
                    if self.failing.take().is_some() {
                        info!(url = %client.url(), "fleet export: ClickHouse takes rows again");
                    }
                }
                Err(e) if must_wait(&e) => {
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
                        self.set_aside(spool, stats, &batch, &e.to_string());
                        continue;
                    }
                    return Pass::Stalled;
                }
            }
        }
        Pass::Drained
    }

    fn set_aside(&mut self, spool: &Spool, stats: &FleetStats, batch: &Batch, why: &str) {
        warn!(
            table = %batch.table,
            batch = %batch.batch_id,
            rows = batch.rows,
            "fleet export: ClickHouse refused a batch for good ({why}); its rows are counted as refused"
        );
        spool.ack(&batch.batch_id);
        stats.add(&batch.table, "refused", u64::from(batch.rows));
    }
}
