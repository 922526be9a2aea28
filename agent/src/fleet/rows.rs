//! One struct per fleet table, field for field (`schema.rs` has the
//! columns), and batches of rows encoded for one insert.
//!
//! Times are `DateTime` seconds (`fleet::time`). Three columns are the
//! batch's, not the caller's: [`EncodedBatch::encode`] sets `batch_id`,
//! `row` (the row's index in the batch) and `date` (the UTC day of the
//! row's time, its partition), so that they cannot disagree with the
//! batch. Reading rows back (`select`) gives the same structs.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize};

use super::{schema::Table, sql::literal, time};

/// The most rows in one batch. ClickHouse writes an insert of up to
/// `max_insert_block_size` rows (1,048,576 by default) as one block, so a
/// batch below it is stored whole or not at all in each of its partitions.
pub const MAX_BATCH_ROWS: usize = 100_000;
/// The longest batch id.
pub const MAX_BATCH_ID: usize = 128;

/// A row of one of the fleet's tables.
pub trait Row: Serialize + DeserializeOwned {
    /// Its table.
    const TABLE: Table;
    /// The time whose UTC day is the row's `date`.
    fn time(&self) -> u32;
    /// Sets the columns the batch owns.
    fn stamp(&mut self, batch_id: &str, row: u32);
}

/// A flow summary: one service's calls to one peer over an interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    pub host: String,
    pub host_id: String,
    pub service: String,
    /// `egress` or `ingress`.
    pub direction: String,
    /// `tcp`, `udp`, ...
    pub protocol: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// `allow`, `deny`, `audit`, ...
    pub verdict: String,
    /// The rule that decided (the decision log's `rule`), "" when none.
    pub rule: String,
    #[serde(deserialize_with = "u64_or_text")]
    pub calls: u64,
    #[serde(deserialize_with = "u64_or_text")]
    pub bytes_sent: u64,
    #[serde(deserialize_with = "u64_or_text")]
    pub bytes_received: u64,
    pub first_seen: u32,
    pub last_seen: u32,
    /// Set by the batch: the UTC day of `last_seen`.
    pub date: String,
    pub batch_id: String,
    pub row: u32,
    /// The DNS name the service looked up that gave `remote_addr` (the
    /// decision log's `dst_name`), "" when none. Left out of a row without
    /// one, and last in the table, so that rows without a name still go
    /// into a table made before the column (`fleet init` adds it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_name: String,
}

/// An address or a listener of a host, and the service that owns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub host: String,
    pub host_id: String,
    pub service: String,
    /// `address` (one of the host's addresses; port 0) or `listener`.
    pub kind: String,
    pub protocol: String,
    pub addr: String,
    pub port: u16,
    pub first_seen: u32,
    pub last_seen: u32,
    /// Set by the batch: the UTC day of `last_seen`.
    pub date: String,
    pub batch_id: String,
    pub row: u32,
}

/// One service's policy as applied on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRow {
    pub host: String,
    pub host_id: String,
    pub service: String,
    /// `enforce` or `audit`.
    pub mode: String,
    /// The policy file.
    pub file: String,
    /// Its SHA-256, hex.
    pub file_sha256: String,
    /// The rules, as JSON.
    pub rules: String,
    pub applied_at: u32,
    /// Set by the batch: the UTC day of `applied_at`.
    pub date: String,
    pub batch_id: String,
    pub row: u32,
}

/// An anomaly event (docs/anomaly.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyRow {
    pub host: String,
    pub host_id: String,
    pub service: String,
    pub kind: String,
    pub severity: String,
    /// The evidence, as JSON.
    pub detail: String,
    pub at: u32,
    /// Set by the batch: the UTC day of `at`.
    pub date: String,
    pub batch_id: String,
    pub row: u32,
}

macro_rules! row {
    ($ty:ty, $table:expr, $time:ident) => {
        impl Row for $ty {
            const TABLE: Table = $table;
            fn time(&self) -> u32 {
                self.$time
            }
            fn stamp(&mut self, batch_id: &str, row: u32) {
                self.date = time::day(self.$time);
                self.batch_id = batch_id.to_string();
                self.row = row;
            }
        }
    };
}

row!(FlowRow, Table::Flows, last_seen);
row!(EndpointRow, Table::Endpoints, last_seen);
row!(PolicyRow, Table::Policies, applied_at);
row!(AnomalyRow, Table::Anomalies, at);

/// ClickHouse 18.16 writes `UInt64` in JSON as a string
/// (`output_format_json_quote_64bit_integers`), later releases as a
/// number: take either.
fn u64_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Number(n) => Ok(n),
        Either::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// `SELECT` of every column of `R`'s table in `database`, `DateTime`
