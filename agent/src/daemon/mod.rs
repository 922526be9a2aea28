//! `bulkhead run`: load, attach, enforce and report until told to stop,
//! then leave the programs pinned and enforcing.
//!
//! Start-up is a short sequence of named steps, one file each:
//! - `prepare`: everything that can be refused (config, policy, kernel
//!   features, a second agent), before the runtime starts and before
//!   anything touches the kernel: a [`Plan`];
//! - `start`: load, pin, attach, take over from a previous agent, serve
//!   metrics and the control socket, tell the service manager we are
//!   ready: a [`Running`] agent;
//! - `run`: [`Running::run_until_signal`], the main loop (rescans, reloads,
//!   self-checks, control requests) until SIGTERM or SIGINT;
//! - `stop`: [`Running::stop`], which ends the tasks, saves the state and
//!   leaves the pinned programs enforcing.

mod prepare;
mod run;
mod start;
mod stop;

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cli::RunArgs;

pub use prepare::Plan;
pub use start::Running;

/// What the command line sets over the config file (`bulkhead run`'s
/// options), read from it in one place.
struct Overrides {
    config: Option<PathBuf>,
    policy_dir: Option<PathBuf>,
    events: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
    control_socket: Option<PathBuf>,
    log_file: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    allow_insecure_policy_files: bool,
}

pub fn run(args: &RunArgs, log_level: &str) -> Result<()> {
    let overrides = Overrides {
        config: args.config.clone(),
        policy_dir: args.policy_dir.clone(),
        events: args.events.clone(),
        metrics_listen: args.metrics_listen,
        control_socket: args.control_socket.clone(),
        log_file: args.log_file.clone(),
        pin_dir: args.pin_dir.clone(),
        state_dir: args.state_dir.clone(),
        allow_insecure_policy_files: args.allow_insecure_policy_files,
    };
    let plan = prepare::prepare(overrides, log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(plan))
}

/// Start, run until a signal, stop.
async fn serve(plan: Plan) -> Result<()> {
    let mut running = start::start(plan).await?;
    running.run_until_signal().await;
    running.stop().await;
    Ok(())
}
