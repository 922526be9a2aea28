//! The `bulkhead` command line: the arguments of every command (`args`),
//! this dispatcher, and one file per command. Client commands talk to the
//! running agent over its control socket (`ask`); `run` turns its
//! arguments into the daemon's options and starts the daemon. Nothing
//! below the command line imports it.

mod args;
mod ask;
mod blast_radius;
mod check;
mod check_report;
mod detach;
mod fleet;
mod flows;
mod graph;
mod learn;
mod quarantine;
mod release;
mod reload;
mod run;
mod status;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check::check(&args),
        Command::Reload(args) => reload::reload(&args),
        Command::Flows(args) => flows::run(&args),
        Command::Detach(args) => detach::detach(&args),
        Command::Status(args) => status::status(&args),
        Command::Quarantine(args) => quarantine::quarantine(&args),
        Command::Release(args) => release::release(&args),
        Command::Graph(args) => graph::graph(&args),
        Command::BlastRadius(args) => blast_radius::blast_radius(&args),
        Command::Learn(args) => learn::learn(&args),
        Command::Fleet(args) => fleet::run(&args),
        Command::Run(args) => run::run(&args, &cli.log_level),
    }
}
