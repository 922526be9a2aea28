//! The routes: `GET /metrics`, `GET /healthz`, `/graph`, `/graph.json`,
//! 404 for any other path; 421 for a `Host` that is not allowed
//! (`host.rs`). Connections are accepted in `listener.rs`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;
use tokio::{sync::Semaphore, task::JoinHandle};
use tracing::{error, info};

use super::{
    collector::{registry, render, Format},
    graph_cache::GraphCache,
    host::AllowedHosts,
    http_stats::HttpStats,
    listener::accept_loop,
    state::MetricsState,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    // The io error is part of the message, not a `source`: the CLI prints
    // the whole chain, and the hint reads best last.
    #[error("cannot listen for metrics on {addr}: {error}; choose another address with [metrics] listen in the config or --metrics-listen")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A bound listener that does not serve yet. The daemon binds before it
/// touches the kernel, so a taken port stops it before anything is loaded.
#[derive(Debug)]
pub struct Endpoint {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    hosts: AllowedHosts,
}

impl Endpoint {
    /// Binds `addr` (port 0 picks a free port: see [`Self::local_addr`]).
    ///
    /// # Errors
    /// The address cannot be bound; the message names it.
    pub fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let err = |error| MetricsError::Bind { addr, error };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(Self {
            listener,
            addr,
            hosts: AllowedHosts::default(),
        })
    }

    /// Also answers requests whose `Host` names one of `names` (`[metrics]
    /// allowed_hosts`); addresses and `localhost` always are.
    #[must_use]
    pub fn allow_hosts(mut self, names: &[String]) -> Self {
        self.hosts = AllowedHosts::new(names);
        self
    }

    /// The address actually bound.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `state` on the current tokio runtime until the returned
    /// server is dropped.
    ///
    /// # Errors
    /// The listener cannot be registered with the runtime.
    pub fn serve(self, state: Arc<MetricsState>) -> Result<MetricsServer, MetricsError> {
        let addr = self.addr;
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|error| MetricsError::Bind { addr, error })?;
        let app = Arc::new(App {
            registry: registry(Arc::clone(&state)),
            state: Arc::clone(&state),
            work: Semaphore::new(MAX_CONCURRENT_WORK),
            graph: GraphCache::default(),
            hosts: self.hosts,
        });
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/graph", get(graph_page))
            .route("/graph.json", get(graph_json))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(Arc::clone(&app), check_host))
            .with_state(app);
        let task = tokio::spawn(accept_loop(listener, router, state));
        info!(listen = %addr, "serving http://{addr}/metrics and /healthz");
        Ok(MetricsServer { addr, task })
    }
}

/// The running endpoint; stops serving when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Scrapes and graph renderings done at once (at most one of them a
/// rendering: graph_cache.rs); more wait their turn, so a burst of requests
/// cannot take more CPU than this (the daemon has two cores' worth of work
/// to do).
const MAX_CONCURRENT_WORK: usize = 2;

struct App {
    registry: Registry,
    state: Arc<MetricsState>,
    work: Semaphore,
    graph: GraphCache,
    hosts: AllowedHosts,
}

