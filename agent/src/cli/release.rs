//! `bulkhead release`: lift a service's quarantine.

use std::process::ExitCode;

use super::{args::ReleaseArgs, ask::ask};
use crate::control::protocol::{ReleaseRequest, Request};

pub fn release(args: &ReleaseArgs) -> ExitCode {
    let req = Request::Release(ReleaseRequest {
        service: args.service.clone(),
    });
    match ask("release", &args.socket, &req) {
        Ok(_) => {
            println!("released {}: its policy is in force again", args.service);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
