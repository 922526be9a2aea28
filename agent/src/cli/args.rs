//! Every command's arguments (clap), in one place.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::events::{EventType, Verdict};

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
    /// log decisions, reload on SIGHUP, `bulkhead reload` or policy file
    /// changes. SIGINT/SIGTERM stop the agent but leave the programs
    /// enforcing; `detach` removes them.
    Run(RunArgs),
    /// Validate policy files without loading anything, as the agent judges
    /// them (content, owner and mode); exit 0 if all are valid, 1
    /// otherwise, with every error as FILE:LINE:COL: message.
    Check(CheckArgs),
    /// Ask the running agent to re-read its policy directory (and re-open
    /// its decision log), as SIGHUP does, and wait for the outcome: exit 0
    /// if the policy was applied, 1 if it was refused (every error printed
    /// as FILE:LINE:COL: message; the policy in force is unchanged), 3 if
    /// no agent answered. Needs root (the control socket is root-only).
    Reload(ReloadArgs),
    /// Show recent events from the running daemon (and with --follow, live
    /// ones until Ctrl-C), as a table or as JSON lines. Needs root: it talks
    /// to the daemon over its root-only control socket.
    Flows(FlowsArgs),
    /// Show the running agent's state: each service (managed or waiting,
    /// mode, rules, connections allowed/denied since start), the policy,
    /// reloads, pins and coverage.
    Status(StatusArgs),
    /// Cut a service off at once: every connection in and out denied,
    /// established ones included, except --allow exceptions. Survives
    /// reloads and restarts until `bulkhead release`.
    Quarantine(QuarantineArgs),
    /// Lift a service's quarantine: its own policy applies again.
    Release(ReleaseArgs),
    /// Export the service graph the daemon aggregates from flows: nodes
    /// (services, unmanaged processes, endpoints) and edges with counts,
    /// bytes, first/last seen and verdicts (docs/graph.md).
    Graph(GraphArgs),
    /// What a service could reach if compromised: what its policy allows,
    /// what it actually reached, allowances never used, and the services
    /// (and their destinations) reachable through other services.
    BlastRadius(BlastRadiusArgs),
    /// Write a policy allowing exactly what a service was observed doing
    /// (in audit mode unless --enforce), with comments saying where each
    /// rule comes from. Workflow: audit, learn, review, enforce.
    Learn(LearnArgs),
    /// Remove bulkhead from the kernel: detach every program, remove every
    /// pin. Enforcement stops. Refused while an agent is running (stop it
    /// first: its normal stop keeps enforcing).
    Detach(DetachArgs),
    /// Fleet mode on ClickHouse (docs/fleet.md): create the schema, drop
    /// old partitions, and read the fleet back: its graph, a service's
    /// blast radius across hosts, its service instances, its map page.
    Fleet(FleetArgs),
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
    /// Output: text (errors as FILE:LINE:COL: message), json (one object),
    /// or github (GitHub Actions annotations: ::error file=F,line=L,col=C::message).
    #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
    pub format: CheckFormat,
    /// Accept policy files or a directory not owned by root or group- or
    /// world-writable, as warnings (as `run --allow-insecure-policy-files`
    /// does); refused by default, as the agent refuses them.
    #[arg(long)]
    pub allow_insecure_policy_files: bool,
}

/// How `bulkhead check` writes its findings.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckFormat {
    Text,
    Json,
    Github,
}

#[derive(clap::Args, Debug)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
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
        "flow" => Ok(EventType::Flow),
        _ => Err("expected verdict, flow, tcp_established or tcp_closed".to_string()),
    }
}

#[derive(clap::Args, Debug)]
pub struct SocketArgs {
    /// Control socket of the running agent [default: the config's control.socket].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Daemon config file, to find the control socket.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct QuarantineArgs {
    /// The service to cut off.
    pub service: String,
    /// An exception it may still reach (and be reached from):
    /// CIDR[:PORT], e.g. 192.0.2.10:514; repeat for more.
    #[arg(long = "allow", value_name = "CIDR[:PORT]")]
    pub allow: Vec<String>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The service to release.
    pub service: String,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Dot,
    Mermaid,
}

