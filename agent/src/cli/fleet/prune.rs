//! `bulkhead fleet prune --older-than DURATION`: the days before the
//! cutoff, dropped partition by partition.

use std::process::ExitCode;

use super::{block_on, client, describe, fail};
use crate::{
    cli::args::FleetPruneArgs,
    fleet::{prune, time},
};

pub fn prune(args: &FleetPruneArgs) -> ExitCode {
    let client = match client(&args.clickhouse) {
        Ok(c) => c,
        Err(e) => return fail("prune", &e),
    };
    let report = match block_on(prune::prune(&client, args.older_than, time::now())) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail("prune", &describe(&e)),
        Err(e) => return fail("prune", &e),
    };
    for p in &report.dropped {
        println!(
            "dropped {}.{} {} ({} rows, {} bytes)",
            client.database(),
            p.table,
            p.day,
            p.rows,
            p.bytes
        );
    }
    println!(
        "{} partitions before {} dropped, {} kept",
        report.dropped.len(),
        report.cutoff,
        report.kept.len()
    );
    ExitCode::SUCCESS
}
