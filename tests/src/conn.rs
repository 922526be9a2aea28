//! Running `bulkhead-conn`: traffic that keeps going while the test changes
//! what is enforced (reloads, restarts, quarantine).
//!
//! - [`ConnectLoop`]: a client in a service's cgroup connecting to a few
//!   addresses over and over, each attempt stamped with `CLOCK_MONOTONIC`
//!   ([`monotonic_ns`], the clock of the daemon's `ktime_ns`);
//! - [`HeldConn`]: one TCP connection kept open, to send on it later;
//! - [`Sink`]: a TCP server that reports every connection and every byte.
//!
//! Only integration tests know the binary's path
//! (`env!("CARGO_BIN_EXE_bulkhead-conn")`), so they get a `Conn` from the
//! [`conn!`](crate::conn!) macro, which expands there.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    eventually::eventually,
    process::{kill, wait_deadline},
};

/// How long a `bulkhead-conn` may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `CLOCK_MONOTONIC` now, in nanoseconds: comparable with the attempts'
/// stamps and with the daemon's `ktime_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// How `bulkhead-conn` runs: the binary and, optionally, the cgroup it joins.
#[derive(Debug, Clone)]
pub struct Conn {
    bin: PathBuf,
    cgroup: Option<PathBuf>,
    /// A [`ConnectLoop`]'s limit on one `connect()` (the binary's 2 s when
    /// `None`).
    connect_timeout: Option<Duration>,
    /// The one CPU it runs on, if pinned.
    cpu: Option<usize>,
}