#[derive(clap::Args, Debug)]
pub struct GraphArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

#[derive(clap::Args, Debug)]
pub struct BlastRadiusArgs {
    /// The service.
    pub service: String,
    /// Only connections seen in this window count ("7d", "12h", "30m").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

#[derive(clap::Args, Debug)]
pub struct LearnArgs {
    /// The service.
    pub service: String,
    /// Learn only from connections seen in this window ("7d", "12h").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Write the policy to FILE (checked after writing) instead of stdout.
    /// An existing FILE is kept unless --force; a symbolic link never
    /// followed.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace FILE if it exists (never through a symbolic link).
    #[arg(long, requires = "output")]
    pub force: bool,
    /// Write `mode = "enforce"` (default: "audit", to review first).
    #[arg(long)]
    pub enforce: bool,
    /// Also write `exe = [...]` on each rule: the executables whose calls
    /// it was learned from (left out, with a comment, where some calls came
    /// from an executable the kernel had no record of).
    #[arg(long)]
    pub exe: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

/// Reading the saved graph instead of asking the daemon (it may be stopped).
#[derive(clap::Args, Debug)]
pub struct Offline {
    /// Do not ask the daemon: read the graph it saved in this state directory
    /// (`graph.json`, written every 30 s and when it stops).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --state-dir: the policy directory [default: the config's policy_dir].
    #[arg(long, value_name = "DIR", requires = "state_dir")]
    pub policy_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Create the fleet's database and tables where they are missing
    /// (running it again changes nothing), and check the columns of those
    /// that exist; prints what it created.
    Init(FleetInitArgs),
    /// Drop the fleet tables' daily partitions older than a duration;
    /// prints what it dropped.
    Prune(FleetPruneArgs),
    /// The fleet's service graph (every host's service instances, and the
    /// flows between them resolved to the instance listening there at the
    /// time), as JSON, DOT or Mermaid.
    Graph(FleetGraphArgs),
    /// What a service could reach across hosts if compromised: what its
    /// policies allow (resolved to the services listening there), what it
    /// reached, allowances never used, and the lateral paths hop by hop.
    BlastRadius(FleetBlastRadiusArgs),
    /// Every service instance: service, host, mode, last seen.
    Services(FleetServicesArgs),
    /// Serve the fleet's service map (the host map's page) on a loopback
    /// address, read from ClickHouse on every request, until Ctrl-C or
    /// SIGTERM.
    Serve(FleetServeArgs),
}

/// Which ClickHouse, and as whom.
#[derive(clap::Args, Debug)]
pub struct ClickHouseArgs {
    /// ClickHouse's HTTP interface, `http://HOST:PORT` (overrides
    /// `fleet.clickhouse_url`).
    #[arg(long = "clickhouse", value_name = "URL")]
    pub url: Option<String>,
    /// Daemon config file, for its `[fleet]` section (database, user,
    /// password file) [default: /etc/bulkhead/bulkhead.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FleetInitArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

#[derive(clap::Args, Debug)]
pub struct FleetPruneArgs {
    /// Drop the days before the day this long ago ("30d", "12w").
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub older_than: std::time::Duration,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

#[derive(clap::Args, Debug)]
pub struct FleetGraphArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

#[derive(clap::Args, Debug)]
pub struct FleetBlastRadiusArgs {
    /// `SERVICE` (every instance of it) or `SERVICE@HOST` (one).
    pub service: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

#[derive(clap::Args, Debug)]
pub struct FleetServicesArgs {
    /// Print the instances as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

#[derive(clap::Args, Debug)]
pub struct FleetServeArgs {
    /// Address to serve the map on; loopback only (the map shows every
    /// host's services: share it through an authenticating proxy).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9470")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

/// `--older-than`: a humantime duration of more than nothing.
fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write it like 30d, 12w or 36h)")),
    }
}
