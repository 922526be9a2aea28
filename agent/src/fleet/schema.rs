//! The fleet's tables (docs/fleet.md, "Schema"), their `CREATE`
//! statements, and `fleet init`.
//!
//! The SQL keeps to what ClickHouse 18.16 (Debian's package) has and
//! later releases kept: plain `MergeTree`, no TTL, `DateTime` (seconds, no
//! time zone) and `Date`, `String` for addresses and enumerations (no
//! `IPv4`/`IPv6`/`LowCardinality`/`Enum`). Tested on 18.16.1
//! (tests/tests/fleet.rs). Every table is partitioned by
//! day (`PARTITION BY date`, so `fleet prune` drops whole days) and
//! carries `batch_id` and `row`, which make a retried insert idempotent
//! (`Client::insert_once`).

use std::{collections::BTreeMap, fmt};

use super::{client::Client, error::ClientError, sql::literal};

/// One of the fleet's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Flow summaries: what each service did, per interval.
    Flows,
    /// Each host's addresses and listeners, and the service owning them.
    Endpoints,
    /// Policy snapshots, one per service on every applied change.
    Policies,
    /// Anomaly events.
    Anomalies,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Flows,
        Table::Endpoints,
        Table::Policies,
        Table::Anomalies,
    ];

    /// The table's name in its database.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.schema().name
    }

    /// The table by its name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    #[must_use]
    pub fn schema(self) -> &'static TableSchema {
        match self {
            Table::Flows => &FLOWS,
            Table::Endpoints => &ENDPOINTS,
            Table::Policies => &POLICIES,
            Table::Anomalies => &ANOMALIES,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A table's definition.
#[derive(Debug)]
pub struct TableSchema {
    pub name: &'static str,
    /// Name and ClickHouse type, in order (as `system.columns` gives them).
    pub columns: &'static [(&'static str, &'static str)],
    /// The `DateTime` column whose UTC day is the row's `date`.
    pub time_column: &'static str,
    /// The sorting key: the columns the fleet queries filter on first.
    pub order_by: &'static [&'static str],
    /// Columns a later release added (`String`, default ''): `fleet init`
    /// adds them to a table made before, which rows without them keep
    /// fitting.
    pub added: &'static [&'static str],
}

/// The day of the row (UTC), its partition.
const DATE: (&str, &str) = ("date", "Date");
/// Which insert the row came in, and its place in it.
const BATCH_ID: (&str, &str) = ("batch_id", "String");
const ROW: (&str, &str) = ("row", "UInt32");

/// Blast-radius queries start from a service ("what did web reach?"), then
/// a host; the destination next groups a service's edges together.
static FLOWS: TableSchema = TableSchema {
    name: "flows",
    columns: &[
        ("host", "String"),
        ("host_id", "String"),
        ("service", "String"),
        ("direction", "String"),
        ("protocol", "String"),
        ("local_addr", "String"),
        ("local_port", "UInt16"),
        ("remote_addr", "String"),
        ("remote_port", "UInt16"),
        ("verdict", "String"),
        ("rule", "String"),
        ("calls", "UInt64"),
        ("bytes_sent", "UInt64"),
        ("bytes_received", "UInt64"),
        ("first_seen", "DateTime"),
        ("last_seen", "DateTime"),
        DATE,
        BATCH_ID,
        ROW,
        // Added after the first release: last, where `ALTER TABLE ... ADD
        // COLUMN` puts it, so new and migrated tables agree.
        ("dst_name", "String"),
    ],
    time_column: "last_seen",
    order_by: &["service", "host", "remote_addr", "remote_port"],
    added: &["dst_name"],
};

/// Endpoints are looked up by address and port (a flow's destination ->
/// the service listening there, on whichever host had it then).
static ENDPOINTS: TableSchema = TableSchema {
    name: "endpoints",
    columns: &[
        ("host", "String"),
        ("host_id", "String"),
        ("service", "String"),
        ("kind", "String"),
        ("protocol", "String"),
        ("addr", "String"),
        ("port", "UInt16"),
        ("first_seen", "DateTime"),
        ("last_seen", "DateTime"),
        DATE,
        BATCH_ID,
        ROW,
    ],
    time_column: "last_seen",
    order_by: &["addr", "port", "service", "host"],
    added: &[],
};

/// A service's policies, newest last per host.
static POLICIES: TableSchema = TableSchema {
    name: "policies",
    columns: &[
        ("host", "String"),
        ("host_id", "String"),
        ("service", "String"),
        ("mode", "String"),
        ("file", "String"),
        ("file_sha256", "String"),
        ("rules", "String"),
        ("applied_at", "DateTime"),
        DATE,
        BATCH_ID,
        ROW,
    ],
    time_column: "applied_at",
    order_by: &["service", "host", "applied_at"],
    added: &[],
};

