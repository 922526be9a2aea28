//! `bulkhead fleet serve`: the host map's page (graph/page.html) with the
//! fleet's graph, on a loopback listener. `/graph` is the page with the
//! data inlined, `/graph.json` the data alone; both read the fleet from
//! ClickHouse again on every request. Ctrl-C or SIGTERM stop it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::ExitCode,
    sync::Arc,
};

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{client, describe, fail};
use crate::{
    cli::args::FleetServeArgs,
    fleet::{model::Fleet, read, Client},
    graph,
};

/// Past this many instances the page carries no per-instance blast radius
/// (each is a walk of the whole fleet): the graph alone.
const PAGE_BLAST_LIMIT: usize = 1_000;

pub fn serve(args: &FleetServeArgs) -> ExitCode {
    if !args.listen.ip().is_loopback() {
        return fail(
            "serve",
            &format!(
                "--listen {}: not a loopback address; the fleet map shows every host's \
                 services and flows, so it is served on loopback only (reach it through \
                 an SSH tunnel or an authenticating proxy)",
                args.listen
            ),
        );
    }
    let client = match client(&args.clickhouse) {
        Ok(c) => c,
        Err(e) => return fail("serve", &e),
    };
    // Two threads: one serves, one reads ClickHouse and builds the page.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail("serve", &format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(client, args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("serve", &e),
    }
}

struct App {
    client: Client,
    /// One reading at a time: a burst of reloads queues instead of
    /// sending ClickHouse the same three queries many times over.
    reading: Semaphore,
}

async fn run(client: Client, listen: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!(
        "serving the fleet map of {} (database {}) at http://{addr}/graph",
        client.url(),
        client.database()
    );
    // A test or a script reads the address from this line: not buffered.
    let _ = std::io::stdout().flush();
    let app = Arc::new(App {
        client,
        reading: Semaphore::new(1),
    });
    let router = Router::new()
        .route("/", get(|| async { Redirect::to("/graph") }))
        .route("/graph", get(page))
        .route("/graph.json", get(data_json))
        .fallback(not_found)
        .layer(middleware::from_fn(check_host))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(stopped())
        .await
        .map_err(|e| format!("serving on {addr}: {e}"))
}

/// Ctrl-C or SIGTERM.
async fn stopped() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// The fleet read now, as the page's data (`graph::page`'s shape).
async fn read(app: &Arc<App>) -> Result<String, String> {
    let _turn = app
        .reading
        .acquire()
        .await
        .map_err(|_| "not serving".to_string())?;
    let app = Arc::clone(app);
    let handle = tokio::runtime::Handle::current();
    // Three queries and a walk of the fleet per instance: off the thread
    // that answers requests.
    tokio::task::spawn_blocking(move || {
        let fleet = read::load(app.client.database(), |sql| {
            handle
                .block_on(app.client.query(sql))
                .map_err(|e| anyhow::anyhow!(describe(&e)))
        })
        .map_err(|e| format!("{e:#}"))?;
        Ok(data(&fleet).to_string())
    })
    .await
    .map_err(|e| format!("reading the fleet failed: {e}"))?
}

/// The fleet's view, and for each instance what the page highlights when
/// it is selected: the nodes it reached or can reach, the lateral paths,
/// the unused allowances.
fn data(fleet: &Fleet) -> Value {
    let view = fleet.view();
    let node_ids: BTreeSet<&str> = view.nodes.iter().map(|n| n.id.as_str()).collect();
    let mut radius: BTreeMap<String, Value> = BTreeMap::new();
    let instances = fleet.instances();
    for s in instances.iter().take(PAGE_BLAST_LIMIT) {
        let Ok(b) = fleet.blast_radius(&s.name()) else {
            continue;
        };
        let reached = b.reached.iter().map(|r| (r.to.as_str(), r.dest.as_str()));
        let unused = b
            .unused
            .iter()
            .map(|a| format!("{} ports {} {} ({})", a.to, a.ports, a.protocol, a.rule));
        radius.insert(
            format!("service:{}", s.name()),
            graph::page::highlight(reached, &b.lateral, unused, &node_ids),
        );
    }
    json!({ "graph": view, "blast": radius, "generated": graph::now() })
}

async fn page(State(app): State<Arc<App>>) -> Response {
    match read(&app).await {
        Ok(data) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                ),
            ],
            graph::page::html_of(&data),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn data_json(State(app): State<Arc<App>>) -> Response {
    match read(&app).await {
        Ok(data) => ([(header::CONTENT_TYPE, "application/json")], data).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// ClickHouse did not answer, or answered an error: said to the browser
/// and on stderr.
fn unavailable(e: &str) -> Response {
    eprintln!("bulkhead fleet serve: {e}");
    (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: try /graph or /graph.json\n",
    )
        .into_response()
}

/// Refuses a request whose `Host` could be a name rebound to loopback by a
/// web page (DNS rebinding): only addresses and `localhost` are answered,
/// as on the metrics listener.
async fn check_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(host_allowed) {
        return next.run(request).await;
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        "Host not allowed: use an address or localhost\n",
    )
        .into_response()
}

/// `ADDR`, `ADDR:PORT`, `[V6]`, `[V6]:PORT`, `localhost`, `localhost:PORT`.
fn host_allowed(host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        // `[v6]:port`, `v4:port`, `localhost:port`; a bare v6 address has
        // colons too, but arrives in brackets.
        Some((name, port)) if port.parse::<u16>().is_ok() && !name.contains(':') => name,
        Some((name, port)) if port.parse::<u16>().is_ok() && name.ends_with(']') => name,
        _ => host.as_str(),
    };
    name == "localhost"
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4())
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<Ipv6Addr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_and_localhost_are_answered() {
        for ok in [
            "127.0.0.1:9470",
            "127.0.0.1",
            "LOCALHOST:9470",
            "localhost",
            "[::1]:9470",
            "[::1]",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9470",
            "127.0.0.1.evil.example",
            "::1",
            "localhost:99999",
            "[::1]x",
            "",
        ] {
            assert!(!host_allowed(refused), "{refused}");
        }
    }
}
