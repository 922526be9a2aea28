//! `bulkhead fleet`: the fleet's ClickHouse database (docs/fleet.md):
//! `init` creates its schema, `prune` drops old days. Both connect the way
//! the agent would: the config's `[fleet]` section, with `--clickhouse`
//! overriding its URL.

use std::{future::Future, process::ExitCode};

mod init;
mod prune;

use super::args::{ClickHouseArgs, FleetArgs, FleetCommand};
use crate::{
    config::Config,
    fleet::{Client, ClientError},
};

pub fn run(args: &FleetArgs) -> ExitCode {
    match &args.command {
        FleetCommand::Init(a) => init::init(a),
        FleetCommand::Prune(a) => prune::prune(a),
    }
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    Ok(runtime.block_on(work))
}

/// A client error, with what to check when the server refused the
/// credentials.
fn describe(e: &ClientError) -> String {
    if e.is_auth_refused() {
        format!("{e} (check fleet.user and fleet.password_file)")
    } else {
        e.to_string()
    }
}

fn fail(cmd: &str, message: &str) -> ExitCode {
    eprintln!("bulkhead fleet {cmd}: {message}");
    ExitCode::FAILURE
}
