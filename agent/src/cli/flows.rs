//! `bulkhead flows`: recent (and with `--follow`, live) events from the
//! running daemon, as a table or as JSON lines.

use std::{
    io::{self, Write},
    process::ExitCode,
};

mod table;

use super::{args::FlowsArgs, ask::control_socket};
use crate::control::{
    client::{self, ClientError, Line},
    protocol::{End, FlowsRequest, Reply, Request},
};

pub fn run(args: &FlowsArgs) -> ExitCode {
    let socket = match control_socket(args.socket.as_deref(), args.config.as_deref()) {
        Ok(path) => path,
        Err(e) => return fail(&e),
    };
    let req = Request::Flows(request(args));
    let replies = match client::request(&socket, &req) {
        Ok(replies) => replies,
        Err(e) => return fail(&e),
    };
    let format = if args.json {
        Format::Json
    } else if args.follow {
        Format::StreamTable
    } else {
        Format::Table
    };
    let stdout = io::stdout();
    match show(replies, format, &mut stdout.lock(), &mut io::stderr()) {
        Ok(()) => ExitCode::SUCCESS,
        // `bulkhead flows | head`: the reader has what it wanted.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bulkhead flows: {e}");
    ExitCode::FAILURE
}

fn request(args: &FlowsArgs) -> FlowsRequest {
    FlowsRequest {
        follow: args.follow,
        service: args.service.clone(),
        verdict: args.verdict,
        kind: args.kind,
        last: args.last,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The daemon's lines, as received.
    Json,
    /// All rows first, then columns fitted to them.
    Table,
    /// Each row as it comes, with fixed column widths.
    StreamTable,
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error("cannot write the output: {0}")]
    Output(io::Error),
}

/// Writes the reply to `out`; warnings (missed events, the daemon
/// stopping) go to `err` as one line each.
pub fn show<I>(
    replies: I,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure>
where
    I: IntoIterator<Item = Result<Line, ClientError>>,
{
    let mut rows = Vec::new();
    if format == Format::StreamTable {
        writeln!(
            out,
            "{}",
            table::line(&table::HEADER, &table::STREAM_WIDTHS)
        )
        .map_err(Failure::Output)?;
    }
    let mut failed = None;
    for line in replies {
        let Line { raw, reply } = match line {
            Ok(line) => line,
            Err(e) => {
                // Still show what did arrive.
                failed = Some(e);
                break;
            }
        };
        match reply {
            Reply::Event(ev) => match format {
                Format::Json => writeln!(out, "{raw}").map_err(Failure::Output)?,
                Format::Table => rows.push(table::row(&ev)),
                Format::StreamTable => {
                    let line = table::line(&table::row(&ev), &table::STREAM_WIDTHS);
                    writeln!(out, "{line}").map_err(Failure::Output)?;
                }
            },
            Reply::Lagged { lagged } => {
                // stderr is for people; stdout stays one kind of record.
                let _ = writeln!(
                    err,
                    "bulkhead flows: warning: missed {lagged} events (this client fell behind)"
                );
            }
            Reply::End { end: End::Shutdown } => {
                let _ = writeln!(err, "bulkhead flows: the daemon is stopping");
            }
            Reply::End { end: End::Complete } | Reply::Error { .. } | Reply::Result { .. } => {}
        }
    }
    if format == Format::Table {
        if rows.is_empty() && failed.is_none() {
            let _ = writeln!(
                err,
                "bulkhead flows: no matching events among the recent ones"
            );
        } else {
            let widths = table::fit(&rows);
            writeln!(out, "{}", table::line(&table::HEADER, &widths)).map_err(Failure::Output)?;
            for row in &rows {
                writeln!(out, "{}", table::line(row, &widths)).map_err(Failure::Output)?;
            }
        }
    }
    out.flush().map_err(Failure::Output)?;
    failed.map_or(Ok(()), |e| Err(Failure::Daemon(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        client::Replies,
        protocol::{encode_event, tests::event},
    };

    fn run_show(text: &str, format: Format) -> (Result<(), Failure>, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let result = show(Replies::new(text.as_bytes()), format, &mut out, &mut err);
        (
            result,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    fn event_line() -> String {
        String::from_utf8(encode_event(&event())).expect("JSON is UTF-8")
    }

    #[test]
    fn json_passes_lines_through_and_warns_on_stderr() {
        let ev = event_line();
        let text = format!("{ev}\n{{\"lagged\":7}}\n{ev}\n{{\"end\":\"complete\"}}\n");
        let (result, out, err) = run_show(&text, Format::Json);
        assert!(result.is_ok());
        assert_eq!(out, format!("{ev}\n{ev}\n"));
        assert_eq!(
            err,
            "bulkhead flows: warning: missed 7 events (this client fell behind)\n"
        );
    }

    #[test]
    fn table_fits_columns_to_the_rows() {
        let text = format!("{}\n{{\"end\":\"complete\"}}\n", event_line());
        let (result, out, err) = run_show(&text, Format::Table);
        assert!(result.is_ok());
        assert_eq!(err, "");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].starts_with("TIME          SERVICE  PROCESS"),
            "{out}"
        );
        assert!(lines[1].contains("billing  curl[42]"), "{out}");
    }

    #[test]
    fn follow_prints_the_header_at_once_and_reports_shutdown() {
        let text = format!("{}\n{{\"end\":\"shutdown\"}}\n", event_line());
        let (result, out, err) = run_show(&text, Format::StreamTable);
        assert!(result.is_ok());
        assert_eq!(out.lines().count(), 2, "{out}");
        assert_eq!(err, "bulkhead flows: the daemon is stopping\n");
    }

    #[test]
    fn a_cut_off_reply_is_an_error() {
        let text = format!("{}\n", event_line());
        for (format, shown) in [(Format::Json, 1), (Format::Table, 2)] {
            let (result, out, _) = run_show(&text, format);
            assert!(
                matches!(result, Err(Failure::Daemon(ClientError::Truncated))),
                "{format:?}"
            );
            // What did arrive is shown.
            assert_eq!(out.lines().count(), shown, "{format:?}: {out}");
        }
    }

    #[test]
    fn an_error_reply_is_an_error() {
        let (result, _, _) = run_show("{\"error\":\"no\"}\n", Format::Table);
        let e = result.expect_err("error reply");
        assert_eq!(e.to_string(), "the daemon refused: no");
    }
}