static ANOMALIES: TableSchema = TableSchema {
    name: "anomalies",
    columns: &[
        ("host", "String"),
        ("host_id", "String"),
        ("service", "String"),
        ("kind", "String"),
        ("severity", "String"),
        ("detail", "String"),
        ("at", "DateTime"),
        DATE,
        BATCH_ID,
        ROW,
    ],
    time_column: "at",
    order_by: &["service", "host", "at"],
    added: &[],
};

/// `CREATE DATABASE IF NOT EXISTS` (`database` is a checked identifier).
#[must_use]
pub fn create_database(database: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {database}")
}

/// `CREATE TABLE IF NOT EXISTS database.table (...)`.
#[must_use]
pub fn create_table(database: &str, table: Table) -> String {
    let schema = table.schema();
    let columns: Vec<String> = schema
        .columns
        .iter()
        .map(|(name, ty)| format!("    {name} {ty}"))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {database}.{}\n(\n{}\n)\nENGINE = MergeTree()\nPARTITION BY date\nORDER BY ({})",
        schema.name,
        columns.join(",\n"),
        schema.order_by.join(", ")
    )
}

/// `ALTER TABLE database.table ADD COLUMN column String DEFAULT ''`: a
/// column a later release added ([`TableSchema::added`]). The rows
/// already stored read it as ''. (18.16 has no `IF NOT EXISTS` here:
/// `init` adds only a column `system.columns` lacks, and takes a failure
/// as done when the column is there after it.)
#[must_use]
pub fn add_column(database: &str, table: Table, column: &str) -> String {
    format!(
        "ALTER TABLE {database}.{} ADD COLUMN {column} String DEFAULT ''",
        table.name()
    )
}

/// What `fleet init` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The server's `version()`.
    pub version: String,
    pub database: String,
    pub database_created: bool,
    /// Each table, and whether it was created (false: it was there, with
    /// the expected columns).
    pub tables: Vec<(Table, bool)>,
    /// Columns a later release added that an existing table lacked, added
    /// now.
    pub added: Vec<(Table, &'static str)>,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("table {database}.{table} exists with other columns than bulkhead writes: {}; \
             rename or drop it, or use another fleet.database", differences.join("; "))]
    Mismatch {
        database: String,
        table: Table,
        differences: Vec<String>,
    },
}

/// Creates the database and the tables that are missing, adds to an
/// existing table the columns a later release added ([`add_column`]),
/// then checks that every table has the columns bulkhead writes (a table
/// left by another program, or with a column typed otherwise, is
/// reported, never altered). Running it again changes nothing.
///
/// # Errors
/// The server's, or a table whose columns differ.
pub async fn init(client: &Client) -> Result<InitReport, InitError> {
    let database = client.database().to_string();
    let version = client.version().await?;
    let db = literal(&database);
    let had_database = !client
        .query(&format!(
            "SELECT name FROM system.databases WHERE name = {db} FORMAT TabSeparated"
        ))
        .await?
        .trim()
        .is_empty();
    client.query(&create_database(&database)).await?;
    let had: Vec<String> = client
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = {db} FORMAT TabSeparated"
        ))
        .await?
        .lines()
        .map(str::to_string)
        .collect();
    let mut tables = Vec::new();
    for table in Table::ALL {
        client.query(&create_table(&database, table)).await?;
        tables.push((table, !had.iter().any(|name| name == table.name())));
    }
    let mut found = columns(client, &database).await?;
    let mut added = Vec::new();
    for table in Table::ALL {
        let empty = BTreeMap::new();
        let have = found.get(table.name()).unwrap_or(&empty);
        let missing: Vec<&'static str> = table
            .schema()
            .added
            .iter()
            .copied()
            .filter(|c| !have.contains_key(*c))
            .collect();
        for column in missing {
            if let Err(e) = client.query(&add_column(&database, table, column)).await {
                // Another `fleet init` may have added it meanwhile.
                let now = columns(client, &database).await?;
                if !now
                    .get(table.name())
                    .is_some_and(|c| c.contains_key(column))
                {
                    return Err(e.into());
                }
                continue;
            }
            added.push((table, column));
        }
    }
    if !added.is_empty() {
        found = columns(client, &database).await?;
    }
    for table in Table::ALL {
        let empty = BTreeMap::new();
        let differences = differences(table, found.get(table.name()).unwrap_or(&empty));
        if !differences.is_empty() {
            return Err(InitError::Mismatch {
                database,
                table,
                differences,
            });
        }
    }
    Ok(InitReport {
        version,
        database,
        database_created: !had_database,
        tables,
        added,
    })
}