impl Conn {
    /// Run from the test's own cgroup (unmanaged).
    #[must_use]
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            cgroup: None,
            connect_timeout: None,
            cpu: None,
        }
    }

    /// The same, run on CPU `cpu` only: the kernel's per-CPU state (the
    /// denial rate limit's, say) is then this CPU's alone.
    #[must_use]
    pub fn on_cpu(&self, cpu: usize) -> Self {
        Self {
            cpu: Some(cpu),
            ..self.clone()
        }
    }

    /// The same, run inside cgroup directory `dir` (a service).
    #[must_use]
    pub fn in_cgroup(&self, dir: &Path) -> Self {
        Self {
            cgroup: Some(dir.to_path_buf()),
            ..self.clone()
        }
    }

    /// The same, with a [`ConnectLoop`] that gives up on one `connect()`
    /// after `limit` ([`Verdict::Timeout`]) instead of 2 s: a loop that
    /// must show a change within a bound shorter than that, when an attempt
    /// may hang across the change (a quarantine drops the handshake of a
    /// connect it lands in the middle of).
    #[must_use]
    pub fn connect_timeout(&self, limit: Duration) -> Self {
        Self {
            connect_timeout: Some(limit),
            ..self.clone()
        }
    }

    fn spawn(&self, args: &[String]) -> Lines {
        let mut cmd = Command::new(&self.bin);
        if let Some(dir) = &self.cgroup {
            cmd.arg("--cgroup").arg(dir);
        }
        if let Some(cpu) = self.cpu {
            cmd.arg("--cpu").arg(cpu.to_string());
        }
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let what = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut guard = Lines {
            child,
            stdin,
            printed: Arc::clone(&lines),
            reader: None,
            what,
        };
        let Some(stdout) = stdout else {
            panic!("{}: no stdout pipe", guard.what);
        };
        guard.reader = Some(thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        }));
        guard
    }

    /// Starts connecting to each of `targets` in turn, over and over, with
    /// `pause` after each attempt, until [`ConnectLoop::stop`].
    #[must_use]
    pub fn connect_loop(&self, targets: &[SocketAddr], pause: Duration) -> ConnectLoop {
        let mut args = vec![
            "connect-loop".to_owned(),
            "--pause-us".to_owned(),
            pause.as_micros().to_string(),
        ];
        if let Some(limit) = self.connect_timeout {
            args.extend(["--timeout-ms".to_owned(), limit.as_millis().to_string()]);
        }
        args.extend(targets.iter().map(ToString::to_string));
        let lines = self.spawn(&args);
        lines.wait_line(READY_TIMEOUT, |l| l == "started");
        ConnectLoop { lines }
    }

    /// Connects to `addr` and keeps the connection; panics if the connect
    /// fails.
    #[must_use]
    pub fn hold(&self, addr: SocketAddr) -> HeldConn {
        let lines = self.spawn(&["hold".to_owned(), addr.to_string()]);
        let line = lines.wait_line(READY_TIMEOUT, |l| {
            l.starts_with("connected ") || l.starts_with("connect-error ")
        });
        let local = line
            .strip_prefix("connected ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{}: could not connect to {addr}: {line}", lines.what));
        HeldConn {
            lines,
            local,
            queries: 0,
        }
    }

    /// Calls `connect()` on one UDP socket `n` times, `pause` apart, to
    /// `ports` ports from `addr`'s on in turn, and waits until it is done;
    /// panics if a call fails.
    pub fn udp_paced(&self, n: u64, pause: Duration, ports: u16, addr: SocketAddr) {
        let lines = self.spawn(&[
            "udp-paced".to_owned(),
            n.to_string(),
            pause.as_micros().to_string(),
            ports.to_string(),
            addr.to_string(),
        ]);
        let want = format!("done {n}");
        lines.wait_line(READY_TIMEOUT, |l| l == want);
    }

    /// `sendto()`s one byte `n` times from one unconnected UDP socket, to
    /// `ports` ports from `addr`'s on in turn, and waits until it is done.
    /// Returns (calls that went out, calls refused with `EPERM`); panics on
    /// any other error.
    pub fn udp_sendto(&self, n: u64, ports: u16, addr: SocketAddr) -> (u64, u64) {
        let lines = self.spawn(&[
            "udp-sendto".to_owned(),
            n.to_string(),
            ports.to_string(),
            addr.to_string(),
        ]);
        let done = lines.wait_line(READY_TIMEOUT, |l| l.starts_with("done "));
        let mut counts = done.split_whitespace().skip(1).map(str::parse::<u64>);
        match (counts.next(), counts.next()) {
            (Some(Ok(sent)), Some(Ok(eperm))) => (sent, eperm),
            _ => panic!("{}: bad done line {done:?}", lines.what),
        }
    }

    /// `n` TCP sockets connect to `addr` (IPv4), where nothing listens, and
    /// stay open until the returned guard is dropped; waits until all were
    /// refused (panics otherwise).
    #[must_use]
    pub fn refused_hold(&self, n: usize, addr: SocketAddr) -> RefusedSockets {
        let lines = self.spawn(&["refused-hold".to_owned(), n.to_string(), addr.to_string()]);
        lines.wait_line(READY_TIMEOUT, |l| l == format!("refused {n}"));
        RefusedSockets { _lines: lines }
    }

    /// Connects a TCP socket bound to `addr` (IPv4) to that same address,
    /// a simultaneous open with itself, sends it `hello`, reads that back,
    /// closes it, and waits until it is done; panics on any error.
    pub fn self_connect(&self, addr: SocketAddr) {
        let lines = self.spawn(&["self-connect".to_owned(), addr.to_string()]);
        lines.wait_line(READY_TIMEOUT, |l| l == "self-connected");
    }

    /// Starts a TCP server on `addr` (port 0: any) and waits until it is bound.
    #[must_use]
    pub fn sink(&self, addr: SocketAddr) -> Sink {
        let lines = self.spawn(&["sink".to_owned(), addr.to_string()]);
        let line = lines.wait_line(READY_TIMEOUT, |l| l.starts_with("ready "));
        let addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{}: bad ready line {line:?}", lines.what));
        Sink { lines, addr }
    }
}

/// Sockets whose connect was refused, kept open by a `bulkhead-conn`
/// until dropped.
#[derive(Debug)]
pub struct RefusedSockets {
    _lines: Lines,
}

