//! `bulkhead blast-radius`: what a service could reach if compromised.

use std::process::ExitCode;

use super::{args::BlastRadiusArgs, graph::answer};
use crate::{
    control::protocol::{BlastRadiusRequest, Request},
    graph,
};

pub fn blast_radius(args: &BlastRadiusArgs) -> ExitCode {
    let req = Request::BlastRadius(BlastRadiusRequest {
        service: args.service.clone(),
        since: args.since.map(graph::ago),
    });
    let result = match answer("blast-radius", &args.socket, &args.offline, &req) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.json {
        println!("{result}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<graph::blast::BlastRadius>(result) {
        Ok(b) => {
            print!("{}", graph::report::render(&b));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulkhead blast-radius: unexpected answer from the daemon: {e}");
            ExitCode::FAILURE
        }
    }
}
