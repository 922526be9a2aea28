//! The CLI's end of the control socket: connect, send one request, read
//! the reply lines. Blocking I/O: the CLI does one thing at a time.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{decode_reply, encode_request, Reply, Request, MAX_REPLY_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no bulkhead daemon is running (cannot connect to {}: {})", path.display(), os_message(source))]
    NotRunning { path: PathBuf, source: io::Error },
    #[error(
        "permission denied on {}: the control socket is root-only; run this as root",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot connect to {}: {}", path.display(), os_message(source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("lost the connection to the daemon: {}", os_message(.0))]
    Io(#[from] io::Error),
    #[error("the daemon refused: {0}")]
    Daemon(String),
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
    #[error("the daemon closed the connection before the end of its reply")]
    Truncated,
    #[error("no answer from the daemon within {0:?}; a change asked for may still be applied: see bulkhead status")]
    NoAnswer(Duration),
}

/// "No such file or directory" rather than "... (os error 2)".
fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// One reply line: as received (for `--json`), and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub raw: String,
    pub reply: Reply,
}

/// Sends `req` to the daemon at `path` and returns its reply lines.
pub fn request(path: &Path, req: &Request) -> Result<Replies<UnixStream>, ClientError> {
    let mut stream = connect(path)?;
    stream.write_all(encode_request(req).as_bytes())?;
    Ok(Replies::new(stream))
}

/// As [`request`], for a one-shot command: sending the request and each
/// reply line must take less than `deadline` ([`ClientError::NoAnswer`]
/// otherwise), so a wedged daemon cannot hang the command.
pub fn request_within(
    path: &Path,
    req: &Request,
    deadline: Duration,
) -> Result<Replies<UnixStream>, ClientError> {
    let mut stream = connect(path)?;
    stream.set_read_timeout(Some(deadline))?;
    stream.set_write_timeout(Some(deadline))?;
    stream
        .write_all(encode_request(req).as_bytes())
        .map_err(|e| timed_out(e, deadline))?;
    let mut replies = Replies::new(stream);
    replies.deadline = Some(deadline);
    Ok(replies)
}

fn timed_out(e: io::Error, deadline: Duration) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::NoAnswer(deadline),
        _ => ClientError::Io(e),
    }
}

fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.to_path_buf(),
            source,
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_path_buf(),
        },
        _ => ClientError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The reply lines of one request. Ends after `{"end":...}`; an error
/// reply, a line that is not a reply, or the connection closing before the
/// end are each yielded once as an error, then the iterator ends.
pub struct Replies<R> {
    reader: BufReader<R>,
    done: bool,
    /// Set by [`request_within`]: a read that times out is reported as such.
    deadline: Option<Duration>,
}

impl<R: Read> Replies<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader: BufReader::new(reader),
            done: false,
            deadline: None,
        }
    }

    fn next_line(&mut self) -> Result<Line, ClientError> {
        let mut buf = Vec::new();
        let limit = u64::try_from(MAX_REPLY_BYTES).unwrap_or(u64::MAX);
        let read = (&mut self.reader)
            .take(limit + 1)
            .read_until(b'\n', &mut buf);
        if let Err(e) = read {
            return Err(match self.deadline {
                Some(d) => timed_out(e, d),
                None => ClientError::Io(e),
            });
        }
        if buf.is_empty() {
            return Err(ClientError::Truncated);
        }
        if buf.last() != Some(&b'\n') {
            return Err(if buf.len() > MAX_REPLY_BYTES {
                ClientError::Protocol(format!("a line longer than {MAX_REPLY_BYTES} bytes"))
            } else {
                ClientError::Truncated
            });
        }
        buf.pop();
        let raw = String::from_utf8(buf)
            .map_err(|_| ClientError::Protocol("a line that is not UTF-8".to_string()))?;
        match decode_reply(raw.as_bytes()) {
            Ok(Reply::Error { error }) => Err(ClientError::Daemon(error)),
            Ok(reply) => Ok(Line { raw, reply }),
            Err(_) => Err(ClientError::Protocol(shorten(&raw))),
        }
    }
}

impl<R: Read> Iterator for Replies<R> {
    type Item = Result<Line, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let line = self.next_line();
        self.done = matches!(
            line,
            Err(_)
                | Ok(Line {
                    reply: Reply::End { .. },
                    ..
                })
        );
        Some(line)
    }
}

/// At most 200 characters of a line, for an error message.
fn shorten(line: &str) -> String {
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::End;

    fn lines(text: &str) -> Vec<Result<Line, ClientError>> {
        Replies::new(text.as_bytes()).collect()
    }

    #[test]
    fn reads_until_end() {
        let got = lines("{\"lagged\":3}\n{\"end\":\"complete\"}\n{\"lagged\":4}\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            matches!(&got[0], Ok(Line { reply: Reply::Lagged { lagged: 3 }, raw }) if raw == "{\"lagged\":3}")
        );
        assert!(matches!(
            &got[1],
            Ok(Line {
                reply: Reply::End { end: End::Complete },
                ..
            })
        ));
    }

    #[test]
    fn errors_end_the_reply() {
        let got = lines("{\"error\":\"bad request: x\"}\n{\"end\":\"complete\"}\n");
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Err(ClientError::Daemon(e)) if e == "bad request: x"));

        let got = lines("{\"lagged\":1}\n");
        assert!(
            matches!(got.as_slice(), [Ok(_), Err(ClientError::Truncated)]),
            "{got:?}"
        );
        let got = lines("{\"lagged\":1}");
        assert!(
            matches!(got.as_slice(), [Err(ClientError::Truncated)]),
            "{got:?}"
        );
        let got = lines("hello\n");
        assert!(matches!(got.as_slice(), [Err(ClientError::Protocol(l))] if l == "hello"));
    }

    #[test]
    fn a_daemon_that_never_answers_is_given_up_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        // Accepts (the backlog does) and never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let deadline = Duration::from_millis(200);
        let from = std::time::Instant::now();
        let got: Vec<_> = request_within(
            &path,
            &Request::Status(crate::control::protocol::StatusRequest {}),
            deadline,
        )
        .expect("connects")
        .collect();
        assert!(
            matches!(got.as_slice(), [Err(ClientError::NoAnswer(d))] if *d == deadline),
            "{got:?}"
        );
        assert!(
            from.elapsed() < Duration::from_secs(2),
            "{:?}",
            from.elapsed()
        );
    }

    #[test]
    fn messages_are_one_line_without_errno_noise() {
        let e = ClientError::NotRunning {
            path: PathBuf::from("/run/bulkhead/control.sock"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            e.to_string(),
            "no bulkhead daemon is running (cannot connect to /run/bulkhead/control.sock: No such file or directory)"
        );
        let long = "x".repeat(300);
        assert_eq!(shorten(&long).len(), 203);
    }
}