/// Table -> column -> type, as the server has them.
async fn columns(
    client: &Client,
    database: &str,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, ClientError> {
    let text = client
        .query(&format!(
            "SELECT table, name, type FROM system.columns WHERE database = {} FORMAT TabSeparated",
            literal(database)
        ))
        .await?;
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, '\t');
        if let (Some(table), Some(name), Some(ty)) = (fields.next(), fields.next(), fields.next()) {
            out.entry(table.to_string())
                .or_default()
                .insert(name.to_string(), ty.to_string());
        }
    }
    Ok(out)
}

/// Columns bulkhead writes that `found` lacks or types differently.
/// Columns it does not know are left alone (an insert does not name them).
fn differences(table: Table, found: &BTreeMap<String, String>) -> Vec<String> {
    table
        .schema()
        .columns
        .iter()
        .filter_map(|(name, ty)| match found.get(*name) {
            None => Some(format!("no column {name} ({ty})")),
            Some(t) if t != ty => Some(format!("column {name} is {t}, not {ty}")),
            Some(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flows_table_is_created_as_documented() {
        assert_eq!(
            create_table("bulkhead", Table::Flows),
            "CREATE TABLE IF NOT EXISTS bulkhead.flows\n(\n    host String,\n    host_id String,\n    \
             service String,\n    direction String,\n    protocol String,\n    local_addr String,\n    \
             local_port UInt16,\n    remote_addr String,\n    remote_port UInt16,\n    verdict String,\n    \
             rule String,\n    calls UInt64,\n    bytes_sent UInt64,\n    bytes_received UInt64,\n    \
             first_seen DateTime,\n    last_seen DateTime,\n    date Date,\n    batch_id String,\n    \
             row UInt32,\n    dst_name String\n)\nENGINE = MergeTree()\nPARTITION BY date\nORDER BY (service, host, remote_addr, remote_port)"
        );
        assert_eq!(
            create_database("bulkhead"),
            "CREATE DATABASE IF NOT EXISTS bulkhead"
        );
    }

    #[test]
    fn every_table_has_its_time_its_day_and_the_batch_columns() {
        for table in Table::ALL {
            let schema = table.schema();
            let has = |name: &str, ty: &str| schema.columns.contains(&(name, ty));
            assert!(has(schema.time_column, "DateTime"), "{table}");
            assert!(has("date", "Date") && has("batch_id", "String") && has("row", "UInt32"));
            for key in schema.order_by {
                assert!(
                    schema.columns.iter().any(|(n, _)| n == key),
                    "{table}: {key}"
                );
            }
            assert_eq!(Table::from_name(table.name()), Some(table));
            // Nothing a release older than 19 lacks.
            let sql = create_table("d", table);
            for newer in [
                "TTL",
                "DateTime64",
                "LowCardinality",
                "IPv4",
                "IPv6",
                "Nullable",
            ] {
                assert!(!sql.contains(newer), "{table}: {newer}");
            }
        }
    }

    #[test]
    fn a_column_added_later_is_added_to_an_existing_table() {
        assert_eq!(
            add_column("bulkhead", Table::Flows, "dst_name"),
            "ALTER TABLE bulkhead.flows ADD COLUMN dst_name String DEFAULT ''"
        );
        for table in Table::ALL {
            let columns = table.schema().columns;
            for added in table.schema().added {
                // Last, where ALTER puts them, and Strings (add_column's type).
                let at = columns.iter().position(|(n, _)| n == added);
                assert!(
                    at.is_some_and(|i| i + table.schema().added.len() >= columns.len()),
                    "{table}: {added}"
                );
                assert!(columns.contains(&(*added, "String")), "{table}: {added}");
            }
        }
    }

    #[test]
    fn a_table_with_other_columns_is_described() {
        let mut found: BTreeMap<String, String> = Table::Anomalies
            .schema()
            .columns
            .iter()
            .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
            .collect();
        assert!(differences(Table::Anomalies, &found).is_empty());
        found.insert("extra".to_string(), "String".to_string());
        assert!(differences(Table::Anomalies, &found).is_empty());
        found.remove("detail");
        found.insert("at".to_string(), "DateTime('UTC')".to_string());
        assert_eq!(
            differences(Table::Anomalies, &found),
            [
                "no column detail (String)",
                "column at is DateTime('UTC'), not DateTime"
            ]
        );
    }
}
