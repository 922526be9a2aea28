//! Running child processes with deadlines, so no test can hang.

use std::{
    io::Read,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

/// How often a deadline wait polls the child.
const POLL: Duration = Duration::from_millis(10);

/// `base` times `BULKHEAD_TIMEOUT_SCALE` (a whole number, default 1): for
/// the bounds of heavy programs (a browser) that an emulated guest runs
/// many times slower (`cargo xtask test --kernel` sets it).
#[must_use]
pub fn scaled(base: Duration) -> Duration {
    let scale = std::env::var("BULKHEAD_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    base * scale
}

/// Runs `cmd` to completion and returns what it printed; panics (naming the
/// command) if it cannot start or is still running after `timeout`.
#[must_use]
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_output_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`output_with_timeout`], but says what went wrong instead of
/// panicking (for `Drop` code).
///
/// # Errors
///
/// A message naming the command if it cannot start or times out.
pub fn try_output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());
    let Some(status) = wait_deadline(&mut child, timeout) else {
        kill(&mut child);
        // What it printed before it hung says how far it got.
        return Err(format!(
            "{cmd:?} still running after {timeout:?}; killed it; it had printed {:?} \
             and on stderr {:?}",
            String::from_utf8_lossy(&stdout.so_far()),
            String::from_utf8_lossy(&stderr.so_far()),
        ));
    };
    Ok(Output {
        status,
        stdout: stdout.finish(),
        stderr: stderr.finish(),
    })
}

/// A pipe read to its end on a thread (so a full pipe cannot block the
/// child), into a buffer that can be looked at before the end.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: thread::JoinHandle<()>,
}

impl Capture {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let reader = thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 4096];
            // A read error just ends the capture; the exit status still counts.
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Self { buf, reader }
    }

    /// What was read so far, after a moment for the reader to catch up
    /// (the pipe may stay open in a grandchild, so no waiting for its end).
    fn so_far(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_millis(200);
        while !self.reader.is_finished() && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything, once the pipe has ended.
    fn finish(self) -> Vec<u8> {
        let _ = self.reader.join();
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        buf.clone()
    }
}

/// Waits for `child` until `timeout`; `None` if it is still running.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// SIGKILLs and reaps `child`, ignoring "already gone".
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to `pid`; false if the kernel refused (e.g. no such process).
#[expect(
    clippy::must_use_candidate,
    reason = "called for its effect; the result is a convenience"
)]
pub fn signal(pid: u32, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// SIGTERMs `child`, waits up to `grace`, then SIGKILLs it. Returns the exit
/// status and whether it had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> (Option<ExitStatus>, bool) {
    if let Ok(Some(status)) = child.try_wait() {
        return (Some(status), false);
    }
    signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_deadline(child, grace) {
        return (Some(status), false);
    }
    let _ = child.kill();
    (child.wait().ok(), true)
}

/// Sets the open-file limit (soft and hard) of process `pid`, as systemd's
/// `LimitNOFILE=` would: a daemon started by the harness inherits the test
/// runner's, which may be far higher than a service gets by default.
pub fn set_nofile(pid: u32, limit: u64) {
    let rl = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    let pid = libc::pid_t::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
    // SAFETY: a valid rlimit to read, no old value asked for.
    let rc = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &raw const rl,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        rc,
        0,
        "prlimit(RLIMIT_NOFILE) of {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// Raises this process's open-file soft limit to at least `min` (up to
/// the hard limit, which root may also raise).
pub fn raise_own_nofile(min: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rl) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    if rl.rlim_cur >= min {
        return;
    }
    rl.rlim_cur = min;
    rl.rlim_max = rl.rlim_max.max(min);
    // SAFETY: a valid rlimit to read.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rl) };
    assert_eq!(
        rc,
        0,
        "setrlimit(RLIMIT_NOFILE, {min}): {}",
        std::io::Error::last_os_error()
    );
}

/// Polls `GET path` of the server `child` serves at `addr` until `ready`
/// accepts the answer (status, body), for at most `timeout` (scaled). The
/// problem otherwise: the server exited, or its last answer.
///
/// # Errors
/// The server exited, or was not ready in time.
pub fn wait_http_ready(
    child: &mut Child,
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
    ready: impl Fn(u16, &str) -> bool,
) -> Result<(), String> {
    let timeout = scaled(timeout);
    let outcome = crate::eventually(timeout, Duration::from_millis(100), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Err(format!("exited with {status}")));
        }
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        match crate::http::try_http_request(addr, &request)? {
            (status, _, body) if ready(status, &body) => Ok(Ok(())),
            (status, _, body) => Err(format!("{path} answered {status} {body:?}")),
        }
    });
    match outcome {
        Ok(result) => result,
        Err(last) => Err(format!("not ready within {timeout:?} ({last})")),
    }
}

/// Stops a server the harness started (SIGTERM, then SIGKILL after
/// `grace`), saying so when it had to be killed.
pub fn stop_server(child: &mut Child, name: &str, grace: Duration) {
    let (_, killed) = terminate(child, grace);
    if killed {
        eprintln!(
            "{name} {} did not stop within {grace:?}; killed it",
            child.id()
        );
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS` of
/// `/proc/PID/status`); panics if it cannot be read.
#[must_use]
pub fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}
