//! The `bulkhead` command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    config::Config,
    control, daemon,
    events::{EventType, Verdict},
    kernel, policy,
};

#[derive(Parser, Debug)]
#[command(
    name = "bulkhead",
    version,
    about = "Per-service network segmentation enforced in the kernel with eBPF",
    long_about = "bulkhead enforces, per service (a systemd unit or a cgroup), which connections \
                  it may make, at the socket layer: a denied connect() gets EPERM at once. \
                  Policies are TOML files, one per service; see docs/policy.md."
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: load the policies, attach the programs at the cgroup2
    /// root (pinned, taking over from a previous agent's pins), enforce and
    /// log decisions, reload on SIGHUP or policy file changes. SIGINT/SIGTERM
    /// stop the agent but leave the programs enforcing; `detach` removes them.
    Run(RunArgs),
    /// Validate policy files without loading anything; exit 0 if all are
    /// valid, 1 otherwise, with every error as FILE:LINE:COL: message.
    Check(CheckArgs),
    /// Show recent events from the running daemon (and with --follow, live
    /// ones until Ctrl-C), as a table or as JSON lines. Needs root: it talks
    /// to the daemon over its root-only control socket.
    Flows(FlowsArgs),
    /// Show the running agent's state: each service (managed or waiting,
    /// mode, rules, connections allowed/denied since start), the policy,
    /// reloads, pins and coverage.
    Status(control::admin::StatusArgs),
    /// Cut a service off at once: every connection in and out denied,
    /// established ones included, except --allow exceptions. Survives
    /// reloads and restarts until `bulkhead release`.
    Quarantine(control::admin::QuarantineArgs),
    /// Lift a service's quarantine: its own policy applies again.
    Release(control::admin::ReleaseArgs),
    /// Export the service graph the daemon aggregates from flows: nodes
    /// (services, unmanaged processes, endpoints) and edges with counts,
    /// bytes, first/last seen and verdicts (docs/graph.md).
    Graph(crate::graph::cli::GraphArgs),
    /// What a service could reach if compromised: what its policy allows,
    /// what it actually reached, allowances never used, and the services
    /// (and their destinations) reachable through other services.
    BlastRadius(crate::graph::cli::BlastRadiusArgs),
    /// Write a policy allowing exactly what a service was observed doing
    /// (in audit mode unless --enforce), with comments saying where each
    /// rule comes from. Workflow: audit, learn, review, enforce.
    Learn(crate::graph::cli::LearnArgs),
    /// Remove bulkhead from the kernel: detach every program, remove every
    /// pin. Enforcement stops. Refused while an agent is running (stop it
    /// first: its normal stop keeps enforcing).
    Detach(DetachArgs),
    /// Replay the seeded synthetic anomaly workload through the detectors
    /// and print the scores (what `cargo xtask eval-anomaly` runs).
    #[command(hide = true)]
    EvalAnomaly(crate::anomaly::eval::EvalArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Daemon config file [default: /etc/bulkhead/bulkhead.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Policy directory, overriding the config's `policy_dir`.
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Decision log: a file path, or "-" for stdout (overrides `events.sink`).
    #[arg(long, value_name = "PATH|-")]
    pub events: Option<String>,
    /// Metrics and /healthz listen address (overrides `metrics.listen`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Control socket path (overrides `control.socket`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Append the agent's own log to this file instead of stderr/the journal
    /// (overrides `log_file`).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// bpffs directory for the pins (overrides `pin_dir`).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// State directory (overrides `state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Accept policy files and a policy directory that are not owned by
    /// root or are group- or world-writable (refused by default: whoever can
    /// write a policy controls the network). Logged loudly on every load.
    #[arg(long)]
    pub allow_insecure_policy_files: bool,
}

#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    /// Daemon config file, to find the pin and control socket paths.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// bpffs directory of the pins (overrides `pin_dir`).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Control socket of a running agent (overrides `control.socket`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy directory to check [default: the config's policy_dir].
    #[arg(long, value_name = "DIR", conflicts_with = "files")]
    pub policy_dir: Option<PathBuf>,
    /// Daemon config file, to find the policy directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Policy files to check together (as one set).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// After the recent events, keep showing new ones until Ctrl-C or the
    /// daemon stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this service's events.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// Only decisions (verdict events) with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    /// Only events of this type: verdict, tcp_established or tcp_closed.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_event_type)]
    pub kind: Option<EventType>,
    /// Only the last N of the recent matching events.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Print the events as JSON lines (the decision log's format).
    #[arg(long)]
    pub json: bool,
    /// Control socket [default: the config's control.socket, /run/bulkhead/control.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Daemon config file, to find the control socket.
    #[arg(long, value_name = "FILE", conflicts_with = "socket")]
    pub config: Option<PathBuf>,
}

/// `--type`: the event type names of the decision log.
fn parse_event_type(s: &str) -> Result<EventType, String> {
    match s {
        "verdict" => Ok(EventType::Verdict),
        "tcp_established" => Ok(EventType::TcpEstablished),
        "tcp_closed" => Ok(EventType::TcpClosed),
        _ => Err("expected verdict, tcp_established or tcp_closed".to_string()),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Flows(args) => control::flows::run(&args),
        Command::Detach(args) => detach(&args),
        Command::Status(args) => control::admin::status(&args),
        Command::Quarantine(args) => control::admin::quarantine(&args),
        Command::Release(args) => control::admin::release(&args),
        Command::Graph(args) => crate::graph::cli::graph(&args),
        Command::BlastRadius(args) => crate::graph::cli::blast_radius(&args),
        Command::Learn(args) => crate::graph::cli::learn(&args),
        Command::EvalAnomaly(args) => crate::anomaly::eval::main(&args),
        Command::Run(args) => match daemon::run(&args, &cli.log_level) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(args: &CheckArgs) -> ExitCode {
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

fn detach(args: &DetachArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = args.control_socket.clone().unwrap_or(config.control.socket);
    if let Err(e) = control::server::ensure_free(&socket) {
        eprintln!("bulkhead detach: refused: {e}; stop the agent first");
        return ExitCode::FAILURE;
    }
    let root = kernel::pins::PinRoot(args.pin_dir.clone().unwrap_or(config.pin_dir));
    let current = root.current();
    if !current.exists() {
        println!("nothing to detach: no pins at {}", current.display());
        return ExitCode::SUCCESS;
    }
    kernel::pins::remove_pins(&current);
    kernel::pins::clean_leftovers(&root);
    if current.exists() {
        eprintln!(
            "bulkhead detach: some pins under {} could not be removed",
            current.display()
        );
        return ExitCode::FAILURE;
    }
    println!("detached: every bulkhead program removed from the kernel; nothing is enforced now");
    ExitCode::SUCCESS
}