/// columns as seconds, rows matching `filter` (SQL, "1" for all), sorted
/// by batch and row, as `JSONEachRow`; [`parse_rows`] reads the answer.
#[must_use]
pub fn select<R: Row>(database: &str, filter: &str) -> String {
    let schema = R::TABLE.schema();
    let columns: Vec<String> = schema
        .columns
        .iter()
        .map(|(name, ty)| match *ty {
            // Qualified, so that the alias does not shadow the column.
            "DateTime" => format!("toUInt32(t.{name}) AS {name}"),
            _ => format!("t.{name} AS {name}"),
        })
        .collect();
    format!(
        "SELECT {} FROM {database}.{} AS t WHERE {filter} ORDER BY t.batch_id, t.row FORMAT JSONEachRow",
        columns.join(", "),
        schema.name
    )
}

/// The rows of a [`select`] answer.
///
/// # Errors
/// A line that is not such a row.
pub fn parse_rows<R: Row>(text: &str) -> Result<Vec<R>, serde_json::Error> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

/// Why rows do not make a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch id {0:?}: must be 1 to 128 letters, digits, '-', '_', '.' or ':'")]
    BadId(String),
    #[error("a batch holds 1 to {MAX_BATCH_ROWS} rows, not {0}")]
    Size(usize),
    #[error("row {row}: {source}")]
    Encode {
        row: usize,
        source: serde_json::Error,
    },
    /// A stored batch ([`EncodedBatch::from_parts`]) that is not one.
    #[error("batch {id} of {table}, line {line}: {problem}")]
    BadLine {
        id: String,
        table: Table,
        line: usize,
        problem: String,
    },
}

/// Rows of one table ready to insert: `JSONEachRow`, one line per row,
/// line `i` being row `i` of batch `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    table: Table,
    id: String,
    body: Bytes,
    /// Where each line starts, and the body's end.
    starts: Vec<usize>,
    /// The rows' `date`s: the partitions the batch's rows are in.
    days: BTreeSet<String>,
}

impl EncodedBatch {
    /// Stamps `rows` with `id` and their index (and their `date`), and
    /// encodes them.
    ///
    /// # Errors
    /// A bad id, no rows or more than [`MAX_BATCH_ROWS`].
    pub fn encode<R: Row>(id: &str, rows: &mut [R]) -> Result<Self, BatchError> {
        check_id(id)?;
        if rows.is_empty() || rows.len() > MAX_BATCH_ROWS {
            return Err(BatchError::Size(rows.len()));
        }
        let mut body = Vec::with_capacity(rows.len() * 256);
        let mut starts = Vec::with_capacity(rows.len() + 1);
        let mut days = BTreeSet::new();
        for (i, row) in rows.iter_mut().enumerate() {
            let index = u32::try_from(i).map_err(|_| BatchError::Size(i))?;
            row.stamp(id, index);
            days.insert(time::day(row.time()));
            starts.push(body.len());
            serde_json::to_writer(&mut body, row)
                .map_err(|source| BatchError::Encode { row: i, source })?;
            body.push(b'\n');
        }
        starts.push(body.len());
        Ok(Self {
            table: R::TABLE,
            id: id.to_string(),
            body: Bytes::from(body),
            starts,
            days,
        })
    }

    /// A batch kept as its table, id and body (a spool stores those three)
    /// back as a batch: every line must be a row of `id` at its index.
    ///
    /// # Errors
    /// A bad id, or a line that is not the row it should be.
    pub fn from_parts(table: Table, id: &str, body: Bytes) -> Result<Self, BatchError> {
        check_id(id)?;
        #[derive(Deserialize)]
        struct Stamp {
            batch_id: String,
            row: u32,
            date: String,
        }
        let bad = |line: usize, problem: String| BatchError::BadLine {
            id: id.to_string(),
            table,
            line,
            problem,
        };
        let mut starts = Vec::new();
        let mut days = BTreeSet::new();
        let mut at = 0;
        while at < body.len() {
            let line = starts.len();
            let end = body[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|n| at + n)
                .ok_or_else(|| bad(line, "no newline at the end".to_string()))?;
            let stamp: Stamp =
                serde_json::from_slice(&body[at..end]).map_err(|e| bad(line, e.to_string()))?;
            if stamp.batch_id != id || usize::try_from(stamp.row).ok() != Some(line) {
                return Err(bad(
                    line,
                    format!("is row {} of batch {:?}", stamp.row, stamp.batch_id),
                ));
            }
            days.insert(stamp.date);
            starts.push(at);
            at = end + 1;
        }
        if starts.is_empty() || starts.len() > MAX_BATCH_ROWS {
            return Err(BatchError::Size(starts.len()));
        }
        starts.push(body.len());
        Ok(Self {
            table,
            id: id.to_string(),
            body,
            starts,
            days,
        })
    }

