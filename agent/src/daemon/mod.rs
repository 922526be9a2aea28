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

mod heap;
mod prepare;
mod run;
mod start;
mod stop;

use anyhow::{Context, Result};

use crate::{config::Config, reload::PolicySource};

pub use prepare::Plan;
pub use start::Running;

/// What `bulkhead run` starts with (built by the command line, `cli/run.rs`):
/// the config with the command line's overrides applied, the policy
/// directory, and the log level.
pub struct Options {
    pub config: Config,
    pub source: PolicySource,
    pub log_level: String,
}

pub fn run(options: Options) -> Result<()> {
    let plan = prepare::prepare(options)?;
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
