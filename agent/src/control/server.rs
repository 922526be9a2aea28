//! The daemon's end of the control socket: a root-only Unix socket, one
//! request per connection, one task per client, a bounded number of
//! clients, and no client able to hold up the daemon or the event pipeline.

use std::{
    collections::HashSet,
    fs::{self, DirBuilder},
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
        BufWriter,
    },
    net::{unix::OwnedReadHalf, UnixListener, UnixStream},
    sync::{broadcast::error::RecvError, watch, Semaphore},
    task::{JoinHandle, JoinSet},
    time::timeout,
};
use tracing::{debug, info, warn};

use super::protocol::{
    decode_request, encode_event, encode_reply, End, FlowsRequest, Reply, Request,
    MAX_REQUEST_BYTES,
};
use crate::events::{FlowEvent, Hub};

/// Clients served at once; more are told to come back later.
const MAX_CLIENTS: usize = 32;
/// A client must send its request this soon after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that takes longer than this to accept a line is dropped (its
/// follower would otherwise pin a slot forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long clients get to receive `{"end":"shutdown"}`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Live events written per flush.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "another bulkhead daemon is already serving the control socket {}; stop it first, or give \
         this one its own (control.socket, --control-socket)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "control socket {}: something that is not a socket is in the way; refusing to replace it",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("control socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io { path, what, source }
}

/// The running control socket. [`Server::shutdown`] ends it gracefully;
/// dropping it (an error path) stops it at once. Either way the socket
/// file is removed if it is still the one this daemon made.
pub struct Server {
    path: PathBuf,
    /// Device and inode of our socket file.
    ident: (u64, u64),
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (mode 0600) and starts serving events from `hub`.
    /// Must run inside the tokio runtime.
    pub fn start(path: &Path, hub: Arc<Hub>) -> Result<Self, ServerError> {
        Self::start_with_admin(path, hub, None)
    }

    /// As [`Server::start`], forwarding status, quarantine and release
    /// requests to `admin` (the daemon's main loop, which owns the policy).
    pub fn start_with_admin(
        path: &Path,
        hub: Arc<Hub>,
        admin: Option<Admin>,
    ) -> Result<Self, ServerError> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        make_dir(&parent)?;
        clear_stale(path)?;
        let listener = bind_private(&parent, path)?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(path, "cannot make it non-blocking"))?;
        let listener = UnixListener::from_std(listener).map_err(io_err(path, "cannot poll it"))?;
        let meta = fs::symlink_metadata(path).map_err(io_err(path, "cannot stat it after bind"))?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, hub, admin, stop_rx));
        info!(socket = %path.display(), "control socket listening (root only)");
        Ok(Self {
            path: path.to_path_buf(),
            ident: (meta.dev(), meta.ino()),
            stop,
            task: Some(task),
        })
    }

    /// Tells every client the daemon is stopping, gives them
    /// [`SHUTDOWN_GRACE`] to read it, then closes everything.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // Drop removes the socket file.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Only our own file: a second daemon that was refused must not
        // remove the first one's socket, nor we a socket made after ours.
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!(socket = %self.path.display(), "cannot remove the control socket: {e}");
            }
        }
    }
}

/// Creates the socket's directory if needed: 0755, so that `bulkhead flows`
/// can reach the socket (which alone is root-only).
fn make_dir(dir: &Path) -> Result<(), ServerError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_err(dir, "cannot create its directory"))?;
    // The umask may have narrowed the mode.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(io_err(dir, "cannot set its directory's mode"))
}

/// Refuses if a daemon answers on `path` or if something that is not a
/// socket is there; removes nothing. Cheap enough for a pre-flight check
/// before anything is loaded ([`Server::start`] checks again).
pub fn ensure_free(path: &Path) -> Result<(), ServerError> {
    probe(path).map(|_| ())
}

/// Whether a socket file is at `path` that no daemon answers on (a
/// daemon that died left it); errors if one answers or it is not a socket.
fn probe(path: &Path) -> Result<bool, ServerError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path, "cannot inspect it")(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, "cannot tell whether a daemon is using it")(e)),
    }
}

/// Removes a socket file left by a daemon that died; refuses if a daemon
/// answers on it, or if the path is not a socket at all.
fn clear_stale(path: &Path) -> Result<(), ServerError> {
    if probe(path)? {
        fs::remove_file(path).map_err(io_err(path, "cannot remove the stale socket"))?;
        info!(socket = %path.display(), "removed a stale control socket (no daemon answered on it)");
    }
    Ok(())
}

