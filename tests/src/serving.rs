//! A long-running `bulkhead` command that is not the daemon (`bulkhead
//! fleet serve`): started with its output piped, its first stdout line
//! (where it says where it serves) read with a deadline, stopped by its
//! pid.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{
    daemon::bulkhead_bin,
    process::{kill, terminate},
};

/// How long the command may take to print its first line.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The running command; `Drop` SIGKILLs it if it still runs (never panics).
#[derive(Debug)]
pub struct Serving {
    child: Child,
    first_line: String,
}

impl Serving {
    /// `bulkhead ARGS`, waiting for its first stdout line; panics with its
    /// stderr if it exits or prints nothing within 10 s.
    #[must_use]
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bulkhead_bin())
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bulkhead {args:?}: {e}"));
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let mut out = BufReader::new(out);
                let _ = out.read_line(&mut line);
                let _ = tx.send(line);
                // Keep draining, so that the command never blocks on a
                // full pipe.
                let _ = std::io::copy(&mut out, &mut std::io::sink());
            }
        });
        let Ok(first_line) = rx.recv_timeout(START_TIMEOUT) else {
            kill(&mut child);
            panic!(
                "bulkhead {args:?} printed nothing within {START_TIMEOUT:?}: {}",
                stderr_of(&mut child)
            );
        };
        if first_line.is_empty() {
            let status = child.wait().ok();
            panic!(
                "bulkhead {args:?} exited ({status:?}) before printing: {}",
                stderr_of(&mut child)
            );
        }
        Self { child, first_line }
    }

    /// Its first stdout line, without the line end.
    #[must_use]
    pub fn first_line(&self) -> &str {
        self.first_line.trim_end()
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then up to `grace` for it to exit; its exit status, or
    /// `None` if it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        match terminate(&mut self.child, grace) {
            (status, false) => status,
            (_, true) => None,
        }
    }

    /// What it wrote to stderr, once it has exited.
    #[must_use]
    pub fn stderr(&mut self) -> String {
        stderr_of(&mut self.child)
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

impl Drop for Serving {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill(&mut self.child);
        }
    }
}
