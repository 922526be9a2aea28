//! Finding the running agent's control socket, and asking it one question.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::Value;

use super::args::SocketArgs;
use crate::{
    config::{Config, ConfigError},
    control::{
        client::{self, ClientError, Line},
        protocol::{Reply, Request},
    },
};

/// The control socket a client command talks to: the one named on the
/// command line, or else the config's `control.socket` (the config file
/// named, or the default one).
///
/// # Errors
/// The config cannot be read.
pub(super) fn control_socket(
    socket: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    match socket {
        Some(p) => Ok(p.to_path_buf()),
        None => Config::load(config).map(|c| c.control.socket),
    }
}

/// How long a one-shot command waits for the daemon (its answers take
/// milliseconds; the daemon bounds each client in its turn: server.rs).
const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one request and returns its result, or prints one line and
/// returns the exit code.
pub(super) fn ask(cmd: &str, socket: &SocketArgs, req: &Request) -> Result<Value, ExitCode> {
    ask_or(cmd, socket, req, ExitCode::FAILURE)
}

/// As [`ask`], exiting `unanswered` when no answer came (no config, no
/// agent, a refused or failed request).
pub(super) fn ask_or(
    cmd: &str,
    socket: &SocketArgs,
    req: &Request,
    unanswered: ExitCode,
) -> Result<Value, ExitCode> {
    let path = control_socket(socket.socket.as_deref(), socket.config.as_deref()).map_err(|e| {
        eprintln!("bulkhead {cmd}: {e}");
        unanswered
    })?;
    let replies = client::request_within(&path, req, ANSWER_DEADLINE).map_err(|e| {
        eprintln!("bulkhead {cmd}: {}", describe(&e, &path));
        unanswered
    })?;
    let mut result = None;
    for line in replies {
        match line {
            Ok(Line {
                reply: Reply::Result { result: r },
                ..
            }) => result = Some(r),
            Ok(Line {
                reply: Reply::Error { error },
                ..
            }) => {
                eprintln!("bulkhead {cmd}: {error}");
                return Err(unanswered);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("bulkhead {cmd}: {}", describe(&e, &path));
                return Err(unanswered);
            }
        }
    }
    result.ok_or_else(|| {
        eprintln!("bulkhead {cmd}: the daemon sent no answer");
        unanswered
    })
}

fn describe(e: &ClientError, _path: &std::path::Path) -> String {
    e.to_string()
}