/// Binds in a fresh 0700 directory, makes the socket 0600, then renames it
/// into place: nobody can connect while its mode is still the umask's, and
/// the process-wide umask (shared with the runtime's threads) is left alone.
fn bind_private(
    parent: &Path,
    path: &Path,
) -> Result<std::os::unix::net::UnixListener, ServerError> {
    let private = parent.join(format!(".bulkhead-ctl.{}", std::process::id()));
    // Left behind by an earlier process that had our pid and died mid-bind.
    let _ = fs::remove_dir_all(&private);
    DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err(
            &private,
            "cannot create a private directory to bind in",
        ))?;
    let tmp = private.join("s");
    let result = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(io_err(path, "cannot bind"))
        .and_then(|listener| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io_err(path, "cannot set its mode to 0600"))?;
            fs::rename(&tmp, path).map_err(io_err(path, "cannot move it into place"))?;
            Ok(listener)
        });
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&private);
    result
}

/// Where admin requests go, and how their answers come back.
pub type Admin = tokio::sync::mpsc::Sender<AdminCall>;

pub struct AdminCall {
    pub request: Request,
    pub reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, String>>,
}

async fn accept_loop(
    listener: UnixListener,
    hub: Arc<Hub>,
    admin: Option<Admin>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut clients = JoinSet::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        debug!("control socket: {MAX_CLIENTS} clients already; refusing one");
                        let busy = Reply::Error {
                            error: format!("the daemon already serves {MAX_CLIENTS} control clients; try again later"),
                        };
                        let mut line = encode_reply(&busy);
                        line.push(b'\n');
                        // Best effort, never blocking the accept loop.
                        let _ = stream.try_write(&line);
                        continue;
                    };
                    let hub = Arc::clone(&hub);
                    let stop = stop.clone();
                    let admin = admin.clone();
                    clients.spawn(async move {
                        if let Err(e) = serve(stream, &hub, admin, stop, euid).await {
                            debug!("control client: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather than spin.
                    warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    // Clients saw `stop` too and are sending their last line.
    let drained = timeout(SHUTDOWN_GRACE, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            "control socket: {} clients did not finish; closing them",
            clients.len()
        );
    }
    clients.abort_all();
}

/// A client's outgoing lines, each written under [`WRITE_TIMEOUT`].
struct Out<W> {
    w: BufWriter<W>,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    async fn line(&mut self, bytes: &[u8]) -> io::Result<()> {
        let write = async {
            self.w.write_all(bytes).await?;
            self.w.write_all(b"\n").await
        };
        timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
    }

    async fn reply(&mut self, reply: &Reply) -> io::Result<()> {
        self.line(&encode_reply(reply)).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        timeout(WRITE_TIMEOUT, self.w.flush())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
    }

    /// Sends `{"error":...}`; the connection ends after it.
    async fn error(&mut self, error: String) -> io::Result<()> {
        self.reply(&Reply::Error { error }).await?;
        self.flush().await
    }
}

async fn serve(
    stream: UnixStream,
    hub: &Hub,
    admin: Option<Admin>,
    stop: watch::Receiver<bool>,
    euid: u32,
) -> io::Result<()> {
    // The socket's mode already keeps others out; this also covers a
    // socket whose mode someone loosened.
    let uid = stream.peer_cred()?.uid();
    let (rd, wr) = stream.into_split();
    let mut out = Out {
        w: BufWriter::new(wr),
    };
    if uid != 0 && uid != euid {
        return out
            .error("permission denied: only root may use the control socket".to_string())
            .await;
    }
    let mut rd = BufReader::new(rd);
    let line = match timeout(REQUEST_TIMEOUT, read_request(&mut rd)).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return out.error(e).await,
        Err(_) => {
            return out
                .error(format!("no request within {REQUEST_TIMEOUT:?}"))
                .await
        }
    };
    match decode_request(&line) {
        Ok(Request::Flows(req)) => flows(&req, hub, rd, &mut out, stop).await,
        Ok(request) => {
            let Some(admin) = admin else {
                return out
                    .error("this daemon does not take commands".to_string())
                    .await;
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            if admin.send(AdminCall { request, reply }).await.is_err() {
                return out.error("the daemon is stopping".to_string()).await;
            }
            match answer.await {
                Ok(Ok(result)) => {
                    out.reply(&Reply::Result { result }).await?;
                    out.reply(&Reply::End { end: End::Complete }).await?;
                    out.flush().await
                }
                Ok(Err(e)) => out.error(e).await,
                Err(_) => out.error("the daemon is stopping".to_string()).await,
            }
        }
        Err(e) => out.error(e).await,
    }
}

/// One line of at most [`MAX_REQUEST_BYTES`], without its newline.
async fn read_request<R: AsyncBufRead + Unpin>(rd: &mut R) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REQUEST_BYTES).unwrap_or(u64::MAX);
    (&mut *rd)
        .take(limit + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    if line.is_empty() {
        return Err("empty request".to_string());
    }
    Ok(line)
}

async fn flows<W: AsyncWrite + Unpin>(
    req: &FlowsRequest,
    hub: &Hub,
    mut rd: BufReader<OwnedReadHalf>,
    out: &mut Out<W>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    // Subscribe before taking the history, so no event falls between the
    // two; the events in both are skipped below.
    let mut live = req.follow.then(|| hub.subscribe());
    let recent = hub.recent();
    let matching: Vec<&Arc<FlowEvent>> = recent.iter().filter(|ev| req.matches(ev)).collect();
    let skip = req.last.map_or(0, |n| matching.len().saturating_sub(n));
    for ev in &matching[skip..] {
        out.line(&encode_event(ev)).await?;
    }
    let Some(live) = live.as_mut() else {
        out.reply(&Reply::End { end: End::Complete }).await?;
        return out.flush().await;
    };
    out.flush().await?;

    // The hub shares one Arc per event between its history and its live
    // channel, so an address identifies an event; `recent` keeps them alive.
    let mut overlap: HashSet<usize> = recent.iter().map(|ev| Arc::as_ptr(ev) as usize).collect();
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            _ = stop.changed() => {
                out.reply(&Reply::End { end: End::Shutdown }).await?;
                return out.flush().await;
            }
            // One request per connection: EOF means the client left, and
            // anything more it sends is not ours to read.
            _ = rd.read(&mut byte) => return Ok(()),
            first = live.recv() => {
                let mut next = Some(first);
                let mut n = 0;
                while let Some(got) = next.take() {
                    match got {
                        Ok(ev) => {
                            if !overlap.is_empty() && overlap.contains(&(Arc::as_ptr(&ev) as usize)) {
                                // Already sent from the history.
                            } else {
                                // Past the overlap: nothing later can be in it.
                                overlap.clear();
                                if req.matches(&ev) {
                                    out.line(&encode_event(&ev)).await?;
                                }
                            }
                        }
                        Err(RecvError::Lagged(missed)) => {
                            hub.stats.subscriber_lagged.fetch_add(missed, Ordering::Relaxed);
                            out.reply(&Reply::Lagged { lagged: missed }).await?;
                        }
                        Err(RecvError::Closed) => {
                            out.reply(&Reply::End { end: End::Shutdown }).await?;
                            return out.flush().await;
                        }
                    }
                    n += 1;
                    if n < BATCH {
                        next = match live.try_recv() {
                            Ok(ev) => Some(Ok(ev)),
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(m)) => {
                                Some(Err(RecvError::Lagged(m)))
                            }
                            Err(_) => None,
                        };
                    }
                }
                out.flush().await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader as StdBufReader, Write as _},
        os::unix::net::UnixStream as StdUnixStream,
        sync::mpsc,
    };

    use super::*;
    use crate::{
        control::{
            client::{self, ClientError, Line},
            protocol::{tests::event, FlowsRequest},
        },
        events::{Sink, Verdict},
    };

    fn hub() -> Arc<Hub> {
        Arc::new(
            Hub::new(Sink::open("/dev/null").expect("/dev/null opens"))
                .expect("the writer thread starts"),
        )
    }

    fn ev(pid: u32, verdict: Verdict) -> FlowEvent {
        FlowEvent {
            pid,
            verdict: Some(verdict),
            ..event()
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o7777
    }

    /// Runs a blocking client request to completion on a thread.
    async fn ask(path: &Path, req: FlowsRequest) -> Vec<Result<Line, ClientError>> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || match client::request(&path, &Request::Flows(req)) {
            Ok(replies) => replies.collect(),
            Err(e) => vec![Err(e)],
        })
        .await
        .expect("client thread")
    }

    fn pids(lines: &[Result<Line, ClientError>]) -> Vec<u32> {
        lines
            .iter()
            .filter_map(|l| match l {
                Ok(Line {
                    reply: Reply::Event(ev),
                    ..
                }) => Some(ev.pid),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_recent_events_root_only_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/ctl.sock");
        let hub = hub();
        hub.publish(vec![
            ev(1, Verdict::Allow),
            ev(2, Verdict::Deny),
            ev(3, Verdict::Deny),
        ]);
        let server = Server::start(&path, Arc::clone(&hub)).expect("starts");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("run")), 0o755);
        // Nothing left of the private bind directory.
        let names: Vec<_> = fs::read_dir(dir.path().join("run"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["ctl.sock"]);

        let got = ask(
            &path,
            FlowsRequest {
                verdict: Some(Verdict::Deny),
                ..FlowsRequest::default()
            },
        )
        .await;
        assert_eq!(pids(&got), [2, 3]);
        assert!(matches!(
            got.last(),
            Some(Ok(Line {
                reply: Reply::End { end: End::Complete },
                ..
            }))
        ));
        let got = ask(
            &path,
            FlowsRequest {
                last: Some(1),
                ..FlowsRequest::default()
            },
        )
        .await;
        assert_eq!(pids(&got), [3]);

        server.shutdown().await;
        assert!(!path.exists(), "the socket file is removed on shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_one_error_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let _server = Server::start(&path, hub()).expect("starts");
        for (request, want) in [
            (
                "{\"v\":9,\"cmd\":\"flows\"}\n",
                "unsupported protocol version 9",
            ),
            ("{\"v\":1,\"cmd\":\"dance\"}\n", "unknown variant `dance`"),
            ("\n", "empty request"),
        ] {
            let path = path.clone();
            let reply = tokio::task::spawn_blocking(move || {
                let mut s = StdUnixStream::connect(&path).expect("connect");
                s.write_all(request.as_bytes()).expect("send");
                let mut lines = Vec::new();
                for line in StdBufReader::new(s).lines() {
                    lines.push(line.expect("read"));
                }
                lines
            })
            .await
            .expect("client thread");
            assert_eq!(reply.len(), 1, "{request:?}: {reply:?}");
            assert!(
                reply[0].starts_with("{\"error\":") && reply[0].contains(want),
                "{reply:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_daemon_per_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let first = Server::start(&path, hub()).expect("starts");
        let err = Server::start(&path, hub())
            .err()
            .expect("a live daemon answers");
        assert!(matches!(err, ServerError::InUse { .. }), "{err}");
        assert!(matches!(ensure_free(&path), Err(ServerError::InUse { .. })));
        drop(err);
        // The refused one did not take the socket away from the first.
        assert!(ask(&path, FlowsRequest::default()).await[0].is_ok());
        first.shutdown().await;

        // A socket nobody listens on is stale: replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(ensure_free(&path).is_ok(), "a stale socket is free to take");
        assert!(path.exists(), "ensure_free removes nothing");
        let second = Server::start(&path, hub()).expect("replaces a stale socket");
        assert!(ask(&path, FlowsRequest::default()).await[0].is_ok());
        drop(second);
        assert!(!path.exists(), "dropping the server removes its socket too");

        fs::write(&path, "not a socket").expect("write");
        let err = Server::start(&path, hub()).err().expect("not a socket");
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "not a socket");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follow_streams_each_event_once_then_ends_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let hub = hub();
        hub.publish(vec![ev(1, Verdict::Deny)]);
        let server = Server::start(&path, Arc::clone(&hub)).expect("starts");
        let (tx, rx) = mpsc::channel();
        let client_path = path.clone();
        let reader = std::thread::spawn(move || {
            let req = Request::Flows(FlowsRequest {
                follow: true,
                ..FlowsRequest::default()
            });
            for line in client::request(&client_path, &req).expect("connect") {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a line within 5 s")
        };
        assert_eq!(pids(&[next()]), [1], "the recent event first");
        hub.publish(vec![ev(2, Verdict::Allow), ev(3, Verdict::Deny)]);
        assert_eq!(pids(&[next(), next()]), [2, 3], "then live ones, once each");
        server.shutdown().await;
        assert!(matches!(
            next(),
            Ok(Line {
                reply: Reply::End { end: End::Shutdown },
                ..
            })
        ));
        reader.join().expect("reader thread");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_that_falls_behind_is_told_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let hub = hub();
        hub.publish(vec![ev(7, Verdict::Deny)]);
        let _server = Server::start(&path, Arc::clone(&hub)).expect("starts");
        let mut stream = StdUnixStream::connect(&path).expect("connect");
        stream
            .write_all(b"{\"v\":1,\"cmd\":\"flows\",\"follow\":true}\n")
            .expect("send");
        // The server subscribes before it sends the history: once the
        // history's one event is here, every later one goes live.
        let stream = tokio::task::spawn_blocking(move || {
            let mut first = String::new();
            let mut rd = StdBufReader::new(&mut stream);
            rd.read_line(&mut first).expect("history");
            assert!(first.contains("\"pid\":7"), "{first}");
            assert!(rd.buffer().is_empty(), "nothing else was sent yet");
            stream
        })
        .await
        .expect("client thread");
        // Far more than the socket buffer and the live channel hold, while
        // this client reads nothing.
        for chunk in 0..40u32 {
            hub.publish(
                (0..1000)
                    .map(|i| ev(chunk * 1000 + i, Verdict::Allow))
                    .collect(),
            );
        }
        let lines = tokio::task::spawn_blocking(move || {
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut lagged = 0;
            for line in StdBufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("{\"lagged\":") {
                    lagged += n.trim_end_matches('}').parse::<u64>().expect("a count");
                }
            }
            lagged
        })
        .await
        .expect("client thread");
        assert!(lines > 0, "a lagged notice");
        assert_eq!(hub.stats.subscriber_lagged.load(Ordering::Relaxed), lines);
    }
}