/// A running `bulkhead-conn` and the lines it printed; killed on `Drop`.
#[derive(Debug)]
struct Lines {
    child: Child,
    stdin: Option<ChildStdin>,
    printed: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    what: String,
}

impl Lines {
    fn snapshot(&self) -> Vec<String> {
        self.printed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn find(&self, matches: &impl Fn(&str) -> bool) -> Option<String> {
        self.printed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|l| matches(l))
            .cloned()
    }

    /// Waits up to `timeout` for a line `matches` accepts; `None` if none came.
    fn try_wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        eventually(timeout, Duration::from_millis(10), || {
            self.find(&matches).ok_or(())
        })
        .ok()
    }

    fn wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        self.try_wait_line(timeout, matches).unwrap_or_else(|| {
            panic!(
                "{}: no expected line within {timeout:?}; it printed {:?}",
                self.what,
                self.snapshot()
            )
        })
    }

    fn command(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            panic!("{}: stdin already closed", self.what);
        };
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot write {line:?} to it: {e}", self.what));
    }

    /// Closes stdin (the process exits), waits for it, and for every line.
    fn finish(&mut self, timeout: Duration) {
        drop(self.stdin.take());
        if wait_deadline(&mut self.child, timeout).is_none() {
            kill(&mut self.child);
            panic!(
                "{} did not exit within {timeout:?} of stdin closing",
                self.what
            );
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        drop(self.stdin.take());
        kill(&mut self.child);
    }
}

/// What one connect attempt of a [`ConnectLoop`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection was made.
    Ok,
    /// `connect()` failed with this errno (`EPERM`: denied).
    Errno(i32),
    /// No answer within the client's limit (2 s, or
    /// [`Conn::connect_timeout`]'s).
    Timeout,
}

/// One connect attempt: to which port, when (`CLOCK_MONOTONIC` ns around
/// `connect()`), and what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The destination port.
    pub port: u16,
    /// Just before `socket()`.
    pub start_ns: u64,
    /// Just after `connect()` returned.
    pub end_ns: u64,
    /// The outcome.
    pub verdict: Verdict,
}

impl Attempt {
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.strip_prefix("attempt ")?.split(' ');
        let port = f.next()?.parse().ok()?;
        let start_ns = f.next()?.parse().ok()?;
        let end_ns = f.next()?.parse().ok()?;
        let verdict = match f.next()? {
            "ok" => Verdict::Ok,
            "timeout" => Verdict::Timeout,
            other => Verdict::Errno(other.strip_prefix("errno:")?.parse().ok()?),
        };
        Some(Self {
            port,
            start_ns,
            end_ns,
            verdict,
        })
    }
}

/// A running `bulkhead-conn connect-loop`; killed on `Drop`.
#[derive(Debug)]
pub struct ConnectLoop {
    lines: Lines,
}

impl ConnectLoop {
    /// Every attempt reported so far, in order.
    #[must_use]
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lines
            .printed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|l| Attempt::parse(l))
            .collect()
    }

    /// How many attempts were reported so far.
    #[must_use]
    pub fn count(&self) -> usize {
        self.lines
            .printed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            .saturating_sub(1)
    }

    /// Waits up to `timeout` for an attempt that `matches` accepts and
    /// returns it; `None` if none came.
    #[must_use]
    pub fn wait_attempt(
        &self,
        timeout: Duration,
        matches: impl Fn(&Attempt) -> bool,
    ) -> Option<Attempt> {
        self.lines
            .try_wait_line(timeout, |l| Attempt::parse(l).is_some_and(|a| matches(&a)))
            .and_then(|l| Attempt::parse(&l))
    }

    /// Stops the loop and returns every attempt, in order.
    #[must_use]
    pub fn stop(mut self) -> Vec<Attempt> {
        self.lines.finish(Duration::from_secs(10));
        self.attempts()
    }
}

