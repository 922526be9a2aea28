//! `bulkhead graph`: the service graph, from the running daemon or from
//! the graph it saved (`--state-dir`), as JSON, DOT or Mermaid.

use std::process::ExitCode;

use serde_json::Value;

use super::{
    args::{Format, GraphArgs, Offline, SocketArgs},
    ask::ask,
};
use crate::{
    config::Config,
    control::protocol::{GraphRequest, Request},
    graph::{self, view::View},
    policy,
};

/// The daemon's answer, or with `--state-dir` the same answer computed here
/// from the saved graph and the policy files.
pub(super) fn answer(
    cmd: &str,
    socket: &SocketArgs,
    offline: &Offline,
    req: &Request,
) -> Result<Value, ExitCode> {
    let Some(state_dir) = &offline.state_dir else {
        return ask(cmd, socket, req);
    };
    let fail = |e: String| {
        eprintln!("bulkhead {cmd}: {e}");
        ExitCode::FAILURE
    };
    let path = state_dir.join(graph::store::FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let graph =
        graph::store::from_json(&bytes).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let dir = match &offline.policy_dir {
        Some(d) => d.clone(),
        None => {
            Config::load(socket.config.as_deref())
                .map_err(|e| fail(e.to_string()))?
                .policy_dir
        }
    };
    let set = policy::load_dir(&dir).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        fail(format!("invalid policy in {}", dir.display()))
    })?;
    let shared = graph::Shared::default();
    *shared.graph() = graph;
    match req {
        Request::BlastRadius(r) => graph::requests::blast_radius(&shared, &set, r),
        Request::Learn(r) => graph::requests::learn(&shared, &set, r),
        _ => Ok(graph::requests::graph(&shared, &set)),
    }
    .map_err(fail)
}

pub fn graph(args: &GraphArgs) -> ExitCode {
    let req = Request::Graph(GraphRequest {});
    let result = match answer("graph", &args.socket, &args.offline, &req) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let view: View = match serde_json::from_value(result) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bulkhead graph: the daemon's answer is not a graph: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!(
        "{}",
        match args.format {
            Format::Dot => graph::export::dot(&view),
            _ => graph::export::mermaid(&view),
        }
    );
    ExitCode::SUCCESS
}
