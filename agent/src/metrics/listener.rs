//! The metrics listener's accept loop. Every connection costs the daemon a
//! file descriptor, and the daemon shares its descriptor limit with the
//! control socket and the kernel maps, so no local client may hold many:
//! at most [`MAX_CONNECTIONS`] are served (more are closed at once and
//! counted), a request's header must arrive within [`HEADER_TIMEOUT`]
//! (hyper's header timer, which also runs while a keep-alive connection
//! waits idle for its next request), and no connection lives longer than
//! [`CONNECTION_LIFETIME`].

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet, time::timeout};
use tracing::{debug, warn};

use super::{http_stats::HttpStats, state::MetricsState};

/// Connections served at once. Prometheus keeps one per server; this leaves
/// room for several scrapers and a few people looking at `/graph`.
pub const MAX_CONNECTIONS: usize = 64;
/// From the connection's start (or the end of its last response) to the
/// end of a request's header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// After this, a connection finishes the response in flight and closes; a
/// client that stopped reading a long response is cut off [`CLOSE_GRACE`]
/// later.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// hyper's read buffer, which bounds a request's header (its minimum).
const MAX_HEADER_BYTES: usize = 8192;

/// Serves `router` on `listener` until the task is aborted (which also
/// ends every connection: they live in this task's [`JoinSet`]).
pub async fn accept_loop(listener: TcpListener, router: Router, state: Arc<MetricsState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: back off, not spin.
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            HttpStats::bump(&state.http.refused_busy);
            debug!("metrics endpoint: {MAX_CONNECTIONS} connections open; closing one more");
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let state = Arc::clone(&state);
        connections.spawn(async move {
            state.http.open.fetch_add(1, Ordering::Relaxed);
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!("metrics connection: {e}");
                    }
                }
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = timeout(CLOSE_GRACE, conn).await;
                }
            }
            state.http.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}