    #[must_use]
    pub fn table(&self) -> Table {
        self.table
    }

    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `JSONEachRow` body.
    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// How many rows.
    #[must_use]
    pub fn rows(&self) -> u32 {
        u32::try_from(self.starts.len() - 1).unwrap_or(u32::MAX)
    }

    /// The `date`s of its rows.
    #[must_use]
    pub fn days(&self) -> &BTreeSet<String> {
        &self.days
    }

    /// The lines of the rows whose index `keep` accepts, in order.
    #[must_use]
    pub fn only(&self, keep: impl Fn(u32) -> bool) -> Bytes {
        let mut out = Vec::new();
        for (i, pair) in self.starts.windows(2).enumerate() {
            if u32::try_from(i).is_ok_and(&keep) {
                out.extend_from_slice(&self.body[pair[0]..pair[1]]);
            }
        }
        Bytes::from(out)
    }

    /// `SELECT row` of the rows of this batch already stored, looking only
    /// in its partitions.
    #[must_use]
    pub fn stored_rows_sql(&self, database: &str) -> String {
        let days: Vec<String> = self.days.iter().map(|d| literal(d)).collect();
        format!(
            "SELECT row FROM {database}.{} WHERE date IN ({}) AND batch_id = {} FORMAT TabSeparated",
            self.table.name(),
            days.join(", "),
            literal(&self.id)
        )
    }
}

/// A batch id unique across the fleet and across the agent's restarts:
/// the host id (at most `config::MAX_HOST_ID` characters), the run (a
/// random number drawn at each start, [`run_id`]: not a time, which two
/// runs or two cloned hosts can share) and the batch's number in the run.
#[must_use]
pub fn batch_id(host_id: &str, run: u64, seq: u64) -> String {
    format!("{host_id}-{run}-{seq}")
}

/// A run id: 64 random bits from the kernel (`getrandom`). Two runs (or
/// two hosts cloned with one machine id) drawing the same one is a chance
/// of 2^-64; a retry then skipping another batch's rows would need the
/// same sequence number too.
///
/// # Errors
/// The kernel's random source failed.
pub fn run_id() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: a buffer of the length given; flags 0 blocks only until the
    // pool is initialised (at boot).
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
}

