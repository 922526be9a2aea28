//! `bulkhead fleet graph`: the fleet's service graph, in the host graph's
//! exported form (`bulkhead.graph.v1`), as JSON, DOT or Mermaid.

use std::process::ExitCode;

use super::{client, fail, load};
use crate::{
    cli::args::{FleetGraphArgs, Format},
    graph::export,
};

pub fn graph(args: &FleetGraphArgs) -> ExitCode {
    let fleet = match client(&args.clickhouse).and_then(|c| load(&c)) {
        Ok(f) => f,
        Err(e) => return fail("graph", &e),
    };
    let view = fleet.view();
    match args.format {
        Format::Json => match serde_json::to_string_pretty(&view) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail("graph", &format!("cannot write the graph as JSON: {e}")),
        },
        Format::Dot => print!("{}", export::dot(&view)),
        Format::Mermaid => print!("{}", export::mermaid(&view)),
    }
    ExitCode::SUCCESS
}
