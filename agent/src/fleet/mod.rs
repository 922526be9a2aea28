//! Fleet mode (docs/fleet.md): every agent writes its flows, endpoints,
//! policies and anomalies to one ClickHouse database, so that the service
//! graph and the blast radius cross host boundaries.
//!
//! - `config`: the `[fleet]` section; the connection and host identity it
//!   resolves to (password file, host name, machine id)
//! - `client`: a small ClickHouse HTTP client (queries, JSONEachRow
//!   inserts, idempotent retries); `error`: what it reports
//! - `schema`: the tables, their `CREATE` statements, `fleet init`
//! - `rows`: one Rust struct per table, and batches of them encoded for an
//!   insert
//! - `prune`: daily partitions, and dropping the old ones (`fleet prune`)
//! - `sql`, `time`: literals and identifiers in SQL; UTC seconds and days
//! - `export`: the exporter (rows, spool, delivery); `host`: what the
//!   engine tells it about this host's services
//! - `inventory`: this host's addresses and its services' listeners
//! - `model`: the fleet read back (instances, listeners by time, flows),
//!   its blast radius and graph; `read`: the queries that fill it

pub mod client;
pub mod config;
mod error;
pub mod export;
pub mod host;
pub mod inventory;
pub mod model;
pub mod prune;
pub mod read;
pub mod rows;
pub mod schema;
pub mod sql;
pub mod time;

pub use client::{Client, InsertOutcome, MAX_RESPONSE_BYTES};
pub use config::{
    parse_clickhouse_url, Connection, FleetConfig, HostIdentity, Password, SetupError,
};
pub use error::ClientError;
pub use rows::{AnomalyRow, EncodedBatch, EndpointRow, FlowRow, PolicyRow, Row};
pub use schema::Table;
