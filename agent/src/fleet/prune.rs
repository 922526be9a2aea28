//! The fleet's daily partitions, and dropping the old ones (`bulkhead
//! fleet prune`). Plain `MergeTree` on the oldest supported release has
//! no TTL, so retention is this: whole days, dropped by partition, which
//! costs the server nothing like a `DELETE` would.

use std::time::Duration;

use super::{client::Client, error::ClientError, schema::Table, sql::literal, time};

/// One day of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub table: Table,
    /// ClickHouse's partition id: the day as `YYYYMMDD`.
    pub id: String,
    /// The day, `YYYY-MM-DD`.
    pub day: String,
    pub rows: u64,
    pub bytes: u64,
}

/// What a prune did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Partitions of days before this one were dropped (`YYYY-MM-DD`).
    pub cutoff: String,
    pub dropped: Vec<Partition>,
    /// The partitions left.
    pub kept: Vec<Partition>,
}

/// The active partitions of the fleet's tables, by table and day.
///
/// # Errors
/// The server's.
pub async fn partitions(client: &Client) -> Result<Vec<Partition>, ClientError> {
    let text = client
        .query(&format!(
            "SELECT table, partition_id, sum(rows), sum(bytes_on_disk) FROM system.parts \
             WHERE database = {} AND active GROUP BY table, partition_id \
             ORDER BY table, partition_id FORMAT TabSeparated",
            literal(client.database())
        ))
        .await?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// One line of the partitions' query; None for another program's table
/// in the database, or a partition that is not a day.
fn parse_line(line: &str) -> Option<Partition> {
    let mut fields = line.split('\t');
    let table = Table::from_name(fields.next()?)?;
    let id = fields.next()?;
    let day = time::partition_day(id)?;
    Some(Partition {
        table,
        id: id.to_string(),
        day,
        rows: fields.next()?.parse().ok()?,
        bytes: fields.next()?.parse().ok()?,
    })
}

/// The first day kept when dropping what is older than `older_than` at
/// `now`: the day of `now - older_than`. A partition of that day may hold
/// rows newer than the cutoff itself, so only days before it go.
#[must_use]
pub fn cutoff_day(now: u32, older_than: Duration) -> String {
    let back = u32::try_from(older_than.as_secs()).unwrap_or(u32::MAX);
    time::day(now.saturating_sub(back))
}

/// Drops every partition of the fleet's tables dated before
/// [`cutoff_day`]`(now, older_than)`.
///
/// # Errors
/// The server's; partitions dropped before it are in no report, but
/// running it again drops the rest.
pub async fn prune(
    client: &Client,
    older_than: Duration,
    now: u32,
) -> Result<PruneReport, ClientError> {
    let cutoff = cutoff_day(now, older_than);
    let (dropped, kept): (Vec<Partition>, Vec<Partition>) = partitions(client)
        .await?
        .into_iter()
        .partition(|p| p.day < cutoff);
    for p in &dropped {
        client
            .query(&format!(
                "ALTER TABLE {}.{} DROP PARTITION {}",
                client.database(),
                p.table.name(),
                literal(&p.day)
            ))
            .await?;
    }
    Ok(PruneReport {
        cutoff,
        dropped,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_other_tables_or_partitions_are_left_out() {
        assert_eq!(
            parse_line("flows\t20261024\t12\t3456"),
            Some(Partition {
                table: Table::Flows,
                id: "20261024".to_string(),
                day: "2026-10-24".to_string(),
                rows: 12,
                bytes: 3456,
            })
        );
        assert_eq!(parse_line("mine\t20261024\t1\t1"), None);
        assert_eq!(parse_line("flows\tall\t1\t1"), None);
    }

    #[test]
    fn the_cutoff_is_a_day() {
        // 2026-12-03T06:00:00Z.
        let now = 1_796_277_600;
        let day = Duration::from_secs(86_400);
        assert_eq!(cutoff_day(now, day * 30), "2026-11-03");
        assert_eq!(cutoff_day(now, Duration::from_secs(3600)), "2026-12-03");
        assert_eq!(cutoff_day(now, day * 100_000), "1970-01-01");
    }
}
