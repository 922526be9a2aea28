//! `bulkhead fleet init`: the database and its tables, created where they
//! are missing.

use std::process::ExitCode;

use super::{block_on, client, describe, fail};
use crate::{cli::args::FleetInitArgs, fleet::schema};

pub fn init(args: &FleetInitArgs) -> ExitCode {
    let client = match client(&args.clickhouse) {
        Ok(c) => c,
        Err(e) => return fail("init", &e),
    };
    let report = match block_on(schema::init(&client)) {
        Ok(Ok(r)) => r,
        Ok(Err(schema::InitError::Client(e))) => return fail("init", &describe(&e)),
        Ok(Err(e)) => return fail("init", &e.to_string()),
        Err(e) => return fail("init", &e),
    };
    println!("ClickHouse {} at {}", report.version, client.url());
    let said = |created: bool| if created { "created" } else { "exists" };
    println!(
        "database {}: {}",
        report.database,
        said(report.database_created)
    );
    for (table, created) in &report.tables {
        println!("table {}.{table}: {}", report.database, said(*created));
    }
    for (table, column) in &report.added {
        println!("table {}.{table}: column {column} added", report.database);
    }
    ExitCode::SUCCESS
}
