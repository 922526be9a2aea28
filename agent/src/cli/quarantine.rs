//! `bulkhead quarantine`: cut a service off at once.

use std::process::ExitCode;

use serde_json::Value;

use super::{args::QuarantineArgs, ask::ask};
use crate::control::protocol::{QuarantineRequest, Request};

pub fn quarantine(args: &QuarantineArgs) -> ExitCode {
    let req = Request::Quarantine(QuarantineRequest {
        service: args.service.clone(),
        allow: args.allow.clone(),
    });
    match ask("quarantine", &args.socket, &req) {
        Ok(result) => {
            println!(
                "quarantined {} in {} µs: everything in and out denied{}",
                args.service,
                result
                    .get("applied_in_us")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                match result.get("allow").and_then(Value::as_array) {
                    Some(a) if !a.is_empty() => format!(
                        " except {}",
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => String::new(),
                }
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
