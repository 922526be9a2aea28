//! `bulkhead reload`: the running agent reloads its policy now and says
//! whether it was applied; the exit code says it too, so `systemctl reload`
//! (`ExecReload=`) fails when the policy was refused.

use std::process::ExitCode;

use super::{args::ReloadArgs, ask::ask_or};
use crate::control::protocol::{ReloadAnswer, ReloadRequest, Request};

/// The policy was refused; the policy in force is unchanged.
const REFUSED: u8 = 1;
/// No answer: no agent, no access to its socket, or the request failed.
/// Distinct from [`REFUSED`] (and from clap's usage error, 2).
const UNANSWERED: u8 = 3;

pub fn reload(args: &ReloadArgs) -> ExitCode {
    let result = match ask_or(
        "reload",
        &args.socket,
        &Request::Reload(ReloadRequest {}),
        ExitCode::from(UNANSWERED),
    ) {
        Ok(result) => result,
        Err(code) => return code,
    };
    let answer: ReloadAnswer = match serde_json::from_value(result) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("bulkhead reload: unexpected answer from the daemon: {e}");
            return ExitCode::from(UNANSWERED);
        }
    };
    let out = render(&answer);
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    ExitCode::from(out.code)
}

/// What `bulkhead reload` prints and exits with, for an answer.
#[derive(Debug, PartialEq, Eq)]
struct Rendered {
    stdout: String,
    stderr: String,
    code: u8,
}

/// Warnings first, on stderr (`warning: FILE:LINE:COL: message`); then, if
/// refused, every error on stderr (`FILE:LINE:COL: message`) and a summary
/// line; if applied, one line on stdout.
fn render(answer: &ReloadAnswer) -> Rendered {
    // Paths and messages may hold anything a local user put in a name.
    let visible = |p: &crate::control::protocol::Problem| {
        crate::visible::visible(&p.to_string()).into_owned()
    };
    let mut stderr = String::new();
    for w in &answer.warnings {
        stderr.push_str(&format!("warning: {}\n", visible(w)));
    }
    if answer.applied {
        return Rendered {
            stdout: "bulkhead reload: the policy was applied\n".to_string(),
            stderr,
            code: 0,
        };
    }
    for e in &answer.errors {
        stderr.push_str(&visible(e));
        stderr.push('\n');
    }
    stderr.push_str(&format!(
        "bulkhead reload: refused ({} error(s)); the policy in force is unchanged\n",
        answer.errors.len()
    ));
    Rendered {
        stdout: String::new(),
        stderr,
        code: REFUSED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Problem;

    fn at(file: &str, line: usize, column: usize, message: &str) -> Problem {
        Problem {
            file: Some(file.to_string()),
            line,
            column,
            message: message.to_string(),
        }
    }

    #[test]
    fn a_refused_reload_prints_every_error_where_it_is_and_exits_1() {
        let out = render(&ReloadAnswer {
            applied: false,
            errors: vec![
                at(
                    "/etc/bulkhead/policies/web.toml",
                    6,
                    9,
                    "port 0 is not a port",
                ),
                at(
                    "/etc/bulkhead/policies/db.toml",
                    0,
                    0,
                    "mode 0666 is group- or world-writable: refused (chmod go-w)",
                ),
            ],
            warnings: vec![],
        });
        assert_eq!(
            out,
            Rendered {
                stdout: String::new(),
                stderr: "/etc/bulkhead/policies/web.toml:6:9: port 0 is not a port\n\
                         /etc/bulkhead/policies/db.toml:0:0: mode 0666 is group- or world-writable: refused (chmod go-w)\n\
                         bulkhead reload: refused (2 error(s)); the policy in force is unchanged\n"
                    .to_string(),
                code: 1,
            }
        );
    }

    #[test]
    fn an_applied_reload_says_so_with_its_warnings_and_exits_0() {
        let out = render(&ReloadAnswer {
            applied: true,
            errors: vec![],
            warnings: vec![
                at("/p/a.toml", 1, 1, "shadowed"),
                Problem::unlocated("cannot re-open the decision log: Permission denied".into()),
            ],
        });
        assert_eq!(
            out,
            Rendered {
                stdout: "bulkhead reload: the policy was applied\n".to_string(),
                stderr: "warning: /p/a.toml:1:1: shadowed\n\
                         warning: cannot re-open the decision log: Permission denied\n"
                    .to_string(),
                code: 0,
            }
        );
    }

    #[test]
    fn control_characters_in_a_name_are_shown_not_sent_to_the_terminal() {
        let out = render(&ReloadAnswer {
            applied: false,
            errors: vec![at("/p/\u{1b}]0;x\u{7}.toml", 1, 1, "bad")],
            warnings: vec![],
        });
        assert!(!out.stderr.contains('\u{1b}'), "{:?}", out.stderr);
        assert!(
            out.stderr
                .starts_with("/p/\\u{1b}]0;x\\u{7}.toml:1:1: bad\n"),
            "{:?}",
            out.stderr
        );
    }
}
