//! The receiving end of `sd_notify`: a Unix datagram socket the daemon sends
//! `READY=1` to (its path goes in `$NOTIFY_SOCKET`).

use std::{
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A bound notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

/// How [`NotifySocket::wait_ready`] ended when it did not see `READY=1`.
#[derive(Debug)]
pub enum NotReady {
    /// `gave_up()` said to stop (e.g. the daemon exited).
    GaveUp,
    /// Nothing said `READY=1` in time.
    Timeout,
    /// The socket failed.
    Io(io::Error),
}

impl NotifySocket {
    /// Binds a datagram socket at `path` (which must not exist yet).
    #[must_use]
    pub fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("cannot bind notify socket {}: {e}", path.display()));
        Self {
            sock,
            path: path.to_path_buf(),
        }
    }

    /// The socket's path, the value for `NOTIFY_SOCKET`.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for a datagram with a `READY=1` line, calling
    /// `gave_up` between reads (every 100 ms); every datagram received is
    /// kept in `seen`.
    ///
    /// # Errors
    ///
    /// [`NotReady`] says why no `READY=1` came.
    pub fn wait_ready(
        &self,
        timeout: Duration,
        seen: &mut Vec<String>,
        mut gave_up: impl FnMut() -> bool,
    ) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        self.sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(NotReady::Io)?;
        let mut buf = vec![0u8; 4096];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let ready = msg.lines().any(|l| l.trim() == "READY=1");
                    seen.push(msg);
                    if ready {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(NotReady::Io(e)),
            }
            if gave_up() {
                return Err(NotReady::GaveUp);
            }
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout);
            }
        }
    }

    /// Every datagram waiting on the socket now, without blocking.
    #[must_use]
    pub fn pending(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.sock.set_nonblocking(true).is_err() {
            return out;
        }
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}
