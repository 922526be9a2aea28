//! The exporter against a real OTLP/HTTP receiver on loopback (axum).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse as _, Response},
    routing::post,
    Router,
};
use serde_json::{json, Value};

use super::{spawn, ExportConfig, ExportEvents, ExportStats};
use crate::events::{FlowEvent, Hub, Sink};

/// An answer: its status and its Retry-After.
type Answer = (u16, Option<&'static str>);

/// One request as the receiver got it: its headers and its body,
/// decompressed when it said gzip.
#[derive(Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    at: std::time::Instant,
}

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Received>>>,
    /// What the receiver answers (200 unless a test says otherwise).
    status: Arc<AtomicU16>,
    /// Answers given first, in order (status, Retry-After), before `status`.
    script: Arc<Mutex<std::collections::VecDeque<Answer>>>,
}

impl Receiver {
    fn received(&self) -> Vec<Received> {
        self.requests.lock().expect("lock").clone()
    }

    /// The log records of every JSON request so far.
    fn records(&self) -> Vec<Value> {
        self.received()
            .iter()
            .flat_map(|r| {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                v["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }
}

async fn logs(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let gzip = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let body = if gzip {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
            .expect("the body is gzip");
        out
    } else {
        body.to_vec()
    };
    r.requests.lock().expect("lock").push(Received {
        headers,
        body,
        at: std::time::Instant::now(),
    });
    let scripted = r.script.lock().expect("lock").pop_front();
    let (status, retry_after) = scripted.unwrap_or((r.status.load(Ordering::Relaxed), None));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    match retry_after {
        Some(after) => (status, [("retry-after", after)]).into_response(),
        None => status.into_response(),
    }
}

fn app(r: &Receiver) -> Router {
    Router::new()
        .route("/v1/logs", post(logs))
        .with_state(r.clone())
}

async fn receiver(at: SocketAddr, status: u16) -> (Receiver, SocketAddr) {
    let r = Receiver::default();
    r.status.store(status, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(at).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = app(&r);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (r, addr)
}

/// A receiver over TLS with a certificate for `localhost` from a CA of the
/// test's own; returns the CA's PEM file.
async fn tls_receiver(dir: &std::path::Path) -> (Receiver, SocketAddr, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bulkhead test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("server cert");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write the CA");

    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let r = Receiver::default();
    r.status.store(200, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = app(&r);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA fails the handshake.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (r, addr, ca_file)
}

/// Starts the exporter on `cfg`, with no `OTEL_*` environment.
fn start(cfg: &ExportConfig, hub: &Arc<Hub>, stats: &Arc<ExportStats>) -> super::Exporter {
    let settings = super::settings::resolve(cfg, &|_| None).expect("valid settings");
    spawn(cfg, settings, hub, Arc::clone(stats))
        .expect("the client starts")
        .expect("enabled")
}

fn hub() -> (Arc<Hub>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::open(dir.path().join("events.jsonl").to_str().expect("utf-8")).expect("sink");
    (
        Arc::new(Hub::new(sink).expect("the writer thread starts")),
        dir,
    )
}

fn config(addr: SocketAddr) -> ExportConfig {
    ExportConfig {
        otlp_endpoint: format!("http://{addr}/v1/logs"),
        batch_size: 4,
        flush_interval_ms: 50,
        queue_capacity: 8,
        timeout_ms: Some(1000),
        max_retries: 1,
        retry_initial_ms: 10,
        retry_max_ms: 20,
        ..ExportConfig::default()
    }
}

/// A denied connect of `pid`.
fn verdict(pid: u32) -> FlowEvent {
    FlowEvent {
        pid,
        tid: pid,
        ..crate::events::sample_verdict()
    }
}

fn anomaly() -> FlowEvent {
    let mut d = crate::anomaly::Detector::new(crate::anomaly::AnomalyConfig::default());
    for _ in 0..30 {
        d.observe(&verdict(1));
    }
    let found = d.tick(1_800_000_000);
    crate::anomaly::to_event(&found[0])
}

async fn eventually(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arrive_as_otlp_json_logs() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 200).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = start(&config(addr), &hub, &stats);
    let events: Vec<FlowEvent> = (1..=5).map(verdict).chain([anomaly()]).collect();
    hub.publish(events);
    // The exporter counts a batch as sent once the receiver has answered,
    // which is after the receiver holds the records.
    eventually("6 records at the receiver, counted as sent", || {
        r.records().len() == 6 && ExportStats::get(&stats.sent) == 6
    })
    .await;
    assert_eq!(stats.dropped(), 0);
    let first: Value = serde_json::from_slice(&r.received()[0].body).expect("JSON");
    let resource = &first["resourceLogs"][0]["resource"]["attributes"][0];
    assert_eq!(resource["key"], "service.name");
    assert_eq!(resource["value"]["stringValue"], "bulkhead");
    let records = r.records();
    let bodies: Vec<Value> = records
        .iter()
        .map(|rec| {
            serde_json::from_str(rec["body"]["stringValue"].as_str().expect("string body"))
                .expect("body is an event")
        })
        .collect();
    assert_eq!(
        bodies
            .iter()
            .map(|b| b["pid"].clone())
            .take(5)
            .collect::<Vec<_>>(),
        (1..=5).map(Value::from).collect::<Vec<_>>()
    );
    let verdict = &records[0];
    // 64-bit integers are strings in the protobuf JSON mapping.
    assert_eq!(verdict["timeUnixNano"], "1779268087123456789");
    assert_eq!(verdict["severityText"], "WARN", "a deny");
    assert_eq!(verdict["eventName"], "bulkhead.verdict");
    // The semantic-convention attributes (docs/events.md, "Field mapping"):
    // the denied connect of `billing` to 192.0.2.9:5432/tcp by pid 1.
    let attrs: Vec<(String, Value)> = verdict["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .map(|x| {
            let key = x["key"].as_str().expect("key").to_string();
            (key, x["value"].clone())
        })
        .collect();
    let expected = [
        ("bulkhead.event.type", json!({"stringValue": "verdict"})),
        ("bulkhead.service", json!({"stringValue": "billing"})),
        ("bulkhead.mode", json!({"stringValue": "enforce"})),
        (
            "bulkhead.rule",
            json!({"stringValue": "billing.toml#default-deny"}),
        ),
        (
            "bulkhead.traffic_direction",
            json!({"stringValue": "egress"}),
        ),
        ("bulkhead.verdict", json!({"stringValue": "deny"})),
        ("network.transport", json!({"stringValue": "tcp"})),
        ("network.type", json!({"stringValue": "ipv4"})),
        ("network.peer.address", json!({"stringValue": "192.0.2.9"})),
        ("network.peer.port", json!({"intValue": "5432"})),
        ("process.pid", json!({"intValue": "1"})),
        ("thread.id", json!({"intValue": "1"})),
        ("process.executable.name", json!({"stringValue": "curl"})),
        ("user.id", json!({"stringValue": "0"})),
    ]
    .map(|(k, v)| (k.to_string(), v));
    assert_eq!(attrs, expected.to_vec(), "{verdict:#}");
    let resource = &first["resourceLogs"][0]["resource"]["attributes"][2];
    assert_eq!(resource["key"], "host.name");
    assert_eq!(
        resource["value"]["stringValue"],
        crate::events::host::name(),
        "the name events carry"
    );
    assert_eq!(bodies[0]["host"], "web-1", "the event's own host field");
    let a = &records[5];
    assert_eq!(bodies[5]["type"], "anomaly");
    assert_eq!(a["eventName"], "bulkhead.anomaly");
    let attrs = a["attributes"].as_array().expect("attributes");
    assert!(
        attrs
            .iter()
            .any(|x| x["key"] == "bulkhead.anomaly.kind"
                && x["value"]["stringValue"] == "deny_burst"),
        "{a:#}"
    );
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_drops_and_counts_then_recovers() {
    // A free port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = start(&config(port), &hub, &stats);
    hub.publish((1..=40).map(verdict).collect());
    eventually("every event sent or dropped", || {
        ExportStats::get(&stats.dropped_queue_full) + ExportStats::get(&stats.dropped_retries) == 40
    })
    .await;
    assert!(
        ExportStats::get(&stats.dropped_queue_full) > 0,
        "queue of 8"
    );
    assert!(ExportStats::get(&stats.failed_requests) >= 2, "retried");
    assert_eq!(ExportStats::get(&stats.sent), 0);
    // The collector comes up on that port: new events get through.
    let (r, _) = receiver(port, 200).await;
    hub.publish(vec![verdict(99)]);
    eventually("the event after recovery", || {
        r.records().iter().any(|rec| {
            rec["body"]["stringValue"]
                .as_str()
                .is_some_and(|b| b.contains("\"pid\":99"))
        })
    })
    .await;
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_only_and_refused_batches_are_counted() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 400).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let cfg = ExportConfig {
        events: ExportEvents::Anomalies,
        ..config(addr)
    };
    let exporter = start(&cfg, &hub, &stats);
    hub.publish(vec![verdict(1), anomaly(), verdict(2)]);
    eventually("the refused anomaly", || {
        ExportStats::get(&stats.dropped_rejected) == 1
    })
    .await;
    let records = r.records();
    assert_eq!(
        records.len(),
        1,
        "a 400 is not retried; verdicts not exported"
    );
    assert!(records[0]["body"]["stringValue"]
        .as_str()
        .is_some_and(|b| b.contains("\"type\":\"anomaly\"")));
    exporter.abort();
}

/// A collector that answers 200 and then sends body chunks of `size`
/// bytes forever, one every `gap`; returns its address and how many body
/// bytes it managed to write before the exporter hung up.
async fn endless_collector(
    size: usize,
    gap: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = conn.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if conn.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("{size:x}\r\n{}\r\n", "x".repeat(size));
                while conn.write_all(chunk.as_bytes()).await.is_ok() {
                    count.fetch_add(size as u64, Ordering::Relaxed);
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
            });
        }
    });
    (addr, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_cut_at_the_cap() {
    let (addr, written) = endless_collector(0x4000, Duration::ZERO).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = start(&config(addr), &hub, &stats);
    hub.publish((1..=4).map(verdict).collect());
    eventually("the batch counted as sent", || {
        ExportStats::get(&stats.sent) == 4
    })
    .await;
    // Let the collector notice the hang-up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = written.load(Ordering::Relaxed);
    // The cap plus what the two kernels' socket buffers held.
    assert!(bytes < 16 * 1024 * 1024, "the exporter read {bytes} bytes");
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_answer_times_out() {
    let (addr, _) = endless_collector(1, Duration::from_millis(100)).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = start(&config(addr), &hub, &stats);
    hub.publish((1..=4).map(verdict).collect());
    // timeout_ms 1000, one retry: both attempts time out, the batch is
    // dropped and counted.
    eventually("the batch dropped after its retries", || {
        ExportStats::get(&stats.dropped_retries) == 4
    })
    .await;
    assert_eq!(ExportStats::get(&stats.failed_requests), 2);
    assert_eq!(ExportStats::get(&stats.sent), 0);
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_protobuf_and_headers_as_collectors_expect() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 200).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let mut cfg = ExportConfig {
        // The base form: `/v1/logs` is added.
        otlp_endpoint: format!("http://{addr}"),
        protocol: Some(super::Protocol::HttpProtobuf),
        compression: Some(super::Compression::Gzip),
        ..config(addr)
    };
    cfg.headers.insert("api-key".into(), "s3cret".into());
    let exporter = start(&cfg, &hub, &stats);
    hub.publish((1..=3).map(verdict).collect());
    eventually("3 records sent", || ExportStats::get(&stats.sent) == 3).await;
    let got = r.received();
    let first = &got[0];
    assert_eq!(first.headers["content-type"], "application/x-protobuf");
    assert_eq!(first.headers["content-encoding"], "gzip");
    assert_eq!(first.headers["api-key"], "s3cret");
    // The receiver decompressed it; it decodes as the OTLP message.
    let request: Vec<_> = got
        .iter()
        .map(|g| {
            <opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest as prost::Message>::decode(&g.body[..])
                .expect("an ExportLogsServiceRequest")
        })
        .collect();
    let records: Vec<_> = request
        .iter()
        .flat_map(|r| r.resource_logs[0].scope_logs[0].log_records.clone())
        .collect();
    assert_eq!(records.len(), 3);
    let rec = &records[0];
    assert_eq!(rec.event_name, "bulkhead.verdict");
    assert_eq!(rec.severity_text, "WARN");
    assert_eq!(rec.time_unix_nano, 1_779_268_087_123_456_789);
    let attr = |key: &str| {
        rec.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    assert_eq!(attr("network.peer.port"), Some(V::IntValue(5432)));
    assert_eq!(
        attr("network.peer.address"),
        Some(V::StringValue("192.0.2.9".into()))
    );
    assert_eq!(attr("process.pid"), Some(V::IntValue(1)));
    let Some(V::StringValue(body)) = rec.body.clone().and_then(|b| b.value) else {
        panic!("a string body: {rec:?}");
    };
    let ev: Value = serde_json::from_str(&body).expect("the event's JSON line");
    assert_eq!(ev["pid"], 1);
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_retried_after_that_long() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 200).await;
    r.script
        .lock()
        .expect("lock")
        .extend([(429, Some("1")), (503, None)]);
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let cfg = ExportConfig {
        max_retries: 3,
        ..config(addr)
    };
    let exporter = start(&cfg, &hub, &stats);
    hub.publish(vec![verdict(7)]);
    eventually("the record sent on the third try", || {
        ExportStats::get(&stats.sent) == 1
    })
    .await;
    let got = r.received();
    assert_eq!(got.len(), 3, "429, then 503, then 200");
    // Retry-After: 1 s, against a 10 ms backoff; then the backoff (20 ms).
    let waited = got[1].at - got[0].at;
    assert!(waited >= Duration::from_secs(1), "waited {waited:?}");
    assert!(got[2].at - got[1].at < Duration::from_secs(1));
    assert_eq!(ExportStats::get(&stats.failed_requests), 2);
    assert_eq!(stats.dropped(), 0);
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_answers_are_not_retried() {
    for status in [400, 401, 404, 408, 413, 500, 501] {
        let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), status).await;
        let (hub, _dir) = hub();
        let stats = Arc::new(ExportStats::default());
        let exporter = start(&config(addr), &hub, &stats);
        hub.publish(vec![verdict(1)]);
        eventually("the batch dropped as rejected", || {
            ExportStats::get(&stats.dropped_rejected) == 1
        })
        .await;
        assert_eq!(r.received().len(), 1, "HTTP {status} is not retried");
        exporter.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_ca_file_and_refused_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, addr, ca_file) = tls_receiver(dir.path()).await;
    let url = format!("https://localhost:{}", addr.port());
    // Trusting the test's CA: delivered.
    let (hub, _hub_dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let cfg = ExportConfig {
        otlp_endpoint: url.clone(),
        ca_file: Some(ca_file),
        ..config(addr)
    };
    let exporter = start(&cfg, &hub, &stats);
    hub.publish(vec![verdict(5)]);
    eventually("the record over TLS", || ExportStats::get(&stats.sent) == 1).await;
    assert_eq!(r.records().len(), 1);
    exporter.abort();
    // The system's trust store alone does not know the test's CA: the
    // handshake fails, the batch is retried and dropped, nothing arrives.
    let (hub2, _hub_dir2) = self::hub();
    let stats = Arc::new(ExportStats::default());
    let cfg = ExportConfig {
        otlp_endpoint: url,
        ..config(addr)
    };
    let exporter = start(&cfg, &hub2, &stats);
    hub2.publish(vec![verdict(6)]);
    eventually("the batch dropped after its retries", || {
        ExportStats::get(&stats.dropped_retries) == 1
    })
    .await;
    assert_eq!(r.records().len(), 1, "nothing more arrived");
    exporter.abort();
}
