//! Services that look names up the ordinary way: glibc's `getaddrinfo`
//! (the probe's `resolve-connect`/`resolve-loop`) or `curl`, reading an
//! `/etc/resolv.conf` and `/etc/nsswitch.conf` of the test's own that the
//! probe bind-mounts in a mount namespace of its own ([`ClientResolver`]).
//! The host's files are never touched.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    probe::Probe,
    process::{kill, output_with_timeout},
};

/// A `resolv.conf` naming one server (port 53: a resolv.conf has no port)
/// and an `nsswitch.conf` whose `hosts:` is `dns` alone, so that the
/// lookup goes to that server whatever the host's configuration says.
#[derive(Debug)]
pub struct ClientResolver {
    dir: TempDir,
}

impl ClientResolver {
    /// Files pointing at `server` (which must listen on port 53). Panics
    /// if nscd runs on this host: glibc would ask it (whatever
    /// nsswitch.conf says) instead of the test's resolver.
    #[must_use]
    pub fn new(server: SocketAddr) -> Self {
        for socket in ["/var/run/nscd/socket", "/run/nscd/socket"] {
            assert!(
                !Path::new(socket).exists(),
                "nscd runs on this host ({socket} exists): glibc asks it instead of the \
                 test's resolver, so these lookups would never reach the agent's proxy; \
                 stop nscd to run this test"
            );
        }
        assert_eq!(
            server.port(),
            53,
            "test bug: a resolv.conf cannot name port {}",
            server.port()
        );
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-resolv-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        // Two tries of 2 s: a lost datagram is retried, never waited on
        // for glibc's default 5 s.
        let resolv = format!("nameserver {}\noptions timeout:2 attempts:2\n", server.ip());
        write(&dir.path().join("resolv.conf"), &resolv);
        write(&dir.path().join("nsswitch.conf"), "hosts: dns\n");
        Self { dir }
    }

    /// `probe` with these files as its `/etc/resolv.conf` and
    /// `/etc/nsswitch.conf`.
    #[must_use]
    pub fn apply(&self, probe: &Probe) -> Probe {
        probe
            .bind_file(
                &self.dir.path().join("resolv.conf"),
                Path::new("/etc/resolv.conf"),
            )
            .bind_file(
                &self.dir.path().join("nsswitch.conf"),
                Path::new("/etc/nsswitch.conf"),
            )
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs `CMD ARGS` through `probe` (its cgroup, its mount namespace) to
/// completion, with a deadline.
#[must_use]
pub fn exec_in(probe: &Probe, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = probe.command();
    cmd.arg("exec").args(args);
    output_with_timeout(&mut cmd, timeout)
}

/// One batch of a [`ResolveLoop`]: exact counts.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rounds: u64,
    pub connected: u64,
    /// Connects refused with EPERM.
    pub eperm: u64,
    /// Lookups that failed (no answer, or no address).
    pub resolve_failed: u64,
    /// Connects or reads that failed otherwise.
    pub other_failed: u64,
    /// Address connected to -> rounds.
    pub peers: BTreeMap<String, u64>,
    /// The first failures, as text.
    pub errors: Vec<String>,
    /// The line as printed.
    pub json: String,
}

/// A running `bulkhead-probe resolve-loop`: a service process doing
/// lookup-then-connect rounds in batches the test asks for; killed on
/// `Drop`.
#[derive(Debug)]
pub struct ResolveLoop {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

/// How long the loop may take to start.
const LOOP_READY: Duration = Duration::from_secs(10);

impl ResolveLoop {
    /// Starts `probe resolve-loop NAME PORT` and waits until it is ready.
    #[must_use]
    pub fn start(probe: &Probe, name: &str, port: u16) -> Self {
        let mut cmd: Command = probe.command();
        cmd.args(["resolve-loop", name, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            kill(&mut child);
            panic!("{cmd:?}: no stdout pipe");
        };
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let run = Self {
            child,
            stdin,
            lines,
        };
        let first = run.lines.recv_timeout(LOOP_READY).unwrap_or_default();
        assert!(
            first.contains("\"ready\":true"),
            "{cmd:?} did not get ready: {first:?}"
        );
        run
    }

    /// Runs `rounds` rounds and returns their counts; panics if they do not
    /// finish within `timeout` (a generous bound, not a measurement).
    pub fn batch(&mut self, rounds: u64, timeout: Duration) -> Batch {
        let Some(stdin) = self.stdin.as_mut() else {
            panic!("resolve-loop: stdin already closed");
        };
        writeln!(stdin, "{rounds}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("resolve-loop: cannot ask for a batch: {e}"));
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!("resolve-loop: no report of a batch of {rounds} within {timeout:?} ({e})")
        });
        parse_batch(&line)
    }
}

fn parse_batch(line: &str) -> Batch {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("resolve-loop printed no JSON ({e}): {line:?}"));
    let n = |key: &str| {
        v.get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("resolve-loop: no {key} in {line}"))
    };
    Batch {
        rounds: n("rounds"),
        connected: n("connected"),
        eperm: n("eperm"),
        resolve_failed: n("resolve_failed"),
        other_failed: n("other_failed"),
        peers: v
            .get("peers")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        errors: v
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        json: line.to_owned(),
    }
}

impl Drop for ResolveLoop {
    fn drop(&mut self) {
        // Closing stdin ends the loop; kill covers a hung one.
        self.stdin = None;
        kill(&mut self.child);
    }
}
