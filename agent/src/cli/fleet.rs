//! `bulkhead fleet`: the fleet's ClickHouse database (docs/fleet.md):
//! `init` creates its schema, `prune` drops old days; `graph`,
//! `blast-radius`, `services` and `serve` read the fleet back. All connect
//! the way the agent would: the config's `[fleet]` section, with
//! `--clickhouse` overriding its URL.

use std::{future::Future, process::ExitCode};

mod blast_radius;
mod graph;
mod init;
mod prune;
mod serve;
mod services;

use super::args::{ClickHouseArgs, FleetArgs, FleetCommand};
use crate::{
    config::Config,
    fleet::{model::Fleet, read, Client, ClientError},
};

pub fn run(args: &FleetArgs) -> ExitCode {
    match &args.command {
        FleetCommand::Init(a) => init::init(a),
        FleetCommand::Prune(a) => prune::prune(a),
        FleetCommand::Graph(a) => graph::graph(a),
        FleetCommand::BlastRadius(a) => blast_radius::blast_radius(a),
        FleetCommand::Services(a) => services::services(a),
        FleetCommand::Serve(a) => serve::serve(a),
    }
}

/// The fleet as ClickHouse holds it now (read.rs's three queries), each
/// run on a runtime of this thread.
fn load(client: &Client) -> Result<Fleet, String> {
    let runtime = runtime()?;
    read::load(client.database(), |sql| {
        runtime
            .block_on(client.query(sql))
            .map_err(|e| anyhow::anyhow!(describe(&e)))
    })
    .map_err(|e| format!("{e:#}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The client the config and the command line give.
fn client(args: &ClickHouseArgs) -> Result<Client, String> {
    let config = Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    let conn = config
        .fleet
        .connection(args.url.as_deref())
        .map_err(|e| e.to_string())?;
    Client::new(conn).map_err(|e| e.to_string())
}

/// Runs `work` to its end on a runtime of this thread.
fn block_on<F: Future>(work: F) -> Result<F::Output, String> {
    Ok(runtime()?.block_on(work))
}

/// ClickHouse's `UNKNOWN_TABLE` and `UNKNOWN_DATABASE`.
const MISSING_SCHEMA_CODES: [u32; 2] = [60, 81];

/// A client error, with what to check when the server refused the
/// credentials, or what to run when the schema is not there.
fn describe(e: &ClientError) -> String {
    if e.is_auth_refused() {
        format!("{e} (check fleet.user and fleet.password_file)")
    } else if e.code().is_some_and(|c| MISSING_SCHEMA_CODES.contains(&c)) {
        format!("{e} (run `bulkhead fleet init` first)")
    } else {
        e.to_string()
    }
}

fn fail(cmd: &str, message: &str) -> ExitCode {
    eprintln!("bulkhead fleet {cmd}: {message}");
    ExitCode::FAILURE
}
