//! `bulkhead check`: validate policy files without loading anything.

use std::process::ExitCode;

use super::args::CheckArgs;
use crate::{config::Config, kernel, policy};

pub fn check(args: &CheckArgs) -> ExitCode {
    let result = if args.files.is_empty() {
        let dir = match &args.policy_dir {
            Some(dir) => dir.clone(),
            None => match Config::load(args.config.as_deref()) {
                Ok(c) => c.policy_dir,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        policy::load_dir(&dir)
    } else {
        policy::load_files(&args.files)
    };
    match result.and_then(|set| kernel::compile(&set).map(|c| (set, c))) {
        Ok((set, compiled)) => {
            for w in &set.warnings {
                eprintln!("warning: {w}");
            }
            for s in &set.services {
                println!(
                    "ok: {} ({}, {}): {} egress rules, from {}",
                    s.name,
                    s.selector,
                    s.mode,
                    s.egress.len(),
                    s.file.display()
                );
            }
            println!(
                "{} services, {} rules, {} IPv4 and {} IPv6 prefixes: valid",
                set.services.len(),
                compiled.rules.len(),
                compiled.v4.len(),
                compiled.v6.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s); nothing was loaded", errors.0.len());
            ExitCode::FAILURE
        }
    }
}