/// Refuses a request whose `Host` could be a rebound name (host.rs).
async fn check_host(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).map(|h| h.as_bytes());
    if app.hosts.allows(host) {
        return next.run(request).await;
    }
    HttpStats::bump(&app.state.http.refused_host);
    (
        StatusCode::MISDIRECTED_REQUEST,
        "Host not allowed: use an address or localhost, or list the name in [metrics] allowed_hosts\n",
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let Ok(_turn) = app.work.acquire().await else {
        // Only if the semaphore were closed, which it never is.
        return (StatusCode::SERVICE_UNAVAILABLE, "not serving metrics\n").into_response();
    };
    // A scrape reads a dozen kernel counters per service (one syscall
    // each): off the two async workers, which also drain the ring buffer.
    let shared = Arc::clone(&app);
    let rendered = tokio::task::spawn_blocking(move || render(&shared.registry, format)).await;
    match rendered {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Ok(Err(e)) => {
            error!("cannot encode the metrics: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
                .into_response()
        }
        Err(e) => {
            error!("metrics scrape failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response()
        }
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    match app.state.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

/// The service map (docs/graph.md): one self-contained page.
async fn graph_page(State(app): State<Arc<App>>) -> Response {
    let Some(shared) = app.state.graph() else {
        return not_found().await;
    };
    match app.graph.get(shared, &app.work, &app.state.http).await {
        Ok(rendered) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                ),
            ],
            rendered.html.clone(),
        )
            .into_response(),
        Err(e) => {
            error!("graph page failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "graph page failed\n").into_response()
        }
    }
}

async fn graph_json(State(app): State<Arc<App>>) -> Response {
    let Some(shared) = app.state.graph() else {
        return not_found().await;
    };
    match app.graph.get(shared, &app.work, &app.state.http).await {
        Ok(rendered) => (
            [(header::CONTENT_TYPE, "application/json")],
            rendered.json.clone(),
        )
            .into_response(),
        Err(e) => {
            error!("graph.json failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "graph.json failed\n").into_response()
        }
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: try /metrics, /healthz or /graph\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::metrics::fake::{fake_state, fake_state_with};

    /// One HTTP/1.0 request; returns (status, headers, body).
    async fn get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n");
        conn.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    fn serve() -> (MetricsServer, Arc<MetricsState>) {
        serve_state(fake_state())
    }

    fn serve_state(state: Arc<MetricsState>) -> (MetricsServer, Arc<MetricsState>) {
        let endpoint = Endpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        (endpoint.serve(Arc::clone(&state)).expect("serve"), state)
    }

    #[tokio::test]
    async fn metrics_in_both_formats() {
        let (server, _state) = serve();
        let (status, head, body) = get(server.local_addr(), "/metrics", "*/*").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            body.contains("bulkhead_events_received_total{type=\"verdict\"} 17"),
            "{body}"
        );

        let openmetrics = "application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1";
        let (status, head, body) = get(server.local_addr(), "/metrics", openmetrics).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn healthz_follows_attachment_and_consumer() {
        let (server, state) = serve();
        let addr = server.local_addr();
        let (status, _, body) = get(addr, "/healthz", "*/*").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        state.stats().consumer_alive.store(false, Ordering::Relaxed);
        let (status, _, body) = get(addr, "/healthz", "*/*").await;
        assert_eq!((status, body.as_str()), (503, "event consumer stopped\n"));
        state.set_attached(false);
        let (status, _, body) = get(addr, "/healthz", "*/*").await;
        assert_eq!((status, body.as_str()), (503, "programs not attached\n"));
    }

    #[tokio::test]
    async fn other_paths_are_404() {
        let (server, _state) = serve();
        for path in ["/", "/metrics/x", "/debug/pprof"] {
            let (status, _, _) = get(server.local_addr(), path, "*/*").await;
            assert_eq!(status, 404, "{path}");
        }
    }

    #[tokio::test]
    async fn a_foreign_host_is_refused_and_counted() {
        let (server, state) = serve();
        let addr = server.local_addr();
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /graph.json HTTP/1.0\r\nHost: rebound.example:9469\r\n\r\n")
            .await
            .expect("send");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.0 421"), "{response}");
        assert_eq!(HttpStats::get(&state.http.refused_host), 1);
        let (status, _, _) = get(addr, "/healthz", "*/*").await;
        assert_eq!(status, 200, "an address as Host is answered");
    }

    #[tokio::test]
    async fn the_graph_is_rendered_once_for_requests_within_its_ttl() {
        let (server, state) = serve_state(fake_state_with(Some(Arc::new(
            crate::graph::Shared::default(),
        ))));
        let addr = server.local_addr();
        let (status, _, first) = get(addr, "/graph.json", "*/*").await;
        assert_eq!(status, 200, "{first}");
        let (status, _, page) = get(addr, "/graph", "*/*").await;
        assert_eq!(status, 200, "{page}");
        let (_, _, second) = get(addr, "/graph.json", "*/*").await;
        assert_eq!(first, second, "served from the cache");
        assert_eq!(HttpStats::get(&state.http.graph_renders), 1);
        tokio::time::sleep(super::super::graph_cache::TTL).await;
        let _ = get(addr, "/graph.json", "*/*").await;
        assert_eq!(
            HttpStats::get(&state.http.graph_renders),
            2,
            "rendered again after the TTL"
        );
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        use super::super::listener::MAX_CONNECTIONS;
        let (server, state) = serve();
        let addr = server.local_addr();
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf))
            .await
            .expect("closed within 2 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(HttpStats::get(&state.http.refused_busy), 1);
        drop(idle);
    }

    /// The header timeout also ends a keep-alive connection left idle
    /// after a response (a new idle one: tests/tests/abuse.rs).
    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
        use super::super::listener::HEADER_TIMEOUT;
        let (server, _state) = serve();
        let addr = server.local_addr();
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        conn.write_all(request.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.expect("the response");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        let from = std::time::Instant::now();
        let closed = tokio::time::timeout(HEADER_TIMEOUT * 2, conn.read(&mut buf))
            .await
            .expect("closed within twice the timeout");
        assert!(matches!(closed, Ok(0)), "{closed:?}");
        assert!(from.elapsed() >= HEADER_TIMEOUT - std::time::Duration::from_millis(100));
    }

    #[test]
    fn a_taken_address_is_an_error_naming_it() {
        let first = Endpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let taken = first.local_addr();
        let err = Endpoint::bind(taken).expect_err("the port is taken");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen for metrics on {taken}: ")),
            "{err}"
        );
    }
}