fn check_id(id: &str) -> Result<(), BatchError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_BATCH_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(BatchError::BadId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(last_seen: u32) -> FlowRow {
        FlowRow {
            host: "h1".into(),
            host_id: "0123".into(),
            service: "web".into(),
            direction: "egress".into(),
            protocol: "tcp".into(),
            local_addr: "198.51.100.1".into(),
            local_port: 40000,
            remote_addr: "198.51.100.2".into(),
            remote_port: 8080,
            verdict: "allow".into(),
            rule: "web.toml:3".into(),
            calls: u64::MAX,
            bytes_sent: 10,
            bytes_received: 20,
            first_seen: last_seen - 5,
            last_seen,
            ..FlowRow::default()
        }
    }

    /// The JSON keys of a row, in order.
    fn keys<R: Row>(row: &R) -> Vec<String> {
        let text = serde_json::to_string(row).expect("encode");
        let value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).expect("an object");
        value.keys().cloned().collect()
    }

    /// Each struct writes exactly its table's columns (serde_json keeps
    /// the struct's order only with `preserve_order`, so compare as sets),
    /// but for the columns added later, left out when empty.
    #[test]
    fn every_row_has_exactly_its_tables_columns() {
        fn check<R: Row + Default>() {
            let mut got = keys(&R::default());
            got.sort();
            let schema = R::TABLE.schema();
            let mut want: Vec<String> = schema
                .columns
                .iter()
                .filter(|(n, _)| !schema.added.contains(n))
                .map(|(n, _)| (*n).to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "{}", R::TABLE);
        }
        check::<FlowRow>();
        check::<EndpointRow>();
        check::<PolicyRow>();
        check::<AnomalyRow>();
    }

    #[test]
    fn a_flows_dns_name_is_written_only_when_it_has_one() {
        let named = FlowRow {
            dst_name: "api.example.test".into(),
            ..flow(1_796_342_399)
        };
        assert!(keys(&named).contains(&"dst_name".to_string()));
        assert!(!keys(&flow(1_796_342_399)).contains(&"dst_name".to_string()));
        let mut rows = vec![named.clone()];
        let batch = EncodedBatch::encode("h1-6", &mut rows).expect("batch");
        let text = std::str::from_utf8(batch.body()).expect("utf-8");
        assert!(text.contains("\"dst_name\":\"api.example.test\""), "{text}");
        let back: FlowRow = serde_json::from_str(text.trim_end()).expect("decode");
        assert_eq!(back, rows[0]);
        // A row stored before the column reads back without a name.
        let mut old: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        old.as_object_mut().expect("an object").remove("dst_name");
        let back: FlowRow = serde_json::from_value(old).expect("decode");
        assert_eq!(back.dst_name, "");
    }

    #[test]
    fn a_batch_stamps_its_rows_one_line_each() {
        // 2026-12-03T23:59:59Z and one second later: two days.
        let mut rows = vec![flow(1_796_342_399), flow(1_796_342_400)];
        let batch = EncodedBatch::encode("h1-7", &mut rows).expect("batch");
        assert_eq!(batch.table(), Table::Flows);
        assert_eq!(batch.rows(), 2);
        assert_eq!(rows[1].row, 1);
        assert_eq!(rows[1].batch_id, "h1-7");
        assert_eq!(rows[0].date, "2026-12-03");
        assert_eq!(rows[1].date, "2026-12-04");
        assert_eq!(
            batch.days().iter().map(String::as_str).collect::<Vec<_>>(),
            ["2026-12-03", "2026-12-04"]
        );
        let text = std::str::from_utf8(batch.body()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("\"calls\":18446744073709551615"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("\"last_seen\":1796342399"),
            "{}",
            lines[0]
        );
        let back: FlowRow = serde_json::from_str(lines[1]).expect("decode");
        assert_eq!(back, rows[1]);
        // Only the second row.
        assert_eq!(
            &batch.only(|i| i == 1)[..],
            format!("{}\n", lines[1]).as_bytes()
        );
        assert_eq!(
            batch.stored_rows_sql("bulkhead"),
            "SELECT row FROM bulkhead.flows WHERE date IN ('2026-12-03', '2026-12-04') \
             AND batch_id = 'h1-7' FORMAT TabSeparated"
        );
    }

    #[test]
    fn a_stored_batch_reads_back_and_a_foreign_one_is_refused() {
        let mut rows = vec![flow(1_796_342_399), flow(1_796_342_300)];
        let batch = EncodedBatch::encode("h1-8", &mut rows).expect("batch");
        let again =
            EncodedBatch::from_parts(Table::Flows, "h1-8", batch.body().clone()).expect("same");
        assert_eq!(again, batch);
        let err = EncodedBatch::from_parts(Table::Flows, "h1-9", batch.body().clone())
            .expect_err("another id");
        assert_eq!(
            err.to_string(),
            "batch h1-9 of flows, line 0: is row 0 of batch \"h1-8\""
        );
        let cut = batch.body().slice(..batch.body().len() - 1);
        assert!(EncodedBatch::from_parts(Table::Flows, "h1-8", cut).is_err());
    }

    #[test]
    fn batch_ids_fit_with_the_longest_host_id() {
        let longest = batch_id(
            &"f".repeat(crate::fleet::config::MAX_HOST_ID),
            u64::MAX,
            u64::MAX,
        );
        assert!(check_id(&longest).is_ok(), "{longest}");
        assert_eq!(
            batch_id("0123abcd", 1_796_277_600_000_000_000, 7),
            "0123abcd-1796277600000000000-7"
        );
    }

    #[test]
    fn bad_ids_and_sizes_are_refused() {
        let mut rows = vec![flow(100)];
        for id in ["", "a b", "x'y", &"a".repeat(129)] {
            assert!(EncodedBatch::encode(id, &mut rows).is_err(), "{id:?}");
        }
        let mut none: Vec<FlowRow> = Vec::new();
        assert!(matches!(
            EncodedBatch::encode("a", &mut none),
            Err(BatchError::Size(0))
        ));
    }

    #[test]
    fn quoted_64_bit_numbers_read_back() {
        let line = serde_json::to_string(&flow(100))
            .expect("encode")
            .replace("\"bytes_sent\":10", "\"bytes_sent\":\"10\"");
        let row: FlowRow = serde_json::from_str(&line).expect("decode");
        assert_eq!(row.bytes_sent, 10);
    }

    #[test]
    fn selects_read_times_as_seconds() {
        let sql = select::<AnomalyRow>("bulkhead", "1");
        assert_eq!(
            sql,
            "SELECT t.host AS host, t.host_id AS host_id, t.service AS service, t.kind AS kind, \
             t.severity AS severity, t.detail AS detail, toUInt32(t.at) AS at, t.date AS date, \
             t.batch_id AS batch_id, t.row AS row FROM bulkhead.anomalies AS t WHERE 1 \
             ORDER BY t.batch_id, t.row FORMAT JSONEachRow"
        );
    }
}