/// A running `bulkhead-conn hold`: one TCP connection; killed on `Drop`.
#[derive(Debug)]
pub struct HeldConn {
    lines: Lines,
    local: SocketAddr,
    /// Queries sent by [`HeldConn::query_for`] so far (numbers them).
    queries: u64,
}

impl HeldConn {
    /// The connection's local address (how the peer knows it).
    #[must_use]
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Writes `text` (no spaces) on the connection; panics unless `write()`
    /// took it (the kernel queues it: whether it arrives is the peer's to say).
    pub fn send(&mut self, text: &str) {
        self.lines.command(&format!("send {text}"));
        let want = format!("sent {text}");
        let line = self
            .lines
            .wait_line(READY_TIMEOUT, |l| l == want || l.starts_with("send-error "));
        assert_eq!(line, want, "{}: write of {text:?} failed", self.lines.what);
    }

    /// Writes `per_second` "queries" of `size` bytes a second for
    /// `duration`, paced by the clock (a client on a pooled connection).
    /// Each query is a distinct text, so each write's acknowledgement is
    /// its own.
    pub fn query_for(&mut self, size: usize, per_second: u32, duration: Duration) {
        let start = std::time::Instant::now();
        let every = Duration::from_secs(1) / per_second.max(1);
        let mut k = 0;
        loop {
            let due = start + every * k;
            if due >= start + duration {
                break;
            }
            k += 1;
            thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            self.queries += 1;
            let mut text = format!("q{}-", self.queries);
            text.extend(std::iter::repeat_n('x', size.saturating_sub(text.len())));
            self.send(&text);
        }
        thread::sleep((start + duration).saturating_duration_since(std::time::Instant::now()));
    }

    /// Whether `text` arrived from the peer within `timeout`.
    #[must_use]
    pub fn received_within(&self, text: &str, timeout: Duration) -> bool {
        let want = format!("recv {text}");
        self.lines
            .try_wait_line(timeout, |l| l.contains(&want))
            .is_some()
    }

    /// Whether the peer's close (`eof`) arrived within `timeout`.
    #[must_use]
    pub fn eof_within(&self, timeout: Duration) -> bool {
        self.lines.try_wait_line(timeout, |l| l == "eof").is_some()
    }

    /// Everything it printed.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.lines.snapshot()
    }
}

/// A running `bulkhead-conn sink`; killed on `Drop`.
#[derive(Debug)]
pub struct Sink {
    lines: Lines,
    addr: SocketAddr,
}

impl Sink {
    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes `text` (no spaces) to every connection accepted so far.
    pub fn send(&mut self, text: &str) {
        self.lines.command(&format!("send {text}"));
    }

    /// Shuts the write side of every connection accepted so far down (its
    /// FIN goes out; the connection stays open the other way); panics
    /// unless the one from `peer` was.
    pub fn close_to(&mut self, peer: SocketAddr) {
        self.lines.command("close");
        let want = format!("closed {peer}");
        let line = self.lines.wait_line(READY_TIMEOUT, |l| {
            l == want || l.starts_with(&format!("close-error {peer} "))
        });
        assert_eq!(line, want, "{}: shutdown failed", self.lines.what);
    }

    /// Whether `text` arrived from `peer` within `timeout`.
    #[must_use]
    pub fn received_within(&self, peer: SocketAddr, text: &str, timeout: Duration) -> bool {
        let want = format!("recv {peer} ");
        self.lines
            .try_wait_line(timeout, |l| {
                l.strip_prefix(&want).is_some_and(|t| t.contains(text))
            })
            .is_some()
    }

    /// Waits up to `timeout` for a connection from `peer`; panics if none.
    pub fn wait_accepted(&self, peer: SocketAddr, timeout: Duration) {
        let want = format!("accepted {peer}");
        self.lines.wait_line(timeout, |l| l == want);
    }

    /// Everything it printed.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.lines.snapshot()
    }
}
