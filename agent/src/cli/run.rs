//! `bulkhead run`: the command line's overrides laid over the config, then
//! the daemon.

use std::process::ExitCode;

use anyhow::Result;

use super::args::RunArgs;
use crate::{config::Config, daemon, reload::PolicySource};

pub fn run(args: &RunArgs, log_level: &str) -> ExitCode {
    match options(args, log_level).and_then(daemon::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon's options: the config file (or the default one) with each
/// flag given overriding its setting.
fn options(args: &RunArgs, log_level: &str) -> Result<daemon::Options> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(file) = &args.log_file {
        config.log_file = Some(file.clone());
    }
    if let Some(sink) = &args.events {
        config.events.sink = sink.clone();
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if let Some(socket) = &args.control_socket {
        config.control.socket = socket.clone();
    }
    if let Some(dir) = &args.pin_dir {
        config.pin_dir = dir.clone();
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    let source = PolicySource {
        dir: args
            .policy_dir
            .clone()
            .unwrap_or_else(|| config.policy_dir.clone()),
        allow_insecure: args.allow_insecure_policy_files,
    };
    Ok(daemon::Options {
        config,
        source,
        log_level: log_level.to_string(),
    })
}
